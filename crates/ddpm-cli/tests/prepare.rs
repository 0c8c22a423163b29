//! `ddpm prepare` end to end: real photos into shards on file:// and on an S3 API, resume
//! after an interruption, bad images, and training from the prepared dataset.

mod common;

#[path = "../../ddpm-checkpoint/tests/common/moto.rs"]
mod moto;

use common::{ddpm_log, fails, ok, path};
use std::path::{Path, PathBuf};

fn photos() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/photos");
    assert!(
        p.join("astronaut.png").exists(),
        "run `make test-tools` ({})",
        p.display()
    );
    p
}

/// A folder of five real photos and one truncated JPEG.
fn photo_folder(root: &Path) -> PathBuf {
    let dir = root.join("photos");
    std::fs::create_dir_all(dir.join("more")).unwrap();
    for (i, n) in [
        "astronaut.png",
        "chelsea.png",
        "coffee.png",
        "rocket.jpg",
        "motorcycle_left.png",
    ]
    .iter()
    .enumerate()
    {
        let sub = if i % 2 == 0 { "" } else { "more/" };
        std::fs::copy(photos().join(n), dir.join(format!("{sub}{i}-{n}"))).unwrap();
    }
    let mut bad = std::fs::read(photos().join("rocket.jpg")).unwrap();
    bad.truncate(300);
    std::fs::write(dir.join("9-truncated.jpg"), bad).unwrap();
    dir
}

fn prepare_args<'a>(src: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "prepare",
        "--source",
        src,
        "--resolution",
        "16",
        "--out",
        out,
        "--shard-size",
        "2",
        "--on-bad-sample",
        "skip",
        "--max-bad-fraction",
        "0.2",
        "--workers",
        "2",
    ]
}

#[test]
fn photos_are_prepared_resumed_verified_and_trained_on() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let src = format!("folder:{}", path(&photo_folder(root)));
    let out_dir = root.join("prepared");
    let out = format!("file://{}", path(&out_dir));

    // Fail policy: the bad image is named and nothing is written as a manifest.
    let err = fails(&[
        "prepare",
        "--source",
        &src,
        "--resolution",
        "16",
        "--out",
        &out,
        "--shard-size",
        "2",
    ]);
    assert!(err.contains("9-truncated.jpg"), "{err}");
    assert!(!out_dir.join("dataset.json").exists());

    let text = ok(&prepare_args(&src, &out));
    assert!(
        text.contains("prepared 5 samples")
            && text.contains("3 shards")
            && text.contains("1 images skipped"),
        "{text}"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("dataset.json")).unwrap()).unwrap();
    assert_eq!(manifest["samples"], 5);
    assert_eq!(manifest["shards"].as_array().unwrap().len(), 3);
    assert_eq!(
        std::fs::metadata(out_dir.join("shard-00000.bin"))
            .unwrap()
            .len(),
        2 * 3 * 16 * 16
    );

    // Interrupted before the manifest and before the last shard's sidecar: the rerun redoes
    // only that shard.
    std::fs::remove_file(out_dir.join("dataset.json")).unwrap();
    std::fs::remove_file(out_dir.join("shard-00002.bin.json")).unwrap();
    let text = ok(&prepare_args(&src, &out));
    assert!(text.contains("2 reused"), "{text}");
    let again: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("dataset.json")).unwrap()).unwrap();
    assert_eq!(again, manifest, "the same dataset, bit for bit");
    let text = ok(&prepare_args(&src, &out));
    assert!(text.contains("already prepared"), "{text}");

    // An unfinished prepare with other parameters is not mixed into: the difference is named.
    std::fs::remove_file(out_dir.join("dataset.json")).unwrap();
    let mut other = prepare_args(&src, &out);
    other[8] = "3"; // --shard-size
    let err = fails(&other);
    assert!(
        err.contains("unfinished prepare") && err.contains("\"shard_size\":3"),
        "{err}"
    );
    ok(&prepare_args(&src, &out));
    let err = fails(&[
        "prepare",
        "--source",
        &src,
        "--resolution",
        "16",
        "--pad",
        "2",
        "--out",
        &out,
    ]);
    assert!(err.contains("--pad applies to idx: and cifar10:"), "{err}");

    // Train from it.
    let cfg = root.join("shards.toml");
    std::fs::write(
        &cfg,
        format!(
            "[run]\nname = \"shards\"\nout_dir = \"{}\"\n[data]\nsource = \"shards:{out}\"\nresolution = 16\nchannels = 3\n\
             [model]\nch = 32\nch_mult = [1, 2]\nnum_res_blocks = 1\nattn_resolutions = [8]\n\
             [diffusion]\nnum_timesteps = 20\n[train]\nbatch_size = 4\ntotal_steps = 2\nthreads = 1\n[sample]\nsteps = 10\n",
            path(&root.join("run"))
        ),
    )
    .unwrap();
    let cfg = path(&cfg);
    let (status, log) = ddpm_log(&["train", "--config", &cfg], "info");
    assert!(status.success() && log.contains("images=5"), "{log}");

    // The checkpoint at step 2 is 3 samples into epoch 1 of the 8-shard-window order; a
    // resume under another window would repeat and skip samples, so it is refused.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let other = root.join("shards-window1.toml");
    std::fs::write(
        &other,
        text.replace(
            "channels = 3\n",
            "channels = 3\nshuffle_window_shards = 1\ncache_shards = 2\n",
        ),
    )
    .unwrap();
    let err = fails(&["train", "--config", &path(&other), "--steps", "3"]);
    assert!(
        err.contains("data.shuffle_window_shards") && err.contains("\"shard-windows:8\""),
        "{err}"
    );

    // A flipped byte in a shard is named.
    let shard = out_dir.join("shard-00001.bin");
    let mut b = std::fs::read(&shard).unwrap();
    b[7] ^= 0x40;
    std::fs::write(&shard, b).unwrap();
    let err = fails(&["train", "--config", &cfg, "--fresh", "--overwrite"]);
    assert!(
        err.contains("shard-00001.bin") && err.contains("sha256"),
        "{err}"
    );
}

#[test]
fn a_dataset_is_prepared_into_an_s3_api() {
    let moto = moto::Moto::start();
    moto.create_bucket("data");
    let dir = tempfile::tempdir().unwrap();
    let src = format!("folder:{}", path(&photo_folder(dir.path())));
    let mut args: Vec<String> = prepare_args(&src, "s3://data/photos16")
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (k, v) in moto.options() {
        args.push("--option".into());
        args.push(format!("{k}={v}"));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = ok(&argv);
    assert!(
        text.contains("prepared 5 samples") && text.contains("s3://data/photos16"),
        "{text}"
    );
    let text = ok(&argv);
    assert!(text.contains("already prepared"), "{text}");

    // Train from it: the loader fetches and verifies the shards from the S3 API.
    let options: String = moto
        .options()
        .iter()
        .map(|(k, v)| format!("{k} = \"{v}\"\n"))
        .collect();
    let cfg = dir.path().join("s3shards.toml");
    std::fs::write(
        &cfg,
        format!(
            "[run]\nname = \"s3shards\"\nout_dir = \"{}\"\n[data]\nsource = \"shards:s3://data/photos16\"\nresolution = 16\nchannels = 3\n\
             [data.options]\n{options}\
             [model]\nch = 32\nch_mult = [1, 2]\nnum_res_blocks = 1\nattn_resolutions = [8]\n\
             [diffusion]\nnum_timesteps = 20\n[train]\nbatch_size = 4\ntotal_steps = 3\nthreads = 1\n[sample]\nsteps = 10\n",
            path(&dir.path().join("run"))
        ),
    )
    .unwrap();
    let (status, log) = ddpm_log(&["train", "--config", &path(&cfg)], "info");
    assert!(status.success() && log.contains("images=5"), "{log}");
    let lines = std::fs::read_to_string(dir.path().join("run/train_log.jsonl")).unwrap();
    assert!(
        lines.contains("\"step\":3") && lines.contains("data_wait_fraction"),
        "{lines}"
    );
}
