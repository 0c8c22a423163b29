//! Sample-quality metrics of the paper (Ho et al. 2020, Table 1): FID and Inception Score,
//! computed as the standard tools compute them.
//!
//! * [`preprocess`]: pixels to Inception input (299x299 "nv_bilinear" resize, TF range).
//! * [`torchscript::FidInception`]: pool3 features from the TF Inception as TorchScript.
//! * [`stats`]: mean and covariance accumulated in float64; `.npz` / `.safetensors` files.
//! * [`frechet`]: the Frechet distance, stable for singular covariances.
//! * [`score`]: the Inception Score over 10 splits.
//! * [`inception_v3::InceptionV3`]: pytorch-fid's Inception-v3 with its 1008-class head,
//!   from pytorch-fid's `pt_inception-2015-12-05` weights, for the Inception Score.
//! * [`images`]: image folders read as the reference tools read them.
//! * [`pipeline::FeatureCollector`]: pixel batches in, statistics (and IS) out.

pub mod frechet;
pub mod images;
pub mod inception_v3;
pub mod pipeline;
pub mod preprocess;
pub mod score;
pub mod stats;
pub mod torchscript;

pub use frechet::frechet_distance;
pub use inception_v3::InceptionV3;
pub use pipeline::{Classifier, Collected, FeatureCollector};
pub use score::{inception_score, IS_SPLITS};
pub use stats::{FeatureStats, StatsAccumulator};
pub use torchscript::FidInception;

/// Errors of the metrics: each names the file, tensor or statistic at fault.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A weights, image or statistics file could not be read or has the wrong content.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An argument or input is unusable; the message says what was expected.
    #[error("{0}")]
    Invalid(String),
    /// A libtorch error.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result alias for this crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;
