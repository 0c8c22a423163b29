//! Retention: which committed checkpoints to delete (a pure function of the listing), and
//! deleting them together with orphaned blobs of checkpoints that were never committed.

use crate::layout::MANIFEST;
use crate::store::CheckpointStore;
use crate::{CheckpointError, Result};
use object_store::ObjectStoreExt;

/// What one retention pass removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Committed checkpoints deleted (their manifest first).
    pub deleted: Vec<u64>,
    /// Uncommitted step directories (blobs of a writer that died before its manifest) removed.
    pub orphans: Vec<u64>,
}

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

/// Uncommitted step directories that are safe to clean: older than the newest committed
/// checkpoint and not the one in flight. A directory newer than the newest commit may belong
/// to a writer that is still uploading, so it is left alone.
pub fn plan_orphans(committed: &[u64], uncommitted: &[u64], in_flight: Option<u64>) -> Vec<u64> {
    let Some(&newest) = committed.iter().max() else {
        return Vec::new();
    };
    uncommitted
        .iter()
        .copied()
        .filter(|&s| s < newest && Some(s) != in_flight && !committed.contains(&s))
        .collect()
}

impl CheckpointStore {
    /// Deletes committed checkpoints beyond the newest `keep_last` (never the newest, never
    /// `in_flight`) and the blobs of uncommitted checkpoints older than the newest commit.
    /// A manifest goes before its blobs, so a half-deleted checkpoint no longer exists. A
    /// failed delete is logged and skipped, not fatal.
    pub async fn apply_retention(
        &self,
        keep_last: usize,
        in_flight: Option<u64>,
    ) -> Result<RetentionReport> {
        let by_step = self.step_objects().await?;
        let is_committed = |objs: &Vec<object_store::ObjectMeta>| {
            objs.iter().any(|m| m.location.filename() == Some(MANIFEST))
        };
        let committed: Vec<u64> = by_step
            .iter()
            .filter(|(_, o)| is_committed(o))
            .map(|(s, _)| *s)
            .collect();
        let uncommitted: Vec<u64> = by_step
            .iter()
            .filter(|(_, o)| !is_committed(o))
            .map(|(s, _)| *s)
            .collect();
        let mut report = RetentionReport::default();
        for step in plan_deletions(&committed, in_flight, keep_last)? {
            if let Err(e) = self.store.delete(&self.object(step, MANIFEST)).await {
                tracing::warn!(run = %self.run, step, error = %e, "could not delete a checkpoint manifest; keeping the checkpoint");
                continue;
            }
            report.deleted.push(step);
            self.delete_blobs(step, &by_step[&step]).await;
        }
        for step in plan_orphans(&committed, &uncommitted, in_flight) {
            tracing::info!(run = %self.run, step, "removing the blobs of a checkpoint that was never committed");
            self.delete_blobs(step, &by_step[&step]).await;
            report.orphans.push(step);
        }
        Ok(report)
    }

    /// Removes every uncommitted step directory. A writer calls this when it takes over a
    /// run (at start or resume): the blobs of a writer that died before its manifest would
    /// otherwise block or confuse the commit of the same step. Returns the steps cleaned.
    pub async fn remove_uncommitted(&self) -> Result<Vec<u64>> {
        let mut cleaned = Vec::new();
        for (step, objects) in self.step_objects().await? {
            if objects
                .iter()
                .any(|m| m.location.filename() == Some(MANIFEST))
            {
                continue;
            }
            tracing::warn!(run = %self.run, step, objects = objects.len(), "removing the blobs of an uncommitted checkpoint (a writer died before its manifest)");
            self.delete_blobs(step, &objects).await;
            cleaned.push(step);
        }
        Ok(cleaned)
    }

    async fn delete_blobs(&self, step: u64, objects: &[object_store::ObjectMeta]) {
        for o in objects {
            if o.location.filename() == Some(MANIFEST) {
                continue;
            }
            if let Err(e) = self.store.delete(&o.location).await {
                tracing::warn!(run = %self.run, step, object = %o.location, error = %e, "could not delete a blob");
            }
        }
    }
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
    fn orphans_are_only_the_old_uncommitted_steps() {
        assert_eq!(plan_orphans(&[10, 30], &[5, 20, 40], None), vec![5, 20]);
        assert_eq!(plan_orphans(&[10, 30], &[20], Some(20)), Vec::<u64>::new());
        assert_eq!(plan_orphans(&[], &[5], None), Vec::<u64>::new());
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
