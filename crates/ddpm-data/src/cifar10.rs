//! CIFAR-10 binary version (`cifar-10-batches-bin/`).
//!
//! Each of data_batch_1..5.bin (training) and test_batch.bin holds 10,000 records of 3,073
//! bytes: one label byte (0-9), then 1,024 red, 1,024 green and 1,024 blue bytes, each plane a
//! row-major 32x32 image.

use crate::{DataError, Result};
use std::path::Path;

/// Bytes per record: label + 3 x 32 x 32.
pub const RECORD_BYTES: usize = 1 + 3 * 32 * 32;

/// Which files to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// data_batch_1.bin .. data_batch_5.bin (50,000 images).
    Train,
    /// test_batch.bin (10,000 images).
    Test,
}

/// Images (`[N, 3, 32, 32]` planes, row-major) and labels of a split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cifar10 {
    /// N x 3 x 32 x 32 bytes.
    pub pixels: Vec<u8>,
    /// N labels in 0..=9.
    pub labels: Vec<u8>,
}

/// Parses one batch file's bytes; `path` names it in errors.
pub fn parse_batch(bytes: &[u8], path: &str, out: &mut Cifar10) -> Result<()> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD_BYTES) {
        return Err(DataError::Format {
            path: path.into(),
            reason: format!(
                "size {} is not a positive multiple of the {RECORD_BYTES}-byte CIFAR-10 record",
                bytes.len()
            ),
        });
    }
    for (i, rec) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        if rec[0] > 9 {
            return Err(DataError::Format {
                path: path.into(),
                reason: format!("record {i} has label {} (expected 0-9)", rec[0]),
            });
        }
        out.labels.push(rec[0]);
        out.pixels.extend_from_slice(&rec[1..]);
    }
    Ok(())
}

/// Reads a split from the `cifar-10-batches-bin` directory.
pub fn read(dir: &Path, split: Split) -> Result<Cifar10> {
    let names: Vec<String> = match split {
        Split::Train => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
        Split::Test => vec!["test_batch.bin".into()],
    };
    let mut out = Cifar10 {
        pixels: Vec::new(),
        labels: Vec::new(),
    };
    for name in names {
        let path = dir.join(&name);
        let p = path.display().to_string();
        let bytes = std::fs::read(&path).map_err(|source| DataError::Io {
            path: p.clone(),
            source,
        })?;
        parse_batch(&bytes, &p, &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(label: u8, fill: u8) -> Vec<u8> {
        let mut r = vec![label];
        r.extend((0..3 * 1024).map(|i| fill.wrapping_add((i / 1024) as u8)));
        r
    }

    #[test]
    fn reads_all_five_training_batches_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for b in 1..=5u8 {
            let bytes: Vec<u8> = (0..2).flat_map(|i| record(b, 10 * b + i)).collect();
            std::fs::write(dir.path().join(format!("data_batch_{b}.bin")), bytes).unwrap();
        }
        let c = read(dir.path(), Split::Train).unwrap();
        assert_eq!(c.labels, vec![1, 1, 2, 2, 3, 3, 4, 4, 5, 5]);
        assert_eq!(c.pixels.len(), 10 * 3072);
        // Second image of batch 1: red plane 11, green 12, blue 13.
        assert_eq!(
            (c.pixels[3072], c.pixels[3072 + 1024], c.pixels[3072 + 2048]),
            (11, 12, 13)
        );
    }

    #[test]
    fn truncated_files_and_bad_labels_are_named() {
        let mut out = Cifar10 {
            pixels: vec![],
            labels: vec![],
        };
        let err = parse_batch(&record(1, 0)[..100], "x.bin", &mut out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.bin") && err.contains("3073"), "{err}");
        let err = parse_batch(&record(12, 0), "y.bin", &mut out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("y.bin") && err.contains("label 12"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let err = read(dir.path(), Split::Test).unwrap_err().to_string();
        assert!(err.contains("test_batch.bin"), "{err}");
    }
}
