//! The real `coordinator` binary on 127.0.0.1:0 with a bearer token, TLS and mutual TLS:
//! calls without the token, or with another one, are refused (UNAUTHENTICATED) and change
//! nothing; TLS clients connect with the generated CA; under mutual TLS a client without a
//! certificate is refused. The token appears in neither the logs nor /metrics.

mod common;

use anyhow::{bail, Context, Result};
use ddpm_auth::test_pki::TestPki;
use ddpm_auth::{AuthChannel, ClientSecurity, ClientTls, Token};
use ddpm_proto::v1::coordinator_client::CoordinatorClient;
use ddpm_proto::v1::{self, RunState};
use ddpm_proto::PROTOCOL_VERSION;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};

const DEADLINE: Duration = Duration::from_secs(60);
const TOKEN: &str = "test-token-7f3a9c2e5b1d4f6a8c0e";

struct Coordinator {
    child: Child,
    /// `coordinator listening on`, `... metrics on`, `... health on`.
    lines: Vec<String>,
    dir: tempfile::TempDir,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Coordinator {
    /// Starts the binary with `config_extra` appended to a small run's config, `args` and
    /// `env`; reads `expected_lines` lines of stdout.
    fn start(
        config_extra: &str,
        args: &[&str],
        env: &[(&str, &str)],
        expected_lines: usize,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("run.toml");
        std::fs::write(
            &cfg,
            format!(
                "[run]\nname = \"sec\"\nout_dir = {:?}\n[train]\nbatch_size = 4\ntotal_steps = 3\n\
                 [distributed]\nworld_size = 2\nlease_secs = 10\n{config_extra}",
                dir.path().display().to_string()
            ),
        )?;
        Self::start_with(dir, &cfg, args, env, expected_lines)
    }

    fn start_with(
        dir: tempfile::TempDir,
        cfg: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
        expected_lines: usize,
    ) -> Result<Self> {
        let stderr = std::fs::File::create(dir.path().join("stderr.log"))?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_coordinator"));
        cmd.arg("--config")
            .arg(cfg)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("starting the coordinator")?;
        let stdout = child.stdout.take().expect("piped");
        let rx = common::stdout_lines(stdout);
        let mut c = Self {
            child,
            lines: Vec::new(),
            dir,
        };
        for _ in 0..expected_lines {
            let line = rx
                .recv_timeout(DEADLINE)
                .with_context(|| format!("stdout ended early; stderr: {}", c.stderr()))?;
            c.lines.push(line);
        }
        Ok(c)
    }

    fn addr(&self, what: &str) -> String {
        let prefix = format!("coordinator {what} on ");
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {:?}", self.lines))
            .to_string()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    fn scrape(&self) -> Result<String> {
        let addr = self.addr("metrics");
        let mut s = std::net::TcpStream::connect(&addr)?;
        s.set_read_timeout(Some(DEADLINE))?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    }
}

async fn client(url: &str, security: &ClientSecurity) -> Result<CoordinatorClient<AuthChannel>> {
    let channel = security
        .endpoint(url)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    Ok(CoordinatorClient::new(security.authorize(channel)))
}

fn with_token(token: &str) -> ClientSecurity {
    ClientSecurity {
        token: Some(Token::parse(token, "test").unwrap()),
        tls: ClientTls::default(),
    }
}

fn join(id: &str) -> v1::RegisterRequest {
    v1::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        role: v1::Role::Worker.into(),
        requested_rank: None,
        host: format!("host-{id}"),
        device: "cpu".into(),
        member_id: id.into(),
        ring_address: "127.0.0.1:7001".into(),
        nccl_unique_id: Vec::new(),
        failed_generation: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_token_or_with_another_are_refused_and_change_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n"))?;
    let coord = Coordinator::start(
        "",
        &[
            "--token-file",
            token_file.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
            "--health-listen",
            "127.0.0.1:0",
        ],
        &[],
        3,
    )?;
    let url = format!("http://{}", coord.addr("listening"));
    let mut good = client(&url, &with_token(TOKEN)).await?;
    let mut a = good.register(join("a")).await?.into_inner();
    assert_eq!((a.rank, a.world_size), (0, 2));
    let before = good.status(v1::StatusRequest {}).await?.into_inner();

    let mut none = client(&url, &ClientSecurity::default()).await?;
    let mut wrong = client(&url, &with_token("test-token-7f3a9c2e5b1d4f6a8c0f")).await?;
    for (who, c) in [("no token", &mut none), ("a wrong token", &mut wrong)] {
        let reason = if who == "no token" {
            "missing"
        } else {
            "wrong"
        };
        let checks: Vec<(&str, tonic::Status)> = vec![
            ("Register", c.register(join("intruder")).await.unwrap_err()),
            (
                "Heartbeat",
                c.heartbeat(v1::HeartbeatRequest {
                    rank: 0,
                    generation: 1,
                    member_id: "a".into(),
                })
                .await
                .unwrap_err(),
            ),
            (
                "ReportProgress",
                c.report_progress(v1::ProgressReport {
                    rank: 0,
                    generation: 1,
                    step: 3,
                    ..Default::default()
                })
                .await
                .unwrap_err(),
            ),
            (
                "CheckpointCommitted",
                c.checkpoint_committed(v1::CheckpointNotice {
                    rank: 0,
                    generation: 1,
                    step: 2,
                    url: String::new(),
                })
                .await
                .unwrap_err(),
            ),
            ("Status", c.status(v1::StatusRequest {}).await.unwrap_err()),
        ];
        for (rpc, status) in checks {
            assert_eq!(
                status.code(),
                tonic::Code::Unauthenticated,
                "{rpc} with {who}: {status}"
            );
            assert!(
                status
                    .message()
                    .starts_with(&format!("{reason} bearer token")),
                "{rpc} with {who}: {}",
                status.message()
            );
        }
    }
    let after = good.status(v1::StatusRequest {}).await?.into_inner();
    // Everything but the time since the last heartbeat.
    let still = |mut s: v1::StatusResponse| {
        s.members
            .iter_mut()
            .for_each(|m| m.millis_since_heartbeat = 0);
        s
    };
    assert_eq!(
        still(after.clone()),
        still(before),
        "refused calls changed the run"
    );
    assert_eq!(after.members.len(), 1);
    assert_eq!(after.last_checkpoint_step, 0);
    assert_eq!(after.state, RunState::Waiting as i32);
    // The member that holds rank 0 is still the right one.
    a = good.register(join("a")).await?.into_inner();
    assert_eq!(a.rank, 0);

    // Health needs no token, on the gRPC port and on the plaintext health port.
    for addr in [url.clone(), format!("http://{}", coord.addr("health"))] {
        let mut h = HealthClient::new(
            tonic::transport::Channel::from_shared(addr.clone())?
                .connect()
                .await?,
        );
        for service in ["", "ddpm.v1.Coordinator"] {
            let r = h
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await?
                .into_inner();
            assert_eq!(
                r.status,
                ServingStatus::Serving as i32,
                "{addr} {service:?}"
            );
        }
    }

    let body = coord.scrape()?;
    for line in [
        "ddpm_rpc_unauthenticated_total{component=\"coordinator\",reason=\"missing\"} 5",
        "ddpm_rpc_unauthenticated_total{component=\"coordinator\",reason=\"wrong\"} 5",
    ] {
        assert!(body.contains(line), "no {line:?} in\n{body}");
    }
    let stderr = coord.stderr();
    assert!(
        stderr.contains("refused an RPC without the run's bearer token"),
        "{stderr}"
    );
    for (what, text) in [("/metrics", &body), ("the log", &stderr)] {
        assert!(!text.contains(TOKEN), "{what} shows the token");
        assert!(
            !text.contains("7f3a9c2e5b1d"),
            "{what} shows part of the token"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_from_the_variable_the_config_names_and_a_missing_variable_named() -> Result<()> {
    let coord = Coordinator::start(
        "[auth]\ntoken_env = \"DDPM_TEST_RUN_TOKEN\"\n",
        &[],
        &[("DDPM_TEST_RUN_TOKEN", TOKEN)],
        1,
    )?;
    let url = format!("http://{}", coord.addr("listening"));
    let mut good = client(&url, &with_token(TOKEN)).await?;
    assert_eq!(
        good.status(v1::StatusRequest {})
            .await?
            .into_inner()
            .run_name,
        "sec"
    );
    let mut none = client(&url, &ClientSecurity::default()).await?;
    let err = none.status(v1::StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // Without the variable the coordinator does not start, and says which variable and key.
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        "[train]\nbatch_size = 4\n[auth]\ntoken_env = \"DDPM_TEST_SURELY_UNSET\"\n",
    )?;
    let out = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .arg("--config")
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("DDPM_TEST_SURELY_UNSET")
        .output()?;
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "it listened before failing");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("DDPM_TEST_SURELY_UNSET") && stderr.contains("auth.token_env"),
        "{stderr}"
    );
    Ok(())
}

/// The certificate subject names are localhost and 127.0.0.1: the URL's host is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_connect_with_the_ca_and_refuse_another() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::write(dir.path())?;
    let coord = Coordinator::start(
        &format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            pki.server_cert.display().to_string(),
            pki.server_key.display().to_string()
        ),
        &[],
        &[],
        1,
    )?;
    let addr = coord.addr("listening");
    let trusting = ClientSecurity {
        token: None,
        tls: ClientTls {
            ca_file: Some(pki.ca.clone()),
            ..ClientTls::default()
        },
    };
    let mut c = client(&format!("https://{addr}"), &trusting).await?;
    assert_eq!(
        c.status(v1::StatusRequest {}).await?.into_inner().run_name,
        "sec"
    );
    // The name in the certificate, instead of the IP of the URL.
    let by_name = ClientSecurity {
        token: None,
        tls: ClientTls {
            ca_file: Some(pki.ca.clone()),
            server_name: Some("localhost".into()),
            ..ClientTls::default()
        },
    };
    let mut c = client(&format!("https://{addr}"), &by_name).await?;
    c.status(v1::StatusRequest {}).await?;

    let other = ClientSecurity {
        token: None,
        tls: ClientTls {
            ca_file: Some(pki.other_ca.clone()),
            ..ClientTls::default()
        },
    };
    match client(&format!("https://{addr}"), &other).await {
        Err(_) => {}
        Ok(mut c) => {
            let err = c.status(v1::StatusRequest {}).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        }
    }
    // Plaintext to the TLS port gets no answer either.
    match client(&format!("http://{addr}"), &ClientSecurity::default()).await {
        Err(_) => {}
        Ok(mut c) => {
            c.status(v1::StatusRequest {}).await.unwrap_err();
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_a_client_without_a_certificate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::write(dir.path())?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN)?;
    let coord = Coordinator::start(
        "",
        &[
            "--tls-cert",
            pki.server_cert.to_str().unwrap(),
            "--tls-key",
            pki.server_key.to_str().unwrap(),
            "--tls-client-ca",
            pki.ca.to_str().unwrap(),
            "--token-file",
            token_file.to_str().unwrap(),
        ],
        &[],
        1,
    )?;
    let url = format!("https://{}", coord.addr("listening"));
    let with_cert = ClientSecurity {
        token: Some(Token::parse(TOKEN, "test")?),
        tls: ClientTls {
            ca_file: Some(pki.ca.clone()),
            cert_file: Some(pki.client_cert.clone()),
            key_file: Some(pki.client_key.clone()),
            server_name: None,
        },
    };
    let mut c = client(&url, &with_cert).await?;
    let r = c.register(join("a")).await?.into_inner();
    assert_eq!(r.rank, 0);

    // The certificate is not enough without the token.
    let cert_no_token = ClientSecurity {
        token: None,
        ..with_cert.clone()
    };
    let mut c = client(&url, &cert_no_token).await?;
    let err = c.status(v1::StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");

    // The token is not enough without the certificate: the handshake fails.
    let token_no_cert = ClientSecurity {
        token: Some(Token::parse(TOKEN, "test")?),
        tls: ClientTls {
            ca_file: Some(pki.ca.clone()),
            ..ClientTls::default()
        },
    };
    let refused = match client(&url, &token_no_cert).await {
        Err(e) => format!("connect: {e:?}"),
        Ok(mut c) => match c.register(join("intruder")).await {
            Err(e) => {
                assert_ne!(e.code(), tonic::Code::Ok);
                format!("call: {e}")
            }
            Ok(r) => bail!("a client without a certificate registered: {r:?}"),
        },
    };
    let mut c = client(&url, &with_cert).await?;
    let status = c.status(v1::StatusRequest {}).await?.into_inner();
    assert_eq!(
        status
            .members
            .iter()
            .map(|m| m.member_id.as_str())
            .collect::<Vec<_>>(),
        ["a"],
        "after {refused}"
    );
    Ok(())
}
