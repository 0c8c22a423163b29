//! Checkpoints in object storage: layout, manifests, atomic commit, verification, retention.
//!
//! A checkpoint of run `R` at step `N` is the set of blobs under `R/step-N/` together with
//! `R/step-N/manifest.json`. The manifest is written last and only if absent
//! (`PutMode::Create`), so a checkpoint either exists whole or does not exist: readers list
//! manifests, never blobs. Every blob's size and sha256 are in the manifest and are checked
//! on load.

mod blob;
mod commit;
mod layout;
mod manifest;
mod open;
pub mod retention;
mod store;
mod train_state;
mod uploader;

pub use blob::{put_blob, Blob};
pub use layout::{
    parse_step_dir, step_dir, validate_name, LATEST, MANIFEST, REJECTED, WRITER_LOCK,
};
pub use manifest::{sha256_hex, BlobEntry, Manifest, MANIFEST_FORMAT};
pub use open::{open_url, open_url_with, resolve_root_url, StoreOptions};
pub use retention::RetentionReport;
pub use store::{CheckpointStore, UploadPolicy};
pub use train_state::{TrainState, STATE_BLOB};
pub use uploader::{BlobSource, CheckpointJob, UploadStats, Uploader};

/// Errors of the checkpoint crate; each names the run, step or blob at fault.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A run or blob name that would escape its prefix or is not a plain name.
    #[error("invalid {what} {name:?}: {reason}")]
    InvalidName {
        /// What kind of name (run, blob).
        what: &'static str,
        /// The name.
        name: String,
        /// What is allowed.
        reason: String,
    },
    /// A step already has a committed manifest.
    #[error("checkpoint {run}/step-{step} is already committed")]
    AlreadyCommitted {
        /// Run.
        run: String,
        /// Step.
        step: u64,
    },
    /// Another writer is committing the same step.
    #[error("checkpoint {run}/step-{step} is being written by another writer ({holder}); one writer per run")]
    ConcurrentWriter {
        /// Run.
        run: String,
        /// Step.
        step: u64,
        /// The other writer's id, as it wrote it.
        holder: String,
    },
    /// A manifest written by a build with another manifest format.
    #[error("checkpoint {run}/step-{step}: manifest format {found}, this build reads format {supported} (was it written by a newer version?)")]
    UnsupportedFormat {
        /// Run.
        run: String,
        /// Step.
        step: u64,
        /// Format found.
        found: u32,
        /// Format this build reads.
        supported: u32,
    },
    /// A store operation on one object of a checkpoint failed.
    #[error("checkpoint {run}/step-{step}: {object}: {source}")]
    Io {
        /// Run.
        run: String,
        /// Step.
        step: u64,
        /// Object name.
        object: String,
        /// The store's error.
        source: Box<object_store::Error>,
    },
    /// A blob failed verification.
    #[error("checkpoint {run}/step-{step}: blob {blob}: {reason}")]
    Corrupt {
        /// Run.
        run: String,
        /// Step.
        step: u64,
        /// Blob name.
        blob: String,
        /// What did not match.
        reason: String,
    },
    /// A manifest that does not parse or does not describe this checkpoint.
    #[error("checkpoint {run}/step-{step}: manifest: {reason}")]
    BadManifest {
        /// Run.
        run: String,
        /// Step.
        step: u64,
        /// What is wrong.
        reason: String,
    },
    /// `keep_last` below 2.
    #[error("retention keep_last = {0}: expected >= 2 (the newest checkpoint must survive a corrupt upload of the next)")]
    KeepLast(usize),
    /// A store URL that cannot be opened.
    #[error("store URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Uploading one object of a checkpoint failed; nothing was committed.
    #[error("checkpoint {run}/step-{step}: uploading {blob}: {source}")]
    Upload {
        /// Run.
        run: String,
        /// Step.
        step: u64,
        /// Object name.
        blob: String,
        /// The store's error.
        source: Box<object_store::Error>,
    },
    /// Producing the blobs of a checkpoint failed.
    #[error("checkpoint step-{step}: preparing the blobs: {reason}")]
    Serialise {
        /// Step.
        step: u64,
        /// What failed.
        reason: String,
    },
    /// A conditional update kept losing to concurrent writers.
    #[error("run {run}: {what}: too many concurrent updates")]
    Contended {
        /// Run.
        run: String,
        /// What was being updated.
        what: String,
    },
    /// Threads or runtimes could not be started.
    #[error("{0}")]
    Internal(String),
    /// An object-store operation failed.
    #[error("object store: {0}")]
    Store(#[from] Box<object_store::Error>),
}

/// Result alias for this crate.
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;

impl From<object_store::Error> for CheckpointError {
    fn from(e: object_store::Error) -> Self {
        Self::Store(Box::new(e))
    }
}
