//! Telemetry shared by the binaries (`coordinator`, `worker`, `ddpm`): `tracing` logs to
//! stderr, human-readable or JSON, filtered by `RUST_LOG` (default `info`), and a Prometheus
//! text endpoint (`/metrics`) for the `metrics` facade.

use std::net::SocketAddr;

/// Errors of the telemetry setup.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The Prometheus exporter could not be installed or could not bind its address.
    #[error("serving metrics on {addr}: {reason}")]
    Metrics {
        /// The `--metrics-listen` address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event (coloured on a terminal).
    #[default]
    Human,
    /// One JSON object per event, for log collectors.
    Json,
}

/// Installs the global `tracing` subscriber writing to stderr. The filter comes from
/// `RUST_LOG` (default `info`). Call once, first thing in `main`.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}

/// Bucket bounds, in seconds, of every histogram whose name ends in `_seconds` (step time,
/// data wait, all-reduce, checkpoint upload, ...): 0.5 ms to 30 min, so that
/// `histogram_quantile` and the mean (`_sum / _count`) both work in Prometheus. Other
/// histograms are exported as summaries.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// Serves every metric recorded through the `metrics` facade as Prometheus text at
/// `http://ADDR/metrics`, from a thread of its own. Returns the bound address (port 0 picks
/// a free one). Call at most once per process.
pub fn serve_metrics(addr: SocketAddr) -> Result<SocketAddr, TelemetryError> {
    serve(addr, None)
}

/// [`serve_metrics`], with the label `component="<component>"` (e.g. `coordinator`,
/// `worker`) on every series, so that alerting rules can tell the coordinator's per-rank
/// gauges from the workers' own whatever the scrape configuration calls its jobs.
pub fn serve_component_metrics(
    addr: SocketAddr,
    component: &str,
) -> Result<SocketAddr, TelemetryError> {
    serve(addr, Some(component))
}

fn serve(addr: SocketAddr, component: Option<&str>) -> Result<SocketAddr, TelemetryError> {
    let bad = |reason: String| TelemetryError::Metrics { addr, reason };
    // Bind first: the exporter binds lazily and would report a taken port only in its log,
    // and the caller needs the real port when asking for port 0.
    let listener = std::net::TcpListener::bind(addr).map_err(|e| bad(e.to_string()))?;
    let bound = listener.local_addr().map_err(|e| bad(e.to_string()))?;
    drop(listener);
    let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(bound)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            SECONDS_BUCKETS,
        )
        .map_err(|e| bad(e.to_string()))?;
    if let Some(c) = component {
        builder = builder.add_global_label("component", c);
    }
    builder.install().map_err(|e| bad(e.to_string()))?;
    Ok(bound)
}
