//! Committing and resuming the full training state of `ddpm train` through the checkpoint
//! store. Uploads run on a small tokio runtime and block the training loop while they run.

use anyhow::{Context, Result};
use bytes::Bytes;
use ddpm_checkpoint::{open_url, CheckpointStore};
use ddpm_config::Config;
use ddpm_data::epoch::Cursor;
use ddpm_trainer::Trainer;
use std::path::Path;

/// Blob holding the step, the data cursor and the seed.
const STATE_BLOB: &str = "state.json";

/// A training state read back from a checkpoint.
pub struct Resumed {
    /// Completed updates.
    pub step: i64,
    /// Where the data order continues.
    pub cursor: Cursor,
    /// Model, EMA and optimizer blobs.
    pub blobs: Vec<(String, Vec<u8>)>,
}

/// The checkpoints of one run.
pub struct Checkpoints {
    rt: tokio::runtime::Runtime,
    store: CheckpointStore,
    keep_last: usize,
    url: String,
}

impl Checkpoints {
    /// Opens `checkpoint.url` (default: `<out>/checkpoints` on the local disk).
    pub fn open(cfg: &Config, out: &Path) -> Result<Self> {
        let url = if cfg.checkpoint.url.is_empty() {
            let dir = out.join("checkpoints");
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let abs = dir
                .canonicalize()
                .with_context(|| format!("resolving {}", dir.display()))?;
            format!("file://{}", abs.display())
        } else {
            cfg.checkpoint.url.clone()
        };
        let (store, prefix) = open_url(&url).context("checkpoint.url")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            rt,
            store: CheckpointStore::new(store, prefix, &cfg.run.name).context("run.name")?,
            keep_last: cfg.checkpoint.keep_last as usize,
            url,
        })
    }

    /// Where the checkpoints live.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Steps with a committed manifest.
    pub fn committed(&self) -> Result<Vec<u64>> {
        Ok(self.rt.block_on(self.store.committed_steps())?)
    }

    /// The newest checkpoint that verifies (corrupted newer ones are skipped with a warning).
    pub fn newest(&self) -> Result<Option<Resumed>> {
        let Some((m, blobs)) = self.rt.block_on(self.store.load_newest_verified())? else {
            return Ok(None);
        };
        let state = blobs
            .iter()
            .find(|(n, _)| n == STATE_BLOB)
            .with_context(|| format!("checkpoint step-{}: no {STATE_BLOB}", m.step))?;
        let v: serde_json::Value = serde_json::from_slice(&state.1)
            .with_context(|| format!("step-{}: {STATE_BLOB}", m.step))?;
        let field = |k: &str| {
            v[k].as_u64()
                .with_context(|| format!("step-{}: {STATE_BLOB} has no integer `{k}`", m.step))
        };
        Ok(Some(Resumed {
            step: field("step")? as i64,
            cursor: Cursor::at(field("epoch")?, field("position")?),
            blobs: blobs
                .into_iter()
                .filter(|(n, _)| n != STATE_BLOB)
                .map(|(n, b)| (n, b.to_vec()))
                .collect(),
        }))
    }

    /// Commits the trainer's state after `trainer.global_step()` updates, then applies retention.
    pub fn commit(&self, trainer: &Trainer, cursor: &Cursor, cfg: &Config) -> Result<()> {
        let step = trainer.global_step() as u64;
        let state = serde_json::json!({
            "step": step, "epoch": cursor.epoch, "position": cursor.position,
            "seed": cfg.run.seed, "world_size": 1,
        });
        let mut blobs: Vec<(&str, Bytes)> = trainer
            .export_state()?
            .into_iter()
            .map(|(n, b)| (n, Bytes::from(b)))
            .collect();
        blobs.push((STATE_BLOB, Bytes::from(serde_json::to_vec_pretty(&state)?)));
        let started = std::time::Instant::now();
        self.rt
            .block_on(self.store.commit(step, &blobs, cfg.to_json()))?;
        let deleted = self
            .rt
            .block_on(self.store.apply_retention(self.keep_last, None))?;
        tracing::info!(step, seconds = started.elapsed().as_secs_f64(), deleted = ?deleted, url = %self.url, "checkpoint committed");
        Ok(())
    }
}
