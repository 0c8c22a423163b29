//! Checkpoints end to end: kill -9 and exact resume, `--resume` / `--fresh` / `--overwrite`,
//! `ddpm ckpt`, a corrupted blob, and training against a real S3 API (moto_server).

mod common;

#[path = "../../ddpm-checkpoint/tests/common/moto.rs"]
mod moto;

use common::{ddpm, ddpm_log, fails, ok, path, write_idx};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A tiny run of 20 steps with a checkpoint every 10, in `dir/<out>`.
fn config(dir: &Path, name: &str, out: &str, extra: &str) -> String {
    let idx = dir.join("images.gz");
    if !idx.exists() {
        write_idx(&idx);
    }
    let cfg = dir.join(format!("{name}-{out}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[run]\nname = \"{name}\"\nseed = 3\nout_dir = \"{}\"\n\
             [data]\nsource = \"idx:{}\"\nresolution = 16\nchannels = 1\n\
             [model]\nch = 32\nch_mult = [1, 2]\nnum_res_blocks = 1\nattn_resolutions = [8]\ndropout = 0.1\n\
             [diffusion]\nnum_timesteps = 40\n\
             [train]\nbatch_size = 8\nlr = 0.001\nwarmup_steps = 5\ntotal_steps = 20\nlog_every = 5\nthreads = 1\n\
             [sample]\nsteps = 10\n\
             [checkpoint]\nevery_steps = 10\nkeep_last = 3\n{extra}",
            path(&dir.join(out)),
            path(&idx)
        ),
    )
    .unwrap();
    path(&cfg)
}

fn manifest(dir: &Path, out: &str, run: &str, step: u64) -> serde_json::Value {
    let p = dir.join(format!("{out}/checkpoints/{run}/step-{step}/manifest.json"));
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

/// (name, sha256) of every blob of a manifest.
fn blob_hashes(m: &serde_json::Value) -> Vec<(String, String)> {
    m["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().into(),
                b["sha256"].as_str().unwrap().into(),
            )
        })
        .collect()
}

#[test]
fn kill_dash_nine_after_a_checkpoint_then_resume_is_bitwise_exact() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let straight = config(root, "exact", "straight", "");
    ok(&["train", "--config", &straight]);

    let killed = config(root, "exact", "killed", "");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(["train", "--config", &killed])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let step10 = root.join("killed/checkpoints/exact/step-10/manifest.json");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !step10.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "training ended before its first checkpoint"
        );
        assert!(Instant::now() < deadline, "no checkpoint at step 10");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(9),
        "the run must die by SIGKILL mid-training, not finish ({status})"
    );
    assert!(!root
        .join("killed/checkpoints/exact/step-20/manifest.json")
        .exists());

    ok(&["train", "--config", &killed]);
    let a = manifest(root, "straight", "exact", 20);
    let b = manifest(root, "killed", "exact", 20);
    assert_eq!(
        blob_hashes(&a),
        blob_hashes(&b),
        "20 steps straight != 10 + checkpoint + kill -9 + resume + 10 (model, EMA, optimizer, state)"
    );
    let names: Vec<String> = blob_hashes(&a).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "model.safetensors",
            "ema.safetensors",
            "optimizer.safetensors",
            "state.json"
        ]
    );
    let read = |p: &str| std::fs::read(root.join(p)).unwrap();
    assert_eq!(
        read("straight/ema.safetensors"),
        read("killed/ema.safetensors")
    );
}

#[test]
fn resume_fresh_and_overwrite_say_what_they_do() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = config(root, "choices", "run", "");
    ok(&["train", "--config", &cfg]);
    let url = format!("file://{}/run/checkpoints/choices", path(root));

    // --resume 10 with a newer checkpoint: refused, then allowed with --overwrite.
    let err = fails(&["train", "--config", &cfg, "--resume", "10"]);
    assert!(
        err.contains("--resume 10") && err.contains("[20]") && err.contains("--overwrite"),
        "{err}"
    );
    let before = manifest(root, "run", "choices", 20);
    ok(&["train", "--config", &cfg, "--resume", "10", "--overwrite"]);
    assert_eq!(
        blob_hashes(&before),
        blob_hashes(&manifest(root, "run", "choices", 20)),
        "same steps, same state"
    );
    let err = fails(&["train", "--config", &cfg, "--resume", "7"]);
    assert!(
        err.contains("no committed checkpoint at step 7") && err.contains("[10, 20]"),
        "{err}"
    );

    // --fresh over an existing run: refused, then done with --overwrite.
    let err = fails(&["train", "--config", &cfg, "--fresh"]);
    assert!(
        err.contains("--fresh") && err.contains("[10, 20]") && err.contains("--overwrite"),
        "{err}"
    );
    ok(&[
        "train",
        "--config",
        &cfg,
        "--fresh",
        "--overwrite",
        "--steps",
        "10",
    ]);
    let listing = ok(&["ckpt", "ls", &url]);
    let steps: Vec<&str> = listing
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(steps, ["10"], "{listing}");
    let err = fails(&["train", "--config", &cfg, "--overwrite"]);
    assert!(err.contains("--overwrite only applies"), "{err}");
}

#[test]
fn ckpt_lists_inspects_verifies_and_exports_and_resume_skips_a_corrupt_blob() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = config(root, "ops", "run", "");
    ok(&["train", "--config", &cfg]);
    let url = format!("file://{}/run/checkpoints/ops", path(root));

    let ls = ok(&["ckpt", "ls", &url]);
    let rows: Vec<&str> = ls.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{ls}");
    assert!(
        rows[0].trim_start().starts_with("10") && rows[1].contains("latest"),
        "{ls}"
    );

    let inspect = ok(&["ckpt", "inspect", &url]);
    assert!(inspect.contains("step:   20"), "{inspect}");
    assert!(
        inspect.contains("optimizer.safetensors") && inspect.contains("sha256"),
        "{inspect}"
    );
    let params = ok(&["inspect", "--config", &cfg]);
    let count = inspect
        .lines()
        .find_map(|l| l.strip_prefix("parameters: "))
        .unwrap()
        .to_string();
    assert!(
        params.contains(&count),
        "inspect of the config: {params}\nckpt inspect: {inspect}"
    );
    assert!(inspect.contains("epoch 4 position 32"), "{inspect}");

    ok(&["ckpt", "verify", &url]);

    // Export both ways; the safetensors export samples like the run's own EMA weights.
    let st = root.join("export-st");
    ok(&[
        "ckpt",
        "export",
        &format!("{url}/step-20"),
        "--format",
        "safetensors",
        "--out",
        &path(&st),
    ]);
    assert_eq!(
        std::fs::read(st.join("ema.safetensors")).unwrap(),
        std::fs::read(root.join("run/checkpoints/ops/step-20/ema.safetensors")).unwrap()
    );
    let diffusers = root.join("export-diffusers");
    ok(&[
        "ckpt",
        "export",
        &url,
        "--format",
        "diffusers",
        "--out",
        &path(&diffusers),
    ]);
    let back = root.join("back.safetensors");
    ok(&[
        "convert",
        "--input",
        &path(&diffusers),
        "--to",
        "ours",
        "--output",
        &path(&back),
    ]);
    let a = ok(&[
        "sample",
        "--config",
        &cfg,
        "--weights",
        &path(&st.join("ema.safetensors")),
        "--n",
        "2",
        "--seed",
        "5",
        "--save-tensor",
        &path(&root.join("a.safetensors")),
        "--out",
        &path(&root.join("a.png")),
    ]);
    let b = ok(&[
        "sample",
        "--config",
        &cfg,
        "--weights",
        &path(&back),
        "--n",
        "2",
        "--seed",
        "5",
        "--save-tensor",
        &path(&root.join("b.safetensors")),
        "--out",
        &path(&root.join("b.png")),
    ]);
    let _ = (a, b);
    assert_eq!(
        std::fs::read(root.join("a.safetensors")).unwrap(),
        std::fs::read(root.join("b.safetensors")).unwrap(),
        "diffusers export round-trips to the same samples"
    );

    // Flip one byte of the newest EMA blob: verify names it, resume falls back to step 10.
    let blob = root.join("run/checkpoints/ops/step-20/ema.safetensors");
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let out = ddpm(&["ckpt", "verify", &url]);
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("step-10: ok") && text.contains("ema.safetensors") && text.contains("sha256"),
        "{text}"
    );
    let (status, log) = ddpm_log(&["train", "--config", &cfg, "--steps", "30"], "info");
    assert!(status.success(), "{log}");
    assert!(
        log.contains("skipping a checkpoint that does not verify")
            && log.contains("ema.safetensors"),
        "{log}"
    );
    let resumed = log
        .lines()
        .find(|l| l.contains("resumed from checkpoint"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(resumed.contains("step=10"), "{resumed}");
    // The corrupt step 20 was withdrawn (moved under rejected/, nothing deleted) and
    // committed again.
    assert!(
        log.contains("withdrew a checkpoint that does not verify"),
        "{log}"
    );
    assert!(root
        .join("run/checkpoints/ops/rejected/step-20/ema.safetensors")
        .exists());
    let verify = ok(&["ckpt", "verify", &url]);
    assert!(
        verify.contains("step-20: ok") && verify.contains("step-30: ok"),
        "{verify}"
    );
    // With every checkpoint corrupt, training refuses to start over by itself.
    for step in [10, 20, 30] {
        let blob = root.join(format!("run/checkpoints/ops/step-{step}/state.json"));
        if blob.exists() {
            std::fs::write(&blob, b"{}").unwrap();
        }
    }
    let err = fails(&["train", "--config", &cfg, "--steps", "40"]);
    assert!(
        err.contains("none verifies") && err.contains("--fresh --overwrite"),
        "{err}"
    );
}

#[test]
fn training_checkpoints_to_an_s3_api_and_ckpt_reads_them_there() {
    let moto = moto::Moto::start();
    moto.create_bucket("runs");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let options: String = moto
        .options()
        .iter()
        .map(|(k, v)| format!("{k} = \"{v}\"\n"))
        .collect();
    let cfg = config(
        root,
        "s3run",
        "run",
        &format!("url = \"s3://runs/ckpt\"\n[checkpoint.options]\n{options}"),
    );
    ok(&["train", "--config", &cfg]);
    let mut args: Vec<String> = vec!["ckpt".into(), "ls".into(), "s3://runs/ckpt/s3run".into()];
    for (k, v) in moto.options() {
        args.push("--option".into());
        args.push(format!("{k}={v}"));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let ls = ok(&argv);
    assert!(ls.contains("latest") && ls.lines().count() == 3, "{ls}");
    let mut verify = argv.clone();
    verify[1] = "verify";
    let out = ok(&verify);
    assert!(
        out.contains("step-10: ok") && out.contains("step-20: ok"),
        "{out}"
    );
    // The secret is not in the manifest, nor in the run directory's config.
    let mut inspect = argv.clone();
    inspect[1] = "inspect";
    ok(&inspect);
    let secret = "moto-secret-never-stored";
    let (store, prefix) =
        ddpm_checkpoint::open_url_with("s3://runs/ckpt", &moto.options()).unwrap();
    let ckpts = ddpm_checkpoint::CheckpointStore::new(store, prefix, "s3run").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let manifest = serde_json::to_string(&rt.block_on(ckpts.read_manifest(20)).unwrap()).unwrap();
    assert!(
        manifest.contains("<redacted>") && !manifest.contains(secret),
        "{manifest}"
    );
    let config_toml = std::fs::read_to_string(root.join("run/config.toml")).unwrap();
    assert!(
        config_toml.contains("<redacted>") && !config_toml.contains(secret),
        "{config_toml}"
    );
    // Resume from S3 after losing the local directory.
    std::fs::remove_dir_all(root.join("run")).unwrap();
    let (status, log) = ddpm_log(&["train", "--config", &cfg, "--steps", "30"], "info");
    let resumed = log
        .lines()
        .find(|l| l.contains("resumed from checkpoint"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(status.success() && resumed.contains("step=20"), "{log}");
}

#[test]
fn a_failing_store_does_not_stop_training_but_the_run_ends_in_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // /proc does not take new files: every checkpoint upload fails.
    let cfg = config(
        root,
        "nostore",
        "run",
        "url = \"file:///proc/ddpm-checkpoints\"\n",
    );
    let (status, log) = ddpm_log(&["train", "--config", &cfg], "warn");
    assert!(!status.success(), "{log}");
    assert_eq!(
        log.matches("checkpoint failed; training goes on").count(),
        2,
        "both checkpoints failed and were logged: {log}"
    );
    assert!(
        log.contains("the final checkpoint (step 20) was not committed")
            && log.contains("/proc/ddpm-checkpoints"),
        "{log}"
    );
    // Training itself finished: the weights of step 20 are in the run directory.
    assert!(root.join("run/ema.safetensors").exists());
    let lines = std::fs::read_to_string(root.join("run/train_log.jsonl")).unwrap();
    assert!(
        lines.lines().last().unwrap().contains("\"step\":20"),
        "{lines}"
    );
}

#[test]
fn blobs_of_a_writer_that_died_before_its_manifest_are_removed_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = config(root, "orphans", "run", "");
    ok(&["train", "--config", &cfg, "--steps", "10"]);
    // What a writer killed between its blobs and its manifest leaves behind.
    let ckpt = root.join("run/checkpoints/orphans");
    std::fs::create_dir_all(ckpt.join("step-15")).unwrap();
    for blob in ["model.safetensors", "ema.safetensors"] {
        std::fs::copy(
            ckpt.join("step-10").join(blob),
            ckpt.join("step-15").join(blob),
        )
        .unwrap();
    }
    std::fs::write(ckpt.join("step-15/writer.lock"), "{\"writer\":\"dead\"}").unwrap();
    let url = format!("file://{}", path(&ckpt));
    let ls = ok(&["ckpt", "ls", &url]);
    // (The step column only: "15" can appear in a commit time.)
    assert!(
        !ls.lines()
            .any(|l| l.split_whitespace().next() == Some("15")),
        "an uncommitted checkpoint is not listed: {ls}"
    );
    let (status, log) = ddpm_log(&["train", "--config", &cfg], "warn");
    assert!(status.success(), "{log}");
    assert!(
        log.contains("removed uncommitted checkpoint blobs") && log.contains("15"),
        "{log}"
    );
    assert!(std::fs::read_dir(ckpt.join("step-15")).map_or(true, |mut d| d.next().is_none()));
    let verify = ok(&["ckpt", "verify", &url]);
    assert!(
        verify.contains("step-10: ok") && verify.contains("step-20: ok"),
        "{verify}"
    );
}
