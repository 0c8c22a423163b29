//! `coordinator --config FILE`: serves the gRPC `Coordinator` service of one training run
//! until every worker reported the last step (exit 0), or until SIGINT/SIGTERM (exit 1 when
//! the run is not finished).
//!
//! Stdout carries only machine-readable lines: first `coordinator listening on IP:PORT`,
//! then, with `--metrics-listen`, `coordinator metrics on IP:PORT`. Logs go to stderr.

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use ddpm_config::Config;
use ddpm_coordinator::plan::{self, Plan};
use ddpm_coordinator::service::CoordinatorService;
use ddpm_proto::v1::coordinator_server::CoordinatorServer;
use ddpm_telemetry::LogFormat;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// How long in-flight RPCs may take to finish once shutdown begins.
const DRAIN: Duration = Duration::from_secs(5);

/// The coordinator of a DDPM-RS training run.
///
/// Workers (`worker --coordinator http://ADDR`) register with it, get their rank, the
/// rendezvous of their collective and the resolved config, hold leases by heartbeats, ask
/// for work (where training and the data cursor start, from the newest committed
/// checkpoint) and report progress. When every rank reported the last step it waits
/// --linger-secs and exits 0. A worker that stops heartbeating loses its rank; the run then
/// waits for a replacement (it does not exit).
///
/// Stdout: the first line is `coordinator listening on IP:PORT`; with --metrics-listen the
/// second is `coordinator metrics on IP:PORT`. Logs go to stderr (RUST_LOG filters them).
#[derive(Debug, Parser)]
#[command(name = "coordinator", version, about, long_about)]
struct Args {
    /// The run's TOML config; `[distributed]` sets world_size, backend, listen, lease_secs.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Serve gRPC on this address instead of distributed.listen (port 0: a free port).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Workers in the run, instead of distributed.world_size.
    #[arg(long, value_name = "N")]
    world_size: Option<u32>,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0: a free port).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Log lines on stderr: human or json.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Once the run is finished, keep serving this many seconds so the workers' last
    /// heartbeats see FINISHED.
    #[arg(long, value_name = "S", default_value_t = 2.0)]
    linger_secs: f64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    ddpm_telemetry::init_tracing(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The config of `args`: the file, with the command-line overrides, validated again.
fn load_config(args: &Args) -> Result<Config> {
    let origin = args.config.display().to_string();
    let mut cfg = Config::from_file(&args.config)?;
    if let Some(n) = args.world_size {
        cfg.distributed.world_size = i64::from(n);
    }
    if let Some(addr) = args.listen {
        cfg.distributed.listen = addr.to_string();
    }
    cfg.validate().map_err(|(key, reason)| {
        anyhow!("invalid config {origin} with the command-line overrides: key `{key}`: {reason}")
    })?;
    Ok(cfg)
}

async fn run(args: Args) -> Result<()> {
    let linger = Duration::try_from_secs_f64(args.linger_secs)
        .map_err(|_| anyhow!("--linger-secs {}: expected seconds >= 0", args.linger_secs))?;
    let mut cfg = load_config(&args)?;
    let listen: SocketAddr = cfg.distributed.listen.parse().with_context(|| {
        format!(
            "distributed.listen {:?}: expected IP:PORT",
            cfg.distributed.listen
        )
    })?;
    // The exporter is installed before the service sets its first gauges.
    let metrics_addr = args
        .metrics_listen
        .map(ddpm_telemetry::serve_metrics)
        .transpose()?;
    let store = plan::open_store(&mut cfg)?;
    let plan = Plan::read(&store, &cfg.checkpoint.url).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| {
            format!("binding the gRPC address {listen} (distributed.listen or --listen)")
        })?;
    let bound = listener
        .local_addr()
        .context("reading the bound gRPC address")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "coordinator listening on {bound}")?;
        if let Some(m) = metrics_addr {
            writeln!(out, "coordinator metrics on {m}")?;
        }
        out.flush()?;
    }
    let total = cfg.train.total_steps.max(0) as u64;
    tracing::info!(
        run = %cfg.run.name,
        config = %args.config.display(),
        %bound,
        world_size = cfg.distributed.world_size,
        backend = ?cfg.distributed.backend,
        lease_secs = cfg.distributed.lease_secs,
        checkpoints = %cfg.checkpoint.url,
        total_steps = total,
        "coordinator serving"
    );
    if plan.is_fresh() {
        tracing::info!("no committed checkpoint: the run starts at step 0");
    } else {
        tracing::info!(
            step = plan.restore_step,
            epoch = plan.epoch,
            position = plan.position,
            data_order = %plan.data_order,
            "resuming from the newest committed checkpoint"
        );
    }
    if plan.start_step >= total {
        tracing::info!(
            step = plan.start_step,
            total_steps = total,
            "the run is already complete: workers get 0 steps and report their final progress"
        );
    }

    let service = CoordinatorService::new(&cfg, store, plan);
    let reaper = tokio::spawn(service.clone().expire_loop());
    let stopping = std::sync::Arc::new(tokio::sync::Notify::new());
    let shutdown = {
        let service = service.clone();
        let stopping = stopping.clone();
        async move {
            let mut finished = service.finished();
            tokio::select! {
                _ = async {
                    // The sender lives as long as the service: wait_for cannot fail here.
                    let _ = finished.wait_for(|f| *f).await;
                    tracing::info!(linger_secs = linger.as_secs_f64(), "the run is finished; lingering so every worker sees it");
                    tokio::time::sleep(linger).await;
                } => {}
                name = signal() => {
                    tracing::warn!(signal = name, "shutting down");
                }
            }
            stopping.notify_one();
        }
    };
    let serve = tonic::transport::Server::builder()
        .add_service(CoordinatorServer::new(service.clone()))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        );
    tokio::select! {
        served = serve => served.context("serving gRPC")?,
        _ = async {
            stopping.notified().await;
            tokio::time::sleep(DRAIN).await;
        } => {
            tracing::warn!(drain_secs = DRAIN.as_secs(), "in-flight requests did not finish; closing anyway");
        }
    }
    reaper.abort();
    if service.is_finished() {
        tracing::info!("coordinator done");
        Ok(())
    } else {
        Err(anyhow!(
            "the run {} was not finished when the coordinator stopped; start it again to continue from the newest checkpoint",
            cfg.run.name
        ))
    }
}

/// The first of SIGINT (Ctrl-C) and SIGTERM, by name.
async fn signal() -> &'static str {
    let term = async {
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        }
        #[cfg(not(unix))]
        std::future::pending::<()>().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term => "SIGTERM",
    }
}
