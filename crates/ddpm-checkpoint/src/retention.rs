//! Which committed checkpoints to delete (a pure function of the listing).

use crate::{CheckpointError, Result};

/// Steps to delete so that the newest `keep_last` committed checkpoints remain. The newest
/// committed checkpoint and the one in flight are never deleted. `keep_last` must be >= 2.
pub fn plan_deletions(
    committed: &[u64],
    in_flight: Option<u64>,
    keep_last: usize,
) -> Result<Vec<u64>> {
    if keep_last < 2 {
        return Err(CheckpointError::KeepLast(keep_last));
    }
    let mut steps: Vec<u64> = committed.to_vec();
    steps.sort_unstable();
    steps.dedup();
    let keep_from = steps.len().saturating_sub(keep_last);
    Ok(steps[..keep_from]
        .iter()
        .copied()
        .filter(|s| Some(*s) != in_flight)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_k_and_the_one_in_flight() {
        assert_eq!(
            plan_deletions(&[10, 30, 20, 40], None, 2).unwrap(),
            vec![10, 20]
        );
        assert_eq!(
            plan_deletions(&[10, 20, 30, 40], Some(20), 2).unwrap(),
            vec![10]
        );
        assert_eq!(plan_deletions(&[10], None, 3).unwrap(), Vec::<u64>::new());
        assert!(plan_deletions(&[], None, 2).unwrap().is_empty());
    }

    #[test]
    fn keep_last_one_is_rejected_with_the_reason() {
        let err = plan_deletions(&[1, 2], None, 1).unwrap_err().to_string();
        assert!(
            err.contains("keep_last = 1") && err.contains(">= 2"),
            "{err}"
        );
    }

    #[test]
    fn the_newest_is_never_planned_for_deletion() {
        for k in 2..6 {
            for n in 0..10u64 {
                let steps: Vec<u64> = (0..n).collect();
                let del = plan_deletions(&steps, None, k).unwrap();
                if let Some(newest) = steps.last() {
                    assert!(!del.contains(newest));
                }
                assert_eq!(del.len(), (n as usize).saturating_sub(k));
            }
        }
    }
}
