//! IDX files (MNIST, Fashion-MNIST), raw or gzip-compressed.
//!
//! Format: big-endian magic `0x0000 08 NN` (type 0x08 = unsigned byte, NN = number of
//! dimensions), then NN big-endian u32 dimension sizes, then the data.
//! Images are `0x00000803` (count, rows, cols); labels `0x00000801` (count).

use crate::{DataError, Result};
use std::io::Read;
use std::path::Path;

/// A decoded IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimension sizes, outermost first.
    pub dims: Vec<usize>,
    /// Row-major data.
    pub data: Vec<u8>,
}

/// Reads an IDX file; `.gz` files (by magic bytes) are decompressed.
pub fn read(path: &Path) -> Result<IdxArray> {
    let p = path.display().to_string();
    let raw = std::fs::read(path).map_err(|source| DataError::Io {
        path: p.clone(),
        source,
    })?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| DataError::Format {
                path: p.clone(),
                reason: format!("corrupt gzip stream: {e}"),
            })?;
        out
    } else {
        raw
    };
    parse(&bytes).map_err(|reason| DataError::Format { path: p, reason })
}

/// Parses IDX bytes (uncompressed).
pub fn parse(bytes: &[u8]) -> std::result::Result<IdxArray, String> {
    if bytes.len() < 4 {
        return Err(format!(
            "too short for an IDX header ({} bytes)",
            bytes.len()
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(format!(
            "bad IDX magic {:02x}{:02x}{:02x}{:02x}: expected 0x000008NN (unsigned byte data)",
            bytes[0], bytes[1], bytes[2], bytes[3]
        ));
    }
    let ndim = bytes[3] as usize;
    if ndim == 0 {
        return Err("IDX file declares zero dimensions".into());
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(format!(
            "truncated IDX header: need {header} bytes, have {}",
            bytes.len()
        ));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize
        })
        .collect();
    let n: usize = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("IDX dimensions overflow")?;
    let body = &bytes[header..];
    if body.len() != n {
        return Err(format!(
            "IDX dims {dims:?} need {n} data bytes, file has {}",
            body.len()
        ));
    }
    Ok(IdxArray {
        dims,
        data: body.to_vec(),
    })
}

/// Encodes an IDX array (used by tests and fixture generators).
pub fn encode(a: &IdxArray) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, a.dims.len() as u8];
    for d in &a.dims {
        out.extend_from_slice(&(*d as u32).to_be_bytes());
    }
    out.extend_from_slice(&a.data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_headers() {
        let a = IdxArray {
            dims: vec![2, 3, 4],
            data: (0..24).collect(),
        };
        let bytes = encode(&a);
        assert_eq!(bytes[..4], [0, 0, 8, 3]);
        assert_eq!(parse(&bytes).unwrap(), a);
        assert!(parse(&bytes[..bytes.len() - 1])
            .unwrap_err()
            .contains("need 24 data bytes"));
        assert!(parse(&[0, 0, 9, 1, 0, 0, 0, 1, 5])
            .unwrap_err()
            .contains("bad IDX magic"));
        assert!(parse(&[0, 0, 8]).unwrap_err().contains("too short"));
    }

    #[test]
    fn reads_gzip_files() {
        use std::io::Write;
        let a = IdxArray {
            dims: vec![1, 2, 2],
            data: vec![1, 2, 3, 4],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&encode(&a)).unwrap();
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
        assert_eq!(read(&path).unwrap(), a);
    }
}
