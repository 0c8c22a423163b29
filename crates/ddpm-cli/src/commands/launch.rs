//! `ddpm launch`: a whole distributed run on this host — the coordinator, N workers and
//! (when the config sets `eval.reference`) the evaluator as child processes, their logs
//! prefixed with role and rank, all stopped together. The config's `[auth]` token reaches
//! the workers and the evaluator through their environment, its `[tls]` client files
//! through their flags.

use super::load_config;
use anyhow::{bail, Context, Result};
use clap::Args;
use ddpm_telemetry::LogFormat;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Arguments of `ddpm launch`.
#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Config file (TOML); distributed.world_size is replaced by --workers.
    #[arg(long)]
    pub config: PathBuf,
    /// Workers to start (ranks 0..N).
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// cpu (the workers all-reduce over TCP), or cuda (worker K on GPU K).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Intra-op threads per worker (default: train.threads, or the CPUs divided among the
    /// workers on cpu).
    #[arg(long)]
    pub threads_per_worker: Option<i64>,
    /// After training, write a grid of this many EMA samples to run.out_dir/samples.png
    /// (`ddpm sample`, ancestral, all T steps, seeded with run.seed).
    #[arg(long, default_value_t = 0)]
    pub sample_n: i64,
    /// Do not start the evaluator even though the config sets `eval.reference`.
    #[arg(long)]
    pub no_eval: bool,
    /// Where the coordinator listens (port 0: a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Serve Prometheus metrics: the coordinator's at ADDR, each worker's on ADDR's IP (port
    /// 0: free ports; else PORT+1+rank). Stdout gets `coordinator metrics on IP:PORT` and
    /// `worker R metrics on IP:PORT` lines as soon as each is known.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Test mode: every worker records the samples of each step in the data ledger in DIR
    /// (`worker --ledger DIR`); check it afterwards with `ddpm ledger DIR`.
    #[arg(long, value_name = "DIR")]
    pub ledger: Option<PathBuf>,
}

/// How long the coordinator may take to finish after every worker exited successfully.
const COORDINATOR_GRACE: Duration = Duration::from_secs(30);

/// A child process, its name in the logs and the threads copying its output.
struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    forwarders: Vec<JoinHandle<()>>,
}

impl Proc {
    /// Whether it has exited (recording the status).
    fn poll(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Kills it if it still runs, reaps it, and waits until its last lines are printed.
    fn stop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        for f in self.forwarders.drain(..) {
            let _ = f.join();
        }
    }
}

/// The directory holding this executable, where `coordinator` and `worker` are built too.
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the ddpm executable")?;
    let path = exe.with_file_name(name);
    anyhow::ensure!(
        path.is_file(),
        "{} not found next to {} (build every binary: cargo build --release --bins)",
        path.display(),
        exe.display()
    );
    Ok(path)
}

/// Copies each line of `from` to stderr, prefixed with `[name]`.
fn forward(name: String, from: impl Read + Send + 'static) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            eprintln!("[{name}] {line}");
        }
    })
}

/// Copies a worker's stdout like [`forward`], except its `worker metrics on ADDR` line, which
/// goes to this process's stdout as `worker RANK metrics on ADDR`.
fn forward_worker_stdout(
    name: String,
    rank: u32,
    from: impl Read + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            match line.strip_prefix("worker metrics on ") {
                Some(addr) => {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "worker {rank} metrics on {addr}");
                    let _ = out.flush();
                }
                None => eprintln!("[{name}] {line}"),
            }
        }
    })
}

/// Starts `cmd` with its stderr (and stdout unless `keep_stdout`) forwarded; the child is
/// killed if this process dies.
fn spawn(name: &str, cmd: &mut Command, keep_stdout: bool) -> Result<Proc> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls between fork and exec. PR_SET_PDEATHSIG asks the
    // kernel to kill the child when the launcher dies, so no worker outlives it; if the
    // launcher died before the prctl took effect, the child exits at once.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {name} ({cmd:?})"))?;
    let mut forwarders = vec![forward(name.into(), child.stderr.take().expect("piped"))];
    if !keep_stdout {
        forwarders.push(forward(name.into(), child.stdout.take().expect("piped")));
    }
    Ok(Proc {
        name: name.to_string(),
        child,
        status: None,
        forwarders,
    })
}

/// Reads the coordinator's first stdout line, `coordinator listening on ADDR`, and with
/// `metrics` the next, `coordinator metrics on ADDR` (printed on this process's stdout),
/// then forwards the rest. Fails (after printing its last words) if it exits before.
fn coordinator_address(p: &mut Proc, metrics: bool) -> Result<String> {
    let stdout = p.child.stdout.take().context("coordinator stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    p.forwarders.push(std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        let _ = reader.read_line(&mut first);
        let _ = tx.send(first);
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if metrics && line.starts_with("coordinator metrics on ") {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            } else {
                eprintln!("[coordinator] {line}");
            }
        }
    }));
    let first = rx.recv_timeout(Duration::from_secs(120));
    let addr = first
        .as_deref()
        .ok()
        .and_then(|l| l.trim().strip_prefix("coordinator listening on "))
        .map(str::to_string);
    match addr {
        Some(a) => Ok(a),
        None => {
            p.stop();
            match first {
                Ok(l) if l.is_empty() => bail!(
                    "the coordinator exited ({}) before listening; its log is above",
                    p.status.map_or("unknown status".into(), |s| s.to_string())
                ),
                Ok(l) => bail!("unexpected first line from the coordinator: {l:?}"),
                Err(_) => bail!("the coordinator did not say where it listens within 120 s"),
            }
        }
    }
}

/// Waits for every process; the first failure or Ctrl-C stops the rest. With
/// `coordinator_first`, `procs[0]` is the coordinator, which gets [`COORDINATOR_GRACE`] to
/// finish once every worker has exited. An evaluator that fails does not stop the
/// training: it is reported, and makes the launch fail at the end.
fn supervise(procs: &mut [Proc], coordinator_first: bool, interrupted: &AtomicBool) -> Result<()> {
    let mut workers_done: Option<Instant> = None;
    let mut side_failure: Option<String> = None;
    let failure = loop {
        if interrupted.load(Ordering::SeqCst) {
            break Some("interrupted (Ctrl-C)".to_string());
        }
        let mut failed = None;
        for p in procs.iter_mut() {
            let was_running = p.status.is_none();
            if let Some(s) = p.poll()? {
                if s.success() || !was_running {
                    continue;
                }
                let why = format!("{} exited with {s}", p.name);
                if p.name == "evaluator" {
                    eprintln!("[launch] {why}; training goes on without it (its log is above)");
                    side_failure.get_or_insert(why);
                } else if failed.is_none() {
                    failed = Some(why);
                }
            }
        }
        if failed.is_some() {
            break failed;
        }
        if procs.iter().all(|p| p.status.is_some()) {
            break None;
        }
        let mut workers = procs.iter().filter(|p| p.name.starts_with("worker"));
        // Only while the coordinator runs: the evaluator may score the final checkpoint
        // for long after the coordinator finished.
        if coordinator_first && procs[0].status.is_none() && workers.all(|p| p.status.is_some()) {
            let since = *workers_done.get_or_insert_with(Instant::now);
            if since.elapsed() > COORDINATOR_GRACE {
                break Some(format!(
                    "every worker exited, but the coordinator did not finish the run within {COORDINATOR_GRACE:?}"
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for p in procs.iter_mut() {
        p.stop();
    }
    match failure.or(side_failure) {
        Some(why) => bail!("{why}; stopped the other processes"),
        None => Ok(()),
    }
}

/// Runs `ddpm launch`.
/// `log_format` (ddpm's global `--log-format`) applies to every process it starts too.
pub fn run(a: LaunchArgs, log_format: LogFormat) -> Result<()> {
    anyhow::ensure!(a.workers >= 1, "--workers: expected >= 1");
    let mut cfg = load_config(&a.config)?;
    cfg.distributed.world_size = a.workers as i64;
    cfg.validate().map_err(|(key, reason)| {
        anyhow::anyhow!(
            "{} with --workers {}: key `{key}`: {reason}",
            a.config.display(),
            a.workers
        )
    })?;
    let cuda = match a.device.as_str() {
        "cpu" => false,
        "cuda" => true,
        other => bail!("--device: expected cpu or cuda, got {other:?}"),
    };
    let threads = a.threads_per_worker.or_else(|| {
        (!cuda && cfg.train.threads == 0).then(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cpus / a.workers as usize).max(1) as i64
        })
    });
    let (coordinator, worker) = (sibling("coordinator")?, sibling("worker")?);
    let evaluator = match cfg.eval.reference.is_empty() || a.no_eval {
        true => None,
        false => Some(sibling("evaluator")?),
    };
    // The token, read now so that a missing file or variable stops the launch before
    // anything starts; the workers get it in their environment, never on a command line.
    let token = ddpm_auth::Token::from_config(&cfg.auth)
        .with_context(|| format!("[auth] of {}", a.config.display()))?;
    let tls = !cfg.tls.cert_file.is_empty();
    let client_tls = ddpm_auth::ClientTls::from_config(&cfg.tls);
    anyhow::ensure!(
        cfg.tls.client_ca_file.is_empty() || client_tls.cert_file.is_some(),
        "{}: tls.client_ca_file makes the coordinator require client certificates: set tls.client_cert_file and tls.client_key_file for the workers ddpm launch starts",
        a.config.display()
    );
    let log_format = match log_format {
        LogFormat::Human => "human",
        LogFormat::Json => "json",
    };
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let started = Instant::now();
    let mut coordinator_cmd = Command::new(&coordinator);
    coordinator_cmd.arg("--config").arg(&a.config).args([
        "--world-size",
        &a.workers.to_string(),
        "--listen",
        &a.listen,
        "--log-format",
        log_format,
    ]);
    if let Some(m) = a.metrics_listen {
        coordinator_cmd.args(["--metrics-listen", &m.to_string()]);
    }
    let mut c = spawn("coordinator", &mut coordinator_cmd, true)?;
    let addr = coordinator_address(&mut c, a.metrics_listen.is_some())?;
    let url = format!("{}://{addr}", if tls { "https" } else { "http" });
    let mut procs = vec![c];
    // The token through the environment (never on a command line), the TLS client files
    // through flags: for every client process this launch starts.
    let secure = |cmd: &mut Command| {
        match &token {
            Some(t) => cmd.env(ddpm_auth::TOKEN_ENV, t.expose()),
            None => cmd.env_remove(ddpm_auth::TOKEN_ENV),
        };
        for (flag, file) in [
            ("--tls-ca", &client_tls.ca_file),
            ("--tls-cert", &client_tls.cert_file),
            ("--tls-key", &client_tls.key_file),
        ] {
            if let (true, Some(f)) = (tls, file) {
                cmd.arg(flag).arg(f);
            }
        }
        if let (true, Some(name)) = (tls, &client_tls.server_name) {
            cmd.args(["--tls-server-name", name]);
        }
    };
    tracing::info!(coordinator = %addr, workers = a.workers, "launching");
    for rank in 0..a.workers {
        let mut cmd = Command::new(&worker);
        cmd.args(["--coordinator", &url])
            .args(["--rank", &rank.to_string()])
            .args(["--log-format", log_format])
            .args([
                "--device",
                &if cuda {
                    format!("cuda:{rank}")
                } else {
                    "cpu".into()
                },
            ]);
        if let Some(t) = threads {
            cmd.args(["--threads", &t.to_string()]);
        }
        if let Some(dir) = &a.ledger {
            cmd.arg("--ledger").arg(dir);
        }
        if let Some(m) = a.metrics_listen {
            let port = if m.port() == 0 {
                0
            } else {
                m.port()
                    .checked_add(1 + rank as u16)
                    .context("--metrics-listen: the workers' ports would pass 65535")?
            };
            cmd.args([
                "--metrics-listen",
                &SocketAddr::new(m.ip(), port).to_string(),
            ]);
        }
        secure(&mut cmd);
        let name = format!("worker {rank}");
        match spawn(&name, &mut cmd, true) {
            Ok(mut p) => {
                let stdout = p.child.stdout.take().expect("piped");
                p.forwarders.push(forward_worker_stdout(name, rank, stdout));
                procs.push(p)
            }
            Err(e) => {
                procs.iter_mut().for_each(Proc::stop);
                return Err(e);
            }
        }
    }
    if let Some(evaluator) = &evaluator {
        // It evaluates checkpoints as they are committed and exits once the run is over and
        // every due checkpoint has its result.
        let mut cmd = Command::new(evaluator);
        cmd.args(["--coordinator", &url])
            .args(["--device", if cuda { "cuda:0" } else { "cpu" }])
            .args(["--log-format", log_format]);
        if !cuda {
            cmd.args(["--threads", "1"]);
        }
        secure(&mut cmd);
        match spawn("evaluator", &mut cmd, false) {
            Ok(p) => procs.push(p),
            Err(e) => {
                procs.iter_mut().for_each(Proc::stop);
                return Err(e);
            }
        }
    }
    supervise(&mut procs, true, &interrupted)?;
    let secs = started.elapsed().as_secs_f64();
    let out = PathBuf::from(&cfg.run.out_dir);
    if a.sample_n > 0 {
        let mut sampler = spawn(
            "sample",
            Command::new(std::env::current_exe().context("locating ddpm")?)
                .arg("sample")
                .arg("--config")
                .arg(out.join("config.toml"))
                .arg("--weights")
                .arg(out.join("ema.safetensors"))
                .arg("--out")
                .arg(out.join("samples.png"))
                .args(["--n", &a.sample_n.to_string(), "--sampler", "ddpm"])
                .args(["--seed", &cfg.run.seed.to_string()])
                .args(["--device", if cuda { "cuda:0" } else { "cpu" }]),
            false,
        )?;
        // Through the same supervision: Ctrl-C stops the sampling too.
        supervise(std::slice::from_mut(&mut sampler), false, &interrupted)?;
    }
    println!("{}", summary(&cfg.run.name, &out, a.workers, secs)?);
    Ok(())
}

/// One line: run, steps, final loss, time, where the weights are.
fn summary(run: &str, out: &Path, workers: u32, secs: f64) -> Result<String> {
    let log = out.join("train_log.jsonl");
    let text =
        std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let last: serde_json::Value = text
        .lines()
        .last()
        .map(serde_json::from_str)
        .transpose()
        .with_context(|| format!("{}: last line", log.display()))?
        .with_context(|| format!("{} is empty", log.display()))?;
    Ok(format!(
        "{run}: step {} on {workers} workers in {secs:.1} s, loss {:.4}, {:.1} images/s; weights in {}",
        last["step"],
        last["loss"].as_f64().unwrap_or(f64::NAN),
        last["images_per_second"].as_f64().unwrap_or(f64::NAN),
        out.display()
    ))
}
