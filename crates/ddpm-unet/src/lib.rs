//! The U-Net of Ho, Jain & Abbeel (2020) (a PixelCNN++-style Wide-ResNet U-Net with
//! self-attention at 16x16, GroupNorm(32), swish and a sinusoidal time embedding).
//!
//! * [`UNet`] / [`UNetConfig`]: the network; parameter counts match the paper's models
//!   exactly (35,746,307 at CIFAR-10 32x32; 113,673,219 at 256x256).
//! * [`weights`]: our weight names (the official implementation's structure) and import/export
//!   of diffusers `UNet2DModel` safetensors, with a named error for every missing, extra or
//!   mis-shaped tensor.
//! * [`device`]: parsing `--device` and loading libtorch's CUDA library on demand.

mod blocks;
pub mod device;
mod model;
pub mod weights;

pub use model::{parameter_count, UNet, UNetConfig};

/// Errors raised by the U-Net crate.
#[derive(Debug, thiserror::Error)]
pub enum UNetError {
    /// A configuration value the U-Net cannot use.
    #[error("invalid U-Net config: `{key}`: {reason}")]
    Config {
        /// The offending key.
        key: String,
        /// What was expected.
        reason: String,
    },
    /// A weights file does not match the model.
    #[error("weights {path}: {reason}")]
    Weights {
        /// The weights file.
        path: String,
        /// Every missing, unexpected or mis-shaped tensor, by name.
        reason: String,
    },
    /// A device could not be used.
    #[error("device `{device}`: {reason}")]
    Device {
        /// The device that was asked for.
        device: String,
        /// Why it cannot be used and what to do.
        reason: String,
    },
    /// File I/O.
    #[error("{path}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A libtorch error.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result alias for this crate.
pub type Result<T, E = UNetError> = std::result::Result<T, E>;
