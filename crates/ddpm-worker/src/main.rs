//! `worker`: one rank of a distributed DDPM-RS run.

use clap::Parser;
use ddpm_telemetry::LogFormat;
use ddpm_worker::run::{run, WorkerOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// One rank of a distributed DDPM training run. It needs no config file: it registers with
/// the coordinator, which assigns its rank (or honours --rank), hands out the resolved config
/// and the collective's rendezvous, and says where in the data and the schedule to start.
/// The worker trains its share of every global batch and all-reduces gradients with the other
/// ranks; ring rank 0 commits the checkpoints and writes the weights to run.out_dir.
///
/// When a peer dies or hangs, or the coordinator moves the run to another generation (or
/// restarts), the worker registers again and trains on in the next generation from the
/// newest committed checkpoint; it exits only when the run is finished or failed, or the
/// coordinator stays unreachable for --connect-timeout-secs.
#[derive(Parser, Debug)]
#[command(name = "worker", version)]
struct Args {
    /// The coordinator, e.g. http://10.0.0.5:50051.
    #[arg(long)]
    coordinator: String,
    /// The rank slot to take (0..world_size, or 0..elastic.max_workers); a rank held by a
    /// live worker is refused after --wait-for-rank-secs. Default: any free rank.
    #[arg(long)]
    rank: Option<u32>,
    /// Device: cpu, cuda or cuda:K.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Where this worker's end of the gradient ring listens (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    ring_listen: SocketAddr,
    /// Host name or IP the other workers reach this one at (default: the listen address).
    #[arg(long)]
    advertise: Option<String>,
    /// Intra-op CPU threads (overrides train.threads).
    #[arg(long)]
    threads: Option<i64>,
    /// Rank 0's output directory (overrides run.out_dir).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seconds to keep trying to reach the coordinator: at start, and whenever it is
    /// unreachable later (a restart), before giving up.
    #[arg(long, default_value_t = 120)]
    connect_timeout_secs: u64,
    /// Seconds to keep asking for a --rank that another worker holds: a replacement that
    /// starts before its dead predecessor's lease ran out gets the rank then. Longer than
    /// distributed.lease_secs by default.
    #[arg(long, default_value_t = 45)]
    wait_for_rank_secs: u64,
    /// Serve Prometheus metrics on http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Test mode: append one JSON line per applied step to
    /// `DIR/ledger-rank<R>-<member>.jsonl` with the samples (epoch, position, index) this
    /// rank consumed and the generation, so that `ddpm ledger DIR` can check that every
    /// sample of every completed epoch was used exactly once across failures.
    #[arg(long, value_name = "DIR")]
    ledger: Option<PathBuf>,
    /// Log lines as human-readable text or JSON.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(flatten)]
    security: ddpm_auth::ClientArgs,
}

fn main() -> std::process::ExitCode {
    let tuned = ddpm_trainer::malloc::tune_for_training();
    let args = Args::parse();
    ddpm_telemetry::init_tracing(args.log_format);
    if !tuned {
        tracing::debug!("glibc malloc thresholds not set");
    }
    match start(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn start(a: Args) -> anyhow::Result<()> {
    if let Some(addr) = a.metrics_listen {
        let bound = ddpm_telemetry::serve_component_metrics(addr, "worker")?;
        tracing::info!(%bound, "serving /metrics");
        // Machine-readable, as the coordinator's: `ddpm launch` reads it.
        println!("worker metrics on {bound}");
    }
    let security = a.security.security()?;
    let device = ddpm_unet::device::resolve(&a.device)
        .map_err(|e| anyhow::anyhow!("--device {:?}: {e}", a.device))?;
    run(WorkerOptions {
        coordinator: a.coordinator,
        rank: a.rank,
        device,
        device_name: a.device,
        ring_listen: a.ring_listen,
        advertise: a.advertise,
        threads: a.threads,
        out: a.out,
        connect_patience: Duration::from_secs(a.connect_timeout_secs),
        taken_rank_patience: Duration::from_secs(a.wait_for_rank_secs),
        security,
        ledger: a.ledger,
    })?;
    Ok(())
}
