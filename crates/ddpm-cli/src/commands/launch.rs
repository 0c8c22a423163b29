//! `ddpm launch`: a whole distributed run on this host — the coordinator and N workers as
//! child processes, their logs prefixed with role and rank, all stopped together.

use super::{device, load_config};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
    /// After training, write a grid of this many EMA samples to run.out_dir/samples.png.
    #[arg(long, default_value_t = 0)]
    pub sample_n: i64,
    /// Where the coordinator listens (port 0: a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
}

/// A child process and its name in the logs.
struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
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

/// Starts `cmd` with its stdout and stderr piped; the child is killed if this process dies.
fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the child when
    // its parent (this process) dies, so no worker outlives a killed launcher.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {name} ({cmd:?})"))?;
    Ok(Proc {
        name: name.to_string(),
        child,
        status: None,
    })
}

/// Copies each line of `from` to stderr, prefixed with `[name]`.
fn forward(name: String, from: impl Read + Send + 'static) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            eprintln!("[{name}] {line}");
        }
    });
}

/// Reads the coordinator's first stdout line, `coordinator listening on ADDR`.
fn coordinator_address(p: &mut Proc) -> Result<String> {
    let stdout = p.child.stdout.take().context("coordinator stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        let _ = reader.read_line(&mut first);
        let _ = tx.send(first);
        for line in reader.lines() {
            let Ok(line) = line else { break };
            eprintln!("[coordinator] {line}");
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(120))
        .context("the coordinator did not say where it listens within 120 s")?;
    let addr = first
        .trim()
        .strip_prefix("coordinator listening on ")
        .with_context(|| format!("unexpected first line from the coordinator: {first:?}"))?;
    Ok(addr.to_string())
}

fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter_mut().filter(|p| p.status.is_none()) {
        let _ = p.child.kill();
        p.status = p.child.wait().ok();
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
    let mut procs = Vec::new();
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
    )?;
    forward("coordinator".into(), c.child.stderr.take().expect("piped"));
    let addr = match coordinator_address(&mut c) {
        Ok(addr) => addr,
        Err(e) => {
            procs.push(c);
            stop_all(&mut procs);
            return Err(e);
        }
    };
    procs.push(c);
    tracing::info!(coordinator = %addr, workers = a.workers, "launching");
    for rank in 0..a.workers {
        let name = format!("worker {rank}");
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
        match spawn(&name, &mut cmd) {
            Ok(mut p) => {
                forward(name.clone(), p.child.stdout.take().expect("piped"));
                forward(name, p.child.stderr.take().expect("piped"));
                procs.push(p);
            }
            Err(e) => {
                stop_all(&mut procs);
                return Err(e);
            }
        }
    }
    // Wait for every process; the first failure (or Ctrl-C) stops the rest.
    let failure = loop {
        if interrupted.load(Ordering::SeqCst) {
            break Some("interrupted (Ctrl-C)".to_string());
        }
        let mut failed = None;
        for p in procs.iter_mut().filter(|p| p.status.is_none()) {
            if let Some(s) = p.child.try_wait().context("waiting for a child")? {
                p.status = Some(s);
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
        std::thread::sleep(Duration::from_millis(100));
    };
    if let Some(why) = failure {
        stop_all(&mut procs);
        // Give the forwarding threads a moment to print the last lines of the failed process.
        std::thread::sleep(Duration::from_millis(200));
        bail!("{why}; stopped the other processes");
    }
    let secs = started.elapsed().as_secs_f64();
    let out = PathBuf::from(&cfg.run.out_dir);
    if a.sample_n > 0 {
        sample_grid(&out, a.sample_n, cfg.run.seed, &a.device)?;
    }
    println!("{}", summary(&cfg.run.name, &out, a.workers, secs)?);
    Ok(())
}

/// Writes a grid of `n` ancestral samples of the run's EMA weights to `out/samples.png`.
fn sample_grid(out: &Path, n: i64, seed: u64, device_arg: &str) -> Result<()> {
    let cfg = load_config(&out.join("config.toml"))?;
    let dev = device(if device_arg == "cuda" {
        "cuda:0"
    } else {
        "cpu"
    })?;
    let (_vs, net, _) = ddpm_trainer::load_model(&cfg, &out.join("ema.safetensors"), dev)?;
    let d = ddpm_diffusion::GaussianDiffusion::new(&cfg.diffusion, dev)?;
    super::sample::write_ancestral_grid(&d, &net, &cfg, n, seed, dev, &out.join("samples.png"))?;
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
