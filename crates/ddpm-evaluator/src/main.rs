//! `evaluator`: FID and Inception Score of a run's committed checkpoints.
//!
//! `evaluator --config F` reads the run from a config file and watches until stopped;
//! `evaluator --coordinator URL` gets the resolved config from the run's coordinator
//! (credential-like store options from this process's environment) and exits once the run
//! is over (the coordinator says so or, with the coordinator gone, the final checkpoint at
//! train.total_steps is committed) and every due checkpoint is evaluated. `--once STEP` evaluates one checkpoint and exits.

use anyhow::{bail, Context, Result};
use clap::Parser;
use ddpm_config::Config;
use ddpm_evaluator::{Evaluator, EvaluatorError};
use ddpm_proto::v1::coordinator_client::CoordinatorClient;
use ddpm_proto::v1::{RegisterRequest, Role, RunState, StatusRequest};
use ddpm_telemetry::LogFormat;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Evaluates the EMA weights of every committed checkpoint of a run (FID against
/// eval.reference, IS with eval.is_weights) and writes eval/step-<N>.json and a grid PNG
/// beside the checkpoints.
#[derive(Parser, Debug)]
#[command(name = "evaluator", version, about, long_about = None)]
struct Args {
    /// The run's config file.
    #[arg(
        long,
        conflicts_with = "coordinator",
        required_unless_present = "coordinator"
    )]
    config: Option<PathBuf>,
    /// The run's coordinator (http://HOST:PORT): the config comes from it, and the evaluator
    /// exits once the run has finished and every due checkpoint is evaluated.
    #[arg(long)]
    coordinator: Option<String>,
    /// Evaluate committed checkpoint STEP (even if it has a result) and exit.
    #[arg(long)]
    once: Option<u64>,
    /// Device: cpu, cuda or cuda:K.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch threads (default: libtorch's choice).
    #[arg(long)]
    threads: Option<i32>,
    /// Serve Prometheus metrics (ddpm_eval_fid, ddpm_eval_is_mean, ddpm_eval_progress, ...)
    /// on http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// The run's bearer token and TLS files, for --coordinator.
    #[command(flatten)]
    client: ddpm_auth::ClientArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    ddpm_telemetry::init_tracing(args.log_format);
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The coordinator of `--coordinator`, asked for the config and, between polls, the run state.
struct Coordinator {
    rt: tokio::runtime::Runtime,
    client: CoordinatorClient<ddpm_auth::AuthChannel>,
}

impl Coordinator {
    fn connect(url: &str, security: &ddpm_auth::ClientSecurity) -> Result<(Self, Config)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let endpoint = security
            .endpoint(url)
            .with_context(|| format!("--coordinator {url:?}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20));
        let deadline = Instant::now() + Duration::from_secs(60);
        let channel = loop {
            match rt.block_on(endpoint.connect()) {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "coordinator not reachable yet; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("connecting to the coordinator at {url}"))
                }
            }
        };
        let mut client = CoordinatorClient::new(security.authorize(channel))
            .max_decoding_message_size(ddpm_auth::MAX_RESPONSE_BYTES);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let reply = rt
            .block_on(client.register(RegisterRequest {
                protocol_version: ddpm_proto::PROTOCOL_VERSION,
                role: Role::Evaluator.into(),
                host: host.trim().to_string(),
                member_id: format!("evaluator:{}:{}", host.trim(), std::process::id()),
                ..Default::default()
            }))
            .map_err(|s| {
                anyhow::anyhow!(
                    "the coordinator at {url} refused the evaluator: {}",
                    s.message()
                )
            })?
            .into_inner();
        let mut cfg = Config::parse(&reply.config_toml, "the config from the coordinator")?;
        cfg.restore_redacted(|v| std::env::var(v).ok())?;
        Ok((Self { rt, client }, cfg))
    }

    /// Whether the run has finished (or failed); `None` when the coordinator did not answer.
    fn run_over(&mut self) -> Option<bool> {
        match self.rt.block_on(self.client.status(StatusRequest {})) {
            Ok(s) => {
                let state =
                    RunState::try_from(s.into_inner().state).unwrap_or(RunState::Unspecified);
                Some(matches!(state, RunState::Finished | RunState::Failed))
            }
            Err(s) => {
                tracing::warn!(error = %s.message(), "coordinator status unavailable");
                None
            }
        }
    }
}

fn run(a: Args) -> Result<()> {
    if let Some(addr) = a.metrics_listen {
        let bound = ddpm_telemetry::serve_metrics(addr)?;
        tracing::info!(%bound, "serving /metrics");
        println!("evaluator metrics on {bound}");
    }
    if let Some(t) = a.threads {
        anyhow::ensure!(t >= 1, "--threads: expected >= 1, got {t}");
        tch::set_num_threads(t);
    }
    let (mut coordinator, cfg) = match (&a.config, &a.coordinator) {
        (Some(path), None) => (None, Config::from_file(path)?),
        (None, Some(url)) => {
            let (c, cfg) = Coordinator::connect(url, &a.client.security()?)?;
            (Some(c), cfg)
        }
        _ => bail!("give exactly one of --config and --coordinator"),
    };
    let device = ddpm_unet::device::resolve(&a.device).context("--device")?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc_handler(move || stop.store(true, Ordering::Relaxed))?;
    }
    let evaluator = Evaluator::open(cfg.clone(), device, stop.clone())?;
    if let Some(step) = a.once {
        return Ok(evaluate(&evaluator, step)?);
    }
    let poll = Duration::from_secs(cfg.eval.poll_secs as u64);
    let mut failed = BTreeSet::new();
    tracing::info!(run = %cfg.run.name, every_steps = cfg.eval.every_steps, "watching for committed checkpoints");
    loop {
        // The run's state is read before the listing, so a run that finished is only left
        // once the checkpoints it had committed by then are all evaluated.
        let over = match coordinator.as_mut() {
            None => None,
            // A coordinator that is gone (it exits shortly after the run finishes) leaves
            // the store to tell: the final checkpoint is committed at train.total_steps.
            Some(c) => c.run_over().or_else(|| {
                let newest = evaluator.newest_committed().ok().flatten();
                Some(newest.is_some_and(|s| s >= cfg.train.total_steps as u64))
            }),
        };
        // A store that fails to list is tried again at the next poll: an evaluator that
        // exits on a blip would, under `ddpm launch`, be one less process watching the run.
        let listed_due = evaluator.due();
        let listed = listed_due.is_ok();
        let due: Vec<u64> = match listed_due {
            Ok(d) => d.into_iter().filter(|s| !failed.contains(s)).collect(),
            Err(e) => {
                tracing::warn!("listing the checkpoints failed, trying again in {poll:?}: {e:#}");
                metrics::counter!("ddpm_eval_failures_total").increment(1);
                Vec::new()
            }
        };
        for step in &due {
            match evaluate(&evaluator, *step) {
                Ok(_) => {}
                Err(e) if stop.load(Ordering::Relaxed) => {
                    tracing::info!("{e:#}");
                    return Ok(());
                }
                Err(e) => {
                    // A checkpoint that cannot be evaluated (pruned meanwhile, corrupt) is
                    // not retried by this process; the next evaluator to start tries again.
                    tracing::error!(step, "evaluation failed: {e:#}");
                    metrics::counter!("ddpm_eval_failures_total").increment(1);
                    failed.insert(*step);
                }
            }
        }
        if over == Some(true) && due.is_empty() && listed {
            tracing::info!("the run is over and every due checkpoint is evaluated");
            return Ok(());
        }
        let until = Instant::now() + poll;
        while Instant::now() < until {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Evaluates `step`, with a progress bar on a terminal and the ddpm_eval_* metrics.
fn evaluate(evaluator: &Evaluator, step: u64) -> Result<(), EvaluatorError> {
    tracing::info!(step, "evaluating");
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "step {msg} [{elapsed_precise}] {wide_bar} {pos}/{len} samples ({eta} left)",
        )
        .expect("valid template"),
    );
    pb.set_message(step.to_string());
    let mut progress = |done: i64, total: i64| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        metrics::gauge!("ddpm_eval_progress").set(done as f64 / total as f64);
    };
    let r = evaluator.evaluate(step, &mut progress);
    pb.finish_and_clear();
    let r = r?;
    metrics::gauge!("ddpm_eval_fid").set(r.fid);
    metrics::gauge!("ddpm_eval_step").set(r.step as f64);
    metrics::gauge!("ddpm_eval_seconds").set(r.seconds);
    if let Some((mean, std)) = r.inception_score {
        metrics::gauge!("ddpm_eval_is_mean").set(mean);
        metrics::gauge!("ddpm_eval_is_std").set(std);
    }
    tracing::info!(
        step,
        fid = r.fid,
        is_mean = ?r.inception_score.map(|s| s.0),
        n = r.n,
        seconds = r.seconds,
        result = %evaluator.result_location(step),
        "evaluated"
    );
    println!(
        "step {step}: FID {:.4} over {} samples in {:.1} s",
        r.fid, r.n, r.seconds
    );
    Ok(())
}

/// Calls `f` on SIGINT or SIGTERM (from a thread of its own).
fn ctrlc_handler(f: impl Fn() + Send + 'static) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            });
            tracing::info!("stop asked for: finishing the current batch, writing nothing partial");
            f();
        })?;
    Ok(())
}
