//! Writing a checkpoint: blobs (multipart when large, hashed while they upload), then the
//! manifest with `PutMode::Create`, then the `latest` pointer.

use crate::blob::Blob;
use crate::layout::{validate_name, MANIFEST, WRITER_LOCK};
use crate::manifest::{BlobEntry, Manifest, MANIFEST_FORMAT};
use crate::store::CheckpointStore;
use crate::{CheckpointError, Result};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

/// How many times a conditional update of `latest` is retried against concurrent updates.
const LATEST_RETRIES: usize = 8;

/// The step in a `latest` pointer's bytes.
pub(crate) fn parse_latest(bytes: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(bytes).ok()?["step"].as_u64()
}

impl CheckpointStore {
    /// Claims `step` (create-only `writer.lock`, kept for good), writes `blobs`, then the
    /// manifest (last, only if absent), then moves the `latest` pointer forward. Refuses a
    /// step that is already committed or claimed before touching any of its blobs, so of two
    /// writers of the same step exactly one writes blobs; the other gets
    /// [`CheckpointError::ConcurrentWriter`] or [`CheckpointError::AlreadyCommitted`].
    pub async fn commit(
        &self,
        step: u64,
        blobs: &[(&str, Blob)],
        config: serde_json::Value,
    ) -> Result<Manifest> {
        let manifest_path = self.object(step, MANIFEST);
        self.ensure_not_committed(step).await?;
        for (name, _) in blobs {
            validate_name("blob", name)?;
            if [MANIFEST, WRITER_LOCK].contains(name) {
                return Err(CheckpointError::InvalidName {
                    what: "blob",
                    name: name.to_string(),
                    reason: format!("{MANIFEST} and {WRITER_LOCK} are reserved"),
                });
            }
        }
        self.claim_step(step).await?;
        // A writer whose claim was retried could get here after another writer committed.
        self.ensure_not_committed(step).await?;
        // All blobs at once; each is hashed on the blocking pool while its bytes upload.
        // join_all, not try_join_all: every upload finishes or aborts its own multipart
        // upload; none is dropped half way.
        let uploads = blobs.iter().map(|(name, data)| async move {
            let path = self.object(step, name);
            let to_hash = data.clone();
            let hash = tokio::task::spawn_blocking(move || to_hash.sha256_hex());
            let (uploaded, sha256) = tokio::join!(self.upload_blob(&path, data), hash);
            uploaded.map_err(|e| self.upload_failed(step, name, e))?;
            Ok::<_, CheckpointError>(BlobEntry {
                name: name.to_string(),
                size: data.len() as u64,
                sha256: sha256.expect("sha256 task does not panic"),
            })
        });
        let entries = futures::future::join_all(uploads)
            .await
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            run: self.run.clone(),
            step,
            blobs: entries,
            config,
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&manifest_path, PutPayload::from(json), create)
            .await
        {
            Ok(_) => {}
            // A retried put whose first attempt landed: the manifest there is ours.
            Err(object_store::Error::AlreadyExists { .. })
                if self
                    .read_manifest(step)
                    .await
                    .is_ok_and(|m| m.blobs == manifest.blobs) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                return Err(self.already_committed(step))
            }
            Err(e) => return Err(self.upload_failed(step, MANIFEST, e)),
        }
        if let Err(e) = self.update_latest(step).await {
            // The checkpoint is committed; readers fall back to listing manifests.
            tracing::warn!(run = %self.run, step, error = %e, "checkpoint committed but the latest pointer was not updated");
        }
        Ok(manifest)
    }

    async fn ensure_not_committed(&self, step: u64) -> Result<()> {
        match self.store.head(&self.object(step, MANIFEST)).await {
            Ok(_) => Err(self.already_committed(step)),
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.io(step, MANIFEST, e)),
        }
    }

    /// Creates `step-N/writer.lock` (create-only) before any blob is written, so a second
    /// writer of the same step fails before it can overwrite the first one's blobs. The
    /// claim stays after the commit (it goes with the checkpoint), so a late second writer
    /// is refused too.
    async fn claim_step(&self, step: u64) -> Result<()> {
        let me = writer_id();
        let body = serde_json::to_vec(&serde_json::json!({ "writer": me })).expect("json");
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let path = self.object(step, WRITER_LOCK);
        match self
            .store
            .put_opts(&path, PutPayload::from(body), create)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => {
                let holder = match self.store.get(&path).await {
                    Ok(r) => r
                        .bytes()
                        .await
                        .ok()
                        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                        .and_then(|v| v["writer"].as_str().map(str::to_string))
                        .unwrap_or_else(|| "unknown".into()),
                    Err(_) => "unknown".into(),
                };
                Err(CheckpointError::ConcurrentWriter {
                    run: self.run.clone(),
                    step,
                    holder,
                })
            }
            Err(e) => Err(self.upload_failed(step, WRITER_LOCK, e)),
        }
    }

    fn already_committed(&self, step: u64) -> CheckpointError {
        CheckpointError::AlreadyCommitted {
            run: self.run.clone(),
            step,
        }
    }

    fn upload_failed(&self, step: u64, blob: &str, source: object_store::Error) -> CheckpointError {
        CheckpointError::Upload {
            run: self.run.clone(),
            step,
            blob: blob.to_string(),
            source: Box::new(source),
        }
    }

    /// One blob, with this store's upload policy.
    async fn upload_blob(&self, path: &Path, data: &Blob) -> object_store::Result<()> {
        crate::blob::put_blob(self.store.as_ref(), path, data, &self.upload).await
    }

    /// Moves the `latest` pointer to `step` unless it already names a newer step. Uses a
    /// conditional put (create-if-absent, then update-if-unchanged by e-tag) and retries on a
    /// concurrent change. Stores without conditional update (the local file system) get a
    /// plain put, which is an atomic rename there.
    pub async fn update_latest(&self, step: u64) -> Result<()> {
        let path = self.latest_path();
        let body = serde_json::to_vec(&serde_json::json!({ "step": step })).expect("json");
        for _ in 0..LATEST_RETRIES {
            let mode = match self.store.get(&path).await {
                Ok(r) => {
                    let version = UpdateVersion {
                        e_tag: r.meta.e_tag.clone(),
                        version: r.meta.version.clone(),
                    };
                    let current = parse_latest(&r.bytes().await?);
                    if current.is_some_and(|c| c >= step) {
                        return Ok(());
                    }
                    PutMode::Update(version)
                }
                Err(object_store::Error::NotFound { .. }) => PutMode::Create,
                Err(e) => return Err(e.into()),
            };
            let opts = PutOptions {
                mode,
                ..Default::default()
            };
            match self
                .store
                .put_opts(&path, PutPayload::from(body.clone()), opts)
                .await
            {
                Ok(_) => return Ok(()),
                Err(
                    object_store::Error::Precondition { .. }
                    | object_store::Error::AlreadyExists { .. },
                ) => continue,
                Err(object_store::Error::NotImplemented { .. }) => {
                    self.store.put(&path, PutPayload::from(body)).await?;
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(CheckpointError::Contended {
            run: self.run.clone(),
            what: "latest pointer".into(),
        })
    }
}

/// `host:pid:nanos`, enough to tell writers apart in an error message.
fn writer_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{host}:{}:{nanos}", std::process::id())
}
