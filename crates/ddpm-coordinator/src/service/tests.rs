//! Unit tests of the service: its methods called directly.
use super::*;
use ddpm_proto::PROTOCOL_VERSION;

struct Run {
    svc: CoordinatorService,
    store: CheckpointStore,
    _dir: tempfile::TempDir,
}

fn run(world: u32, batch: u32, total: u32, backend: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::parse(
        &format!(
            "[run]\nname = \"t\"\nout_dir = {:?}\n[train]\nbatch_size = {batch}\ntotal_steps = {total}\n\
             [distributed]\nworld_size = {world}\nbackend = {backend:?}\nlease_secs = 5\n",
            dir.path().display().to_string()
        ),
        "<test>",
    )
    .unwrap();
    let store = crate::plan::open_store(&mut cfg).unwrap();
    let svc = CoordinatorService::new(&cfg, store.clone(), Plan::default(), 1);
    Run {
        svc,
        store,
        _dir: dir,
    }
}

fn join(id: &str, rank: Option<u32>) -> Request<v1::RegisterRequest> {
    Request::new(v1::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        role: v1::Role::Worker.into(),
        requested_rank: rank,
        host: format!("host-{id}"),
        device: "cpu".into(),
        member_id: id.into(),
        ring_address: format!("{id}:7000"),
        nccl_unique_id: Vec::new(),
        failed_generation: 0,
    })
}

async fn status(svc: &CoordinatorService) -> v1::StatusResponse {
    svc.status(Request::new(v1::StatusRequest {}))
        .await
        .unwrap()
        .into_inner()
}

async fn work(
    svc: &CoordinatorService,
    rank: u32,
    generation: u64,
) -> Result<v1::WorkAssignment, Status> {
    svc.next_work(Request::new(v1::WorkRequest { rank, generation }))
        .await
        .map(Response::into_inner)
}

fn report(rank: u32, generation: u64, step: u64) -> Request<v1::ProgressReport> {
    Request::new(v1::ProgressReport {
        rank,
        generation,
        step,
        loss: 0.5,
        images_per_second: 10.0,
        epoch: 0,
        position: step * 5,
        data_wait_fraction: 0.1,
        allreduce_seconds: 0.01,
    })
}

#[tokio::test]
async fn evaluators_get_the_config_without_joining_and_duplicate_ranks_are_refused() {
    // Another protocol version: ddpm_proto's check_version, through the real binary in
    // tests/service.rs.
    let Run { svc, .. } = run(2, 4, 3, "tcp");
    let before = status(&svc).await;
    let mut eval = join("e", None);
    eval.get_mut().role = v1::Role::Evaluator.into();
    let e = svc.register(eval).await.unwrap().into_inner();
    assert!(e.rendezvous.is_none() && e.config_toml.contains("world_size = 2"));
    assert_eq!(
        status(&svc).await,
        before,
        "an evaluator changes no membership"
    );

    let a = svc.register(join("a", Some(1))).await.unwrap().into_inner();
    assert_eq!((a.rank, a.world_size, a.generation), (1, 2, 1));
    assert!(a.rendezvous.is_none());
    assert_eq!(a.lease_millis, 5000);
    assert!(
        a.config_toml.contains("world_size = 2"),
        "{}",
        a.config_toml
    );
    let before = status(&svc).await;
    let s = svc.register(join("b", Some(1))).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::AlreadyExists);
    assert!(
        s.message().contains("rank 1 is taken by a on host-a"),
        "{}",
        s.message()
    );
    let after = status(&svc).await;
    assert_eq!(after.members.len(), 1);
    assert_eq!(
        (
            after.state,
            after.generation,
            after.members[0].member_id.as_str()
        ),
        (before.state, before.generation, "a")
    );
    let mut none = join("n", None);
    none.get_mut().role = v1::Role::Unspecified.into();
    let s = svc.register(none).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn a_full_ring_gets_the_rendezvous_and_the_same_cursor_and_finishes() {
    let Run { svc, .. } = run(2, 5, 3, "tcp");
    let a = svc.register(join("a", None)).await.unwrap().into_inner();
    assert_eq!(a.rank, 0);
    let s = work(&svc, 0, 1).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition);
    assert!(
        s.message()
            .contains("not formed yet (1 of 2 workers registered)"),
        "{}",
        s.message()
    );
    let b = svc.register(join("b", None)).await.unwrap().into_inner();
    let expected: v1::Rendezvous = ddpm_proto::Rendezvous::Tcp {
        peers: vec!["a:7000".into(), "b:7000".into()],
    }
    .into();
    assert_eq!(b.rendezvous, Some(expected.clone()));
    // The waiting worker polls and gets the same rendezvous and rank.
    let a = svc.register(join("a", None)).await.unwrap().into_inner();
    assert_eq!((a.rank, a.rendezvous), (0, Some(expected)));

    let w0 = work(&svc, 0, 1).await.unwrap();
    let w1 = work(&svc, 1, 1).await.unwrap();
    assert_eq!(
        (w0.start_step, w0.steps, w0.epoch, w0.position),
        (0, 3, 0, 0)
    );
    assert_eq!((w0.per_rank_batch, w1.per_rank_batch), (2, 3));
    assert_eq!(
        (w1.start_step, w1.steps, w1.world_size, &w1.restore_url),
        (0, 3, 2, &String::new())
    );
    assert_eq!(
        work(&svc, 1, 2).await.unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );

    let hb = svc
        .heartbeat(Request::new(v1::HeartbeatRequest {
            rank: 0,
            generation: 0,
            member_id: "a".into(),
        }))
        .await
        .unwrap_err();
    assert!(hb.message().contains("generation 0"), "{}", hb.message());

    let ack = svc
        .report_progress(report(0, 1, 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.state, v1::RunState::Running as i32);
    assert!(!svc.is_finished());
    // Rank 0 asks again after its stretch: nothing left, from its own cursor.
    let again = work(&svc, 0, 1).await.unwrap();
    assert_eq!((again.start_step, again.steps, again.position), (3, 0, 15));
    let ack = svc
        .report_progress(report(1, 1, 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.state, v1::RunState::Finished as i32);
    assert!(svc.is_finished());
    assert!(*svc.finished().borrow());
    let st = status(&svc).await;
    assert_eq!(
        (st.state, st.step, st.total_steps),
        (v1::RunState::Finished as i32, 3, 3)
    );
    let s = svc.register(join("c", None)).await.unwrap_err();
    assert!(s.message().contains("finished"), "{}", s.message());
}

#[tokio::test]
async fn checkpoint_notices_come_from_rank_0_of_the_current_generation() {
    let Run { svc, .. } = run(2, 4, 10, "tcp");
    svc.register(join("a", None)).await.unwrap();
    svc.register(join("b", None)).await.unwrap();
    let notice = |rank, generation, step| {
        Request::new(v1::CheckpointNotice {
            rank,
            generation,
            step,
            url: "file:///x".into(),
        })
    };
    let s = svc.checkpoint_committed(notice(1, 1, 4)).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition);
    assert!(s.message().contains("rank 0"), "{}", s.message());
    let s = svc.checkpoint_committed(notice(0, 7, 4)).await.unwrap_err();
    assert!(s.message().contains("generation 7"), "{}", s.message());
    svc.checkpoint_committed(notice(0, 1, 4)).await.unwrap();
    svc.checkpoint_committed(notice(0, 1, 2)).await.unwrap();
    assert_eq!(status(&svc).await.last_checkpoint_step, 4);
}

#[tokio::test]
async fn a_lost_member_moves_the_generation_and_the_new_ring_resumes_from_the_store() {
    let Run { svc, store, .. } = run(2, 4, 10, "tcp");
    svc.register(join("a", None)).await.unwrap();
    svc.register(join("b", None)).await.unwrap();
    assert_eq!(work(&svc, 0, 1).await.unwrap().start_step, 0);
    svc.report_progress(report(0, 1, 6)).await.unwrap();
    // Rank 0 committed step 4 before rank 1 vanished.
    let state = serde_json::json!({"step": 4, "epoch": 1, "position": 3, "data_order": "uniform"});
    let blobs: Vec<(&str, ddpm_checkpoint::Blob)> =
        vec![("state.json", serde_json::to_vec(&state).unwrap().into())];
    store
        .commit(4, &blobs, serde_json::json!({}))
        .await
        .unwrap();
    {
        // Both leases lapse (a clock 10 s on, rather than waiting).
        let mut st = svc.lock();
        svc.expire(&mut st, Instant::now() + Duration::from_secs(10));
    }
    let st = status(&svc).await;
    assert_eq!(
        (st.generation, st.state, st.members.len()),
        (2, v1::RunState::Reforming as i32, 0)
    );
    let s = svc.report_progress(report(0, 1, 7)).await.unwrap_err();
    assert!(s.message().contains("generation 2"), "{}", s.message());
    let a = svc.register(join("a", None)).await.unwrap().into_inner();
    // A member of the gathering generation hears that the ring is re-forming.
    let beat = svc
        .heartbeat(Request::new(v1::HeartbeatRequest {
            rank: a.rank,
            generation: 2,
            member_id: "a".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(beat.state, v1::RunState::Reforming as i32);
    let c = svc.register(join("c", None)).await.unwrap().into_inner();
    assert_eq!((a.generation, a.rank, c.rank), (2, 0, 1));
    assert!(c.rendezvous.is_some());
    let w0 = work(&svc, 0, 2).await.unwrap();
    let w1 = work(&svc, 1, 2).await.unwrap();
    assert_eq!(
        w0,
        v1::WorkAssignment {
            per_rank_batch: 2,
            ..w1.clone()
        }
    );
    assert_eq!(
        (
            w1.start_step,
            w1.steps,
            w1.epoch,
            w1.position,
            w1.restore_step
        ),
        (4, 6, 1, 3, 4)
    );
    assert_eq!(w1.restore_url, svc.shared.store_url);
    assert_eq!(status(&svc).await.step, 4);
}

#[tokio::test]
async fn nccl_hands_out_ring_rank_0s_unique_id() {
    let Run { svc, .. } = run(2, 4, 10, "nccl");
    let s = svc.register(join("a", Some(0))).await.unwrap_err();
    assert!(
        s.message().contains("ncclUniqueId") && s.message().contains("0 bytes"),
        "{}",
        s.message()
    );
    assert_eq!(status(&svc).await.members.len(), 0);
    let id: Vec<u8> = (0..128).map(|i| i as u8).collect();
    let mut a = join("a", Some(0));
    a.get_mut().nccl_unique_id = id.clone();
    assert!(svc
        .register(a)
        .await
        .unwrap()
        .into_inner()
        .rendezvous
        .is_none());
    let mut b = join("b", None);
    b.get_mut().nccl_unique_id = vec![1; 128];
    let b = svc.register(b).await.unwrap().into_inner();
    let expected: v1::Rendezvous = ddpm_proto::Rendezvous::Nccl { unique_id: id }.into();
    assert_eq!(b.rendezvous, Some(expected));
}

#[tokio::test]
async fn an_already_complete_run_gives_zero_steps_and_finishes_on_the_final_reports() {
    let Run { svc, store, _dir } = run(2, 4, 3, "tcp");
    let cfg_url = svc.shared.store_url.clone();
    let plan = Plan {
        start_step: 3,
        epoch: 0,
        position: 12,
        data_order: "uniform".into(),
        restore_url: cfg_url.clone(),
        restore_step: 3,
    };
    let mut cfg = Config::parse(&svc.shared.config_toml, "<resolved>").unwrap();
    cfg.checkpoint.url = cfg_url;
    let svc = CoordinatorService::new(&cfg, store, plan, 1);
    assert_eq!(status(&svc).await.last_checkpoint_step, 3);
    svc.register(join("a", None)).await.unwrap();
    svc.register(join("b", None)).await.unwrap();
    for rank in 0..2 {
        let w = work(&svc, rank, 1).await.unwrap();
        assert_eq!(
            (w.start_step, w.steps, w.restore_step, w.position),
            (3, 0, 3, 12)
        );
    }
    svc.report_progress(report(0, 1, 3)).await.unwrap();
    svc.report_progress(report(1, 1, 3)).await.unwrap();
    assert!(svc.is_finished());
}

#[tokio::test]
async fn a_reported_failure_re_forms_at_once_and_the_old_generation_changes_nothing() {
    let Run { svc, store, .. } = run(2, 4, 10, "tcp");
    svc.register(join("a", None)).await.unwrap();
    svc.register(join("b", None)).await.unwrap();
    svc.report_progress(report(0, 1, 2)).await.unwrap();
    svc.report_progress(report(1, 1, 2)).await.unwrap();
    // a's collective failed: it says so when it registers again; b has not noticed yet.
    let mut again = join("a", None);
    again.get_mut().failed_generation = 1;
    let a = svc.register(again).await.unwrap().into_inner();
    assert_eq!((a.generation, a.rendezvous), (2, None));
    // The generation is in the store before anyone is told of it.
    assert_eq!(crate::generation::read(&store, "t").await.unwrap(), 2);
    let before = status(&svc).await;
    // Everything b sends for generation 1 is refused and changes nothing.
    let refused = [
        svc.report_progress(report(1, 1, 3)).await.unwrap_err(),
        work(&svc, 1, 1).await.unwrap_err(),
        svc.heartbeat(Request::new(v1::HeartbeatRequest {
            rank: 1,
            generation: 1,
            member_id: "b".into(),
        }))
        .await
        .unwrap_err(),
        svc.checkpoint_committed(Request::new(v1::CheckpointNotice {
            rank: 0,
            generation: 1,
            step: 5,
            url: svc.shared.store_url.clone(),
        }))
        .await
        .unwrap_err(),
    ];
    for s in &refused {
        assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{}", s.message());
        assert!(s.message().contains("generation 2"), "{}", s.message());
    }
    let after = status(&svc).await;
    assert_eq!(
        (after.generation, after.step, after.last_checkpoint_step),
        (before.generation, before.step, before.last_checkpoint_step)
    );
    // b registers again: generation 2 forms with both, ring ranks by slot.
    let b = svc.register(join("b", None)).await.unwrap().into_inner();
    assert_eq!((b.generation, b.ring_rank), (2, 1));
    assert!(b.rendezvous.is_some());
}
