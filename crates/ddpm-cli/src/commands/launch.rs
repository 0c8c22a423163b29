//! `ddpm launch`: a whole distributed run on this host — the coordinator, N workers and
//! (when the config sets `eval.reference`) the evaluator as child processes, their logs
//! prefixed with role and rank, all stopped together.

use super::load_config;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::{BufRead, BufReader, Read};
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

/// Reads the coordinator's first stdout line, `coordinator listening on ADDR`, then
/// forwards the rest. Fails (after printing its last words) if it exits before.
fn coordinator_address(p: &mut Proc) -> Result<String> {
    let stdout = p.child.stdout.take().context("coordinator stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    p.forwarders.push(std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        let _ = reader.read_line(&mut first);
        let _ = tx.send(first);
        for line in reader.lines() {
            let Ok(line) = line else { break };
            eprintln!("[coordinator] {line}");
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
/// finish once every worker has exited.
fn supervise(procs: &mut [Proc], coordinator_first: bool, interrupted: &AtomicBool) -> Result<()> {
    let mut workers_done: Option<Instant> = None;
    let failure = loop {
        if interrupted.load(Ordering::SeqCst) {
            break Some("interrupted (Ctrl-C)".to_string());
        }
        let mut failed = None;
        for p in procs.iter_mut() {
            if let Some(s) = p.poll()? {
                if !s.success() && failed.is_none() {
                    failed = Some(format!("{} exited with {s}", p.name));
                }
            }
        }
        if failed.is_some() {
            break failed;
        }
        if procs.iter().all(|p| p.status.is_some()) {
            break None;
        }
        let workers = procs
            .iter()
            .skip(1)
            .filter(|p| p.name.starts_with("worker"));
        if coordinator_first && workers.clone().all(|p| p.status.is_some()) {
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
    match failure {
        Some(why) => bail!("{why}; stopped the other processes"),
        None => Ok(()),
    }
}

/// Runs `ddpm launch`.
pub fn run(a: LaunchArgs) -> Result<()> {
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
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let started = Instant::now();
    let mut c = spawn(
        "coordinator",
        Command::new(&coordinator)
            .arg("--config")
            .arg(&a.config)
            .args([
                "--world-size",
                &a.workers.to_string(),
                "--listen",
                &a.listen,
            ]),
        true,
    )?;
    let addr = coordinator_address(&mut c)?;
    let mut procs = vec![c];
    tracing::info!(coordinator = %addr, workers = a.workers, "launching");
    for rank in 0..a.workers {
        let mut cmd = Command::new(&worker);
        cmd.args(["--coordinator", &format!("http://{addr}")])
            .args(["--rank", &rank.to_string()])
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
        match spawn(&format!("worker {rank}"), &mut cmd, false) {
            Ok(p) => procs.push(p),
            Err(e) => {
                procs.iter_mut().for_each(Proc::stop);
                return Err(e);
            }
        }
    }
    if !cfg.eval.reference.is_empty() && !a.no_eval {
        // It evaluates checkpoints as they are committed and exits once the run is over and
        // every due checkpoint has its result.
        let mut cmd = Command::new(sibling("evaluator")?);
        cmd.args(["--coordinator", &format!("http://{addr}")])
            .args(["--device", if cuda { "cuda:0" } else { "cpu" }]);
        if !cuda {
            cmd.args(["--threads", "1"]);
        }
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
