//! The rules of [`Membership`], without a network.

use super::*;

fn join(id: &str, rank: Option<u32>) -> JoinRequest {
    JoinRequest {
        protocol_version: PROTOCOL_VERSION,
        requested_rank: rank,
        member_id: id.into(),
        host: format!("host-{id}"),
        device: "cpu".into(),
        ring_address: format!("{id}:7000"),
        nccl_unique_id: Vec::new(),
        failed_generation: 0,
    }
}

#[test]
fn ranks_are_assigned_honoured_and_a_duplicate_names_the_holder() {
    let t = Instant::now();
    let mut m = Membership::new(3, Duration::from_secs(10));
    assert_eq!(m.register(join("a", Some(2)), t).unwrap().rank, 2);
    assert_eq!(m.register(join("b", None), t).unwrap().rank, 0);
    let err = m.register(join("c", Some(2)), t).unwrap_err().to_string();
    assert!(err.contains("rank 2 is taken by a on host-a"), "{err}");
    let err = m.register(join("c", Some(3)), t).unwrap_err().to_string();
    assert!(
        err.contains("rank 3 is out of range") && err.contains("3 rank slots"),
        "{err}"
    );
    // Nothing changed: still waiting for rank 1.
    assert_eq!(m.phase(), Phase::Waiting);
    assert!(m.tcp_rendezvous().is_none());
    assert_eq!(m.register(join("c", None), t).unwrap().rank, 1);
    assert_eq!(m.phase(), Phase::Running);
    assert_eq!(
        m.tcp_rendezvous(),
        Some(Rendezvous::Tcp {
            peers: vec!["b:7000".into(), "c:7000".into(), "a:7000".into()]
        })
    );
    let err = m.register(join("d", None), t).unwrap_err().to_string();
    assert!(err.contains("all 3 ranks are taken"), "{err}");
    // The same process registering again keeps its rank.
    assert_eq!(m.register(join("a", None), t).unwrap().rank, 2);
}

#[test]
fn another_protocol_version_and_a_finished_run_are_refused() {
    let t = Instant::now();
    let mut m = Membership::new(1, Duration::from_secs(10));
    let mut old = join("a", None);
    old.protocol_version = PROTOCOL_VERSION + 1;
    let err = m.register(old, t).unwrap_err().to_string();
    assert!(
        err.contains(&format!("version {}", PROTOCOL_VERSION + 1)),
        "{err}"
    );
    assert_eq!(m.members().count(), 0);
    m.register(join("a", None), t).unwrap();
    m.finish();
    let err = m.register(join("b", None), t).unwrap_err().to_string();
    assert!(err.contains("finished"), "{err}");
    assert_eq!(m.members().count(), 1);
}

#[test]
fn a_lost_lease_frees_the_rank_and_moves_the_generation_on() {
    let t0 = Instant::now();
    let lease = Duration::from_secs(10);
    let mut m = Membership::new(2, lease);
    m.register(join("a", None), t0).unwrap();
    m.register(join("b", None), t0).unwrap();
    assert_eq!((m.phase(), m.generation()), (Phase::Running, 1));
    let t1 = t0 + Duration::from_secs(8);
    assert_eq!(m.heartbeat(0, 1, "a", t1).unwrap(), Phase::Running);
    // b stops heartbeating; past its lease it is dropped and the ring re-forms.
    let t2 = t0 + Duration::from_secs(12);
    let err = m.heartbeat(0, 1, "a", t2).unwrap_err().to_string();
    assert!(err.contains("generation 2"), "{err}");
    assert_eq!((m.phase(), m.generation()), (Phase::Waiting, 2));
    let err = m.heartbeat(1, 2, "b", t2).unwrap_err().to_string();
    assert!(err.contains("lost its lease"), "{err}");
    // A replacement takes rank 1 in generation 2; a keeps rank 0 by registering again.
    let adm = m.register(join("a", None), t2).unwrap();
    assert_eq!((adm.rank, adm.generation), (0, 2));
    let adm = m.register(join("c", Some(1)), t2).unwrap();
    assert_eq!((adm.rank, adm.generation), (1, 2));
    assert_eq!(m.phase(), Phase::Running);
    // A heartbeat from the old holder of rank 1 is refused, naming the new one.
    let err = m.heartbeat(1, 2, "b", t2).unwrap_err().to_string();
    assert!(err.contains("held by c"), "{err}");
}

fn progress(generation: u64, step: u64) -> Progress {
    Progress {
        generation,
        step,
        loss: 0.1,
        images_per_second: 1.0,
        epoch: 0,
        position: step,
    }
}

#[test]
fn reports_are_kept_per_rank_and_the_run_ends_when_every_rank_reached_the_end() {
    let t = Instant::now();
    let mut m = Membership::new(2, Duration::from_secs(10));
    m.register(join("a", None), t).unwrap();
    let err = m.report(1, progress(1, 1), t).unwrap_err().to_string();
    assert!(err.contains("rank 1 of generation 1 is not held"), "{err}");
    m.register(join("b", None), t).unwrap();
    m.report(0, progress(1, 5), t).unwrap();
    assert!(!m.all_reached(5));
    // Registering again keeps the report.
    m.register(join("a", None), t).unwrap();
    assert_eq!(m.holder(0, 1).unwrap().progress, Some(progress(1, 5)));
    let err = m.report(1, progress(3, 5), t).unwrap_err().to_string();
    assert!(err.contains("generation 3"), "{err}");
    m.report(1, progress(1, 5), t).unwrap();
    assert!(m.all_reached(5) && !m.all_reached(6));
    // A report that arrives late (step 4 after step 5) does not take the step back.
    m.report(1, progress(1, 4), t).unwrap();
    assert!(m.all_reached(5));
}

#[test]
fn expiry_returns_the_dropped_members() {
    let t = Instant::now();
    let mut m = Membership::new(2, Duration::from_secs(10));
    m.register(join("a", None), t).unwrap();
    m.register(join("b", None), t).unwrap();
    m.heartbeat(0, 1, "a", t + Duration::from_secs(8)).unwrap();
    assert!(m.expire(t + Duration::from_secs(9)).is_empty());
    let gone = m.expire(t + Duration::from_secs(12));
    let ids: Vec<&str> = gone.iter().map(|g| g.join.member_id.as_str()).collect();
    assert_eq!(ids, ["b"]);
    assert_eq!((m.generation(), m.phase()), (2, Phase::Waiting));
}

#[test]
fn nccl_needs_every_workers_unique_id_and_hands_out_the_ring_leaders() {
    let t = Instant::now();
    let mut m = Membership::new(2, Duration::from_secs(10)).with_nccl();
    let err = m.register(join("a", None), t).unwrap_err().to_string();
    assert!(
        err.contains("a on host-a") && err.contains("128 bytes"),
        "{err}"
    );
    assert_eq!(m.members().count(), 0);
    let mut b = join("b", Some(1));
    b.nccl_unique_id = vec![9; NCCL_UNIQUE_ID_BYTES];
    m.register(b, t).unwrap();
    let mut a = join("a", None);
    a.nccl_unique_id = vec![7; NCCL_UNIQUE_ID_BYTES];
    assert_eq!(m.register(a, t).unwrap().rank, 0);
    assert_eq!(
        m.nccl_rendezvous().unwrap().unwrap(),
        Rendezvous::Nccl {
            unique_id: vec![7; NCCL_UNIQUE_ID_BYTES]
        }
    );
}

fn failed(id: &str, generation: u64) -> JoinRequest {
    JoinRequest {
        failed_generation: generation,
        ..join(id, None)
    }
}

fn running(n: u32, sizes: Sizes, t: Instant) -> Membership {
    let mut m = Membership::elastic(sizes, Duration::from_secs(30));
    for (r, id) in ["a", "b", "c", "d"].iter().take(n as usize).enumerate() {
        m.register(join(id, Some(r as u32)), t).unwrap();
    }
    assert_eq!(m.phase(), Phase::Running);
    m
}

#[test]
fn a_survivor_reporting_a_failed_collective_moves_the_run_on_and_a_replacement_takes_the_dead_slot()
{
    let t = Instant::now();
    let mut m = running(3, Sizes::fixed(3), t);
    assert_eq!(m.generation(), 1);
    // b (rank 1) dies; a's all-reduce fails and a registers again, reporting generation 1.
    let adm = m.register(failed("a", 1), t).unwrap();
    assert_eq!((adm.rank, adm.generation, adm.ring_rank), (0, 2, None));
    assert_eq!(m.phase(), Phase::Waiting);
    // A report of the old generation or a heartbeat of it is refused (stale).
    let err = m.heartbeat(2, 1, "c", t).unwrap_err().to_string();
    assert!(
        err.contains("generation 2") && err.contains("register again"),
        "{err}"
    );
    assert!(m.report(2, progress(1, 9), t).is_err());
    // A replacement may take rank 1 at once: b did not register into generation 2.
    let adm = m.register(join("e", Some(1)), t).unwrap();
    assert_eq!((adm.rank, adm.generation), (1, 2));
    // But not rank 0, which a holds in generation 2.
    let err = m.register(join("f", Some(0)), t).unwrap_err();
    assert!(matches!(err, CoordinatorError::Taken(_)), "{err}");
    // c learns of generation 2 (its heartbeat was refused) and registers again: formed.
    let adm = m.register(failed("c", 1), t).unwrap();
    assert_eq!(
        (adm.generation, adm.ring_rank, adm.world_size),
        (2, Some(2), 3)
    );
    assert_eq!(m.phase(), Phase::Running);
    assert_eq!(
        m.tcp_rendezvous(),
        Some(Rendezvous::Tcp {
            peers: vec!["a:7000".into(), "e:7000".into(), "c:7000".into()]
        })
    );
    // A second failure report of generation 1 changes nothing now.
    assert_eq!(m.register(failed("a", 1), t).unwrap().generation, 2);
    assert_eq!(m.phase(), Phase::Running);
    // b comes back: its old generation is refused, and its rank is e's.
    let err = m.heartbeat(1, 2, "b", t).unwrap_err().to_string();
    assert!(err.contains("held by e"), "{err}");
}

#[test]
fn an_elastic_run_goes_on_with_fewer_after_the_grace_and_grows_when_a_worker_joins() {
    let t = Instant::now();
    let sizes = Sizes {
        target: 3,
        min: 2,
        slots: 3,
        grace: Duration::from_secs(5),
    };
    let mut m = running(3, sizes, t);
    // Rank 2 dies; a reports the failure, b follows.
    m.register(failed("a", 1), t).unwrap();
    m.register(failed("b", 1), t + Duration::from_secs(1))
        .unwrap();
    assert_eq!((m.phase(), m.generation()), (Phase::Waiting, 2));
    // Two of three wait for the third during the grace...
    assert!(!m.try_form(t + Duration::from_secs(4)));
    // ...then form without it: a ring of 2.
    m.expire(t + Duration::from_secs(5));
    assert_eq!(m.phase(), Phase::Running);
    assert_eq!(m.world_size(), 2);
    assert_eq!(
        (
            m.ring_rank(0),
            m.ring_rank(1),
            m.ring_rank(2),
            m.ring_leader()
        ),
        (Some(0), Some(1), None, Some(0))
    );
    assert!(
        m.members().all(|x| x.join.member_id != "c"),
        "the dead member is dropped"
    );
    let t2 = t + Duration::from_secs(6);
    m.report(1, progress(2, 7), t2).unwrap();
    // A new worker takes the free slot 2: the run moves to generation 3, which forms at
    // once when the two survivors have registered into it (3 is the target).
    let adm = m.register(join("d", None), t2).unwrap();
    assert_eq!((adm.rank, adm.generation, adm.ring_rank), (2, 3, None));
    m.register(failed("a", 2), t2).unwrap();
    let adm = m.register(join("b", None), t2).unwrap();
    assert_eq!(
        (adm.generation, adm.ring_rank, adm.world_size),
        (3, Some(1), 3)
    );
    // b kept its report of generation 2 (it is the same process).
    assert_eq!(m.holder(1, 3).unwrap().progress, Some(progress(2, 7)));
}

#[test]
fn below_the_minimum_a_generation_waits_for_a_replacement() {
    let t = Instant::now();
    let sizes = Sizes {
        target: 3,
        min: 2,
        slots: 3,
        grace: Duration::from_secs(1),
    };
    let mut m = running(3, sizes, t);
    m.register(failed("a", 1), t).unwrap();
    // Alone past the grace (within the lease): no ring of one.
    assert!(!m.try_form(t + Duration::from_secs(20)));
    assert_eq!(m.phase(), Phase::Waiting);
    m.register(join("b", None), t + Duration::from_secs(20))
        .unwrap();
    assert_eq!(m.phase(), Phase::Running);
}

#[test]
fn a_restarted_coordinator_starts_after_the_old_generations() {
    let t = Instant::now();
    let mut m = Membership::new(1, Duration::from_secs(10)).starting_at(7);
    let err = m.heartbeat(0, 6, "a", t).unwrap_err().to_string();
    assert!(
        err.contains("generation 6") && err.contains("generation 7"),
        "{err}"
    );
    let adm = m.register(failed("a", 6), t).unwrap();
    assert_eq!((adm.generation, adm.ring_rank), (7, Some(0)));
}

#[test]
fn a_generation_above_the_target_waits_for_every_live_member_instead_of_re_forming_for_each() {
    let t = Instant::now();
    let sizes = Sizes {
        target: 3,
        min: 3,
        slots: 4,
        grace: Duration::from_secs(5),
    };
    let mut m = running(3, sizes, t);
    // A fourth worker joins the ring of 3: generation 2 includes it.
    m.register(join("d", None), t).unwrap();
    assert_eq!((m.phase(), m.generation()), (Phase::Waiting, 2));
    m.register(failed("a", 1), t).unwrap();
    m.register(failed("b", 1), t).unwrap();
    // Three of four registered: the target, but c (holding a lease) is still to come.
    assert_eq!(m.phase(), Phase::Waiting);
    m.register(failed("c", 1), t).unwrap();
    assert_eq!(
        (m.phase(), m.world_size(), m.generation()),
        (Phase::Running, 4, 2)
    );
    // Polling registrations of the formed ring change nothing.
    m.register(join("d", None), t).unwrap();
    assert_eq!((m.phase(), m.generation()), (Phase::Running, 2));
}

#[test]
fn an_elastic_generation_waits_for_the_last_checkpoint_writer_while_it_holds_its_lease() {
    let t = Instant::now();
    let sizes = Sizes {
        target: 3,
        min: 2,
        slots: 3,
        grace: Duration::from_secs(1),
    };
    let mut m = running(3, sizes, t);
    // c dies; b reports it; a (ring rank 0) is still committing its upload in flight.
    m.register(failed("b", 1), t).unwrap();
    m.heartbeat(0, 1, "a", t).unwrap_err();
    // Past the grace, b alone plus nobody: no ring; and not without a while a holds its lease.
    let t2 = t + Duration::from_secs(2);
    m.register(join("d", Some(2)), t2).unwrap();
    assert!(!m.try_form(t2));
    // a registers: the three form at once.
    m.register(failed("a", 1), t2).unwrap();
    assert_eq!((m.phase(), m.world_size()), (Phase::Running, 3));
    // Now the writer a dies: b and d wait for it until its lease (30 s) runs out.
    m.register(failed("b", 2), t2).unwrap();
    m.register(failed("d", 2), t2).unwrap();
    assert!(!m.try_form(t2 + Duration::from_secs(10)));
    m.register(join("b", None), t2 + Duration::from_secs(25))
        .unwrap();
    m.register(join("d", None), t2 + Duration::from_secs(25))
        .unwrap();
    m.expire(t2 + Duration::from_secs(31));
    assert_eq!((m.phase(), m.world_size()), (Phase::Running, 2));
    assert_eq!(m.ring_leader(), Some(1));
}
