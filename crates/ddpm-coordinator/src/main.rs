//! `coordinator --config FILE`: serves the gRPC `Coordinator` service of one training run
//! until every worker reported the last step (exit 0), or until SIGINT/SIGTERM (exit 1 when
//! the run is not finished).
//!
//! Stdout carries only machine-readable lines: first `coordinator listening on IP:PORT`,
//! then, with `--metrics-listen`, `coordinator metrics on IP:PORT`, then, with
//! `--health-listen`, `coordinator health on IP:PORT`. Logs go to stderr.

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use ddpm_config::Config;
use ddpm_coordinator::plan::{self, Plan};
use ddpm_coordinator::service::{CoordinatorService, MAX_REQUEST_BYTES};
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
/// --linger-secs and exits 0. A worker that stops heartbeating, or whose peers report that
/// their collective failed, moves the run to a new generation: the survivors register
/// again and train on from the newest committed checkpoint, with a replacement, or without
/// one when [elastic] allows fewer workers. A restarted coordinator rebuilds the run from
/// the checkpoint store (the newest checkpoint, and the generation it continues after) and
/// the workers reconnect.
///
/// Every RPC must carry the run's bearer token when one is configured ([auth] in the config,
/// or --token-file); the gRPC port may serve TLS, and then may require client certificates
/// ([tls], or --tls-cert/--tls-key/--tls-client-ca). The grpc.health.v1 service answers
/// without a token, on the gRPC port and, with --health-listen, on a plaintext port of its
/// own for probes that speak neither TLS nor tokens.
///
/// Stdout: the first line is `coordinator listening on IP:PORT`; with --metrics-listen the
/// next is `coordinator metrics on IP:PORT`, with --health-listen the next is
/// `coordinator health on IP:PORT`. Logs go to stderr (RUST_LOG filters them).
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
    /// Also serve the grpc.health.v1 service, in plaintext and without a token, on this
    /// address (for probes such as the kubelet's; port 0: a free port).
    #[arg(long, value_name = "ADDR")]
    health_listen: Option<SocketAddr>,
    /// File holding the bearer token every RPC must carry, instead of auth.token_file /
    /// auth.token_env.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Serve TLS with this certificate chain (PEM), instead of tls.cert_file.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert, instead of tls.key_file.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by these CAs (PEM; mutual TLS), instead of
    /// tls.client_ca_file.
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
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
    if let Some(f) = &args.token_file {
        cfg.auth.token_file = f.display().to_string();
        cfg.auth.token_env.clear();
    }
    if let (Some(c), Some(k)) = (&args.tls_cert, &args.tls_key) {
        cfg.tls.cert_file = c.display().to_string();
        cfg.tls.key_file = k.display().to_string();
    }
    if let Some(ca) = &args.tls_client_ca {
        cfg.tls.client_ca_file = ca.display().to_string();
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
        .map(|a| ddpm_telemetry::serve_component_metrics(a, "coordinator"))
        .transpose()?;
    // Read before anything listens: a token or certificate that cannot be used stops the
    // coordinator with the file or variable named, rather than leaving the run open.
    let token = ddpm_auth::Token::from_config(&cfg.auth)?;
    let check = ddpm_auth::BearerCheck::new(token.as_ref());
    let tls = ddpm_auth::server_tls(&cfg.tls)?;
    let store = plan::open_store(&mut cfg)?;
    let plan = Plan::read(&store, &cfg.checkpoint.url).await?;
    // One past every generation a predecessor handed out (stored before it is used).
    let generation = ddpm_coordinator::generation::next(&store, &cfg.checkpoint.url).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| {
            format!("binding the gRPC address {listen} (distributed.listen or --listen)")
        })?;
    let bound = listener
        .local_addr()
        .context("reading the bound gRPC address")?;
    let health_listener = match args.health_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the health address {addr} (--health-listen)"))?,
        ),
        None => None,
    };
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "coordinator listening on {bound}")?;
        if let Some(m) = metrics_addr {
            writeln!(out, "coordinator metrics on {m}")?;
        }
        if let Some(h) = &health_listener {
            writeln!(out, "coordinator health on {}", h.local_addr()?)?;
        }
        out.flush()?;
    }
    if !check.is_required() {
        tracing::warn!(%bound, "no bearer token configured ([auth] or --token-file): any client that reaches this address can join the run");
    }
    let total = cfg.train.total_steps.max(0) as u64;
    tracing::info!(
        run = %cfg.run.name,
        config = %args.config.display(),
        %bound,
        world_size = cfg.distributed.world_size,
        backend = ?cfg.distributed.backend,
        lease_secs = cfg.distributed.lease_secs,
        token = check.is_required(),
        tls = tls.is_some(),
        client_certificates = !cfg.tls.client_ca_file.is_empty(),
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

    if generation > 1 {
        tracing::info!(
            generation,
            "a coordinator ran this run before: continuing with generation {generation}; its workers register again"
        );
    }
    let complete = plan.start_step >= total;
    let service = CoordinatorService::new(&cfg, store, plan, generation);
    if complete {
        service.finish_complete_run();
    }
    let reaper = tokio::spawn(service.clone().expire_loop());
    let (health, health_service) = tonic_health::server::health_reporter();
    let coordinator_name =
        <CoordinatorServer<CoordinatorService> as tonic::server::NamedService>::NAME;
    health
        .set_service_status(coordinator_name, tonic_health::ServingStatus::Serving)
        .await;
    let stopping = std::sync::Arc::new(tokio::sync::Notify::new());
    // Stops the health-only server together with the main one.
    let (stop_health, health_stopped) = tokio::sync::watch::channel(false);
    let shutdown = {
        let service = service.clone();
        let stopping = stopping.clone();
        let health = health.clone();
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
            for name in ["", coordinator_name] {
                health
                    .set_service_status(name, tonic_health::ServingStatus::NotServing)
                    .await;
            }
            let _ = stop_health.send(true);
            stopping.notify_one();
        }
    };
    if let Some(l) = health_listener {
        let health_service = health_service.clone();
        let mut stopped = health_stopped;
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(health_service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(l),
                    async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    },
                )
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the health server stopped");
            }
        });
    }
    let mut server = tonic::transport::Server::builder()
        // Requests are small; bounded headers and frames keep a hostile peer's memory use
        // small too.
        .http2_max_header_list_size(64 << 10)
        .max_frame_size(Some(64 << 10));
    if let Some(t) = tls {
        server = server
            .tls_config(t)
            .context("the gRPC port's TLS settings ([tls] or --tls-*)")?;
    }
    let coordinator = CoordinatorServer::new(service.clone())
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(ddpm_auth::MAX_RESPONSE_BYTES);
    let serve = server
        .add_service(health_service)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            coordinator,
            check,
        ))
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
