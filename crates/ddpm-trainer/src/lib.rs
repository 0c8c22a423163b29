//! The single-process DDPM trainer, reused by the distributed worker.
//!
//! [`Trainer`] owns the U-Net, its EMA copy and the Adam state, all as flat buffers
//! ([`flat`]): one training step is Algorithm 1 (sample t and eps, one gradient step on the
//! configured Table 2 objective) followed by global-norm clipping, Adam with linear warmup,
//! and the EMA update. [`load_model`] builds a U-Net from a config and a weights file for
//! sampling.

pub mod flat;
pub mod malloc;
mod model_io;
pub mod snapshot;
pub mod state;
mod trainer;

pub use model_io::{load_model, save_weights_dir};
pub use snapshot::{SnapshotPool, StateSnapshot};
pub use trainer::{StepStats, Trainer, CPU_UPDATE_SLICE};

/// Errors raised by the trainer.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The U-Net could not be built or loaded.
    #[error(transparent)]
    UNet(#[from] ddpm_unet::UNetError),
    /// The diffusion process rejected an argument.
    #[error(transparent)]
    Diffusion(#[from] ddpm_diffusion::DiffusionError),
    /// File I/O.
    #[error("{path}")]
    Io {
        /// The file or directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A training-state blob that does not match the model.
    #[error("training state {blob}: {reason}")]
    State {
        /// The blob (e.g. optimizer.safetensors).
        blob: String,
        /// What is wrong.
        reason: String,
    },
    /// A batch that does not fit the model.
    #[error("batch: {0}")]
    Batch(String),
    /// A libtorch error.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// A broken internal invariant (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result alias for this crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
