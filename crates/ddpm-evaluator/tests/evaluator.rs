//! The real `evaluator` binary on checkpoints committed to a local store: one checkpoint
//! with --once (FID and IS written), new checkpoints picked up while watching, a stop
//! mid-evaluation that writes nothing (the next run redoes the step), and config errors
//! that name the key.

use ddpm_checkpoint::{open_url, Blob, CheckpointStore};
use ddpm_config::Config;
use ddpm_eval::FeatureStats;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tch::{nn, Device, Kind, Tensor};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Test data installed by `make test-tools`; missing data fails the test, never skips it.
fn tool_file(rel: &str) -> String {
    let p = root().join(rel);
    assert!(
        p.is_file(),
        "{} is missing: run `make test-tools`",
        p.display()
    );
    p.to_str().unwrap().to_string()
}

struct Run {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Run {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let reference = dir.path().join("reference.npz");
        // Reference statistics of the right dimension (any values do for the plumbing; the
        // FID itself is checked against fid-helper-pytorch in crates/ddpm-eval).
        tch::manual_seed(3);
        let f = Tensor::randn([64, 2048], (Kind::Double, Device::Cpu));
        let mu = f.mean_dim(0, false, Kind::Double);
        let y = &f - &mu;
        FeatureStats::new(mu, y.tr().matmul(&y) / 63.0, "reference")
            .unwrap()
            .write(&reference)
            .unwrap();
        let run = Self {
            config: dir.path().join("run.toml"),
            dir,
        };
        run.write_config(
            12,
            &reference.display().to_string(),
            &tool_file(".tools/inception/default_1.pt"),
        );
        run
    }

    fn write_config(&self, num_samples: i64, reference: &str, inception: &str) {
        let d = self.dir.path().display();
        let is = root().join("tests/parity/fixtures/inception_is_weights.pth");
        std::fs::write(
            &self.config,
            format!(
                "[run]\nname = \"tiny\"\nout_dir = \"{d}/run\"\n\
                 [data]\nresolution = 8\nchannels = 3\n\
                 [model]\nch = 32\nch_mult = [1, 2]\nnum_res_blocks = 1\nattn_resolutions = [4]\ndropout = 0.0\n\
                 [diffusion]\nnum_timesteps = 20\n[sample]\nsteps = 10\n\
                 [checkpoint]\nurl = \"file://{d}/ckpt\"\n\
                 [eval]\nnum_samples = {num_samples}\nbatch_size = 6\nsampler = \"ddim\"\nsteps = 4\n\
                 reference = \"{reference}\"\ninception = \"{inception}\"\nis_weights = \"{}\"\n\
                 grid = 4\npoll_secs = 1\n",
                is.display()
            ),
        )
        .unwrap();
    }

    fn cfg(&self) -> Config {
        Config::from_file(&self.config).unwrap()
    }

    fn store(&self) -> CheckpointStore {
        let cfg = self.cfg();
        let (store, prefix) = open_url(&cfg.checkpoint.url).unwrap();
        CheckpointStore::new(store, prefix, &cfg.run.name).unwrap()
    }

    /// Commits a checkpoint holding a freshly initialised model's EMA weights.
    fn commit(&self, step: u64) {
        let cfg = self.cfg();
        let vs = nn::VarStore::new(Device::Cpu);
        let _net =
            ddpm_unet::UNet::new(&vs.root(), &ddpm_unet::UNetConfig::from_config(&cfg)).unwrap();
        let out = self.dir.path().join(format!("weights-{step}"));
        ddpm_trainer::save_weights_dir(&out, &cfg, &vs, &vs).unwrap();
        let ema = std::fs::read(out.join("ema.safetensors")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(self.store().commit(
            step,
            &[("ema.safetensors", Blob::from_segments(vec![ema.into()]))],
            cfg.to_json(),
        ))
        .unwrap();
    }

    fn result(&self, step: u64, ext: &str) -> PathBuf {
        self.dir
            .path()
            .join(format!("ckpt/tiny/eval/step-{step}.{ext}"))
    }

    fn evaluator(&self, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_evaluator"));
        c.args(["--config", self.config.to_str().unwrap(), "--threads", "2"])
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("DDPM_INCEPTION");
        c
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn wait_for(path: &Path, child: &mut Child, limit: Duration) {
    let start = Instant::now();
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the evaluator exited ({status}) before writing {}",
                path.display()
            );
        }
        assert!(
            start.elapsed() < limit,
            "no {} after {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn once_writes_fid_is_and_a_grid_and_watching_picks_up_new_checkpoints() {
    let run = Run::new();
    run.commit(10);
    let out = run.evaluator(&["--once", "10"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("step 10: FID "),
        "{stderr}"
    );
    let r = json(&run.result(10, "json"));
    assert_eq!(
        (r["step"].as_u64(), r["n"].as_i64()),
        (Some(10), Some(12)),
        "{r}"
    );
    assert_eq!(
        (r["sampler"].as_str(), r["steps"].as_i64()),
        (Some("ddim"), Some(4)),
        "{r}"
    );
    let fid = r["fid"].as_f64().unwrap();
    assert!(fid.is_finite() && fid > 0.0, "{r}");
    // IS of 12 samples over 10 splits through the fixture weights' classifier head.
    let is = r["is_mean"].as_f64().unwrap();
    assert!(
        is >= 1.0 && r["is_std"].as_f64().unwrap().is_finite(),
        "{r}"
    );
    let grid = image::open(run.result(10, "png")).unwrap();
    assert_eq!(
        (grid.width(), grid.height()),
        (16, 16),
        "a 2x2 grid of 8x8 samples"
    );

    // Watching: step 10 has its result and is not redone; 20 and 30 are evaluated as they
    // are committed; SIGTERM while idle exits 0.
    run.commit(20);
    let mut child = run.evaluator(&[]).stderr(Stdio::piped()).spawn().unwrap();
    let first = std::fs::read(run.result(10, "json")).unwrap();
    wait_for(
        &run.result(20, "json"),
        &mut child,
        Duration::from_secs(120),
    );
    run.commit(30);
    wait_for(
        &run.result(30, "json"),
        &mut child,
        Duration::from_secs(120),
    );
    assert_eq!(
        std::fs::read(run.result(10, "json")).unwrap(),
        first,
        "step 10 not redone"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn a_stop_mid_evaluation_writes_nothing_and_the_next_run_redoes_the_step() {
    let run = Run::new();
    let reference = run.cfg().eval.reference;
    let inception = run.cfg().eval.inception;
    run.write_config(3000, &reference, &inception);
    run.commit(5);
    let mut child = run.evaluator(&[]).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("the evaluator logs its start").unwrap();
        if line.contains("evaluating") {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let rest: Vec<String> = lines.map_while(|l| l.ok()).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("nothing was written")),
        "{rest:?}"
    );
    assert!(!run.result(5, "json").exists() && !run.result(5, "png").exists());

    run.write_config(12, &reference, &inception);
    let out = run.evaluator(&["--once", "5"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&run.result(5, "json"))["n"].as_i64(), Some(12));
}

#[test]
fn config_errors_name_the_key() {
    let run = Run::new();
    let inception = run.cfg().eval.inception;
    run.write_config(12, "", &inception);
    let out = run.evaluator(&["--once", "1"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("eval.reference: not set"),
        "{err}"
    );

    let stats = run.dir.path().join("small.npz");
    FeatureStats::new(
        Tensor::zeros([4], (Kind::Double, Device::Cpu)),
        Tensor::eye(4, (Kind::Double, Device::Cpu)),
        "x",
    )
    .unwrap()
    .write(&stats)
    .unwrap();
    run.write_config(12, stats.to_str().unwrap(), &inception);
    let out = run.evaluator(&["--once", "1"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("eval.reference") && err.contains("dimension 4, expected 2048"),
        "{err}"
    );

    run.write_config(12, stats.to_str().unwrap(), "");
    let out = run.evaluator(&["--once", "1"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("eval.inception") && err.contains("DDPM_INCEPTION"),
        "{err}"
    );

    // A step that was never committed.
    let reference = run.dir.path().join("reference.npz");
    run.write_config(12, reference.to_str().unwrap(), &inception);
    let out = run.evaluator(&["--once", "7"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("step-7") || err.contains("step 7"),
        "{err}"
    );
}
