//! Where training starts: the newest committed checkpoint of the run (its step and data
//! cursor, from its `state.json`), or a fresh run when the store has none.
//!
//! The coordinator reads the plan at startup, and again whenever the ring re-forms after
//! losing a member (the new generation continues from the newest checkpoint then).

use crate::CoordinatorError;
use ddpm_checkpoint::{
    open_url_with, resolve_root_url, CheckpointError, CheckpointStore, TrainState, STATE_BLOB,
};
use ddpm_config::Config;
use std::path::Path;

/// Where the ranks of one generation start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Completed updates so far: the first step to run.
    pub start_step: u64,
    /// Data cursor at `start_step`: the epoch.
    pub epoch: u64,
    /// Data cursor at `start_step`: the position in the epoch.
    pub position: u64,
    /// The data order the cursor walks (`ddpm_data::epoch::Order::describe`); "" for a
    /// fresh run, "uniform" for checkpoints that did not record it.
    pub data_order: String,
    /// The checkpoint root URL to restore from; "" for a fresh run.
    pub restore_url: String,
    /// The checkpoint step to restore (0 for a fresh run).
    pub restore_step: u64,
}

impl Plan {
    /// Whether there is a checkpoint to restore.
    pub fn is_fresh(&self) -> bool {
        self.restore_url.is_empty()
    }

    /// Reads the plan from `store` (whose root URL is `url`): the newest committed checkpoint
    /// whose `state.json` verifies. A checkpoint whose `state.json` is corrupt or whose
    /// manifest is damaged is skipped with a warning (the previous one is used, as
    /// `ddpm train` resumes); store errors and a `state.json` without the expected keys are
    /// errors naming the checkpoint and the key.
    pub async fn read(store: &CheckpointStore, url: &str) -> Result<Plan, CoordinatorError> {
        let store_err = |e: CheckpointError| CoordinatorError::Store {
            url: url.to_string(),
            error: Box::new(e),
        };
        let steps = store.committed_steps().await.map_err(store_err)?;
        for step in steps.into_iter().rev() {
            let bytes = match store.load_blob(step, STATE_BLOB).await {
                Ok(b) => b,
                Err(
                    e @ (CheckpointError::Corrupt { .. } | CheckpointError::BadManifest { .. }),
                ) => {
                    tracing::warn!(url, run = store.run(), step, error = %e, "skipping a checkpoint whose train state does not verify; falling back to the previous one");
                    continue;
                }
                Err(e) => return Err(store_err(e)),
            };
            return parse_state(&bytes, url, store.run(), step);
        }
        Ok(Plan::default())
    }
}

/// The plan in the `state.json` of checkpoint `step`.
fn parse_state(bytes: &[u8], url: &str, run: &str, step: u64) -> Result<Plan, CoordinatorError> {
    let state = TrainState::parse(bytes, step).map_err(|reason| CoordinatorError::State {
        url: url.to_string(),
        run: run.to_string(),
        step,
        blob: STATE_BLOB.to_string(),
        reason,
    })?;
    Ok(Plan {
        start_step: state.step,
        epoch: state.epoch,
        position: state.position,
        data_order: state.data_order,
        restore_url: url.to_string(),
        restore_step: step,
    })
}

/// Resolves the checkpoint root of `cfg` (`checkpoint.url`, or `<run.out_dir>/checkpoints`
/// made absolute), writes it back into `cfg.checkpoint.url` (so every worker uses the same
/// root whatever its working directory) and opens the run's checkpoints there.
pub fn open_store(cfg: &mut Config) -> Result<CheckpointStore, CoordinatorError> {
    let url_err = |url: &str, e: CheckpointError| CoordinatorError::Store {
        url: url.to_string(),
        error: Box::new(e),
    };
    let url = resolve_root_url(&cfg.checkpoint.url, Path::new(&cfg.run.out_dir))
        .map_err(|e| url_err(&format!("{:?} (checkpoint.url)", cfg.checkpoint.url), e))?;
    cfg.checkpoint.url = url.clone();
    let (store, prefix) =
        open_url_with(&url, &cfg.checkpoint.options).map_err(|e| url_err(&url, e))?;
    CheckpointStore::new(store, prefix, &cfg.run.name).map_err(|e| url_err(&url, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddpm_checkpoint::Blob;

    fn config(out: &Path) -> Config {
        Config::parse(
            &format!(
                "[run]\nname = \"t\"\nout_dir = {:?}\n[train]\nbatch_size = 4\ntotal_steps = 10\n",
                out.display().to_string()
            ),
            "<test>",
        )
        .unwrap()
    }

    async fn commit(store: &CheckpointStore, step: u64, state: serde_json::Value) {
        let blobs: Vec<(&str, Blob)> = vec![
            ("model.safetensors", vec![1u8; 16].into()),
            (STATE_BLOB, serde_json::to_vec(&state).unwrap().into()),
        ];
        store
            .commit(step, &blobs, serde_json::json!({}))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_fresh_run_resolves_the_root_and_starts_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        let store = open_store(&mut cfg).unwrap();
        assert!(
            cfg.checkpoint.url.starts_with("file:///"),
            "{}",
            cfg.checkpoint.url
        );
        assert!(
            cfg.checkpoint.url.ends_with("/checkpoints"),
            "{}",
            cfg.checkpoint.url
        );
        let plan = Plan::read(&store, &cfg.checkpoint.url).await.unwrap();
        assert_eq!(plan, Plan::default());
        assert!(plan.is_fresh());
    }

    #[tokio::test]
    async fn the_newest_committed_checkpoint_gives_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        let store = open_store(&mut cfg).unwrap();
        let url = cfg.checkpoint.url.clone();
        commit(
            &store,
            4,
            serde_json::json!({"step": 4, "epoch": 0, "position": 16, "data_order": "uniform"}),
        )
        .await;
        commit(
            &store,
            8,
            serde_json::json!({"step": 8, "epoch": 1, "position": 7, "data_order": "shard-windows:8"}),
        )
        .await;
        let plan = Plan::read(&store, &url).await.unwrap();
        assert_eq!(
            plan,
            Plan {
                start_step: 8,
                epoch: 1,
                position: 7,
                data_order: "shard-windows:8".into(),
                restore_url: url.clone(),
                restore_step: 8,
            }
        );
        // Opening the resolved URL again (as a worker does) finds the same checkpoints.
        let mut again = cfg.clone();
        let store2 = open_store(&mut again).unwrap();
        assert_eq!(again.checkpoint.url, url);
        assert_eq!(store2.committed_steps().await.unwrap(), vec![4, 8]);
    }

    #[tokio::test]
    async fn a_missing_data_order_means_uniform() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        let store = open_store(&mut cfg).unwrap();
        commit(
            &store,
            3,
            serde_json::json!({"step": 3, "epoch": 0, "position": 12}),
        )
        .await;
        let plan = Plan::read(&store, &cfg.checkpoint.url).await.unwrap();
        assert_eq!((plan.start_step, plan.data_order.as_str()), (3, "uniform"));
    }

    #[tokio::test]
    async fn a_state_without_a_key_names_the_checkpoint_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        let store = open_store(&mut cfg).unwrap();
        commit(&store, 5, serde_json::json!({"step": 5, "epoch": 0})).await;
        let err = Plan::read(&store, &cfg.checkpoint.url)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t/step-5") && err.contains("state.json") && err.contains("`position`"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_corrupt_state_falls_back_to_the_previous_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        let store = open_store(&mut cfg).unwrap();
        commit(
            &store,
            2,
            serde_json::json!({"step": 2, "epoch": 0, "position": 8}),
        )
        .await;
        commit(
            &store,
            6,
            serde_json::json!({"step": 6, "epoch": 0, "position": 24}),
        )
        .await;
        let blob = dir.path().join("checkpoints/t/step-6").join(STATE_BLOB);
        std::fs::write(&blob, b"{\"step\": 6, \"epoch\": 9, \"position\": 99}").unwrap();
        let plan = Plan::read(&store, &cfg.checkpoint.url).await.unwrap();
        assert_eq!(
            (plan.start_step, plan.restore_step, plan.position),
            (2, 2, 8)
        );
    }

    #[test]
    fn a_bad_url_names_the_url() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.checkpoint.url = "ftp://host/x".into();
        let err = open_store(&mut cfg).unwrap_err().to_string();
        assert!(err.contains("ftp://host/x"), "{err}");
    }
}
