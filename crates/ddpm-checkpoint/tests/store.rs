//! The checkpoint store on real backends: in-memory and the local file system.

use bytes::Bytes;
use ddpm_checkpoint::{open_url, CheckpointError, CheckpointStore};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::sync::Arc;

fn blobs(step: u64) -> Vec<(&'static str, Bytes)> {
    vec![
        ("ema.safetensors", Bytes::from(vec![step as u8; 1000])),
        ("state.json", Bytes::from(format!("{{\"step\": {step}}}"))),
    ]
}

async fn commit(s: &CheckpointStore, step: u64) {
    s.commit(
        step,
        &blobs(step),
        serde_json::json!({"run": {"name": "r"}}),
    )
    .await
    .unwrap();
}

fn stores() -> Vec<(Arc<dyn ObjectStore>, Path, Option<tempfile::TempDir>)> {
    let (mem, mem_prefix) = open_url("memory://").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (fs, fs_prefix) = open_url(&format!("file://{}", dir.path().display())).unwrap();
    vec![(mem, mem_prefix, None), (fs, fs_prefix, Some(dir))]
}

#[tokio::test]
async fn committed_checkpoints_list_load_and_verify() {
    for (store, prefix, _dir) in stores() {
        let s = CheckpointStore::new(store.clone(), prefix.clone(), "r").unwrap();
        commit(&s, 10).await;
        commit(&s, 20).await;
        // Blobs of step 30 without a manifest: a torn upload, not a checkpoint.
        store
            .put(
                &prefix
                    .clone()
                    .join("r")
                    .join("step-30")
                    .join("ema.safetensors"),
                PutPayload::from(vec![1u8; 10]),
            )
            .await
            .unwrap();
        assert_eq!(s.committed_steps().await.unwrap(), vec![10, 20], "{store}");
        let (m, data) = s.load(20).await.unwrap();
        assert_eq!(m.step, 20);
        assert_eq!(
            m.blobs.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
            ["ema.safetensors", "state.json"]
        );
        assert_eq!(data[0].1, blobs(20)[0].1);
        let (newest, _) = s.load_newest_verified().await.unwrap().unwrap();
        assert_eq!(newest.step, 20);
    }
}

#[tokio::test]
async fn a_committed_step_is_never_overwritten() {
    for (store, prefix, _dir) in stores() {
        let s = CheckpointStore::new(store, prefix, "r").unwrap();
        commit(&s, 5).await;
        let other = vec![("ema.safetensors", Bytes::from_static(b"different"))];
        let err = s
            .commit(5, &other, serde_json::Value::Null)
            .await
            .unwrap_err();
        assert!(
            matches!(err, CheckpointError::AlreadyCommitted { step: 5, .. }),
            "{err}"
        );
        // The committed blobs are untouched and still verify.
        s.load(5).await.unwrap();
    }
}

#[tokio::test]
async fn corrupted_or_truncated_blobs_are_named_and_skipped() {
    for (store, prefix, _dir) in stores() {
        let s = CheckpointStore::new(store.clone(), prefix.clone(), "r").unwrap();
        commit(&s, 1).await;
        commit(&s, 2).await;
        commit(&s, 3).await;
        let blob = |step: u64, name: &str| {
            prefix
                .clone()
                .join("r")
                .join(format!("step-{step}"))
                .join(name)
        };
        store
            .put(
                &blob(3, "ema.safetensors"),
                PutPayload::from(vec![3u8; 999]),
            )
            .await
            .unwrap();
        let mut flipped = vec![2u8; 1000];
        flipped[500] = 9;
        store
            .put(&blob(2, "ema.safetensors"), PutPayload::from(flipped))
            .await
            .unwrap();

        let err = s.load(3).await.unwrap_err().to_string();
        assert!(
            err.contains("r/step-3")
                && err.contains("ema.safetensors")
                && err.contains("999 bytes"),
            "{err}"
        );
        let err = s.load(2).await.unwrap_err().to_string();
        assert!(
            err.contains("ema.safetensors") && err.contains("sha256"),
            "{err}"
        );
        // Resume falls back past both to step 1.
        let (m, _) = s.load_newest_verified().await.unwrap().unwrap();
        assert_eq!(m.step, 1);

        store.delete(&blob(1, "state.json")).await.unwrap();
        let err = s.load(1).await.unwrap_err().to_string();
        assert!(
            err.contains("state.json") && err.contains("missing"),
            "{err}"
        );
        assert!(s.load_newest_verified().await.unwrap().is_none());
    }
}

#[tokio::test]
async fn retention_keeps_the_newest_and_the_one_in_flight() {
    for (store, prefix, _dir) in stores() {
        let s = CheckpointStore::new(store.clone(), prefix.clone(), "r").unwrap();
        for step in [100, 200, 300, 400] {
            commit(&s, step).await;
        }
        assert_eq!(s.apply_retention(2, Some(200)).await.unwrap(), vec![100]);
        assert_eq!(s.committed_steps().await.unwrap(), vec![200, 300, 400]);
        let left: Vec<_> = futures_list(&store, &prefix.clone().join("r").join("step-100")).await;
        assert!(left.is_empty(), "step-100 objects left: {left:?}");
        assert!(matches!(
            s.apply_retention(1, None).await,
            Err(CheckpointError::KeepLast(1))
        ));
    }
}

async fn futures_list(store: &Arc<dyn ObjectStore>, prefix: &Path) -> Vec<String> {
    use futures::TryStreamExt;
    store
        .list(Some(prefix))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap()
}

#[test]
fn run_and_blob_names_cannot_escape_their_prefix() {
    let (store, prefix) = open_url("memory://").unwrap();
    let err = CheckpointStore::new(store, prefix, "../other")
        .unwrap_err()
        .to_string();
    assert!(err.contains("../other"), "{err}");
    let err = open_url("not a url").unwrap_err().to_string();
    assert!(err.contains("not a url"), "{err}");
}
