//! `ddpm status` against the real `coordinator` binary (built next to `ddpm`) on
//! 127.0.0.1:0, over TLS with a bearer token, with two workers registered through the
//! gRPC client and an evaluation result in the run's store.

mod common;

use ddpm_auth::test_pki::TestPki;
use ddpm_auth::{ClientSecurity, ClientTls, Token};
use ddpm_proto::v1::coordinator_client::CoordinatorClient;
use ddpm_proto::v1::{self, RegisterRequest};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const TOKEN: &str = "status-test-token-0a1b2c3d4e5f";

fn join(id: &str) -> RegisterRequest {
    RegisterRequest {
        protocol_version: ddpm_proto::PROTOCOL_VERSION,
        role: v1::Role::Worker.into(),
        requested_rank: None,
        host: format!("host-{id}"),
        device: "cpu".into(),
        member_id: id.into(),
        ring_address: format!("127.0.0.1:{}", 7000 + id.len()),
        nccl_unique_id: Vec::new(),
        failed_generation: 0,
    }
}

#[test]
fn status_shows_the_run_its_workers_the_checkpoint_and_the_newest_fid() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = TestPki::write(root).unwrap();
    let token_file = root.join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    // Two evaluation results in the run's store; the newer one is shown.
    let eval = root.join("checkpoints/st/eval");
    std::fs::create_dir_all(&eval).unwrap();
    std::fs::write(
        eval.join("step-20.json"),
        r#"{"fid": 30.0, "is_mean": 2.0, "is_std": 0.1}"#,
    )
    .unwrap();
    std::fs::write(
        eval.join("step-40.json"),
        r#"{"fid": 12.5, "is_mean": 4.2, "is_std": 0.3, "n": 100}"#,
    )
    .unwrap();
    let cfg = root.join("st.toml");
    std::fs::write(
        &cfg,
        format!(
            "[run]\nname = \"st\"\nout_dir = {:?}\n[train]\nbatch_size = 4\ntotal_steps = 50\n\
             [checkpoint]\nevery_steps = 10\n[distributed]\nworld_size = 2\n\
             [auth]\ntoken_file = {:?}\n[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            common::path(root),
            common::path(&token_file),
            common::path(&pki.server_cert),
            common::path(&pki.server_key),
        ),
    )
    .unwrap();
    let (mut coordinator, addr) =
        common::start_coordinator(&["--config", &common::path(&cfg)], Stdio::null());
    let url = format!("https://{addr}");

    let security = ClientSecurity {
        token: Some(Token::parse(TOKEN, "test").unwrap()),
        tls: ClientTls {
            ca_file: Some(pki.ca.clone()),
            ..ClientTls::default()
        },
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = security.endpoint(&url).unwrap().connect().await.unwrap();
        let mut c = CoordinatorClient::new(security.authorize(channel));
        c.register(join("a")).await.unwrap();
        c.register(join("bb")).await.unwrap();
        for rank in [0, 1] {
            c.report_progress(v1::ProgressReport {
                rank,
                generation: 1,
                step: 20 + u64::from(rank),
                loss: 0.25 + f64::from(rank),
                images_per_second: 100.0,
                ..Default::default()
            })
            .await
            .unwrap();
        }
        c.checkpoint_committed(v1::CheckpointNotice {
            rank: 0,
            generation: 1,
            step: 20,
            url: String::new(),
        })
        .await
        .unwrap();
    });

    let tls_args = ["--tls-ca", &common::path(&pki.ca)];
    let out = Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(["status", "--coordinator", &url])
        .args(tls_args)
        .args(["--token-file", &common::path(&token_file)])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0], "run st  running  generation 1  step 20/50  200.0 images/s  2 of 2 workers",
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("last checkpoint: step 20, ")
            && lines[1].ends_with("ago   last FID: FID 12.50 at step 40 (IS 4.20 ± 0.30)"),
        "{stdout}"
    );
    assert!(lines[2].starts_with("RANK  HOST"), "{stdout}");
    for (line, (rank, host, step, loss)) in lines[3..5].iter().zip([
        ("0", "host-a", "20", "0.2500"),
        ("1", "host-bb", "21", "1.2500"),
    ]) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cells[..6],
            [rank, host, "cpu", step, loss, "100.0"],
            "{stdout}"
        );
        assert!(line.ends_with(" ago"), "{stdout}");
    }

    // The token is taken from DDPM_AUTH_TOKEN when no file is given; without either, the
    // coordinator refuses and the error says why.
    let out = Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(["status", "--coordinator", &url])
        .args(tls_args)
        .env(ddpm_auth::TOKEN_ENV, TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(["status", "--coordinator", &url])
        .args(tls_args)
        .env_remove(ddpm_auth::TOKEN_ENV)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Unauthenticated") && stderr.contains("missing bearer token"),
        "{stderr}"
    );

    // --watch redraws until stopped.
    let mut watch = Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(["status", "--coordinator", &url, "--watch", "0.2"])
        .args(tls_args)
        .args(["--token-file", &common::path(&token_file)])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(watch.stdout.take().unwrap());
    let mut tables = 0;
    let mut line = String::new();
    while tables < 3 && reader.read_line(&mut line).unwrap() > 0 {
        tables += usize::from(line.starts_with("run st "));
        line.clear();
    }
    watch.kill().unwrap();
    watch.wait().unwrap();
    assert_eq!(tables, 3, "--watch printed the table {tables} time(s)");
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
}
