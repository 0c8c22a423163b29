//! Committing and resuming the full training state of a run (`ddpm train`, and rank 0 of a
//! distributed run) through the checkpoint store. The training thread only copies the state to host memory; serialisation, hashing
//! and upload run on the checkpoint uploader's thread.

use crate::error::{Context, Result, WorkerError};
use ddpm_checkpoint::{
    open_url_with, resolve_root_url, Blob, CheckpointJob, CheckpointStore, TrainState, UploadStats,
    Uploader,
};
use ddpm_config::Config;
use ddpm_data::epoch::Cursor;
use ddpm_trainer::{SnapshotPool, Trainer};
use std::path::Path;
use std::time::Instant;

/// Blob holding the step, the data cursor, the RNG scheme and the world size (read back by
/// [`ddpm_checkpoint::TrainState`]).
pub use ddpm_checkpoint::STATE_BLOB;

/// A training state read back from a checkpoint.
pub struct Resumed {
    /// Completed updates.
    pub step: i64,
    /// Where the data order continues.
    pub cursor: Cursor,
    /// The order the cursor walks ([`ddpm_data::epoch::Order::describe`]); "uniform" for
    /// checkpoints written before the order was recorded.
    pub data_order: String,
    /// Model, EMA and optimizer blobs.
    pub blobs: Vec<(String, Vec<u8>)>,
}

/// The checkpoints of one run: every store request runs on the uploader's runtime.
pub struct Checkpoints {
    store: CheckpointStore,
    uploader: Uploader,
    /// Host buffers reused by every snapshot (one snapshot's worth stays resident).
    pool: SnapshotPool,
    url: String,
}

/// The checkpoint root URL of a config: `checkpoint.url`, or `<out>/checkpoints`.
pub fn root_url(cfg: &Config, out: &Path) -> Result<String> {
    resolve_root_url(&cfg.checkpoint.url, out).context("checkpoint.url")
}

/// The state.json of a checkpoint.
fn state_json(
    step: u64,
    cursor: &Cursor,
    data_order: &str,
    cfg: &Config,
    world_size: usize,
) -> serde_json::Value {
    serde_json::json!({
        "step": step,
        "epoch": cursor.epoch,
        "position": cursor.position,
        "data_order": data_order,
        "seed": cfg.run.seed,
        // Every step reseeds libtorch from (seed, step): the RNG state is a function of them.
        "rng": {"scheme": "per-step reseed from (seed, step); the global batch's t and noise drawn at once", "seed": cfg.run.seed, "step": step},
                "world_size": world_size,
    })
}

impl Checkpoints {
    /// Opens the run's checkpoints and starts the uploader.
    pub fn open(cfg: &Config, out: &Path) -> Result<Self> {
        let url = root_url(cfg, out)?;
        let (store, prefix) = open_url_with(&url, &cfg.checkpoint.options)
            .with_context(|| "checkpoint.url / checkpoint.options")?;
        let store = CheckpointStore::new(store, prefix, &cfg.run.name).context("run.name")?;
        let uploader = Uploader::spawn(store.clone(), cfg.checkpoint.keep_last as usize)
            .context("checkpoint.keep_last")?;
        Ok(Self {
            store,
            uploader,
            pool: SnapshotPool::default(),
            url,
        })
    }

    /// Where the checkpoints live.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Steps with a committed manifest.
    pub fn committed(&self) -> Result<Vec<u64>> {
        Ok(self
            .uploader
            .handle()
            .block_on(self.store.committed_steps())?)
    }

    /// Deletes every checkpoint of the run (the user asked to start over).
    pub fn delete_run(&self) -> Result<Vec<u64>> {
        Ok(self.uploader.handle().block_on(self.store.delete_run())?)
    }

    /// Deletes the given committed checkpoints.
    pub fn delete_steps(&self, steps: &[u64]) -> Result<()> {
        Ok(self
            .uploader
            .handle()
            .block_on(self.store.delete_steps(steps))?)
    }

    /// Makes this process the run's writer, continuing after `step`: committed checkpoints
    /// newer than `step` (the ones resume skipped because they do not verify) are withdrawn,
    /// and blobs of checkpoints that were never committed (a writer that died before its
    /// manifest) are removed.
    pub fn take_over(&self, step: u64) -> Result<()> {
        for newer in self.committed()?.into_iter().filter(|s| *s > step) {
            self.uploader.handle().block_on(self.store.reject(
                newer,
                &format!("does not verify; training resumed from step {step}"),
            ))?;
        }
        let cleaned = self
            .uploader
            .handle()
            .block_on(self.store.remove_uncommitted())?;
        if !cleaned.is_empty() {
            tracing::warn!(steps = ?cleaned, url = %self.url, "removed uncommitted checkpoint blobs left by an earlier writer");
        }
        Ok(())
    }

    /// Checkpoint `step` (verified; no fallback: the user asked for it), or the newest that
    /// verifies (newer corrupted ones are skipped with a warning naming the blob).
    pub fn load(&self, step: Option<u64>) -> Result<Option<Resumed>> {
        let (m, blobs) = match step {
            Some(s) => self
                .uploader
                .handle()
                .block_on(self.store.load(s))
                .with_context(|| {
                    format!("checkpoint {}/step-{s} in {}", self.store.run(), self.url)
                })?,
            None => match self
                .uploader
                .handle()
                .block_on(self.store.load_newest_verified())?
            {
                Some(found) => found,
                None => return Ok(None),
            },
        };
        let state = blobs
            .iter()
            .find(|(n, _)| n == STATE_BLOB)
            .with_context(|| format!("checkpoint step-{}: no {STATE_BLOB}", m.step))?;
        let s = TrainState::parse(&state.1, m.step).map_err(|reason| {
            WorkerError::Invalid(format!(
                "checkpoint step-{}: {STATE_BLOB}: {reason}",
                m.step
            ))
        })?;
        Ok(Some(Resumed {
            step: s.step as i64,
            cursor: Cursor::at(s.epoch, s.position),
            data_order: s.data_order,
            blobs: blobs
                .into_iter()
                .filter(|(n, _)| n != STATE_BLOB)
                .map(|(n, b)| (n, b.to_vec()))
                .collect(),
        }))
    }

    /// Allocates the host buffers of the snapshots before training starts (one snapshot's
    /// worth of host memory, kept for the run), so no checkpoint faults them in mid-run.
    pub fn prepare(&self, trainer: &Trainer) {
        let started = Instant::now();
        trainer.warm_snapshot_pool(&self.pool);
        tracing::debug!(
            seconds = started.elapsed().as_secs_f64(),
            "snapshot buffers allocated"
        );
    }

    /// Hands the trainer's state after `trainer.global_step()` updates (taken by
    /// `world_size` ranks) to the uploader.
    /// Blocks only to wait for the previous checkpoint (logged and counted) and to copy the
    /// state to host memory. Returns the seconds the training thread spent here.
    pub fn submit(
        &self,
        trainer: &Trainer,
        cursor: &Cursor,
        data_order: &str,
        cfg: &Config,
        world_size: usize,
    ) -> f64 {
        let started = Instant::now();
        let step = trainer.global_step() as u64;
        self.uploader.wait_for_slot(step);
        let snapshot = trainer.snapshot(&self.pool);
        let state = state_json(step, cursor, data_order, cfg, world_size);
        self.uploader.submit(CheckpointJob {
            step,
            blobs: Box::new(move || {
                let mut blobs: Vec<(String, Blob)> = snapshot
                    .into_segments()
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .map(|(n, segments)| (n.to_string(), Blob::from_segments(segments)))
                    .collect();
                let state = serde_json::to_vec_pretty(&state).map_err(|e| e.to_string())?;
                blobs.push((STATE_BLOB.to_string(), Blob::from(state)));
                Ok(blobs)
            }),
            config: cfg.to_json(),
        });
        let stall = started.elapsed().as_secs_f64();
        tracing::debug!(
            step,
            stall_seconds = stall,
            "checkpoint handed to the uploader"
        );
        stall
    }

    /// The newest step the uploader has committed so far.
    pub fn last_committed(&self) -> Option<u64> {
        self.uploader.stats().last_committed
    }

    /// Waits for the checkpoint in flight and returns the uploader's counters.
    pub fn finish(self) -> UploadStats {
        self.uploader.finish()
    }
}
