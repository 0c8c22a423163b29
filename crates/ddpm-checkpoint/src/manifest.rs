//! The manifest: the last object of a checkpoint, listing every blob.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Manifest format version written by this crate.
pub const MANIFEST_FORMAT: u32 = 1;

/// One blob of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobEntry {
    /// Object name inside the step directory (e.g. `ema.safetensors`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex sha256 of the contents.
    pub sha256: String,
}

/// What a committed checkpoint contains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version ([`MANIFEST_FORMAT`]).
    pub format: u32,
    /// Run name.
    pub run: String,
    /// Training step.
    pub step: u64,
    /// Every blob, in the order written.
    pub blobs: Vec<BlobEntry>,
    /// The resolved configuration of the run.
    pub config: serde_json::Value,
}

/// Lower-case hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_a_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
