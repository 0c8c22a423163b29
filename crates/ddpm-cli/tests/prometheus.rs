//! End to end: a real Prometheus server (from `make test-tools`) on 127.0.0.1 scrapes a
//! short `ddpm launch` run of two workers (coordinator and workers with --metrics-listen,
//! and a bearer token that launch hands to its workers); its query API must return
//! ddpm_train_loss for every rank, ddpm_workers_alive equal to the world size, and the
//! workers' own step-time histograms.

mod common;

use common::{path, write_idx};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TOKEN: &str = "prometheus-e2e-token-5e6f7a8b9c";
const DEADLINE: Duration = Duration::from_secs(240);

fn prometheus_exe() -> PathBuf {
    let exe = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/prometheus/bin/prometheus");
    assert!(
        exe.is_file(),
        "{} is missing: run `make test-tools` (it unpacks Debian's prometheus package there)",
        exe.display()
    );
    exe
}

/// Kills (SIGKILL) and reaps a child when dropped, so a failing test leaves nothing behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(ok.success());
}

/// Lines of `from`, sent to the returned channel from a thread.
fn lines(from: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET /api/v1/query?query=`q` on the Prometheus at `addr`: the result vector (empty while
/// Prometheus is still starting, which it answers with 503).
fn query(addr: &str, q: &str) -> Vec<serde_json::Value> {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to prometheus");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET /api/v1/query?query={} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n",
        encode(q)
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    if response.starts_with("HTTP/1.1 503") {
        return Vec::new();
    }
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    // Prometheus answers small bodies with Content-Length; a chunked one starts with a size.
    let json = body
        .find('{')
        .map(|i| &body[i..body.rfind('}').map_or(body.len(), |j| j + 1)])
        .unwrap_or("");
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("query {q}: {e} in {response}"));
    assert_eq!(v["status"], "success", "query {q}: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn ranks(result: &[serde_json::Value]) -> BTreeSet<String> {
    result
        .iter()
        .filter_map(|r| r["metric"]["rank"].as_str().map(str::to_string))
        .collect()
}

fn config(dir: &Path, source: &str) -> PathBuf {
    // Many steps: the run is stopped once Prometheus has seen it.
    let text = format!(
        r#"[run]
name = "scraped"
seed = 1
out_dir = "{out}"
[data]
source = "{source}"
resolution = 16
channels = 1
[model]
ch = 32
ch_mult = [1, 2]
num_res_blocks = 1
attn_resolutions = []
dropout = 0.0
[diffusion]
num_timesteps = 100
[train]
batch_size = 4
total_steps = 1000000
log_every = 1
threads = 1
[distributed]
lease_secs = 20
[auth]
token_env = "DDPM_E2E_TOKEN"
"#,
        out = path(&dir.join("out")),
    );
    let file = dir.join("scraped.toml");
    std::fs::write(&file, text).unwrap();
    file
}

#[test]
fn prometheus_scrapes_a_launched_run_and_sees_every_rank() {
    let prometheus = prometheus_exe();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let idx = root.join("images.idx.gz");
    write_idx(&idx);
    let cfg = config(root, &format!("idx:{}", path(&idx)));
    let launch_log = root.join("launch.log");
    let mut launch = Reaped(
        Command::new(env!("CARGO_BIN_EXE_ddpm"))
            .arg("launch")
            .arg("--config")
            .arg(&cfg)
            .args(["--workers", "2", "--metrics-listen", "127.0.0.1:0"])
            .args(["--log-format", "json"])
            .env("DDPM_E2E_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&launch_log).unwrap())
            .spawn()
            .unwrap(),
    );
    let out = lines(launch.0.stdout.take().unwrap());
    let log = || std::fs::read_to_string(&launch_log).unwrap_or_default();
    let (mut coordinator, mut workers) = (None, Vec::new());
    let end = Instant::now() + DEADLINE;
    while coordinator.is_none() || workers.len() < 2 {
        let line = out
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| {
                panic!(
                    "ddpm launch printed no metrics addresses; its log:\n{}",
                    log()
                )
            });
        if let Some(a) = line.strip_prefix("coordinator metrics on ") {
            coordinator = Some(a.to_string());
        } else if let Some((_, a)) = line
            .strip_prefix("worker ")
            .and_then(|l| l.split_once(" metrics on "))
        {
            workers.push(a.to_string());
        }
    }
    let coordinator = coordinator.unwrap();

    let prom_dir = root.join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let targets = |addrs: &[String]| {
        addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let prom_cfg = prom_dir.join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  \
             - job_name: ddpm-coordinator\n    static_configs:\n      - targets: [{}]\n  \
             - job_name: ddpm-worker\n    static_configs:\n      - targets: [{}]\n",
            targets(std::slice::from_ref(&coordinator)),
            targets(&workers)
        ),
    )
    .unwrap();
    let mut server = Reaped(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", path(&prom_cfg)))
            .arg(format!(
                "--storage.tsdb.path={}",
                path(&prom_dir.join("data"))
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let prom_log = lines(server.0.stderr.take().unwrap());
    let prom_addr = loop {
        let line = prom_log
            .recv_timeout(end.saturating_duration_since(Instant::now()))
            .expect("prometheus said nothing about where it listens");
        if line.contains("msg=\"Listening on\"") {
            let a = line
                .split("address=")
                .nth(1)
                .expect("an address")
                .trim()
                .to_string();
            break a;
        }
    };

    // Until Prometheus has scraped both ranks' losses through the coordinator, both workers
    // alive, and each worker's own step histogram.
    let (loss_ranks, alive, step_ranks) = loop {
        let loss_ranks = ranks(&query(
            &prom_addr,
            "ddpm_train_loss{job=\"ddpm-coordinator\"}",
        ));
        let alive = query(&prom_addr, "ddpm_workers_alive");
        let step_ranks = ranks(&query(
            &prom_addr,
            "ddpm_train_step_seconds_count{job=\"ddpm-worker\"}",
        ));
        let two_alive = alive.len() == 1 && alive[0]["value"][1] == "2";
        if loss_ranks.len() == 2 && two_alive && step_ranks.len() == 2 {
            break (loss_ranks, alive, step_ranks);
        }
        assert!(
            launch.0.try_wait().unwrap().is_none(),
            "ddpm launch exited; its log:\n{}",
            log()
        );
        assert!(
            Instant::now() < end,
            "after {DEADLINE:?}: loss of ranks {loss_ranks:?}, workers alive {alive:?}, step histograms of ranks {step_ranks:?}; launch log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let want: BTreeSet<String> = ["0".to_string(), "1".to_string()].into();
    assert_eq!(loss_ranks, want);
    assert_eq!(step_ranks, want);
    assert_eq!(alive[0]["metric"]["component"], "coordinator", "{alive:?}");
    let losses = query(&prom_addr, "ddpm_train_loss{job=\"ddpm-coordinator\"}");
    for l in &losses {
        let v: f64 = l["value"][1].as_str().unwrap().parse().unwrap();
        assert!(v.is_finite() && v > 0.0, "{l}");
    }

    // Ctrl-C stops launch and every process it started; the token never reached the logs.
    signal(&launch.0, "-INT");
    let end = Instant::now() + Duration::from_secs(60);
    while launch.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "ddpm launch did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    }
    signal(&server.0, "-TERM");
    let _ = server.0.wait();
    let log = log();
    assert!(log.contains("interrupted (Ctrl-C)"), "{log}");
    assert!(!log.contains(TOKEN), "the token is in the launch log");

    // --log-format json reached every process: one JSON object per line, each step's
    // events in a span with the rank and the step, each RPC in a span naming the rank.
    let json = |prefix: &str| -> Vec<serde_json::Value> {
        log.lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    for rank in [0u64, 1] {
        let lines = json(&format!("[worker {rank}] "));
        assert!(
            lines.iter().any(|v| v["fields"]["message"] == "progress"
                && v["span"]["name"] == "step"
                && v["span"]["rank"] == rank
                && v["span"]["step"].as_u64() == v["fields"]["step"].as_u64()),
            "no progress event in a step span of rank {rank}:\n{log}"
        );
    }
    let coordinator_lines = json("[coordinator] ");
    assert!(
        coordinator_lines
            .iter()
            .any(|v| v["span"]["name"] == "register" && v["span"]["rank"].is_u64()),
        "no event in a register span with the rank:\n{log}"
    );
}
