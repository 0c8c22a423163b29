//! `ddpm train`: single-process training.

use super::{device, load_config, progress};
use anyhow::{Context, Result};
use clap::Args;
use ddpm_data::epoch::Cursor;
use ddpm_trainer::Trainer;
use ddpm_worker::checkpoints::Checkpoints;
use ddpm_worker::train_loop::{self, LogLine, LoopObserver, LoopSetup};
use std::path::PathBuf;

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
    /// Start the run from step 0 instead of resuming. Refuses when the run already has
    /// checkpoints, unless --overwrite is given too. By default training resumes from the
    /// newest checkpoint that verifies (corrupted newer ones are skipped, loudly).
    #[arg(long, conflicts_with = "resume")]
    pub fresh: bool,
    /// Resume from the checkpoint of this step (it must verify; there is no fallback).
    /// Refuses when newer checkpoints exist, unless --overwrite is given too.
    #[arg(long, value_name = "STEP")]
    pub resume: Option<u64>,
    /// With --fresh: delete the run's checkpoints first. With --resume STEP: delete the
    /// checkpoints newer than STEP first (the run continues from STEP and would commit the
    /// same steps again).
    #[arg(long)]
    pub overwrite: bool,
    /// Serve Prometheus metrics (ddpm_train_loss, ddpm_train_step_seconds, ... with rank 0)
    /// on http://ADDR/metrics while training.
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Runs `ddpm train`.
pub fn run(a: TrainArgs) -> Result<()> {
    let mut cfg = load_config(&a.config)?;
    if let Some(addr) = a.metrics_listen {
        let bound = ddpm_telemetry::serve_metrics(addr)?;
        eprintln!("metrics on http://{bound}/metrics");
    }
    if let Some(s) = a.steps {
        anyhow::ensure!(s >= 1, "--steps: expected >= 1, got {s}");
        cfg.train.total_steps = s;
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(&cfg.run.out_dir));
    let dev = device(&a.device)?;
    let data = ddpm_worker::dataset::open_training_source(&cfg.data).with_context(|| {
        format!(
            "opening data.source {:?} of {}",
            cfg.data.source,
            a.config.display()
        )
    })?;
    tracing::info!(images = data.len(), source = %cfg.data.source, "dataset opened");
    let data_order = data.order().describe();
    let mut trainer = Trainer::new(&cfg, dev)?;
    let (vs, _) = trainer.model();
    tracing::info!(parameters = ddpm_unet::parameter_count(vs), device = ?dev, steps = cfg.train.total_steps, "training");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let total = cfg.train.total_steps;
    let seed = cfg.run.seed;
    let checkpoints = Checkpoints::open(&cfg, &out)?;
    anyhow::ensure!(
        !a.overwrite || a.fresh || a.resume.is_some(),
        "--overwrite only applies together with --fresh or --resume STEP"
    );
    let existing = checkpoints.committed()?;
    let mut cursor = Cursor::default();
    let mut start = 0;
    if a.fresh {
        if !existing.is_empty() {
            anyhow::ensure!(
                a.overwrite,
                "--fresh: run {:?} already has checkpoints at steps {existing:?} in {}; add --overwrite to delete them, or change run.name",
                cfg.run.name,
                checkpoints.url()
            );
            let removed = checkpoints.delete_run()?;
            tracing::warn!(steps = ?removed, url = %checkpoints.url(), "--fresh --overwrite: deleted the run's checkpoints");
        }
    } else {
        if let Some(step) = a.resume {
            anyhow::ensure!(
                existing.contains(&step),
                "--resume {step}: run {:?} has no committed checkpoint at step {step} in {} (committed: {existing:?})",
                cfg.run.name,
                checkpoints.url()
            );
            let newer: Vec<u64> = existing.iter().copied().filter(|s| *s > step).collect();
            if !newer.is_empty() {
                anyhow::ensure!(
                    a.overwrite,
                    "--resume {step}: run {:?} has newer checkpoints at steps {newer:?} in {}; add --overwrite to delete them",
                    cfg.run.name,
                    checkpoints.url()
                );
            }
        }
        let resumed = checkpoints.load(a.resume).with_context(|| match a.resume {
            Some(s) => format!("--resume {s}"),
            None => "resuming from the newest checkpoint that verifies".to_string(),
        })?;
        if let Some(r) = resumed {
            let newer: Vec<u64> = existing
                .iter()
                .copied()
                .filter(|s| *s as i64 > r.step)
                .collect();
            // A position means something only in the order it was taken in: resuming mid-epoch
            // under another order would repeat some samples and skip others.
            anyhow::ensure!(
                r.data_order == data_order || r.cursor.position == 0,
                "checkpoint step {} is {} samples into epoch {} of data order {:?}, but this config \
                 gives order {data_order:?} (data.source or data.shuffle_window_shards changed); \
                 resuming would repeat and skip samples. Restore the setting, resume from a \
                 checkpoint at an epoch boundary (--resume STEP), or start over (--fresh)",
                r.step,
                r.cursor.position,
                r.cursor.epoch,
                r.data_order,
            );
            // Restore first: if the state does not fit the model, nothing has been deleted.
            trainer.import_state(&r.blobs, r.step)?;
            if a.resume.is_some() && !newer.is_empty() {
                checkpoints.delete_steps(&newer)?;
                tracing::warn!(steps = ?newer, "--resume --overwrite: deleted the newer checkpoints");
            }
            cursor = r.cursor;
            start = r.step;
            tracing::info!(step = r.step, epoch = cursor.epoch, url = %checkpoints.url(), "resumed from checkpoint");
        } else {
            // Never silently start a run over whose checkpoints all fail verification.
            anyhow::ensure!(
                existing.is_empty(),
                "run {:?} has checkpoints at steps {existing:?} in {} but none verifies \
                 (`ddpm ckpt verify` names the blobs); to start over, pass --fresh --overwrite",
                cfg.run.name,
                checkpoints.url()
            );
        }
    }
    checkpoints.take_over(start as u64)?;
    if start < total {
        checkpoints.prepare(&trainer);
    }
    let mut bar = Bar(progress(total as u64, "train"));
    bar.0.set_position(start.min(total) as u64);
    let outcome = train_loop::train(
        &mut trainer,
        LoopSetup {
            cfg: &cfg,
            data,
            cursor,
            data_order,
            out: out.clone(),
            checkpoints: Some(&checkpoints),
            ranks: None,
            generation: 0,
            ledger: None,
        },
        &mut bar,
    )?;
    bar.0.finish_and_clear();
    let url = checkpoints.url().to_string();
    let uploads = checkpoints.finish();
    tracing::info!(
        committed = uploads.committed,
        failed = uploads.failed,
        waits = uploads.waits,
        stall_seconds = outcome.checkpoint_stall,
        "checkpoints"
    );
    if let Some(last) = outcome.submitted {
        anyhow::ensure!(
            uploads.last_committed == Some(last),
            "the final checkpoint (step {last}) was not committed to {url}: {}; the weights in {} are current, the newest checkpoint is older",
            uploads.last_error.as_deref().unwrap_or("unknown error"),
            out.display()
        );
    }
    if a.sample_n > 0 {
        let (_, net) = trainer.ema_model();
        super::sample::write_ancestral_grid(
            trainer.diffusion(),
            net,
            &cfg,
            a.sample_n,
            seed,
            dev,
            &out.join("samples.png"),
        )?;
    }
    Ok(())
}

/// The progress bar and the log lines of `ddpm train`.
struct Bar(indicatif::ProgressBar);

impl LoopObserver for Bar {
    fn stepped(&mut self, _step: u64) {
        self.0.inc(1);
    }

    fn logged(&mut self, l: &LogLine) {
        self.0.set_message(format!("train loss {:.4}", l.loss));
        l.record_gauges(0);
        self.0.suspend(|| l.trace());
    }
}
