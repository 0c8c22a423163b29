//! `ddpm-bench checkpoint`: the cost of checkpointing a model's full training state (model +
//! EMA + Adam moments) to a `file://` store, against a plain copy of the same bytes in the
//! same run.
//!
//! Per round:
//! - *stall*: what the training thread pays (the hand-over of `ddpm train`: wait for the
//!   slot, copy the state into the pooled host buffers, submit; the pool is allocated
//!   before the first step, as `ddpm train` does, and that start-up cost is reported);
//! - *commit*: from the hand-over until the checkpoint is committed (serialisation, sha256,
//!   upload with fsync, manifest, latest pointer) — the throughput is bytes / this time;
//! - *plain copy*: the same serialised bytes written with `std::fs::write` + `fsync`, one
//!   file per blob, into the same file system;
//! - *step during upload*: a training step run while the checkpoint uploads, against the
//!   step time measured with no upload.

use anyhow::{Context, Result};
use ddpm_checkpoint::{open_url, Blob, CheckpointJob, CheckpointStore, Uploader};
use ddpm_trainer::{SnapshotPool, Trainer};
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use tch::Device;

/// Arguments of `ddpm-bench checkpoint`.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckpointArgs {
    /// Configuration file (TOML) giving the model, e.g. configs/lsun_church.toml.
    #[arg(long)]
    config: PathBuf,
    /// Directory on the file system to write to (removed between rounds).
    #[arg(long)]
    dir: PathBuf,
    /// Batch of the training steps that set the stall budget.
    #[arg(long, default_value_t = 1)]
    batch: i64,
    /// Rounds (checkpoint + plain copy each).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Intra-op threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    threads: i64,
}

/// `sync(1)`: writes back other dirty pages so that they are not charged to the next phase.
fn flush_file_system() {
    let _ = std::process::Command::new("sync").status();
}

/// Seconds to sha256 every blob of the state, one after the other on this thread (what the
/// commit overlaps with the writes).
fn hash_seconds(trainer: &Trainer) -> Result<f64> {
    let blobs = trainer.export_state()?;
    let t = Instant::now();
    for (_, data) in &blobs {
        std::hint::black_box(ddpm_checkpoint::sha256_hex(data));
    }
    Ok(t.elapsed().as_secs_f64())
}

fn fsync_write(path: &std::path::Path, data: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).with_context(|| format!("{}", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// Runs the benchmark and returns one JSON line.
pub fn run(a: &CheckpointArgs) -> Result<Value> {
    let mut cfg = crate::load_config(&a.config)?;
    cfg.train.batch_size = a.batch;
    if a.threads > 0 {
        tch::set_num_threads(a.threads as i32);
    }
    std::fs::create_dir_all(&a.dir)?;
    let dir = a.dir.canonicalize()?;
    let mut trainer = Trainer::new(&cfg, Device::Cpu)?;
    let params = ddpm_unet::parameter_count(trainer.model().0);
    let (c, r) = (cfg.data.channels, cfg.data.resolution);
    let x = tch::Tensor::rand([a.batch, c, r, r], (tch::Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    eprintln!(
        "checkpoint bench: {params} parameters; timing a training step at batch {}",
        a.batch
    );
    trainer.step(&x)?; // warm-up
    let t = Instant::now();
    trainer.step(&x)?;
    let step_s = t.elapsed().as_secs_f64();

    let (store, prefix) = open_url(&format!("file://{}", dir.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let pool = SnapshotPool::default();
    // As `ddpm train` does before its first step.
    let t = Instant::now();
    trainer.warm_snapshot_pool(&pool);
    let warm_pool_s = t.elapsed().as_secs_f64();
    // Hands the state to an uploader the way `ddpm train` does; returns the stall.
    let hand_over = |trainer: &Trainer, uploader: &Uploader| {
        let t = Instant::now();
        let step = trainer.global_step() as u64;
        uploader.wait_for_slot(step);
        let snapshot = trainer.snapshot(&pool);
        uploader.submit(CheckpointJob {
            step,
            blobs: Box::new(move || {
                Ok(snapshot
                    .into_segments()
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .map(|(n, segments)| (n.to_string(), Blob::from_segments(segments)))
                    .collect())
            }),
            config: cfg.to_json(),
        });
        t.elapsed().as_secs_f64()
    };
    let checkpoint_alone = |trainer: &Trainer, round: usize| -> Result<(f64, f64, u64)> {
        flush_file_system();
        let run = format!("bench-{round}");
        let cs = CheckpointStore::new(store.clone(), prefix.clone(), &run)?;
        let uploader = Uploader::spawn(cs.clone(), 2)?;
        let t0 = Instant::now();
        let stall_s = hand_over(trainer, &uploader);
        uploader.wait_idle();
        let commit_s = t0.elapsed().as_secs_f64();
        let stats = uploader.finish();
        anyhow::ensure!(
            stats.committed == 1,
            "round {round}: the checkpoint was not committed: {:?}",
            stats.last_error
        );
        let m = rt.block_on(cs.read_manifest(trainer.global_step() as u64))?;
        let bytes: u64 = m.blobs.iter().map(|b| b.size).sum();
        rt.block_on(cs.delete_run())?;
        let _ = std::fs::remove_dir_all(dir.join(&run));
        Ok((stall_s, commit_s, bytes))
    };
    let plain_copy = |trainer: &Trainer, round: usize| -> Result<f64> {
        let blobs = trainer.export_state()?;
        let plain_dir = dir.join(format!("plain-{round}"));
        std::fs::create_dir_all(&plain_dir)?;
        flush_file_system();
        let t = Instant::now();
        for (name, data) in &blobs {
            fsync_write(&plain_dir.join(name), data)?;
        }
        let plain_s = t.elapsed().as_secs_f64();
        drop(blobs);
        std::fs::remove_dir_all(&plain_dir)?;
        Ok(plain_s)
    };
    let hash_s = hash_seconds(&trainer)?;
    let mut rounds: Vec<Value> = Vec::new();
    for round in 0..a.rounds {
        // A (checkpoint alone, hand-over to commit) and B (plain copy of the same bytes),
        // in alternating order so that drift in disk speed hits both.
        let mut commit = None;
        let mut plain = None;
        for phase in if round % 2 == 0 {
            ["A", "B"]
        } else {
            ["B", "A"]
        } {
            if phase == "A" {
                commit = Some(checkpoint_alone(&trainer, round)?);
            } else {
                plain = Some(plain_copy(&trainer, round)?);
            }
        }
        let (stall_s, commit_s, bytes) = commit.expect("phase A ran");
        let plain_s = plain.expect("phase B ran");

        // C: a training step while a checkpoint uploads (they share the CPUs here).
        let run_c = format!("bench-{round}-during");
        let cs = CheckpointStore::new(store.clone(), prefix.clone(), &run_c)?;
        let uploader = Uploader::spawn(cs.clone(), 2)?;
        let stall_c = hand_over(&trainer, &uploader);
        let t1 = Instant::now();
        trainer.step(&x)?;
        let step_during_upload_s = t1.elapsed().as_secs_f64();
        let stats = uploader.finish();
        anyhow::ensure!(
            stats.committed == 1,
            "round {round}: {:?}",
            stats.last_error
        );
        rt.block_on(cs.delete_run())?;
        let _ = std::fs::remove_dir_all(dir.join(&run_c));
        let line = json!({
            "round": round, "bytes": bytes, "stall_s": stall_s, "stall_during_s": stall_c,
            "commit_s": commit_s, "plain_copy_s": plain_s,
            "step_during_upload_s": step_during_upload_s,
            "throughput_ratio": plain_s / commit_s,
        });
        eprintln!("{line}");
        rounds.push(line);
    }
    let med = |k: &str| {
        crate::median(
            &rounds
                .iter()
                .map(|r| r[k].as_f64().unwrap())
                .collect::<Vec<_>>(),
        )
    };
    let bytes = rounds[0]["bytes"].as_u64().unwrap_or(0);
    Ok(json!({
        "bench": "checkpoint",
        "config": a.config.display().to_string(),
        "parameters": params,
        "bytes": bytes,
        "batch": a.batch,
        "threads": tch::get_num_threads(),
        "step_s": step_s,
        "stall_s": med("stall_s"),
        "first_stall_s": rounds[0]["stall_s"],
        "warm_pool_s": warm_pool_s,
        "sha256_serial_s": hash_s,
        "throughput_ratio_per_round_median": med("throughput_ratio"),
        "stall_share_of_step": med("stall_s") / step_s,
        "commit_s": med("commit_s"),
        "commit_gb_per_s": bytes as f64 / med("commit_s") / 1e9,
        "plain_copy_s": med("plain_copy_s"),
        "plain_gb_per_s": bytes as f64 / med("plain_copy_s") / 1e9,
        "throughput_ratio": med("plain_copy_s") / med("commit_s"),
        "step_during_upload_s": med("step_during_upload_s"),
        "rounds": rounds,
        "peak_rss_mib": crate::peak_rss_mib(),
    }))
}
