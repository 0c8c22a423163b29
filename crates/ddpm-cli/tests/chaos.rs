//! Fault tolerance end to end: `ddpm launch` with 3 CPU workers on the quickstart model,
//! with workers and the coordinator killed (SIGKILL) at random steps.
//!
//! - With every killed process started again (`--max-restarts`, as a StatefulSet restarts
//!   its pods), the run reaches its final step with a verified last checkpoint and a clean
//!   data ledger (every sample of every completed epoch used exactly once in the surviving
//!   history), and its final weights are bitwise those of an uninterrupted run: failures
//!   cost time, never the result.
//! - With `elastic.min_workers = 2` and a worker killed for good, the run finishes on 2
//!   workers with the configured global batch and a clean ledger.
//!
//! The kill steps come from a seed (`DDPM_CHAOS_SEED`, printed on failure); every run also
//! checks that rank 0's log shows the re-formed generations.

mod common;

use common::{ok, path, write_idx_images};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Samples of the generated dataset: 3 global batches of the quickstart's 32 per epoch, so
/// the run completes many epochs.
const SAMPLES: usize = 96;

/// Steps of each run.
const TOTAL_STEPS: u64 = 90;

/// A gzipped IDX file of `SAMPLES` grey 28x28 images (Fashion-MNIST's shape), each a
/// different pattern.
fn write_images(file: &Path) {
    write_idx_images(file, SAMPLES, 28, |i, x, y| {
        (x * (1 + i % 5) + y * (1 + i % 7) + i) % 11 < 5
    });
}

/// The repository's quickstart config with this test's data, output, length and failure
/// settings; `extra` is appended.
fn quickstart(dir: &Path, name: &str, images: &Path, extra: &str) -> String {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/quickstart.toml");
    let text = std::fs::read_to_string(&repo).unwrap();
    let mut replaced = 0;
    let mut swap = |text: String, from: &str, to: &str| {
        assert!(text.contains(from), "quickstart.toml has no {from:?}");
        replaced += 1;
        text.replace(from, to)
    };
    let text = swap(text, "name = \"quickstart\"", &format!("name = \"{name}\""));
    let text = swap(
        text,
        "out_dir = \"runs/quickstart\"",
        &format!("out_dir = \"{}\"", path(&dir.join(name))),
    );
    let text = swap(
        text,
        "source = \"idx:.data/fashion-mnist/train-images-idx3-ubyte.gz\"",
        &format!("source = \"idx:{}\"", path(images)),
    );
    let text = swap(
        text,
        "total_steps = 1000",
        &format!("total_steps = {TOTAL_STEPS}"),
    );
    let text = swap(text, "log_every = 50", "log_every = 1");
    let text = swap(text, "snapshot_every = 500", "snapshot_every = 0");
    let text = swap(text, "threads = 0", "threads = 1");
    assert_eq!(replaced, 7);
    let text = format!(
        "{text}\n[checkpoint]\nevery_steps = 10\n\n[distributed]\nlease_secs = 4\ncollective_timeout_secs = 30\n{extra}"
    );
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, text).unwrap();
    path(&file)
}

/// A small deterministic generator for the kill schedule (SplitMix64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

/// The child processes of `parent` whose command line contains `needle`.
fn children(parent: u32, needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": the command may contain spaces, so read after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        if ppid == Some(parent) && cmdline.contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// Kills the one child of `parent` whose command line contains `needle`.
fn kill_child(parent: u32, needle: &str) {
    let pids = children(parent, needle);
    assert_eq!(
        pids.len(),
        1,
        "children of {parent} matching {needle:?}: {pids:?}"
    );
    // SAFETY: sending a signal to a process of this test.
    assert_eq!(unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) }, 0);
}

/// The step of the last line of rank 0's train log, and how many lines it has.
fn progress(log: &Path) -> (u64, usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.ends_with('}')).collect();
    let step = lines
        .last()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["step"].as_u64())
        .unwrap_or(0);
    (step, lines.len())
}

/// `ddpm launch` as a child; its stderr goes to `<dir>/<name>.log`.
fn launch(dir: &Path, cfg: &str, name: &str, args: &[&str]) -> (Child, PathBuf) {
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(["launch", "--config", cfg, "--workers", "3"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (child, log)
}

fn wait(child: &mut Child, log: &Path, limit: Duration) {
    let end = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            assert!(status.success(), "ddpm launch failed ({status}):\n{text}");
            return;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("ddpm launch did not finish within {limit:?}:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The data ledger in `dir` holds steps 1..=TOTAL_STEPS with every sample of every
/// completed epoch used exactly once, by the library's check and by `ddpm ledger`; returns
/// the generations of its surviving history.
fn check_ledger(dir: &Path) -> u64 {
    let report = ddpm_worker::ledger::check(dir, Some(SAMPLES)).unwrap();
    assert_eq!(report.steps, TOTAL_STEPS, "{report}");
    // 90 steps of 32 samples: 30 whole epochs of 96.
    assert_eq!(report.completed_epochs, 30, "{report}");
    let out = ok(&["ledger", &path(dir), "--steps", &TOTAL_STEPS.to_string()]);
    assert!(
        out.contains(&format!("ledger ok: steps 1..={TOTAL_STEPS}")),
        "{out}"
    );
    report.history_generations.len() as u64
}

/// The last checkpoint of a run verifies.
fn verify_final_checkpoint(out: &Path) {
    let url = format!(
        "file://{}/{}/step-{TOTAL_STEPS}",
        path(&out.join("checkpoints")),
        out.file_name().unwrap().to_str().unwrap()
    );
    let report = ok(&["ckpt", "verify", &url]);
    assert!(
        report.contains(&format!("step-{TOTAL_STEPS}: ok")),
        "{report}"
    );
}

#[test]
fn killed_workers_and_coordinator_cost_time_never_the_result() {
    let seed: u64 = std::env::var("DDPM_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261129);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let images = root.join("images.idx.gz");
    write_images(&images);

    // The uninterrupted run.
    let reference = quickstart(root, "reference", &images, "");
    let (mut child, log) = launch(root, &reference, "reference", &[]);
    wait(&mut child, &log, Duration::from_secs(240));

    // The same run, with three workers and the coordinator killed at random steps.
    let chaos = quickstart(root, "chaos", &images, "");
    let ledger = root.join("chaos-ledger");
    let (mut child, log) = launch(
        root,
        &chaos,
        "chaos",
        &["--max-restarts", "4", "--ledger", &path(&ledger)],
    );
    let mut rng = Rng(seed);
    let mut victims: Vec<String> = (0..3).map(|_| format!("--rank {}", rng.below(3))).collect();
    let coordinator_at = rng.below(4) as usize;
    victims.insert(coordinator_at, "coordinator --config".into());
    // One kill per stretch of the run, each after at least 3 steps of the new generation.
    let mut at: Vec<u64> = (0..4).map(|k| 8 + 18 * k + rng.below(12)).collect();
    at.sort();
    let train_log = root.join("chaos/train_log.jsonl");
    let mut lines_at_last_kill = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    for (victim, step) in victims.iter().zip(&at) {
        loop {
            let (now, lines) = progress(&train_log);
            if now >= *step && lines >= lines_at_last_kill + 3 {
                lines_at_last_kill = lines;
                break;
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended before the kill at step {step} (seed {seed}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            assert!(Instant::now() < deadline, "seed {seed}: no progress");
            std::thread::sleep(Duration::from_millis(20));
        }
        kill_child(child.id(), victim);
    }
    wait(&mut child, &log, Duration::from_secs(240));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("starting it again").count(),
        4,
        "seed {seed}, kills {victims:?} at {at:?}:\n{text}"
    );
    assert!(
        text.contains("a coordinator ran this run before"),
        "seed {seed}:\n{text}"
    );
    assert_eq!(progress(&train_log).0, TOTAL_STEPS);
    verify_final_checkpoint(&root.join("chaos"));
    // Four failures: the surviving history spans several generations (one whose steps were
    // all redone by the next contributes none).
    let generations = check_ledger(&ledger);
    assert!((2..=5).contains(&generations), "seed {seed}: {generations}");
    for weights in ["model.safetensors", "ema.safetensors"] {
        let a = std::fs::read(root.join("reference").join(weights)).unwrap();
        let b = std::fs::read(root.join("chaos").join(weights)).unwrap();
        assert!(
            a == b,
            "seed {seed}, kills {victims:?} at {at:?}: {weights} differs from the uninterrupted run's"
        );
    }
}

#[test]
fn an_elastic_run_goes_on_with_fewer_workers_and_the_same_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let images = root.join("images.idx.gz");
    write_images(&images);
    let cfg = quickstart(
        root,
        "elastic",
        &images,
        "\n[elastic]\nmin_workers = 2\nrendezvous_grace_secs = 1.0\n",
    );
    let ledger = root.join("elastic-ledger");
    let (mut child, log) = launch(root, &cfg, "elastic", &["--ledger", &path(&ledger)]);
    let train_log = root.join("elastic/train_log.jsonl");
    let deadline = Instant::now() + Duration::from_secs(240);
    while progress(&train_log).0 < 25 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    kill_child(child.id(), "--rank 1");
    wait(&mut child, &log, Duration::from_secs(240));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("the run goes on without it") && text.contains("is formed with 2 worker(s)"),
        "{text}"
    );
    // The steps after the re-formation ran on 2 workers with the global batch of 32.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&train_log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(
        (last["step"].as_u64(), last["world_size"].as_u64()),
        (Some(TOTAL_STEPS), Some(2))
    );
    verify_final_checkpoint(&root.join("elastic"));
    assert_eq!(check_ledger(&ledger), 2);
    let state = ok(&[
        "ckpt",
        "inspect",
        &format!(
            "file://{}/elastic/step-{TOTAL_STEPS}",
            path(&root.join("elastic/checkpoints"))
        ),
    ]);
    assert!(state.contains("(world size 2)"), "{state}");
}
