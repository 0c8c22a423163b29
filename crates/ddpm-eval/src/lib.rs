//! Sample-quality metrics of the paper (Ho et al. 2020, Table 1): FID and Inception Score,
//! computed as the standard tools compute them.

pub mod inception_v3;

/// Errors of the metrics: each names the file, tensor or statistic at fault.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A weights or statistics file could not be read or has the wrong content.
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
