//! `ddpm-bench loader`: training-loader throughput on a folder of encoded images (e.g. the
//! LSUN-like WebP set that `reference_loader.py make-data` writes): read, decode, centre crop,
//! antialiased resize, random flip and conversion to a float tensor in [-1, 1], on `--threads`
//! pool threads, consumed as fast as the loader delivers. `reference_loader.py run` does the
//! same work with a PyTorch DataLoader + PIL + torchvision transforms and as many workers.

use anyhow::Result;
use clap::Args;
use ddpm_config::DataConfig;
use ddpm_data::epoch::Cursor;
use ddpm_data::loader::{Loader, LoaderOptions};
use ddpm_data::samples::open_sample_source;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `ddpm-bench loader`.
#[derive(Args, Debug)]
pub struct LoaderArgs {
    /// Folder of images (PNG, JPEG, WebP).
    #[arg(long)]
    dir: PathBuf,
    /// Output side.
    #[arg(long, default_value_t = 256)]
    resolution: i64,
    /// Images per batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Pool threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Untimed batches first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed batches.
    #[arg(long, default_value_t = 20)]
    batches: usize,
}

/// Runs the benchmark; one JSON object.
pub fn run(a: &LoaderArgs) -> Result<Value> {
    anyhow::ensure!(
        a.batches > 0 && a.threads > 0,
        "--batches and --threads must be >= 1"
    );
    // The consumer only drops batches: keep libtorch's own pool out of the way.
    tch::set_num_threads(1);
    let cfg = DataConfig {
        source: format!("folder:{}", a.dir.display()),
        resolution: a.resolution,
        channels: 3,
        random_flip: true,
        ..DataConfig::default()
    };
    let source = open_sample_source(&cfg)?;
    let images = source.len();
    let mut opts = LoaderOptions::from_config(&cfg, 0, a.batch, 1, 0);
    opts.threads = a.threads;
    let mut loader = Loader::start(source, Cursor::default(), opts)?;
    for _ in 0..a.warmup {
        loader.next_batch()?;
    }
    let t0 = Instant::now();
    let mut n = 0usize;
    for _ in 0..a.batches {
        let b = loader.next_batch()?;
        anyhow::ensure!(b.images.size() == [a.batch as i64, 3, a.resolution, a.resolution]);
        n += b.indices.len();
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(json!({
        "impl": "ddpm-rs",
        "bench": "loader",
        "threads": a.threads,
        "batch": a.batch,
        "resolution": a.resolution,
        "dataset_images": images,
        "images": n,
        "seconds": secs,
        "images_per_second": n as f64 / secs,
    }))
}
