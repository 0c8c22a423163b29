//! What every backend must do. Each scenario uses its own run name, so one store serves all.

use super::faulty::{Fault, FaultyStore};
use bytes::Bytes;
use ddpm_checkpoint::{Blob, CheckpointError, CheckpointStore, UploadPolicy};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::sync::Arc;

pub type Store = (Arc<dyn ObjectStore>, Path);

pub fn blobs(step: u64) -> Vec<(&'static str, Blob)> {
    vec![
        (
            "ema.safetensors",
            Bytes::from(vec![step as u8; 1000]).into(),
        ),
        (
            "state.json",
            Bytes::from(format!("{{\"step\": {step}}}")).into(),
        ),
    ]
}

pub async fn commit(s: &CheckpointStore, step: u64) {
    s.commit(
        step,
        &blobs(step),
        serde_json::json!({"run": {"name": s.run()}}),
    )
    .await
    .unwrap();
}

fn object(prefix: &Path, run: &str, step: u64, name: &str) -> Path {
    prefix
        .clone()
        .join(run)
        .join(format!("step-{step}"))
        .join(name)
}

pub async fn list(store: &Arc<dyn ObjectStore>, prefix: &Path) -> Vec<String> {
    store
        .list(Some(prefix))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap()
}

/// Runs every scenario against one backend.
pub async fn all(backend: &str, (store, prefix): Store) {
    let s = (store, prefix);
    commit_list_load_verify(&s).await;
    never_overwritten(&s).await;
    corrupted_and_truncated_fall_back(&s).await;
    retention_and_orphans(&s).await;
    latest_pointer(&s).await;
    multipart(&s).await;
    two_writers(&s).await;
    writer_dies_before_manifest(&s).await;
    eprintln!("{backend}: all checkpoint scenarios passed");
}

async fn commit_list_load_verify((store, prefix): &Store) {
    let s = CheckpointStore::new(store.clone(), prefix.clone(), "basic").unwrap();
    commit(&s, 10).await;
    commit(&s, 20).await;
    // Blobs of step 30 without a manifest: a torn upload, not a checkpoint.
    store
        .put(
            &object(prefix, "basic", 30, "ema.safetensors"),
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
    assert_eq!(m.config["run"]["name"], "basic");
    assert_eq!(data[0].1, blobs(20)[0].1.to_bytes());
    let (newest, _) = s.load_newest_verified().await.unwrap().unwrap();
    assert_eq!(newest.step, 20);
    // The writer's claim stays with the checkpoint: a late second writer is refused.
    let left = list(store, &prefix.clone().join("basic").join("step-20")).await;
    assert!(left.iter().any(|p| p.ends_with("writer.lock")), "{left:?}");
}

async fn never_overwritten((store, prefix): &Store) {
    let s = CheckpointStore::new(store.clone(), prefix.clone(), "overwrite").unwrap();
    commit(&s, 5).await;
    let other = vec![("ema.safetensors", Bytes::from_static(b"different").into())];
    let err = s
        .commit(5, &other, serde_json::Value::Null)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CheckpointError::AlreadyCommitted { step: 5, .. }),
        "{err}"
    );
    s.load(5).await.unwrap();
}

async fn corrupted_and_truncated_fall_back((store, prefix): &Store) {
    let s = CheckpointStore::new(store.clone(), prefix.clone(), "corrupt").unwrap();
    for step in 1..=3 {
        commit(&s, step).await;
    }
    let blob = |step, name| object(prefix, "corrupt", step, name);
    store
        .put(
            &blob(3, "ema.safetensors"),
            PutPayload::from(vec![3u8; 999]),
        )
        .await
        .unwrap();
    let mut flipped = vec![2u8; 1000];
    flipped[500] ^= 0x10;
    store
        .put(&blob(2, "ema.safetensors"), PutPayload::from(flipped))
        .await
        .unwrap();
    let err = s.load(3).await.unwrap_err().to_string();
    assert!(
        err.contains("corrupt/step-3")
            && err.contains("ema.safetensors")
            && err.contains("999 bytes"),
        "{err}"
    );
    let err = s.load(2).await.unwrap_err().to_string();
    assert!(
        err.contains("ema.safetensors") && err.contains("sha256"),
        "{err}"
    );
    let (m, _) = s.load_newest_verified().await.unwrap().unwrap();
    assert_eq!(m.step, 1, "resume falls back past both");
    // The writer that resumed from step 1 withdraws step 3 and can commit it again.
    s.reject(3, "ema.safetensors is truncated").await.unwrap();
    assert_eq!(s.committed_steps().await.unwrap(), vec![1, 2]);
    let rejected = prefix
        .clone()
        .join("corrupt")
        .join("rejected")
        .join("step-3");
    let read = |name: &'static str| {
        let p = rejected.clone().join(name);
        async move {
            let b = store.get(&p).await.unwrap().bytes().await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&b).unwrap()
        }
    };
    assert_eq!(read("manifest.json").await["step"], 3);
    assert!(read("reason.json").await["reason"]
        .as_str()
        .unwrap()
        .contains("truncated"));
    let moved = list(store, &rejected).await;
    assert!(
        moved.iter().any(|p| p.ends_with("ema.safetensors")),
        "{moved:?}"
    );
    assert!(list(store, &prefix.clone().join("corrupt").join("step-3"))
        .await
        .is_empty());
    commit(&s, 3).await;
    s.load(3).await.unwrap();
    s.reject(3, "again").await.unwrap();
    store.delete(&blob(1, "state.json")).await.unwrap();
    let err = s.load(1).await.unwrap_err().to_string();
    assert!(
        err.contains("state.json") && err.contains("missing"),
        "{err}"
    );
    assert!(s.load_newest_verified().await.unwrap().is_none());
}

async fn retention_and_orphans((store, prefix): &Store) {
    let s = CheckpointStore::new(store.clone(), prefix.clone(), "retention").unwrap();
    for step in [100, 200, 300, 400] {
        commit(&s, step).await;
    }
    // An orphan older than the newest commit, and one newer (maybe still uploading).
    for step in [250, 500] {
        store
            .put(
                &object(prefix, "retention", step, "model.safetensors"),
                PutPayload::from(vec![0u8; 4]),
            )
            .await
            .unwrap();
    }
    let report = s.apply_retention(2, Some(200)).await.unwrap();
    assert_eq!(report.deleted, vec![100]);
    assert_eq!(report.orphans, vec![250]);
    assert_eq!(s.committed_steps().await.unwrap(), vec![200, 300, 400]);
    for gone in [100, 250] {
        let left = list(
            store,
            &prefix
                .clone()
                .join("retention")
                .join(format!("step-{gone}")),
        )
        .await;
        assert!(left.is_empty(), "step-{gone} objects left: {left:?}");
    }
    let newer = list(store, &prefix.clone().join("retention").join("step-500")).await;
    assert_eq!(
        newer.len(),
        1,
        "a directory newer than the newest commit is left alone"
    );
    assert!(matches!(
        s.apply_retention(1, None).await,
        Err(CheckpointError::KeepLast(1))
    ));
    // A writer taking over the run removes every uncommitted directory.
    assert_eq!(s.remove_uncommitted().await.unwrap(), vec![500]);
}

async fn latest_pointer((store, prefix): &Store) {
    let s = CheckpointStore::new(store.clone(), prefix.clone(), "latest").unwrap();
    assert_eq!(s.latest_step().await.unwrap(), None);
    commit(&s, 10).await;
    commit(&s, 20).await;
    let pointer = prefix.clone().join("latest").join("latest");
    let body = store.get(&pointer).await.unwrap().bytes().await.unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["step"],
        20
    );
    assert_eq!(s.latest_step().await.unwrap(), Some(20));
    // Never moves backwards.
    s.update_latest(15).await.unwrap();
    assert_eq!(s.latest_step().await.unwrap(), Some(20));
    // A pointer at a step without a manifest, or no pointer: readers list manifests.
    store
        .put(&pointer, PutPayload::from(r#"{"step": 99}"#))
        .await
        .unwrap();
    assert_eq!(s.latest_step().await.unwrap(), Some(20));
    store.delete(&pointer).await.unwrap();
    assert_eq!(s.latest_step().await.unwrap(), Some(20));
    commit(&s, 30).await;
    assert_eq!(s.latest_step().await.unwrap(), Some(30));
}

async fn multipart((store, prefix): &Store) {
    // S3 wants parts of at least 5 MiB (but the last).
    let policy = UploadPolicy {
        threshold: 6 << 20,
        part_size: 5 << 20,
        concurrency: 2,
    };
    let s = CheckpointStore::new(store.clone(), prefix.clone(), "multipart")
        .unwrap()
        .with_upload_policy(policy);
    let big: Vec<u8> = (0..(11u32 << 20))
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    let big = Bytes::from(big);
    // Two segments (a header and a body), so parts straddle a segment boundary.
    let segmented = Blob::from_segments(vec![big.slice(..100), big.slice(100..)]);
    s.commit(
        7,
        &[
            ("model.safetensors", segmented),
            ("state.json", Bytes::from_static(b"{}").into()),
        ],
        serde_json::Value::Null,
    )
    .await
    .unwrap();
    let (m, data) = s.load(7).await.unwrap();
    assert_eq!(m.blobs[0].size, big.len() as u64);
    assert_eq!(data[0].1, big);
}

async fn two_writers((store, prefix): &Store) {
    let a = CheckpointStore::new(store.clone(), prefix.clone(), "writers").unwrap();
    let b = a.clone();
    let blob_a: Vec<(&str, Blob)> = vec![("ema.safetensors", vec![0xAA; 3000].into())];
    let blob_b: Vec<(&str, Blob)> = vec![("ema.safetensors", vec![0xBB; 3000].into())];
    let (ra, rb) = tokio::join!(
        a.commit(9, &blob_a, serde_json::Value::Null),
        b.commit(9, &blob_b, serde_json::Value::Null)
    );
    let (winner, loser) = match (&ra, &rb) {
        (Ok(_), Err(e)) => (&blob_a, e),
        (Err(e), Ok(_)) => (&blob_b, e),
        _ => panic!("exactly one writer must win: {ra:?} / {rb:?}"),
    };
    assert!(
        matches!(
            loser,
            CheckpointError::AlreadyCommitted { step: 9, .. }
                | CheckpointError::ConcurrentWriter { step: 9, .. }
        ),
        "{loser}"
    );
    assert!(loser.to_string().contains("writers/step-9"), "{loser}");
    let (_, data) = a.load(9).await.unwrap();
    assert_eq!(
        data[0].1,
        winner[0].1.to_bytes(),
        "the winner's bytes, intact"
    );
}

async fn writer_dies_before_manifest((store, prefix): &Store) {
    let faulty = FaultyStore::new(store.clone());
    let dyn_store: Arc<dyn ObjectStore> = faulty.clone();
    let s = CheckpointStore::new(dyn_store, prefix.clone(), "torn").unwrap();
    commit(&s, 1).await;
    faulty.set(Fault::FailNamed("manifest.json"));
    let err = s
        .commit(2, &blobs(2), serde_json::Value::Null)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("manifest.json") && err.to_string().contains("torn/step-2"),
        "{err}"
    );
    faulty.set(Fault::None);
    // Invisible: the previous checkpoint is the newest and the pointer still names it.
    assert_eq!(s.committed_steps().await.unwrap(), vec![1]);
    assert_eq!(s.latest_step().await.unwrap(), Some(1));
    assert_eq!(s.load_newest_verified().await.unwrap().unwrap().0.step, 1);
    // Its blobs are orphans, cleaned once a later checkpoint commits.
    assert!(!list(store, &prefix.clone().join("torn").join("step-2"))
        .await
        .is_empty());
    commit(&s, 3).await;
    let report = s.apply_retention(2, None).await.unwrap();
    assert_eq!(report.orphans, vec![2]);
    assert!(list(store, &prefix.clone().join("torn").join("step-2"))
        .await
        .is_empty());
}
