//! `ddpm train`: single-process training.

use super::{device, load_config, progress};
use anyhow::{Context, Result};
use clap::Args;
use ddpm_config::SamplerKind;
use ddpm_data::epoch::Cursor;
use ddpm_trainer::{save_weights_dir, Trainer};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `ddpm train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Config file (TOML); see configs/README.md for every key.
    #[arg(long)]
    pub config: PathBuf,
    /// Device to train on: cpu, cuda or cuda:K.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Number of steps (overrides train.total_steps).
    #[arg(long)]
    pub steps: Option<i64>,
    /// Output directory (overrides run.out_dir). Gets ema.safetensors, model.safetensors,
    /// config.toml and train_log.jsonl.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// After training, write a grid of this many EMA samples (ancestral, T steps) to
    /// OUT/samples.png. 0 skips it.
    #[arg(long, default_value_t = 0)]
    pub sample_n: i64,
    /// Refuse to run if the run already has committed checkpoints (by default training
    /// resumes from the newest checkpoint that verifies).
    #[arg(long)]
    pub fresh: bool,
}

/// Runs `ddpm train`.
pub fn run(a: TrainArgs) -> Result<()> {
    let mut cfg = load_config(&a.config)?;
    if let Some(s) = a.steps {
        anyhow::ensure!(s >= 1, "--steps: expected >= 1, got {s}");
        cfg.train.total_steps = s;
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(&cfg.run.out_dir));
    let dev = device(&a.device)?;
    let data = ddpm_data::open_source(&cfg.data).with_context(|| {
        format!(
            "loading data.source {:?} of {}",
            cfg.data.source,
            a.config.display()
        )
    })?;
    tracing::info!(images = data.len(), source = %cfg.data.source, "dataset loaded");
    let mut trainer = Trainer::new(&cfg, dev)?;
    let (vs, _) = trainer.model();
    tracing::info!(parameters = ddpm_unet::parameter_count(vs), device = ?dev, steps = cfg.train.total_steps, "training");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let log_path = out.join("train_log.jsonl");
    // Appended to, so a resumed run keeps the history of the steps before it.
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;

    let total = cfg.train.total_steps;
    let batch = cfg.train.batch_size as usize;
    let seed = cfg.run.seed;
    let checkpoints = super::checkpoints::Checkpoints::open(&cfg, &out)?;
    let mut cursor = Cursor::default();
    let mut start = 0;
    if a.fresh {
        let existing = checkpoints.committed()?;
        anyhow::ensure!(
            existing.is_empty(),
            "--fresh: run {:?} already has checkpoints at steps {existing:?} in {}; delete them or change run.name",
            cfg.run.name,
            checkpoints.url()
        );
    } else if let Some(r) = checkpoints.newest()? {
        trainer.import_state(&r.blobs, r.step)?;
        cursor = r.cursor;
        start = r.step;
        tracing::info!(step = r.step, epoch = cursor.epoch, url = %checkpoints.url(), "resumed from checkpoint");
    }
    let pb = progress(total as u64, "train");
    pb.set_position(start.min(total) as u64);
    let mut window_start = Instant::now();
    let mut window_images = 0usize;
    for step in start..total {
        let idx = cursor.next_batch(data.len(), batch, seed);
        let x = data.batch(&idx);
        let stats = trainer.step(&x)?;
        window_images += batch;
        pb.inc(1);
        let done = step + 1;
        if done % cfg.train.log_every == 0 || done == total {
            let loss = stats.loss.double_value(&[]);
            let gnorm = stats.grad_norm.double_value(&[]);
            let ips = window_images as f64 / window_start.elapsed().as_secs_f64();
            anyhow::ensure!(
                loss.is_finite(),
                "step {done}: the loss is {loss}; stopping (lower train.lr?)"
            );
            pb.set_message(format!("train loss {loss:.4}"));
            let line = serde_json::json!({"step": done, "loss": loss, "grad_norm": gnorm, "lr": stats.lr,
                "images_per_second": ips, "epoch": cursor.epoch});
            writeln!(log, "{line}")?;
            pb.suspend(|| {
                tracing::info!(
                    step = done,
                    loss,
                    grad_norm = gnorm,
                    lr = stats.lr,
                    images_per_second = ips,
                    "progress"
                )
            });
            window_start = Instant::now();
            window_images = 0;
        }
        let every = cfg.checkpoint.every_steps;
        if (every > 0 && done % every == 0) || done == total {
            pb.suspend(|| checkpoints.commit(&trainer, &cursor, &cfg))?;
        }
        if cfg.train.snapshot_every > 0 && done % cfg.train.snapshot_every == 0 && done != total {
            let (m, _) = trainer.model();
            let (e, _) = trainer.ema_model();
            save_weights_dir(&out, &cfg, m, e)?;
        }
    }
    pb.finish_and_clear();
    let (m, _) = trainer.model();
    let (e, _) = trainer.ema_model();
    save_weights_dir(&out, &cfg, m, e)?;
    tracing::info!(dir = %out.display(), "wrote ema.safetensors, model.safetensors, config.toml");
    if a.sample_n > 0 {
        let (_, net) = trainer.ema_model();
        let png = out.join("samples.png");
        tch::manual_seed(seed as i64);
        let x = super::sample::generate(
            trainer.diffusion(),
            net,
            &super::sample::SamplingPlan {
                n: a.sample_n,
                batch_size: cfg.sample.batch_size,
                sampler: SamplerKind::Ddpm,
                steps: cfg.diffusion.num_timesteps,
                eta: 0.0,
                clip: cfg.sample.clip_denoised,
                shape: [cfg.data.channels, cfg.data.resolution, cfg.data.resolution],
            },
            None,
            dev,
        )?;
        crate::images::save_grid(&x, super::sample::grid_cols(a.sample_n), &png)?;
        tracing::info!(path = %png.display(), "wrote sample grid");
    }
    Ok(())
}
