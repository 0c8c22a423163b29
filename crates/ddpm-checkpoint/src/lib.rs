//! Checkpoints in object storage: layout, manifests, atomic commit, verification, retention.
//!
//! A checkpoint of run `R` at step `N` is the set of blobs under `R/step-N/` together with
//! `R/step-N/manifest.json`. The manifest is written last and only if absent
//! (`PutMode::Create`), so a checkpoint either exists whole or does not exist: readers list
//! manifests, never blobs. Every blob's size and sha256 are in the manifest and are checked
//! on load.

mod layout;
mod manifest;
pub mod retention;
mod store;

pub use layout::{step_dir, validate_name, MANIFEST};
pub use manifest::{BlobEntry, Manifest, MANIFEST_FORMAT};
pub use store::{open_url, CheckpointStore};

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
    /// An object-store operation failed.
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
}

/// Result alias for this crate.
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;
