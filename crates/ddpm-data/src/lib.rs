//! Datasets for DDPM-RS. This first version reads IDX files (MNIST / Fashion-MNIST) and the
//! CIFAR-10 binary batches into memory as training tensors; deterministic epoch plans decide
//! the sample order.

pub mod cifar10;
pub mod decode;
pub mod encoded;
pub mod epoch;
pub mod folder;
pub mod idx;
pub mod loader;
pub mod lsun;
pub mod prepare;
pub mod samples;
pub mod shard_cache;
pub mod shards;
pub mod source;

pub use source::{open_source, ImageSet};

/// Errors raised while reading datasets.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("{path}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not in the expected format.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What was expected and what was found.
        reason: String,
    },
    /// An image that cannot be decoded; `origin` is the file, LMDB key, or shard and index.
    #[error("{origin}: cannot decode the image: {reason}")]
    Decode {
        /// Where the image came from.
        origin: String,
        /// Why.
        reason: String,
    },
    /// More images failed to decode than `data.max_bad_fraction` allows.
    #[error("{bad} of {total} images could not be read or decoded, more than data.max_bad_fraction = {max_fraction} (the first: {first})")]
    TooManyBad {
        /// Images skipped.
        bad: usize,
        /// Images in the source.
        total: usize,
        /// The configured limit.
        max_fraction: f64,
        /// The first bad image and why.
        first: String,
    },
    /// A bug or an impossible request inside this crate.
    #[error("{0}")]
    Internal(String),
    /// A `data.source` value that cannot be used.
    #[error("data.source {source_spec:?}: {reason}")]
    Source {
        /// The configured source.
        source_spec: String,
        /// Why it cannot be used.
        reason: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
