//! End-to-end tests of the `ddpm` binary: real processes on a small IDX dataset written by
//! the test.

mod common;

use common::{fails, ok, path, write_idx};
use std::path::{Path, PathBuf};

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    config: String,
    weights: String,
}

/// Trains a tiny model for a few steps and returns its paths.
fn trained() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let idx = root.join("images.gz");
    write_idx(&idx);
    let config = root.join("tiny.toml");
    std::fs::write(
        &config,
        format!(
            "[run]\nname = \"tiny\"\nseed = 1\nout_dir = \"{}\"\n\
             [data]\nsource = \"idx:{}\"\nresolution = 16\nchannels = 1\n\
             [model]\nch = 32\nch_mult = [1, 2]\nnum_res_blocks = 1\nattn_resolutions = [8]\ndropout = 0.0\n\
             [diffusion]\nnum_timesteps = 40\n\
             [train]\nbatch_size = 8\nlr = 0.001\nwarmup_steps = 5\ntotal_steps = 12\nlog_every = 4\nthreads = 1\n\
             [sample]\nsteps = 10\nbatch_size = 4\n[checkpoint]\nevery_steps = 6\n",
            path(&root.join("run")),
            path(&idx)
        ),
    )
    .unwrap();
    let config = path(&config);
    ok(&["train", "--config", &config, "--sample-n", "4"]);
    let weights = path(&root.join("run/ema.safetensors"));
    Setup {
        _dir: dir,
        root,
        config,
        weights,
    }
}

#[test]
fn train_writes_weights_log_and_a_sample_grid() {
    let s = trained();
    let run = s.root.join("run");
    for f in [
        "ema.safetensors",
        "model.safetensors",
        "config.toml",
        "samples.png",
    ] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    let log = std::fs::read_to_string(run.join("train_log.jsonl")).unwrap();
    let steps: Vec<i64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![4, 8, 12]);
    let img = image::open(run.join("samples.png")).unwrap();
    // 2x2 grid of 16x16 images with 2-pixel borders.
    assert_eq!((img.width(), img.height()), (38, 38));
}

#[test]
fn sampling_is_reproducible_and_takes_initial_noise() {
    let s = trained();
    let out = |name: &str| path(&s.root.join(name));
    let noise = s.root.join("xT.safetensors");
    let x_t = tch::Tensor::randn([3, 1, 16, 16], (tch::Kind::Float, tch::Device::Cpu));
    tch::Tensor::write_safetensors(&[("x_T", &x_t)], &noise).unwrap();
    let base = [
        "sample",
        "--config",
        &s.config,
        "--weights",
        &s.weights,
        "--n",
        "3",
    ];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [base, extra].concat()
    }
    ok(&with(
        &base,
        &[
            "--sampler",
            "ddim",
            "--steps",
            "5",
            "--eta",
            "0.5",
            "--seed",
            "7",
            "--out",
            &out("a.png"),
            "--save-tensor",
            &out("a.safetensors"),
        ],
    ));
    ok(&with(
        &base,
        &[
            "--sampler",
            "ddim",
            "--steps",
            "5",
            "--eta",
            "0.5",
            "--seed",
            "7",
            "--out",
            &out("b.png"),
        ],
    ));
    ok(&with(
        &base,
        &[
            "--sampler",
            "ddim",
            "--steps",
            "5",
            "--eta",
            "0.5",
            "--seed",
            "8",
            "--out",
            &out("c.png"),
        ],
    ));
    let read = |n: &str| std::fs::read(s.root.join(n)).unwrap();
    assert_eq!(read("a.png"), read("b.png"), "same seed, same images");
    assert_ne!(read("a.png"), read("c.png"), "another seed, other images");
    let saved = tch::Tensor::read_safetensors(s.root.join("a.safetensors")).unwrap();
    assert_eq!(saved[0].1.size(), vec![3, 1, 16, 16]);

    // Deterministic DDIM (eta 0) from a given x_T ignores the seed.
    let n = path(&noise);
    ok(&with(
        &base,
        &[
            "--sampler",
            "ddim",
            "--steps",
            "5",
            "--init-noise",
            &n,
            "--seed",
            "1",
            "--out",
            &out("d.png"),
        ],
    ));
    ok(&with(
        &base,
        &[
            "--sampler",
            "ddim",
            "--steps",
            "5",
            "--init-noise",
            &n,
            "--seed",
            "2",
            "--out",
            &out("e.png"),
        ],
    ));
    assert_eq!(read("d.png"), read("e.png"));
    // Ancestral sampling over all T = 40 steps.
    ok(&with(&base, &["--sampler", "ddpm", "--out", &out("f.png")]));
    assert!(s.root.join("f.png").exists());

    let err = fails(&[
        "sample",
        "--config",
        &s.config,
        "--weights",
        &s.weights,
        "--n",
        "5",
        "--init-noise",
        &n,
        "--out",
        &out("g.png"),
    ]);
    assert!(err.contains("holds 3 x_T, but --n is 5"), "{err}");
}

#[test]
fn progressive_interpolate_and_nll_run_on_the_trained_model() {
    let s = trained();
    let out = |name: &str| path(&s.root.join(name));
    ok(&[
        "progressive",
        "--config",
        &s.config,
        "--weights",
        &s.weights,
        "--n",
        "2",
        "--frames",
        "5",
        "--out",
        &out("p.png"),
    ]);
    let x_t = tch::Tensor::randn([2, 1, 16, 16], (tch::Kind::Float, tch::Device::Cpu));
    x_t.write_npy(s.root.join("xT.npy")).unwrap();
    ok(&[
        "progressive",
        "--config",
        &s.config,
        "--weights",
        &s.weights,
        "--n",
        "2",
        "--frames",
        "5",
        "--init-noise",
        &out("xT.npy"),
        "--out",
        &out("q.png"),
    ]);
    assert!(s.root.join("q.png").exists());
    // Out-of-range arguments: (command, extra arguments, the error it names).
    let r_png = out("r.png");
    let cases: [(&str, &[&str], &str); 4] = [
        (
            "progressive",
            &["--frames", "41"],
            "--frames: expected 2..=40",
        ),
        (
            "sample",
            &["--sampler", "ddim", "--steps", "41"],
            "--steps: DDIM steps must be in 1..=40",
        ),
        (
            "sample",
            &["--eta=-1"],
            "--eta: expected a number >= 0, got -1",
        ),
        ("sample", &["--n", "0"], "--n: expected >= 1, got 0"),
    ];
    for (cmd, extra, expected) in cases {
        let mut args = vec![cmd, "--config", &s.config, "--weights", &s.weights];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", &r_png]);
        let err = fails(&args);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    let img = image::open(s.root.join("p.png")).unwrap();
    assert_eq!((img.width(), img.height()), (5 * 18 + 2, 2 * 18 + 2));

    for (name, v) in [("a.png", 0u8), ("b.png", 255u8)] {
        image::GrayImage::from_pixel(24, 20, image::Luma([v]))
            .save(s.root.join(name))
            .unwrap();
    }
    ok(&[
        "interpolate",
        "--config",
        &s.config,
        "--weights",
        &s.weights,
        "--a",
        &out("a.png"),
        "--b",
        &out("b.png"),
        "--t",
        "20",
        "--lambdas",
        "5",
        "--out",
        &out("i.png"),
    ]);
    let img = image::open(s.root.join("i.png")).unwrap();
    assert_eq!(img.width(), 7 * 18 + 2, "a, five mixtures, b");

    let json = ok(&[
        "nll",
        "--config",
        &s.config,
        "--weights",
        &s.weights,
        "--n",
        "6",
        "--batch-size",
        "4",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let bpd = v["bits_per_dim"].as_f64().unwrap();
    assert!(bpd.is_finite() && bpd > 0.0, "{v}");
    assert_eq!(v["n"], 6);
}

#[test]
fn convert_round_trips_through_a_diffusers_directory() {
    let s = trained();
    let dir = s.root.join("diffusers");
    ok(&[
        "convert",
        "--config",
        &s.config,
        "--input",
        &s.weights,
        "--to",
        "diffusers",
        "--output",
        &path(&dir),
    ]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["block_out_channels"], serde_json::json!([32, 64]));
    assert_eq!(
        cfg["down_block_types"],
        serde_json::json!(["DownBlock2D", "AttnDownBlock2D"])
    );
    let back = s.root.join("back.safetensors");
    ok(&[
        "convert",
        "--input",
        &path(&dir),
        "--to",
        "ours",
        "--output",
        &path(&back),
    ]);
    let a = tch::Tensor::read_safetensors(&s.weights).unwrap();
    let b: std::collections::HashMap<String, tch::Tensor> = tch::Tensor::read_safetensors(&back)
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} changed in the round trip");
    }
    // The diffusers weights sample exactly like ours.
    let p = |n: &str| path(&s.root.join(n));
    let dw = path(&dir.join("diffusion_pytorch_model.safetensors"));
    ok(&[
        "sample",
        "--config",
        &s.config,
        "--weights",
        &s.weights,
        "--n",
        "2",
        "--sampler",
        "ddim",
        "--steps",
        "4",
        "--out",
        &p("x.png"),
    ]);
    ok(&[
        "sample",
        "--config",
        &s.config,
        "--weights",
        &dw,
        "--n",
        "2",
        "--sampler",
        "ddim",
        "--steps",
        "4",
        "--out",
        &p("y.png"),
    ]);
    assert_eq!(
        std::fs::read(s.root.join("x.png")).unwrap(),
        std::fs::read(s.root.join("y.png")).unwrap()
    );
}

#[test]
fn an_interrupted_run_resumes_to_the_same_weights() {
    let s = trained();
    // The same run in another directory: 6 steps, then a second invocation to 12.
    let text = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace("/run\"", "/run2\"");
    let config = s.root.join("resume.toml");
    std::fs::write(&config, text).unwrap();
    let config = path(&config);
    ok(&["train", "--config", &config, "--steps", "6"]);
    ok(&["train", "--config", &config]);
    let read = |p: &str| std::fs::read(s.root.join(p)).unwrap();
    assert_eq!(
        read("run2/ema.safetensors"),
        read("run/ema.safetensors"),
        "6 + resume + 6 != 12 straight"
    );
    assert_eq!(
        read("run2/model.safetensors"),
        read("run/model.safetensors")
    );
    for step in [6, 12] {
        assert!(
            s.root
                .join(format!("run2/checkpoints/tiny/step-{step}/manifest.json"))
                .exists(),
            "step {step}"
        );
    }
    let log = String::from_utf8(read("run2/train_log.jsonl")).unwrap();
    let steps: Vec<i64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        steps,
        vec![4, 6, 8, 12],
        "the log keeps the first invocation's lines"
    );
    let err = fails(&["train", "--config", &config, "--fresh"]);
    assert!(err.contains("--fresh") && err.contains("[6, 12]"), "{err}");
}

#[test]
fn inspect_reports_the_papers_parameter_counts() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = ok(&[
        "inspect",
        "--config",
        &format!("{root}/../../configs/cifar10.toml"),
    ]);
    assert!(out.contains("total parameters: 35746307"), "{out}");
    assert!(out.contains("mid.attn_1"), "{out}");
    let out = ok(&[
        "inspect",
        "--config",
        &format!("{root}/../../configs/lsun_church.toml"),
    ]);
    assert!(out.contains("total parameters: 113673219"), "{out}");
}

#[test]
fn user_errors_name_the_file_key_or_library() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[train]\nbatchsize = 3\n").unwrap();
    let err = fails(&["inspect", "--config", &path(&bad)]);
    assert!(
        err.contains("bad.toml") && err.contains("batchsize"),
        "{err}"
    );

    std::fs::write(&bad, "[model]\nch = 48\n").unwrap();
    let err = fails(&["inspect", "--config", &path(&bad)]);
    assert!(
        err.contains("model.ch") && err.contains("multiple of 32"),
        "{err}"
    );

    let cifar = format!("{}/../../configs/cifar10.toml", env!("CARGO_MANIFEST_DIR"));
    let missing = path(&dir.path().join("nope.safetensors"));
    let err = fails(&[
        "sample",
        "--config",
        &cifar,
        "--weights",
        &missing,
        "--out",
        &path(&dir.path().join("o.png")),
    ]);
    assert!(err.contains("nope.safetensors"), "{err}");

    let err = fails(&["train", "--config", &cifar, "--steps", "1"]);
    assert!(
        err.contains("data.source") && err.contains("data_batch_1.bin"),
        "{err}"
    );

    let err = fails(&[
        "sample",
        "--config",
        &cifar,
        "--weights",
        &missing,
        "--device",
        "gpu0",
        "--out",
        "o.png",
    ]);
    assert!(err.contains("gpu0") && err.contains("cuda:K"), "{err}");
    // No usable CUDA here: the error names the library and how to point at it. (On a host
    // where CUDA works, the command instead fails later, on the missing weights file.)
    let err = fails(&[
        "sample",
        "--config",
        &cifar,
        "--weights",
        &missing,
        "--device",
        "cuda",
        "--out",
        "o.png",
    ]);
    assert!(
        (err.contains("libtorch_cuda.so") && err.contains("LD_LIBRARY_PATH"))
            || err.contains("nope.safetensors"),
        "{err}"
    );
}

#[test]
fn train_serves_metrics_on_the_address_given_and_names_a_taken_one() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/quickstart.toml");
    let err = fails(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--metrics-listen",
        &addr,
    ]);
    assert!(err.contains(&format!("serving metrics on {addr}")), "{err}");
}

#[test]
fn non_finite_steps_are_skipped_and_too_many_in_a_row_stop_naming_the_step_and_rank() {
    // Learning rate 1 without warmup or clipping diverges within a few steps.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let idx = root.join("images.gz");
    write_idx(&idx);
    let config = root.join("nan.toml");
    std::fs::write(
        &config,
        format!(
            "[run]\nname = \"nan\"\nout_dir = \"{}\"\n\
             [data]\nsource = \"idx:{}\"\nresolution = 16\nchannels = 1\n\
             [model]\nch = 32\nch_mult = [1, 2]\nnum_res_blocks = 1\nattn_resolutions = [8]\ndropout = 0.0\n\
             [diffusion]\nnum_timesteps = 40\n\
             [train]\nbatch_size = 8\nlr = 1.0\nwarmup_steps = 1\ngrad_clip = 0.0\nadam_eps = 1e-30\n\
             total_steps = 30\nlog_every = 1\nthreads = 1\nmax_consecutive_nonfinite = 3\n\
             [sample]\nsteps = 10\n",
            path(&root.join("run")),
            path(&idx)
        ),
    )
    .unwrap();
    let (status, log) = common::ddpm_log(&["train", "--config", &path(&config)], "warn");
    assert!(!status.success(), "{log}");
    let skipped = log.matches("step skipped (no update)").count();
    assert_eq!(
        skipped, 2,
        "two skipped before the third stops the run: {log}"
    );
    assert!(
        log.contains("3 steps in a row had a non-finite loss or gradients")
            && log.contains("on rank 0")
            && log.contains("max_consecutive_nonfinite = 3"),
        "{log}"
    );
}
