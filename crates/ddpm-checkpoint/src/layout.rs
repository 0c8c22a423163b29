//! Object keys of checkpoints.

use crate::{CheckpointError, Result};
use object_store::path::Path;

/// Name of the manifest object in a step directory.
pub const MANIFEST: &str = "manifest.json";

/// Claim object a writer creates (create-only) in a step directory before its blobs.
pub const WRITER_LOCK: &str = "writer.lock";

/// Directory in a run where withdrawn manifests are kept as `step-N.json`
/// (see `CheckpointStore::reject`).
pub const REJECTED: &str = "rejected";

/// Name of the pointer object in a run directory: `{"step": N}` of the newest commit.
pub const LATEST: &str = "latest";

/// Checks that `name` is a plain name: non-empty, letters, digits, `-`, `_`, `.`, and not
/// `.` or `..` (no path separators, so it cannot escape its prefix).
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(CheckpointError::InvalidName {
            what,
            name: name.to_string(),
            reason: "expected letters, digits, '-', '_', '.', and not '.' or '..'".into(),
        })
    }
}

/// `prefix/run/step-N`.
pub fn step_dir(prefix: &Path, run: &str, step: u64) -> Path {
    prefix.clone().join(run).join(format!("step-{step}"))
}

/// The step of a `step-N` directory name.
pub fn parse_step_dir(segment: &str) -> Option<u64> {
    let digits = segment.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_are_rejected() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", "/abs"] {
            assert!(validate_name("run", bad).is_err(), "{bad:?}");
        }
        for good in ["cifar10", "run-1.2_x"] {
            validate_name("run", good).unwrap();
        }
    }

    #[test]
    fn step_directories_round_trip() {
        let d = step_dir(&Path::from("ckpt"), "r", 1200);
        assert_eq!(d.as_ref(), "ckpt/r/step-1200");
        assert_eq!(parse_step_dir("step-1200"), Some(1200));
        for bad in ["step-", "step-1a", "steps-1", "step--1"] {
            assert_eq!(parse_step_dir(bad), None, "{bad}");
        }
    }
}
