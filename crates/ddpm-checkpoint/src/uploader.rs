//! The background uploader: the training thread hands over host copies of the state and
//! goes on; one thread serialises, hashes, uploads, commits and applies retention.
//!
//! At most one checkpoint is in flight. When the next one is due while the last is still
//! uploading, [`Uploader::wait_for_slot`] says so (log, `ddpm_checkpoint_waits_total`) and
//! waits, so host memory never holds more than one pending state.

use crate::blob::Blob;
use crate::store::CheckpointStore;
use crate::{CheckpointError, Result};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Produces the blobs of a checkpoint; runs on the uploader thread (serialisation happens
/// there, not on the training thread). An error is a message naming what failed.
pub type BlobSource = Box<dyn FnOnce() -> std::result::Result<Vec<(String, Blob)>, String> + Send>;

/// One checkpoint handed to the uploader.
pub struct CheckpointJob {
    /// Training step of the state.
    pub step: u64,
    /// The blobs (serialised on the uploader thread).
    pub blobs: BlobSource,
    /// The resolved config, stored in the manifest.
    pub config: serde_json::Value,
}

/// Counters of an uploader; also exported as metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadStats {
    /// Checkpoints committed.
    pub committed: u64,
    /// Checkpoints that failed (nothing committed; the previous one stays the newest).
    pub failed: u64,
    /// Times a due checkpoint had to wait for the previous upload.
    pub waits: u64,
    /// Newest step committed by this uploader.
    pub last_committed: Option<u64>,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Shared {
    in_flight: Mutex<Option<u64>>,
    idle: Condvar,
    stats: Mutex<UploadStats>,
}

/// A background thread that commits checkpoints to one [`CheckpointStore`].
pub struct Uploader {
    tx: Option<mpsc::Sender<CheckpointJob>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    handle: tokio::runtime::Handle,
}

impl Uploader {
    /// Starts the uploader thread. `keep_last` (>= 2) is applied after every commit.
    pub fn spawn(store: CheckpointStore, keep_last: usize) -> Result<Self> {
        if keep_last < 2 {
            return Err(CheckpointError::KeepLast(keep_last));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ckpt-io")
            .enable_all()
            .build()
            .map_err(|e| {
                CheckpointError::Internal(format!("starting the uploader runtime: {e}"))
            })?;
        let handle = rt.handle().clone();
        let (tx, rx) = mpsc::channel::<CheckpointJob>();
        let shared = Arc::new(Shared::default());
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ckpt-upload".into())
            .spawn(move || {
                for job in rx {
                    let step = job.step;
                    let started = Instant::now();
                    // A panic in a job must not leave the slot taken (training would wait
                    // for it forever): it counts as a failed checkpoint.
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_job(&rt, &store, keep_last, job)
                    }))
                    .unwrap_or_else(|panic| {
                        let what = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "unknown panic".into());
                        Err(CheckpointError::Internal(format!(
                            "checkpoint step-{step}: the uploader panicked: {what}"
                        )))
                    });
                    let seconds = started.elapsed().as_secs_f64();
                    let mut stats = worker.stats.lock().expect("uploader state");
                    match outcome {
                        Ok(bytes) => {
                            stats.committed += 1;
                            stats.last_committed = Some(step);
                            metrics::counter!("ddpm_checkpoints_committed_total").increment(1);
                            metrics::counter!("ddpm_checkpoint_bytes_total").increment(bytes);
                            metrics::histogram!("ddpm_checkpoint_seconds").record(seconds);
                            metrics::gauge!("ddpm_checkpoint_last_step").set(step as f64);
                            tracing::info!(run = %store.run(), step, seconds, bytes, "checkpoint committed");
                        }
                        Err(e) => {
                            stats.failed += 1;
                            stats.last_error = Some(e.to_string());
                            metrics::counter!("ddpm_checkpoint_failures_total").increment(1);
                            tracing::error!(run = %store.run(), step, error = %e, "checkpoint failed; training goes on and the previous checkpoint stays the newest");
                        }
                    }
                    drop(stats);
                    *worker.in_flight.lock().expect("uploader state") = None;
                    metrics::gauge!("ddpm_checkpoint_in_flight").set(0.0);
                    worker.idle.notify_all();
                }
            })
            .map_err(|e| CheckpointError::Internal(format!("starting the uploader thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            shared,
            thread: Some(thread),
            handle,
        })
    }

    /// Blocks until no checkpoint is in flight. When one is, logs that checkpoint `step` is
    /// waiting for it and counts the wait (`ddpm_checkpoint_waits_total`).
    pub fn wait_for_slot(&self, step: u64) {
        let mut in_flight = self.shared.in_flight.lock().expect("uploader state");
        if let Some(busy) = *in_flight {
            self.shared.stats.lock().expect("uploader state").waits += 1;
            metrics::counter!("ddpm_checkpoint_waits_total").increment(1);
            tracing::warn!(
                step,
                uploading = busy,
                "checkpoint is due while the previous one is still uploading; waiting for it"
            );
            let started = Instant::now();
            while in_flight.is_some() {
                in_flight = self.shared.idle.wait(in_flight).expect("uploader state");
            }
            metrics::histogram!("ddpm_checkpoint_wait_seconds")
                .record(started.elapsed().as_secs_f64());
        }
    }

    /// Hands a checkpoint to the uploader thread and returns at once (after waiting for the
    /// previous one, see [`Uploader::wait_for_slot`]).
    pub fn submit(&self, job: CheckpointJob) {
        self.wait_for_slot(job.step);
        *self.shared.in_flight.lock().expect("uploader state") = Some(job.step);
        metrics::gauge!("ddpm_checkpoint_in_flight").set(1.0);
        self.tx
            .as_ref()
            .expect("uploader is running")
            .send(job)
            .expect("uploader thread is alive");
    }

    /// Blocks until the checkpoint in flight (if any) is done.
    pub fn wait_idle(&self) {
        let mut in_flight = self.shared.in_flight.lock().expect("uploader state");
        while in_flight.is_some() {
            in_flight = self.shared.idle.wait(in_flight).expect("uploader state");
        }
    }

    /// The uploader's runtime. Run every other request to the same store on it (with
    /// `handle().block_on(..)` from a non-async thread): HTTP clients keep connections per
    /// runtime, and a connection opened on a runtime nobody drives would stall the uploads.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// The counters so far.
    pub fn stats(&self) -> UploadStats {
        self.shared.stats.lock().expect("uploader state").clone()
    }

    /// Waits for the checkpoint in flight, stops the thread and returns the counters.
    pub fn finish(mut self) -> UploadStats {
        self.stop();
        self.stats()
    }

    fn stop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the checkpoint uploader thread panicked");
            }
        }
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serialises, commits and applies retention; returns the bytes committed.
fn run_job(
    rt: &tokio::runtime::Runtime,
    store: &CheckpointStore,
    keep_last: usize,
    job: CheckpointJob,
) -> Result<u64> {
    let step = job.step;
    let blobs = (job.blobs)().map_err(|reason| CheckpointError::Serialise { step, reason })?;
    let named: Vec<(&str, Blob)> = blobs.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let bytes = named.iter().map(|(_, b)| b.len() as u64).sum();
    rt.block_on(store.commit(step, &named, job.config))?;
    drop(named);
    drop(blobs);
    match rt.block_on(store.apply_retention(keep_last, None)) {
        Ok(r) if !r.deleted.is_empty() || !r.orphans.is_empty() => {
            tracing::info!(run = %store.run(), deleted = ?r.deleted, orphans = ?r.orphans, "retention");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(run = %store.run(), error = %e, "retention failed; nothing was deleted")
        }
    }
    Ok(bytes)
}
