//! Retention: which committed checkpoints to delete (a pure function of the listing), and
//! deleting them together with orphaned blobs of checkpoints that were never committed.

use crate::layout::{MANIFEST, REJECTED};
use crate::store::{manifest_of, CheckpointStore};
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
        let (committed, uncommitted): (Vec<u64>, Vec<u64>) = by_step
            .keys()
            .partition(|s| manifest_of(&by_step[*s]).is_some());
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
            if manifest_of(&objects).is_some() {
                continue;
            }
            tracing::warn!(run = %self.run, step, objects = objects.len(), "removing the blobs of an uncommitted checkpoint (a writer died before its manifest)");
            self.delete_blobs(step, &objects).await;
            cleaned.push(step);
        }
        Ok(cleaned)
    }

    /// Deletes every checkpoint of the run, committed or not, and the `latest` pointer (a
    /// user asked to start the run over). Returns the steps removed.
    pub async fn delete_run(&self) -> Result<Vec<u64>> {
        let steps: Vec<u64> = self.step_objects().await?.into_keys().collect();
        self.delete_steps(&steps).await?;
        match self.store.delete(&self.latest_path()).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(steps)
    }

    /// Deletes the checkpoints of `steps`: every manifest first (so none of them exists any
    /// more even if a blob delete fails), then their blobs; drops the `latest` pointer when
    /// it names one of them. A failed manifest delete is returned; a failed blob delete is
    /// logged (the blob is an orphan that retention removes later).
    pub async fn delete_steps(&self, steps: &[u64]) -> Result<()> {
        for step in steps {
            match self.store.delete(&self.object(*step, MANIFEST)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if self
            .read_latest_pointer()
            .await?
            .is_some_and(|p| steps.contains(&p))
        {
            match self.store.delete(&self.latest_path()).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let by_step = self.step_objects().await?;
        for step in steps {
            if let Some(objects) = by_step.get(step) {
                self.delete_blobs(*step, objects).await;
            }
        }
        Ok(())
    }

    /// Withdraws a committed checkpoint that failed verification, so the writer that
    /// resumed before it can commit that step again. Nothing is deleted: the manifest (first,
    /// so the checkpoint stops existing) and every blob move to `<run>/rejected/step-N/`
    /// with a `reason.json` (intact blobs, e.g. the EMA weights, stay usable). The `latest`
    /// pointer is dropped if it names the step.
    pub async fn reject(&self, step: u64, reason: &str) -> Result<()> {
        let objects = self.step_objects().await?.remove(&step).unwrap_or_default();
        let Some(manifest) = manifest_of(&objects) else {
            return Ok(());
        };
        let dest = self.run_dir().join(REJECTED).join(format!("step-{step}"));
        self.store
            .rename(&manifest.location, &dest.clone().join(MANIFEST))
            .await
            .map_err(|e| self.io(step, MANIFEST, e))?;
        for o in &objects {
            let Some(name) = o.location.filename().filter(|n| *n != MANIFEST) else {
                continue;
            };
            if let Err(e) = self
                .store
                .rename(&o.location, &dest.clone().join(name))
                .await
            {
                tracing::warn!(run = %self.run, step, object = %o.location, error = %e, "could not move a withdrawn checkpoint's blob");
            }
        }
        let record = serde_json::json!({ "step": step, "reason": reason });
        self.store
            .put(
                &dest.join("reason.json"),
                serde_json::to_vec_pretty(&record).expect("json").into(),
            )
            .await
            .map_err(|e| self.io(step, "reason.json", e))?;
        if self.read_latest_pointer().await? == Some(step) {
            match self.store.delete(&self.latest_path()).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.io(step, crate::layout::LATEST, e)),
            }
        }
        tracing::warn!(run = %self.run, step, reason, "withdrew a checkpoint that does not verify (moved to rejected/)");
        Ok(())
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
