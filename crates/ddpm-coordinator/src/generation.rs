//! The run's ring generation, kept in the checkpoint store beside the checkpoints
//! (`<root>/<run>/coordinator/generation.json`, `{"generation": N}`), so that a restarted
//! coordinator continues after every generation its predecessor handed out: a worker of an
//! old ring (one that missed the restart, or was partitioned away) then carries a generation
//! the new coordinator refuses, and it cannot pass for a member of the new ring.
//!
//! The coordinator writes a generation before any worker learns of it
//! ([`crate::service::CoordinatorService`] awaits the write before answering), so the stored
//! number is never behind a generation in use.

use crate::CoordinatorError;
use ddpm_checkpoint::{CheckpointError, CheckpointStore};
use object_store::{ObjectStoreExt, PutPayload};

/// The folder (in the run's directory) of the coordinator's state.
pub const STATE_DIR: &str = "coordinator";

/// The object holding the newest generation.
pub const GENERATION_OBJECT: &str = "generation.json";

fn store_error(url: &str, e: impl Into<CheckpointError>) -> CoordinatorError {
    CoordinatorError::Store {
        url: url.to_string(),
        error: Box::new(e.into()),
    }
}

/// The newest generation stored for the run (0 when none was).
pub async fn read(store: &CheckpointStore, url: &str) -> Result<u64, CoordinatorError> {
    let path = store.run_object(STATE_DIR, GENERATION_OBJECT);
    let bytes = match store.object_store().get(&path).await {
        Ok(r) => r.bytes().await.map_err(|e| store_error(url, e))?,
        Err(object_store::Error::NotFound { .. }) => return Ok(0),
        Err(e) => return Err(store_error(url, e)),
    };
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| CoordinatorError::State {
            url: url.to_string(),
            run: store.run().to_string(),
            step: 0,
            blob: path.to_string(),
            reason: format!("not JSON: {e}"),
        })?;
    value
        .get("generation")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| CoordinatorError::State {
            url: url.to_string(),
            run: store.run().to_string(),
            step: 0,
            blob: path.to_string(),
            reason: format!("expected {{\"generation\": N}}, got {value}"),
        })
}

/// Stores `generation` as the run's newest.
pub async fn write(
    store: &CheckpointStore,
    url: &str,
    generation: u64,
) -> Result<(), CoordinatorError> {
    let path = store.run_object(STATE_DIR, GENERATION_OBJECT);
    let body = serde_json::json!({ "generation": generation }).to_string();
    store
        .object_store()
        .put(&path, PutPayload::from(body.into_bytes()))
        .await
        .map_err(|e| store_error(url, e))?;
    Ok(())
}

/// The first generation of a starting coordinator: one past the newest stored, which is
/// written before it is returned.
pub async fn next(store: &CheckpointStore, url: &str) -> Result<u64, CoordinatorError> {
    let generation = read(store, url).await? + 1;
    write(store, url, generation).await?;
    Ok(generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> CheckpointStore {
        let mem: std::sync::Arc<dyn object_store::ObjectStore> =
            std::sync::Arc::new(object_store::memory::InMemory::new());
        CheckpointStore::new(mem, object_store::path::Path::from("root"), "run").unwrap()
    }

    #[tokio::test]
    async fn each_start_continues_after_the_stored_generation() {
        let s = store();
        assert_eq!(read(&s, "memory://").await.unwrap(), 0);
        assert_eq!(next(&s, "memory://").await.unwrap(), 1);
        write(&s, "memory://", 5).await.unwrap();
        assert_eq!(next(&s, "memory://").await.unwrap(), 6);
        assert_eq!(read(&s, "memory://").await.unwrap(), 6);
        // Checkpoint listing ignores the coordinator's folder.
        assert!(s.committed_steps().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_damaged_generation_object_is_an_error_naming_it() {
        let s = store();
        let path = s.run_object(STATE_DIR, GENERATION_OBJECT);
        s.object_store()
            .put(&path, PutPayload::from_static(b"{\"gen\": 3}"))
            .await
            .unwrap();
        let err = read(&s, "memory://").await.unwrap_err().to_string();
        assert!(
            err.contains("coordinator/generation.json") && err.contains("expected"),
            "{err}"
        );
    }
}
