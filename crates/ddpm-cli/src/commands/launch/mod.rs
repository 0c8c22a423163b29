//! `ddpm launch`: a whole distributed run on this host — the coordinator, N workers and
//! (when the config sets `eval.reference`) the evaluator as child processes, their logs
//! prefixed with role and rank, all stopped together. The config's `[auth]` token reaches
//! the workers and the evaluator through their environment, its `[tls]` client files
//! through their flags.

mod procs;

use super::load_config;
use anyhow::{bail, Context, Result};
use clap::Args;
use ddpm_telemetry::LogFormat;
use procs::{
    coordinator_address, forward_worker_stdout, sibling, spawn, supervise, OnFailure, Proc,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

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
    /// Start a worker or the coordinator that fails (exits non-zero, or is killed) again,
    /// as a Kubernetes StatefulSet restarts its pod, up to N times in all: a worker with its
    /// rank, the coordinator on its address. The run goes on in a new generation from the
    /// newest committed checkpoint. 0: the first failure stops every process (except
    /// workers beyond elastic.min_workers, without which the run goes on).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_restarts: u32,
    /// Test mode: every worker records the samples of each step in the data ledger in DIR
    /// (`worker --ledger DIR`); check it afterwards with `ddpm ledger DIR`.
    #[arg(long, value_name = "DIR")]
    pub ledger: Option<PathBuf>,
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
    let coordinator_cmd = |listen: &str| {
        let mut cmd = Command::new(&coordinator);
        cmd.arg("--config").arg(&a.config).args([
            "--world-size",
            &a.workers.to_string(),
            "--listen",
            listen,
            "--log-format",
            log_format,
        ]);
        if let Some(m) = a.metrics_listen {
            cmd.args(["--metrics-listen", &m.to_string()]);
        }
        cmd
    };
    let mut c = spawn("coordinator", &mut coordinator_cmd(&a.listen), true)?;
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
    let start_worker = |rank: u32| -> Result<Proc> {
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
        let mut p = spawn(&name, &mut cmd, true)?;
        let stdout = p.child.stdout.take().expect("piped");
        p.forwarders.push(forward_worker_stdout(name, rank, stdout));
        Ok(p)
    };
    tracing::info!(coordinator = %addr, workers = a.workers, "launching");
    for rank in 0..a.workers {
        match start_worker(rank) {
            Ok(p) => procs.push(p),
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
    // Process i of `procs`: 0 the coordinator (again on the address it bound first, which
    // the workers know), 1..=N the workers.
    let mut respawn = |i: usize| -> Result<Proc> {
        if i == 0 {
            let mut c = spawn("coordinator", &mut coordinator_cmd(&addr), true)?;
            coordinator_address(&mut c, a.metrics_listen.is_some())?;
            Ok(c)
        } else {
            start_worker(i as u32 - 1)
        }
    };
    let (min_workers, _) = cfg.elastic_bounds();
    let on_failure = OnFailure {
        restarts: a.max_restarts,
        respawn: Some(&mut respawn),
        spare_workers: (a.workers as i64 - min_workers).max(0) as u32,
    };
    supervise(&mut procs, true, &interrupted, on_failure)?;
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
        supervise(
            std::slice::from_mut(&mut sampler),
            false,
            &interrupted,
            OnFailure::default(),
        )?;
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
