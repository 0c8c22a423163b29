//! The background uploader: one checkpoint in flight, waits counted, failures counted and
//! survived, the previous checkpoint left intact.

mod common;

use bytes::Bytes;
use common::faulty::{Fault, FaultyStore};
use ddpm_checkpoint::{open_url, CheckpointJob, CheckpointStore, Uploader};
use object_store::ObjectStore;
use std::sync::{mpsc, Arc};

fn job(step: u64, bytes: usize) -> CheckpointJob {
    CheckpointJob {
        step,
        blobs: Box::new(move || {
            Ok(vec![
                (
                    "ema.safetensors".to_string(),
                    Bytes::from(vec![step as u8; bytes]).into(),
                ),
                (
                    "state.json".to_string(),
                    Bytes::from(format!("{{\"step\":{step}}}")).into(),
                ),
            ])
        }),
        config: serde_json::json!({"step": step}),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_due_checkpoint_waits_for_the_one_in_flight() {
    let (store, prefix) = open_url("memory://").unwrap();
    let s = CheckpointStore::new(store, prefix, "r").unwrap();
    let up = Uploader::spawn(s.clone(), 2).unwrap();
    let (release, gate) = mpsc::channel::<()>();
    up.submit(CheckpointJob {
        step: 1,
        blobs: Box::new(move || {
            gate.recv().unwrap();
            Ok(vec![(
                "ema.safetensors".into(),
                Bytes::from_static(b"one").into(),
            )])
        }),
        config: serde_json::Value::Null,
    });
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        release.send(()).unwrap();
    });
    // Step 1 is still serialising: step 2 must wait for it, and say so.
    up.submit(job(2, 10));
    releaser.join().unwrap();
    let stats = up.finish();
    assert_eq!(stats.waits, 1);
    assert_eq!(stats.committed, 2);
    assert_eq!(stats.last_committed, Some(2));
    assert_eq!(runtime().block_on(s.committed_steps()).unwrap(), vec![1, 2]);
}

#[test]
fn a_full_store_is_survived_and_the_old_checkpoint_stays_newest() {
    let (inner, prefix) = open_url("memory://").unwrap();
    let faulty = FaultyStore::new(inner);
    let dyn_store: Arc<dyn ObjectStore> = faulty.clone();
    let s = CheckpointStore::new(dyn_store, prefix, "r").unwrap();
    let up = Uploader::spawn(s.clone(), 2).unwrap();
    up.submit(job(10, 5000));
    up.wait_idle();
    // The disk fills up half way through the next checkpoint.
    faulty.set(Fault::Full { budget: 2500 });
    up.submit(job(20, 5000));
    up.wait_idle();
    let stats = up.stats();
    assert_eq!((stats.committed, stats.failed), (1, 1));
    let err = stats.last_error.unwrap();
    assert!(
        err.contains("r/step-20") && err.contains("No space left"),
        "{err}"
    );
    let rt = runtime();
    assert_eq!(rt.block_on(s.committed_steps()).unwrap(), vec![10]);
    assert_eq!(rt.block_on(s.latest_step()).unwrap(), Some(10));
    let (m, blobs) = rt.block_on(s.load_newest_verified()).unwrap().unwrap();
    assert_eq!((m.step, blobs[0].1.len()), (10, 5000));
    // Space comes back: the next one commits and the orphan of step 20 is cleaned.
    faulty.set(Fault::None);
    up.submit(job(30, 5000));
    let stats = up.finish();
    assert_eq!(
        (stats.committed, stats.failed, stats.last_committed),
        (2, 1, Some(30))
    );
    assert_eq!(rt.block_on(s.committed_steps()).unwrap(), vec![10, 30]);
    let left = rt.block_on(common::scenarios::list(
        s.object_store(),
        &object_store::path::Path::from("r/step-20"),
    ));
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_failing_serialisation_is_counted_and_named() {
    let (store, prefix) = open_url("memory://").unwrap();
    let s = CheckpointStore::new(store, prefix, "r").unwrap();
    let up = Uploader::spawn(s, 3).unwrap();
    up.submit(CheckpointJob {
        step: 4,
        blobs: Box::new(|| Err("tensor `x` is not float32".into())),
        config: serde_json::Value::Null,
    });
    let stats = up.finish();
    assert_eq!(stats.failed, 1);
    let err = stats.last_error.unwrap();
    assert!(
        err.contains("step-4") && err.contains("tensor `x`"),
        "{err}"
    );
    assert!(Uploader::spawn(
        CheckpointStore::new(open_url("memory://").unwrap().0, Default::default(), "r").unwrap(),
        1
    )
    .is_err());
}
