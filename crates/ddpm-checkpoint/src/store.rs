//! Reading checkpoints through any `object_store` backend: listing, manifests, verified loads.
//! Writing is in `commit.rs`, deleting in `retention.rs`.

use crate::layout::{parse_step_dir, step_dir, validate_name, LATEST, MANIFEST};
use crate::manifest::{sha256_hex, BlobEntry, Manifest, MANIFEST_FORMAT};
use crate::{CheckpointError, Result};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The manifest among a step directory's objects, if the step is committed.
pub(crate) fn manifest_of(objects: &[ObjectMeta]) -> Option<&ObjectMeta> {
    objects
        .iter()
        .find(|m| m.location.filename() == Some(MANIFEST))
}

/// How blobs are uploaded: blobs larger than `threshold` bytes go up as multipart uploads in
/// parts of `part_size` bytes, `concurrency` parts at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadPolicy {
    /// Blobs above this many bytes use multipart upload.
    pub threshold: usize,
    /// Part size in bytes (S3 requires >= 5 MiB for every part but the last).
    pub part_size: usize,
    /// Parts in flight at once.
    pub concurrency: usize,
}

impl Default for UploadPolicy {
    fn default() -> Self {
        Self {
            threshold: 64 << 20,
            part_size: 32 << 20,
            concurrency: 4,
        }
    }
}

/// The checkpoints of one run under a prefix of an object store.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) prefix: Path,
    pub(crate) run: String,
    pub(crate) upload: UploadPolicy,
}

impl CheckpointStore {
    /// Checkpoints of `run` under `prefix` in `store`.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: Path, run: &str) -> Result<Self> {
        validate_name("run", run)?;
        Ok(Self {
            store,
            prefix,
            run: run.to_string(),
            upload: UploadPolicy::default(),
        })
    }

    /// The same store with another upload policy.
    pub fn with_upload_policy(mut self, upload: UploadPolicy) -> Self {
        assert!(upload.part_size > 0 && upload.concurrency > 0);
        self.upload = upload;
        self
    }

    /// The run name.
    pub fn run(&self) -> &str {
        &self.run
    }

    /// The underlying object store.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The key of `name` in the run's folder `dir` beside its checkpoints (e.g. the
    /// evaluator's `eval/step-<N>.json`), which checkpoint listing and retention ignore.
    pub fn run_object(&self, dir: &str, name: &str) -> Path {
        self.run_dir().join(dir).join(name)
    }

    pub(crate) fn run_dir(&self) -> Path {
        self.prefix.clone().join(self.run.as_str())
    }

    pub(crate) fn latest_path(&self) -> Path {
        self.run_dir().join(LATEST)
    }

    pub(crate) fn object(&self, step: u64, name: &str) -> Path {
        step_dir(&self.prefix, &self.run, step).join(name)
    }

    pub(crate) fn corrupt(&self, step: u64, blob: &str, reason: String) -> CheckpointError {
        CheckpointError::Corrupt {
            run: self.run.clone(),
            step,
            blob: blob.to_string(),
            reason,
        }
    }

    pub(crate) fn bad_manifest(&self, step: u64, reason: String) -> CheckpointError {
        CheckpointError::BadManifest {
            run: self.run.clone(),
            step,
            reason,
        }
    }

    /// The object key of `name` in the directory of `step`.
    pub fn blob_path(&self, step: u64, name: &str) -> Path {
        self.object(step, name)
    }

    /// Bytes `range` of blob `name` of `step`, unverified (for reading headers cheaply).
    pub async fn read_blob_range(
        &self,
        step: u64,
        name: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes> {
        Ok(self
            .store
            .get_range(&self.object(step, name), range)
            .await?)
    }

    /// Every object under `<run>/step-N/`, grouped by step (committed or not).
    pub(crate) async fn step_objects(&self) -> Result<BTreeMap<u64, Vec<ObjectMeta>>> {
        let metas: Vec<ObjectMeta> = self.store.list(Some(&self.run_dir())).try_collect().await?;
        let mut by_step: BTreeMap<u64, Vec<ObjectMeta>> = BTreeMap::new();
        for m in metas {
            let parts: Vec<String> = m.location.parts().map(|p| p.as_ref().to_string()).collect();
            let Some(step) = parts.iter().rev().nth(1).and_then(|d| parse_step_dir(d)) else {
                continue;
            };
            // Exactly <prefix>/<run>/step-N/<name>, not a look-alike deeper down.
            let name = parts.last().expect("two parts");
            if m.location == self.object(step, name) {
                by_step.entry(step).or_default().push(m);
            }
        }
        Ok(by_step)
    }

    /// Steps that have a manifest, ascending. Blobs without a manifest are not checkpoints.
    pub async fn committed_steps(&self) -> Result<Vec<u64>> {
        Ok(self
            .step_objects()
            .await?
            .into_iter()
            .filter(|(_, objs)| manifest_of(objs).is_some())
            .map(|(step, _)| step)
            .collect())
    }

    /// The step the `latest` pointer names, if the pointer exists, parses and its checkpoint
    /// has a manifest; otherwise the newest step found by listing manifests. The pointer can
    /// lag by one checkpoint when its update failed; resume therefore lists (see
    /// [`CheckpointStore::load_newest_verified`]).
    pub async fn latest_step(&self) -> Result<Option<u64>> {
        if let Some(step) = self.read_latest_pointer().await? {
            match self.store.head(&self.object(step, MANIFEST)).await {
                Ok(_) => return Ok(Some(step)),
                Err(object_store::Error::NotFound { .. }) => {
                    tracing::warn!(run = %self.run, step, "the latest pointer names a checkpoint without a manifest; listing instead");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self.committed_steps().await?.last().copied())
    }

    /// The step in the `latest` pointer object, or None when it is absent or unreadable.
    pub(crate) async fn read_latest_pointer(&self) -> Result<Option<u64>> {
        match self.store.get(&self.latest_path()).await {
            Ok(r) => {
                let bytes = r.bytes().await?;
                Ok(crate::commit::parse_latest(&bytes))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads and checks the manifest of `step`.
    pub async fn read_manifest(&self, step: u64) -> Result<Manifest> {
        let bytes = match self.store.get(&self.object(step, MANIFEST)).await {
            Ok(r) => r.bytes().await.map_err(|e| self.io(step, MANIFEST, e))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(self.bad_manifest(
                    step,
                    "no manifest: the checkpoint was never committed".into(),
                ))
            }
            Err(e) => return Err(self.io(step, MANIFEST, e)),
        };
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| self.bad_manifest(step, format!("not a manifest: {e}")))?;
        if m.format != MANIFEST_FORMAT {
            return Err(CheckpointError::UnsupportedFormat {
                run: self.run.clone(),
                step,
                found: m.format,
                supported: MANIFEST_FORMAT,
            });
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
            out.push((b.name.clone(), self.fetch_verified(step, b).await?));
        }
        Ok((m, out))
    }

    /// Loads and verifies one blob of `step` (e.g. only `ema.safetensors` for sampling).
    pub async fn load_blob(&self, step: u64, name: &str) -> Result<Bytes> {
        let m = self.read_manifest(step).await?;
        let entry = m
            .blobs
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| self.corrupt(step, name, "not listed in the manifest".into()))?;
        self.fetch_verified(step, entry).await
    }

    async fn fetch_verified(&self, step: u64, b: &BlobEntry) -> Result<Bytes> {
        let data = match self.store.get(&self.object(step, &b.name)).await {
            Ok(r) => r.bytes().await.map_err(|e| self.io(step, &b.name, e))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(self.corrupt(
                    step,
                    &b.name,
                    "listed in the manifest but missing".into(),
                ))
            }
            Err(e) => return Err(self.io(step, &b.name, e)),
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
        Ok(data)
    }

    /// A store error while reading or writing `name` of `step`, naming both.
    pub(crate) fn io(&self, step: u64, name: &str, source: object_store::Error) -> CheckpointError {
        CheckpointError::Io {
            run: self.run.clone(),
            step,
            object: name.to_string(),
            source: Box::new(source),
        }
    }

    /// The newest committed checkpoint that verifies. Corrupted or torn ones are skipped with
    /// a warning naming the blob; store errors and manifests of an unsupported format (a
    /// newer build's checkpoints) are returned as errors, never skipped.
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
}
