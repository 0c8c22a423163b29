//! One module per subcommand, plus the helpers they share.

pub mod ckpt;
pub mod convert;
pub mod dataset;
pub mod fid;
pub mod inspect;
pub mod launch;
pub mod ledger;
pub mod nll;
pub mod prepare;
pub mod sample;
pub mod status;
pub mod train;

use anyhow::{Context, Result};
use ddpm_config::Config;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use tch::Device;

/// Reads and validates a config file, and applies its `train.threads` to libtorch.
pub fn load_config(path: &Path) -> Result<Config> {
    let cfg = Config::from_file(path)?;
    if cfg.train.threads > 0 {
        tch::set_num_threads(cfg.train.threads as i32);
    }
    Ok(cfg)
}

/// Parses `--device` (loading CUDA support when asked for).
pub fn device(spec: &str) -> Result<Device> {
    ddpm_unet::device::resolve(spec).context("--device")
}

/// A progress bar on stderr (drawn only when stderr is a terminal).
pub fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} ({eta} left)",
        )
        .expect("valid template"),
    );
    pb.set_message(what.to_string());
    pb
}
