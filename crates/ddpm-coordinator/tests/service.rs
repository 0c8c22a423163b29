//! The real `coordinator` binary on 127.0.0.1:0, driven by fake workers through the
//! generated gRPC client.

mod common;

use anyhow::{bail, Context, Result};
use ddpm_proto::v1::coordinator_client::CoordinatorClient;
use ddpm_proto::v1::{self, RunState};
use ddpm_proto::PROTOCOL_VERSION;
use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Generous: the test machine may be loaded.
const DEADLINE: Duration = Duration::from_secs(60);

/// A running coordinator; killed when dropped if it has not exited.
struct Coordinator {
    child: Child,
    addr: String,
    metrics: Option<String>,
    dir: tempfile::TempDir,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn config(out: &std::path::Path, world: u32, lease_secs: u32) -> String {
    format!(
        "[run]\nname = \"t\"\nout_dir = {:?}\n[train]\nbatch_size = 5\ntotal_steps = 3\n\
         [distributed]\nworld_size = {world}\nlease_secs = {lease_secs}\n",
        out.display().to_string()
    )
}

/// Starts the binary on a run of `world` workers with `args`; waits for its stdout line(s).
fn start(world: u32, args: &[&str]) -> Result<Coordinator> {
    start_with_lease(world, 10, args)
}

fn start_with_lease(world: u32, lease_secs: u32, args: &[&str]) -> Result<Coordinator> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, config(dir.path(), world, lease_secs))?;
    start_in(dir, args)
}

/// Starts the binary on the config `dir/run.toml` (its run and checkpoints in `dir`).
fn start_in(dir: tempfile::TempDir, args: &[&str]) -> Result<Coordinator> {
    let cfg = dir.path().join("run.toml");
    let stderr = std::fs::File::create(dir.path().join("stderr.log"))?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .arg("--config")
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .context("starting the coordinator")?;
    let stdout = child.stdout.take().expect("piped");
    let rx = common::stdout_lines(stdout);
    let mut coordinator = Coordinator {
        child,
        addr: String::new(),
        metrics: None,
        dir,
    };
    let first = rx
        .recv_timeout(DEADLINE)
        .with_context(|| format!("no stdout line; stderr: {}", coordinator.stderr()))?;
    coordinator.addr = first
        .strip_prefix("coordinator listening on ")
        .with_context(|| format!("first stdout line {first:?}"))?
        .to_string();
    if args.contains(&"--metrics-listen") {
        let second = rx.recv_timeout(DEADLINE).context("no second stdout line")?;
        coordinator.metrics = Some(
            second
                .strip_prefix("coordinator metrics on ")
                .with_context(|| format!("second stdout line {second:?}"))?
                .to_string(),
        );
    }
    Ok(coordinator)
}

impl Coordinator {
    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    async fn client(&self) -> Result<CoordinatorClient<Channel>> {
        Ok(CoordinatorClient::connect(format!("http://{}", self.addr)).await?)
    }

    /// Waits for the process to exit by itself.
    fn wait_exit(&mut self) -> Result<ExitStatus> {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > end {
                bail!("the coordinator did not exit; stderr: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET /metrics.
    fn scrape(&self) -> Result<String> {
        let addr = self.metrics.as_ref().context("no metrics address")?;
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(DEADLINE))?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    }
}

fn join(id: &str, rank: Option<u32>) -> v1::RegisterRequest {
    v1::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        role: v1::Role::Worker.into(),
        requested_rank: rank,
        host: format!("host-{id}"),
        device: "cpu".into(),
        member_id: id.into(),
        ring_address: format!("127.0.0.1:{}", 7000 + id.len()),
        nccl_unique_id: Vec::new(),
        failed_generation: 0,
    }
}

fn report(rank: u32, generation: u64, step: u64) -> v1::ProgressReport {
    v1::ProgressReport {
        rank,
        generation,
        step,
        loss: 0.25,
        images_per_second: 100.0,
        epoch: 0,
        position: 5 * step,
        data_wait_fraction: 0.05,
        allreduce_seconds: 0.002,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_ranks_and_other_versions_are_refused_and_sigterm_exits_nonzero() -> Result<()> {
    // --world-size overrides the config's 2.
    let mut coord = start(2, &["--world-size", "3"])?;
    let mut c = coord.client().await?;
    let a = c.register(join("a", Some(0))).await?.into_inner();
    assert_eq!((a.rank, a.world_size, a.generation), (0, 3, 1));
    assert!(a.rendezvous.is_none());
    let before = c.status(v1::StatusRequest {}).await?.into_inner();

    let err = c.register(join("b", Some(0))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert!(
        err.message().contains("rank 0 is taken by a on host-a"),
        "{}",
        err.message()
    );
    let mut old = join("b", None);
    old.protocol_version = PROTOCOL_VERSION + 1;
    let err = c.register(old).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message()
            .contains(&format!("version {}", PROTOCOL_VERSION + 1))
            && err
                .message()
                .contains(&format!("version {PROTOCOL_VERSION}")),
        "{}",
        err.message()
    );

    let after = c.status(v1::StatusRequest {}).await?.into_inner();
    let ids = |s: &v1::StatusResponse| {
        s.members
            .iter()
            .map(|m| (m.rank, m.member_id.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&after), vec![(0, "a".to_string())]);
    assert_eq!(
        (
            after.state,
            after.generation,
            after.world_size,
            after.run_name.as_str()
        ),
        (before.state, before.generation, 3, "t")
    );
    assert_eq!(after.protocol_version, PROTOCOL_VERSION);

    let pid = coord.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status()?;
    assert!(killed.success());
    let status = coord.wait_exit()?;
    assert!(!status.success(), "exit {status:?}");
    let stderr = coord.stderr();
    assert!(stderr.contains("was not finished"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_rank_run_forms_trains_finishes_and_exits_0() -> Result<()> {
    let mut coord = start(
        2,
        &["--metrics-listen", "127.0.0.1:0", "--linger-secs", "5"],
    )?;
    let mut c = coord.client().await?;

    // Rank 0 registers first and waits (no rendezvous yet); work is refused meanwhile.
    let a = c.register(join("a", None)).await?.into_inner();
    assert_eq!((a.rank, a.world_size, a.generation), (0, 2, 1));
    assert!(a.rendezvous.is_none());
    assert_eq!(a.lease_millis, 10_000);
    let cfg = ddpm_config::Config::parse(&a.config_toml, "<RegisterResponse>")?;
    assert_eq!(cfg.distributed.world_size, 2);
    assert!(
        cfg.checkpoint.url.starts_with("file:///"),
        "{}",
        cfg.checkpoint.url
    );
    let err = c
        .next_work(v1::WorkRequest {
            rank: 0,
            generation: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("not formed yet (1 of 2 workers registered)"),
        "{}",
        err.message()
    );
    let hb = c
        .heartbeat(v1::HeartbeatRequest {
            rank: 0,
            generation: 1,
            member_id: "a".into(),
        })
        .await?
        .into_inner();
    assert_eq!(hb.state, RunState::Waiting as i32);

    let b = c.register(join("bb", None)).await?.into_inner();
    assert_eq!(b.rank, 1);
    let ring: v1::Rendezvous = ddpm_proto::Rendezvous::Tcp {
        peers: vec!["127.0.0.1:7001".into(), "127.0.0.1:7002".into()],
    }
    .into();
    assert_eq!(b.rendezvous, Some(ring.clone()));
    // The waiting rank polls Register and gets the same ring and rank.
    let a = c.register(join("a", None)).await?.into_inner();
    assert_eq!((a.rank, a.generation, a.rendezvous), (0, 1, Some(ring)));

    let w0 = c
        .next_work(v1::WorkRequest {
            rank: 0,
            generation: 1,
        })
        .await?
        .into_inner();
    let w1 = c
        .next_work(v1::WorkRequest {
            rank: 1,
            generation: 1,
        })
        .await?
        .into_inner();
    assert_eq!(
        (
            w0.start_step,
            w0.steps,
            w0.epoch,
            w0.position,
            w0.world_size
        ),
        (0, 3, 0, 0, 2)
    );
    assert_eq!(
        (
            w1.start_step,
            w1.steps,
            w1.epoch,
            w1.position,
            w1.world_size
        ),
        (0, 3, 0, 0, 2)
    );
    assert_eq!((w0.restore_url.as_str(), w1.restore_url.as_str()), ("", ""));
    assert_eq!(
        (w0.per_rank_batch, w1.per_rank_batch),
        (
            ddpm_config::rank_rows(5, 2, 0).len() as u32,
            ddpm_config::rank_rows(5, 2, 1).len() as u32
        )
    );
    assert_eq!((w0.per_rank_batch, w1.per_rank_batch), (2, 3));

    let err = c
        .heartbeat(v1::HeartbeatRequest {
            rank: 1,
            generation: 0,
            member_id: "bb".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("generation 0"), "{}", err.message());

    // /metrics shows both workers.
    let end = Instant::now() + DEADLINE;
    loop {
        let body = coord.scrape()?;
        if body.contains("ddpm_workers_alive{component=\"coordinator\"} 2") {
            break;
        }
        assert!(Instant::now() < end, "no ddpm_workers_alive 2 in\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let ack = c.report_progress(report(0, 1, 2)).await?.into_inner();
    assert_eq!(ack.state, RunState::Running as i32);
    c.checkpoint_committed(v1::CheckpointNotice {
        rank: 0,
        generation: 1,
        step: 2,
        url: cfg.checkpoint.url.clone(),
    })
    .await?;
    let ack = c.report_progress(report(0, 1, 3)).await?.into_inner();
    assert_eq!(ack.state, RunState::Running as i32);
    let status = c.status(v1::StatusRequest {}).await?.into_inner();
    assert_eq!(
        (status.step, status.total_steps, status.last_checkpoint_step),
        (0, 3, 2)
    );
    let ack = c.report_progress(report(1, 1, 3)).await?.into_inner();
    assert_eq!(ack.state, RunState::Finished as i32);

    let hb = c
        .heartbeat(v1::HeartbeatRequest {
            rank: 1,
            generation: 1,
            member_id: "bb".into(),
        })
        .await?
        .into_inner();
    assert_eq!(hb.state, RunState::Finished as i32);
    let err = c.register(join("late", None)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("finished"), "{}", err.message());
    let status = c.status(v1::StatusRequest {}).await?.into_inner();
    assert_eq!((status.state, status.step), (RunState::Finished as i32, 3));
    let body = coord.scrape()?;
    assert!(
        body.contains("ddpm_run_finished{component=\"coordinator\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("ddpm_train_loss{component=\"coordinator\",rank=\"1\"} 0.25"),
        "{body}"
    );

    drop(c);
    let exit = coord.wait_exit()?;
    assert!(exit.success(), "exit {exit:?}; stderr: {}", coord.stderr());
    Ok(())
}

#[test]
fn an_invalid_override_names_the_file_and_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, config(dir.path(), 2, 10))?;
    let out = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .arg("--config")
        .arg(&cfg)
        .args(["--world-size", "9", "--listen", "127.0.0.1:0"])
        .output()?;
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("distributed.world_size"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_worker_moves_the_generation_and_a_replacement_fills_its_rank() -> Result<()> {
    let coord = start_with_lease(2, 3, &[])?;
    let mut c = coord.client().await?;
    c.register(join("a", None)).await?;
    let b = c.register(join("bb", None)).await?.into_inner();
    assert!(b.rendezvous.is_some());
    // "a" keeps its lease (registering again once its generation is stale), "bb" goes silent.
    let end = Instant::now() + DEADLINE;
    let mut generation = 1;
    while generation == 1 {
        assert!(
            Instant::now() < end,
            "bb never lost its lease; stderr: {}",
            coord.stderr()
        );
        let hb = c
            .heartbeat(v1::HeartbeatRequest {
                rank: 0,
                generation,
                member_id: "a".into(),
            })
            .await;
        if let Err(e) = hb {
            assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
            generation = c.register(join("a", None)).await?.into_inner().generation;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(generation, 2);
    let status = c.status(v1::StatusRequest {}).await?.into_inner();
    assert_eq!(
        (status.generation, status.state),
        (2, RunState::Reforming as i32)
    );
    assert!(status.members.iter().all(|m| m.member_id != "bb"));
    let err = c.report_progress(report(1, 1, 1)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    let a = c.register(join("a", None)).await?.into_inner();
    let r = c.register(join("cc", None)).await?.into_inner();
    assert_eq!((a.rank, r.rank, r.generation), (0, 1, 2));
    assert!(r.rendezvous.is_some());
    let w = c
        .next_work(v1::WorkRequest {
            rank: 1,
            generation: 2,
        })
        .await?
        .into_inner();
    assert_eq!((w.start_step, w.steps, w.per_rank_batch), (0, 3, 3));
    let stderr = coord.stderr();
    assert!(
        stderr.contains("lost its lease") && stderr.contains("member_id=bb"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_continues_after_its_predecessors_generations() -> Result<()> {
    let mut coord = start(1, &[])?;
    let mut c = coord.client().await?;
    let a = c.register(join("a", None)).await?.into_inner();
    assert_eq!((a.generation, a.ring_rank), (1, 0));
    assert!(a.rendezvous.is_some());
    // Killed (no chance to write anything more), then started again on the same store.
    coord.child.kill()?;
    coord.child.wait()?;
    let dir = std::mem::replace(&mut coord.dir, tempfile::tempdir()?);
    let coord = start_in(dir, &[])?;
    let mut c = coord.client().await?;
    // The worker of generation 1 is refused: it must register again.
    let err = c
        .heartbeat(v1::HeartbeatRequest {
            rank: 0,
            generation: 1,
            member_id: "a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("generation 1") && err.message().contains("generation 2"),
        "{}",
        err.message()
    );
    let mut again = join("a", None);
    again.failed_generation = 1;
    let a = c.register(again).await?.into_inner();
    assert_eq!(a.generation, 2);
    assert!(a.rendezvous.is_some());
    let stderr = coord.stderr();
    assert!(
        stderr.contains("a coordinator ran this run before: continuing with generation 2"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_restarted_after_the_final_checkpoint_finishes_and_workers_are_told(
) -> Result<()> {
    // The run (total_steps = 3) has committed its final checkpoint, e.g. the coordinator
    // died while it lingered, or during the final reports.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("run.toml");
    std::fs::write(&file, config(dir.path(), 2, 10))?;
    let mut cfg = ddpm_config::Config::from_file(&file)?;
    let store = ddpm_coordinator::plan::open_store(&mut cfg)?;
    let state = serde_json::json!({"step": 3, "epoch": 0, "position": 15, "data_order": "uniform"});
    let blobs: Vec<(&str, ddpm_checkpoint::Blob)> = vec![(
        ddpm_checkpoint::STATE_BLOB,
        serde_json::to_vec(&state)?.into(),
    )];
    store.commit(3, &blobs, serde_json::json!({})).await?;
    let mut coord = start_in(dir, &["--linger-secs", "3"])?;
    let mut c = coord.client().await?;
    let status = c.status(v1::StatusRequest {}).await?.into_inner();
    assert_eq!(status.state, RunState::Finished as i32);
    // A worker that comes (back) is told the run is finished; it takes that as the end.
    let err = c.register(join("a", None)).await.unwrap_err();
    assert!(
        err.message().starts_with("the run is finished"),
        "{}",
        err.message()
    );
    let exit = coord.wait_exit()?;
    assert!(exit.success(), "{}", coord.stderr());
    Ok(())
}
