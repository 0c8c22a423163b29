//! Reading and writing checkpoints through any `object_store` backend.

use crate::layout::{parse_step_dir, step_dir, validate_name, MANIFEST};
use crate::manifest::{sha256_hex, BlobEntry, Manifest, MANIFEST_FORMAT};
use crate::retention::plan_deletions;
use crate::{CheckpointError, Result};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::sync::Arc;

/// Opens a store URL (`file:///abs/dir`, `memory://`, ...) and returns the store and the
/// path prefix inside it.
pub fn open_url(url: &str) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let bad = |reason: String| CheckpointError::Url {
        url: url.to_string(),
        reason,
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    let (store, prefix) = object_store::parse_url(&parsed).map_err(|e| bad(e.to_string()))?;
    Ok((Arc::from(store), prefix))
}

/// The checkpoints of one run under a prefix of an object store.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    run: String,
}

impl CheckpointStore {
    /// Checkpoints of `run` under `prefix` in `store`.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: Path, run: &str) -> Result<Self> {
        validate_name("run", run)?;
        Ok(Self {
            store,
            prefix,
            run: run.to_string(),
        })
    }

    /// The run name.
    pub fn run(&self) -> &str {
        &self.run
    }

    fn object(&self, step: u64, name: &str) -> Path {
        step_dir(&self.prefix, &self.run, step).join(name)
    }

    fn corrupt(&self, step: u64, blob: &str, reason: String) -> CheckpointError {
        CheckpointError::Corrupt {
            run: self.run.clone(),
            step,
            blob: blob.to_string(),
            reason,
        }
    }

    fn bad_manifest(&self, step: u64, reason: String) -> CheckpointError {
        CheckpointError::BadManifest {
            run: self.run.clone(),
            step,
            reason,
        }
    }

    /// Writes `blobs` for `step`, then the manifest (last, only if absent). Refuses a step
    /// that is already committed before touching any of its blobs. There is one writer per
    /// run (rank 0); the create-only manifest put is the guard against a second one.
    pub async fn commit(
        &self,
        step: u64,
        blobs: &[(&str, Bytes)],
        config: serde_json::Value,
    ) -> Result<Manifest> {
        let manifest_path = self.object(step, MANIFEST);
        match self.store.head(&manifest_path).await {
            Ok(_) => {
                return Err(CheckpointError::AlreadyCommitted {
                    run: self.run.clone(),
                    step,
                })
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let mut entries = Vec::with_capacity(blobs.len());
        for (name, data) in blobs {
            validate_name("blob", name)?;
            if *name == MANIFEST {
                return Err(CheckpointError::InvalidName {
                    what: "blob",
                    name: name.to_string(),
                    reason: format!("{MANIFEST} is reserved for the manifest"),
                });
            }
            self.store
                .put(&self.object(step, name), PutPayload::from(data.clone()))
                .await?;
            entries.push(BlobEntry {
                name: name.to_string(),
                size: data.len() as u64,
                sha256: sha256_hex(data),
            });
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            run: self.run.clone(),
            step,
            blobs: entries,
            config,
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&manifest_path, PutPayload::from(json), opts)
            .await
        {
            Ok(_) => Ok(manifest),
            Err(object_store::Error::AlreadyExists { .. }) => {
                Err(CheckpointError::AlreadyCommitted {
                    run: self.run.clone(),
                    step,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Steps that have a manifest, ascending. Blobs without a manifest are not checkpoints.
    pub async fn committed_steps(&self) -> Result<Vec<u64>> {
        let run_prefix = self.prefix.clone().join(self.run.as_str());
        let metas: Vec<ObjectMeta> = self.store.list(Some(&run_prefix)).try_collect().await?;
        let mut steps: Vec<u64> = metas
            .iter()
            .filter_map(|m| {
                let parts: Vec<String> =
                    m.location.parts().map(|p| p.as_ref().to_string()).collect();
                let step = parse_step_dir(parts.iter().rev().nth(1)?)?;
                // Exactly <prefix>/<run>/step-N/manifest.json, not a look-alike deeper down.
                (m.location == self.object(step, MANIFEST)).then_some(step)
            })
            .collect();
        steps.sort_unstable();
        steps.dedup();
        Ok(steps)
    }

    /// Reads and checks the manifest of `step`.
    pub async fn read_manifest(&self, step: u64) -> Result<Manifest> {
        let bytes = match self.store.get(&self.object(step, MANIFEST)).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(self.bad_manifest(
                    step,
                    "no manifest: the checkpoint was never committed".into(),
                ))
            }
            Err(e) => return Err(e.into()),
        };
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| self.bad_manifest(step, format!("not a manifest: {e}")))?;
        if m.format != MANIFEST_FORMAT {
            return Err(self.bad_manifest(
                step,
                format!("format {} (this build reads {MANIFEST_FORMAT})", m.format),
            ));
        }
        if m.run != self.run || m.step != step {
            return Err(self.bad_manifest(step, format!("describes {}/step-{}", m.run, m.step)));
        }
        Ok(m)
    }

    /// Loads every blob of `step` and verifies its size and sha256 against the manifest.
    pub async fn load(&self, step: u64) -> Result<(Manifest, Vec<(String, Bytes)>)> {
        let m = self.read_manifest(step).await?;
        let mut out = Vec::with_capacity(m.blobs.len());
        for b in &m.blobs {
            let data = match self.store.get(&self.object(step, &b.name)).await {
                Ok(r) => r.bytes().await?,
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(self.corrupt(
                        step,
                        &b.name,
                        "listed in the manifest but missing".into(),
                    ))
                }
                Err(e) => return Err(e.into()),
            };
            if data.len() as u64 != b.size {
                return Err(self.corrupt(
                    step,
                    &b.name,
                    format!(
                        "{} bytes, the manifest says {} (truncated?)",
                        data.len(),
                        b.size
                    ),
                ));
            }
            let sha = sha256_hex(&data);
            if sha != b.sha256 {
                return Err(self.corrupt(
                    step,
                    &b.name,
                    format!("sha256 {sha}, the manifest says {}", b.sha256),
                ));
            }
            out.push((b.name.clone(), data));
        }
        Ok((m, out))
    }

    /// The newest committed checkpoint that verifies. Corrupted or torn ones are skipped with
    /// a warning naming the blob; store errors are returned.
    pub async fn load_newest_verified(&self) -> Result<Option<(Manifest, Vec<(String, Bytes)>)>> {
        for step in self.committed_steps().await?.into_iter().rev() {
            match self.load(step).await {
                Ok(found) => return Ok(Some(found)),
                Err(
                    e @ (CheckpointError::Corrupt { .. } | CheckpointError::BadManifest { .. }),
                ) => {
                    tracing::warn!(run = %self.run, step, error = %e, "skipping a checkpoint that does not verify; falling back to the previous one");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Deletes committed checkpoints beyond the newest `keep_last` (never the newest, never
    /// `in_flight`). The manifest goes first, so a half-deleted checkpoint no longer exists.
    /// A failed delete is logged, not fatal. Returns the steps whose manifest was deleted.
    pub async fn apply_retention(
        &self,
        keep_last: usize,
        in_flight: Option<u64>,
    ) -> Result<Vec<u64>> {
        let plan = plan_deletions(&self.committed_steps().await?, in_flight, keep_last)?;
        let mut deleted = Vec::new();
        for step in plan {
            if let Err(e) = self.store.delete(&self.object(step, MANIFEST)).await {
                tracing::warn!(run = %self.run, step, error = %e, "could not delete a checkpoint manifest; keeping the checkpoint");
                continue;
            }
            deleted.push(step);
            let dir = step_dir(&self.prefix, &self.run, step);
            let objects: Vec<ObjectMeta> = match self.store.list(Some(&dir)).try_collect().await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(run = %self.run, step, error = %e, "could not list a deleted checkpoint's blobs");
                    continue;
                }
            };
            for o in objects {
                if let Err(e) = self.store.delete(&o.location).await {
                    tracing::warn!(run = %self.run, step, object = %o.location, error = %e, "could not delete a blob");
                }
            }
        }
        Ok(deleted)
    }
}
