//! `ddpm launch`: real `coordinator` and `worker` processes on 127.0.0.1, against one
//! `ddpm train` process on the same data.

mod common;

use common::{ddpm, ok, path, write_idx};
use std::collections::BTreeMap;
use std::path::Path;

/// A small model on 16x16 grey images with a global batch of 7 (uneven over 2 and 3
/// workers) and no dropout, so data-parallel runs can take exactly one process's steps.
/// The paper's learning rate with a 10-step warmup, as the trainer's in-process test: Adam
/// normalises each update, so a rounding difference in a near-zero gradient component (the
/// ranks sum their rows in another order) moves a parameter by up to about the step's lr.
fn config(dir: &Path, out: &str, source: &str) -> String {
    let text = format!(
        r#"[run]
name = "dp"
seed = 3
out_dir = "{out}"
[data]
source = "{source}"
resolution = 16
channels = 1
random_flip = true
[model]
ch = 32
ch_mult = [1, 2]
num_res_blocks = 1
attn_resolutions = [8]
dropout = 0.0
[diffusion]
num_timesteps = 100
[train]
batch_size = 7
lr = 0.0002
warmup_steps = 10

total_steps = 5
log_every = 1
threads = 1
[sample]
batch_size = 4
[distributed]
collective_timeout_secs = 120
lease_secs = 20
"#,
        out = path(&dir.join(out)),
    );
    let file = dir.join(format!("{out}.toml"));
    std::fs::write(&file, text).unwrap();
    path(&file)
}

fn tensors(file: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let v = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, v)
        })
        .collect()
}

fn max_abs_diff(a: &Path, b: &Path) -> f32 {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "same variables"
    );
    let mut worst = 0f32;
    for (name, x) in &a {
        let y = &b[name];
        assert_eq!(x.len(), y.len(), "{name}");
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((p - q).abs());
        }
    }
    worst
}

fn losses(log: &Path) -> Vec<f64> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn two_and_three_workers_take_the_steps_of_one_process_with_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let idx = root.join("images.idx.gz");
    write_idx(&idx);
    let source = format!("idx:{}", path(&idx));
    ok(&["train", "--config", &config(root, "single", &source)]);
    let out = ok(&[
        "launch",
        "--config",
        &config(root, "two", &source),
        "--workers",
        "2",
        "--sample-n",
        "4",
    ]);
    // The one-line summary, and the sample grid from the EMA weights.
    assert!(
        out.contains("dp: step 5 on 2 workers") && out.contains("loss"),
        "{out}"
    );
    assert!(root.join("two/samples.png").is_file());
    ok(&[
        "launch",
        "--config",
        &config(root, "three", &source),
        "--workers",
        "3",
    ]);
    let single = losses(&root.join("single/train_log.jsonl"));
    assert_eq!(single.len(), 5);
    for run in ["two", "three"] {
        for file in ["model.safetensors", "ema.safetensors"] {
            let d = max_abs_diff(&root.join("single").join(file), &root.join(run).join(file));
            assert!(
                d <= 1e-6,
                "{run}/{file}: max |diff| {d:e} against one process"
            );
        }
        let l = losses(&root.join(run).join("train_log.jsonl"));
        assert_eq!(l.len(), 5, "{run}: one log line per step");
        for (a, b) in single.iter().zip(&l) {
            assert!((a - b).abs() <= 1e-5, "{run}: loss {b} against {a}");
        }
        // Rank 0 committed the final checkpoint, recording the world size it was taken at.
        let state: serde_json::Value = serde_json::from_slice(
            &std::fs::read(root.join(run).join("checkpoints/dp/step-5/state.json")).unwrap(),
        )
        .unwrap();
        let world = if run == "two" { 2 } else { 3 };
        assert_eq!(state["world_size"], world, "{state}");
        assert_eq!(state["step"], 5);
    }
}

#[test]
fn a_failing_worker_stops_the_launch_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let missing = root.join("no-such-images.gz");
    let cfg = config(root, "broken", &format!("idx:{}", path(&missing)));
    let started = std::time::Instant::now();
    let out = ddpm(&["launch", "--config", &cfg, "--workers", "2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("] error:") && err.contains("no-such-images.gz"),
        "the worker's own error is shown: {err}"
    );
    assert!(
        err.contains("exited with") && err.contains("stopped the other processes"),
        "{err}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(120),
        "the launch must not wait for the survivors"
    );
}
