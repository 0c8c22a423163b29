//! The training format of a prepared dataset: shards of raw uint8 samples (`[n, C, R, R]`,
//! channels-first, preprocessed once by `ddpm prepare`) plus a manifest, written last, that
//! lists every shard with its sample count and sha256. No I/O here: callers move the bytes.

use crate::{DataError, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Name of the dataset manifest object.
pub const DATASET_MANIFEST: &str = "dataset.json";

/// Manifest format written by this crate.
pub const DATASET_FORMAT: u32 = 1;

/// The sample encoding of the shards.
pub const RAW_UINT8_CHW: &str = "raw-uint8-chw";

/// One shard: source items `[index * shard_size, (index + 1) * shard_size)`, minus any that
/// were skipped as undecodable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// Object name, `shard-NNNNN.bin`.
    pub name: String,
    /// Samples in the shard.
    pub samples: u64,
    /// Size in bytes (`samples * channels * resolution^2`).
    pub bytes: u64,
    /// Lower-case hex sha256.
    pub sha256: String,
    /// Source items left out (origin and reason), under `on_bad_sample = "skip"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<(String, String)>,
}

/// A prepared dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetManifest {
    /// [`DATASET_FORMAT`].
    pub format: u32,
    /// [`RAW_UINT8_CHW`].
    pub encoding: String,
    /// The `data.source` it was prepared from.
    pub source: String,
    /// Side of the square samples.
    pub resolution: u32,
    /// 1 or 3.
    pub channels: u32,
    /// Source items per shard.
    pub shard_size: u64,
    /// Samples in all shards.
    pub samples: u64,
    /// Every shard, in order.
    pub shards: Vec<ShardEntry>,
}

/// Object name of shard `index`.
pub fn shard_name(index: usize) -> String {
    format!("shard-{index:05}.bin")
}

/// Lower-case hex sha256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl DatasetManifest {
    /// Bytes of one sample.
    pub fn sample_bytes(&self) -> u64 {
        self.channels as u64 * self.resolution as u64 * self.resolution as u64
    }

    /// Parses and checks a manifest; `origin` names it in errors.
    pub fn parse(bytes: &[u8], origin: &str) -> Result<Self> {
        let bad = |reason: String| DataError::Format {
            path: origin.to_string(),
            reason,
        };
        let m: DatasetManifest = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("not a dataset manifest: {e}")))?;
        if m.format != DATASET_FORMAT || m.encoding != RAW_UINT8_CHW {
            return Err(bad(format!(
                "format {} / encoding {:?}; this build reads format {DATASET_FORMAT}, {RAW_UINT8_CHW:?}",
                m.format, m.encoding
            )));
        }
        let total: u64 = m.shards.iter().map(|s| s.samples).sum();
        if total != m.samples {
            return Err(bad(format!(
                "shards hold {total} samples, the manifest says {}",
                m.samples
            )));
        }
        for s in &m.shards {
            if s.bytes != s.samples * m.sample_bytes() {
                return Err(bad(format!(
                    "{}: {} bytes for {} samples of {} bytes",
                    s.name,
                    s.bytes,
                    s.samples,
                    m.sample_bytes()
                )));
            }
        }
        Ok(m)
    }

    /// Checks a shard's bytes against its entry; the error names the shard.
    pub fn verify_shard(&self, entry: &ShardEntry, bytes: &[u8]) -> Result<()> {
        let bad = |reason: String| DataError::Format {
            path: entry.name.clone(),
            reason,
        };
        if bytes.len() as u64 != entry.bytes {
            return Err(bad(format!(
                "{} bytes, the manifest says {}",
                bytes.len(),
                entry.bytes
            )));
        }
        let sha = sha256_hex(bytes);
        if sha != entry.sha256 {
            return Err(bad(format!(
                "sha256 {sha}, the manifest says {}",
                entry.sha256
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> DatasetManifest {
        let shard = vec![7u8; 2 * 3 * 4 * 4];
        DatasetManifest {
            format: DATASET_FORMAT,
            encoding: RAW_UINT8_CHW.into(),
            source: "folder:x".into(),
            resolution: 4,
            channels: 3,
            shard_size: 2,
            samples: 2,
            shards: vec![ShardEntry {
                name: shard_name(0),
                samples: 2,
                bytes: shard.len() as u64,
                sha256: sha256_hex(&shard),
                skipped: vec![],
            }],
        }
    }

    #[test]
    fn manifests_round_trip_and_shards_verify() {
        let m = manifest();
        let json = serde_json::to_vec(&m).unwrap();
        assert_eq!(DatasetManifest::parse(&json, "d").unwrap(), m);
        m.verify_shard(&m.shards[0], &[7u8; 96]).unwrap();
        let mut flipped = vec![7u8; 96];
        flipped[10] = 8;
        let err = m
            .verify_shard(&m.shards[0], &flipped)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("shard-00000.bin") && err.contains("sha256"),
            "{err}"
        );
        let err = m
            .verify_shard(&m.shards[0], &[7u8; 95])
            .unwrap_err()
            .to_string();
        assert!(err.contains("95 bytes"), "{err}");
    }

    #[test]
    fn inconsistent_manifests_are_named() {
        let mut m = manifest();
        m.samples = 3;
        let err = DatasetManifest::parse(&serde_json::to_vec(&m).unwrap(), "s3://b/d/dataset.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("s3://b/d/dataset.json") && err.contains("3"),
            "{err}"
        );
        let err = DatasetManifest::parse(b"{}", "x").unwrap_err().to_string();
        assert!(err.contains("not a dataset manifest"), "{err}");
    }
}
