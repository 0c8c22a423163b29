//! The TCP ring with real sockets on 127.0.0.1: one thread per rank.

use ddpm_collective::tcp::{RingOptions, TcpRing};
use ddpm_collective::{AbortFlag, AbortHandle, Collective, CollectiveError, ReduceOp};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Listeners on ephemeral ports, and their addresses.
fn listeners(world: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let ls: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    (ls, addrs)
}

fn options(chunk_elems: usize, timeout: Duration) -> RingOptions {
    RingOptions {
        timeout,
        chunk_elems,
        generation: 7,
        ..RingOptions::default()
    }
}

/// Runs `f(ring)` on every rank of a fresh ring, each on its own thread; returns the results
/// in rank order.
fn on_ring<T: Send>(
    world: usize,
    opts: RingOptions,
    f: impl Fn(&mut TcpRing) -> T + Sync,
) -> Vec<T> {
    let (ls, addrs) = listeners(world);
    std::thread::scope(|s| {
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (addrs, opts, f) = (&addrs, opts.clone(), &f);
                s.spawn(move || {
                    let mut ring = TcpRing::connect(rank, l, addrs, opts).unwrap();
                    f(&mut ring)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Rank r's contribution: integers, so the sums are exact in f32.
fn contribution(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + rank * 1000) % 4093) as f32 + rank as f32)
        .collect()
}

#[test]
fn all_reduce_sums_every_ranks_contribution_for_odd_sizes_and_chunks() {
    for world in 1..=4 {
        for n in [0usize, 1, 2, 5, 1000, 100_003] {
            for chunk in [1usize, 3, 4096] {
                if n > 1000 && chunk < 4096 {
                    continue; // element-sized chunks of a large buffer: slow, no new path
                }
                let out = on_ring(world, options(chunk, Duration::from_secs(20)), |ring| {
                    let mut buf = contribution(ring.rank(), n);
                    ring.all_reduce(&mut buf, ReduceOp::Sum, "test").unwrap();
                    buf
                });
                let parts: Vec<Vec<f32>> = (0..world).map(|r| contribution(r, n)).collect();
                let want: Vec<f32> = (0..n).map(|i| parts.iter().map(|p| p[i]).sum()).collect();
                for (rank, got) in out.iter().enumerate() {
                    assert_eq!(got, &want, "world {world} n {n} chunk {chunk} rank {rank}");
                }
            }
        }
    }
}

#[test]
fn many_buckets_in_a_row_average_and_broadcast() {
    let world = 3;
    let out = on_ring(world, options(1000, Duration::from_secs(20)), |ring| {
        let r = ring.rank() as f32;
        let mut results = Vec::new();
        // Buckets of different sizes, as a gradient split into ~25 MB pieces would be.
        for (b, n) in [4000usize, 17, 1, 9999, 0, 123].iter().enumerate() {
            let mut buf = vec![r + b as f32; *n];
            ring.all_reduce(&mut buf, ReduceOp::Avg, &format!("bucket {b}"))
                .unwrap();
            results.push(buf);
        }
        let mut params: Vec<f32> = if ring.rank() == 1 {
            (0..5000).map(|i| i as f32 * 0.5).collect()
        } else {
            vec![-1.0; 5000]
        };
        ring.broadcast(&mut params, 1, "parameters").unwrap();
        ring.barrier("end").unwrap();
        (results, params)
    });
    for (rank, (results, params)) in out.iter().enumerate() {
        for (b, buf) in results.iter().enumerate() {
            // Mean of r + b over r = 0, 1, 2 is 1 + b.
            assert!(
                buf.iter().all(|&x| x == 1.0 + b as f32),
                "rank {rank} bucket {b}"
            );
        }
        assert_eq!(
            params,
            &(0..5000).map(|i| i as f32 * 0.5).collect::<Vec<_>>(),
            "rank {rank}"
        );
    }
}

#[test]
fn ranks_that_disagree_on_the_size_fail_naming_both() {
    let out = on_ring(2, options(64, Duration::from_secs(10)), |ring| {
        let n = if ring.rank() == 0 { 100 } else { 101 };
        let mut buf = vec![1.0; n];
        ring.all_reduce(&mut buf, ReduceOp::Sum, "bucket 0 at step 5")
            .map_err(|e| e.to_string())
    });
    for r in out {
        let err = r.unwrap_err();
        assert!(
            err.contains("bucket 0 at step 5") && err.contains("100") && err.contains("101"),
            "{err}"
        );
    }
}

#[test]
fn a_silent_peer_times_out_naming_the_collective_and_the_peer() {
    let (mut ls, addrs) = listeners(2);
    let l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    let opts = options(64, Duration::from_millis(500));
    let (tx, rx) = std::sync::mpsc::channel();
    let addrs1 = addrs.clone();
    let o1 = opts.clone();
    // Rank 1 joins the ring, then never calls all_reduce (it waits until rank 0 is done).
    let quiet = std::thread::spawn(move || {
        let ring = TcpRing::connect(1, l1, &addrs1, o1).unwrap();
        let _ = rx.recv();
        drop(ring);
    });
    let mut ring = TcpRing::connect(0, l0, &addrs, opts).unwrap();
    let t0 = Instant::now();
    let err = ring
        .all_reduce(&mut [1.0; 10], ReduceOp::Sum, "bucket 2 at step 9")
        .unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    let msg = err.to_string();
    assert!(
        matches!(err, CollectiveError::Timeout { peer: 1, .. }),
        "{msg}"
    );
    assert!(
        msg.contains("bucket 2 at step 9")
            && msg.contains("rank 1")
            && msg.contains(&addrs[1].to_string()),
        "{msg}"
    );
    tx.send(()).unwrap();
    quiet.join().unwrap();
}

/// Options with a 60 s timeout and an abort flag that a thread sets after `after`.
fn aborted_after(after: Duration) -> (RingOptions, std::thread::JoinHandle<()>) {
    let flag = Arc::new(AbortFlag::default());
    let opts = RingOptions {
        abort: Some(flag.clone()),
        ..options(64, Duration::from_secs(60))
    };
    let setter = std::thread::spawn(move || {
        std::thread::sleep(after);
        flag.abort();
    });
    (opts, setter)
}

#[test]
fn forming_stops_at_once_when_its_abort_flag_is_set() {
    // Rank 1 never comes (it died after registering): rank 0 waits for its connection until
    // the flag is set, not for the 60 s timeout.
    let (mut ls, addrs) = listeners(2);
    drop(ls.pop());
    let l0 = ls.pop().unwrap();
    let (opts, setter) = aborted_after(Duration::from_millis(300));
    let t0 = Instant::now();
    let err = TcpRing::connect(0, l0, &addrs, opts)
        .err()
        .expect("aborted");
    let waited = t0.elapsed();
    setter.join().unwrap();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "took {waited:?}"
    );
    assert!(
        matches!(err, CollectiveError::Aborted { rank: 0, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("forming the ring"), "{err}");

    // A peer that connects but sends no handshake does not hold the abort back either.
    let (mut ls, addrs) = listeners(2);
    let l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    // Rank 1's listener is up (so rank 0's connect succeeds), and a silent client sits in
    // rank 0's accept queue.
    let _silent = std::net::TcpStream::connect(addrs[0]).unwrap();
    let (opts, setter) = aborted_after(Duration::from_millis(300));
    let t0 = Instant::now();
    let err = TcpRing::connect(0, l0, &addrs, opts)
        .err()
        .expect("aborted");
    setter.join().unwrap();
    drop(l1);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    assert!(matches!(err, CollectiveError::Aborted { .. }), "{err}");
}

#[test]
fn a_next_rank_that_refuses_fails_forming_after_the_refused_patience_only_if_one_is_set() {
    // Nothing listens at rank 1's address.
    let (mut ls, addrs) = listeners(2);
    drop(ls.pop());
    let l0 = ls.pop().unwrap();
    let opts = RingOptions {
        refused_patience: Some(Duration::from_millis(300)),
        ..options(64, Duration::from_secs(60))
    };
    let t0 = Instant::now();
    let err = TcpRing::connect(0, l0, &addrs, opts)
        .err()
        .expect("refused");
    assert!(
        t0.elapsed() >= Duration::from_millis(300) && t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        matches!(err, CollectiveError::Peer { peer: 1, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("forming the ring")
            && msg.contains(&addrs[1].to_string())
            && msg.contains("nothing listens at the address rank 1 announced"),
        "{msg}"
    );
    // Without a patience, refusals are retried until the timeout (the peer may be starting).
    let (mut ls, addrs) = listeners(2);
    drop(ls.pop());
    let l0 = ls.pop().unwrap();
    let t0 = Instant::now();
    let err = TcpRing::connect(0, l0, &addrs, options(64, Duration::from_millis(800)))
        .err()
        .expect("timed out");
    assert!(
        t0.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        matches!(err, CollectiveError::Timeout { peer: 1, .. }),
        "{err}"
    );
}

#[test]
fn abort_interrupts_a_blocked_all_reduce_and_a_dead_peer_is_named() {
    let (mut ls, addrs) = listeners(2);
    let l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    let opts = options(64, Duration::from_secs(60));
    let addrs1 = addrs.clone();
    let o1 = opts.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let peer = std::thread::spawn(move || {
        let ring = TcpRing::connect(1, l1, &addrs1, o1).unwrap();
        let _ = rx.recv();
        drop(ring); // the process "dies": its sockets close
    });
    let mut ring = TcpRing::connect(0, l0, &addrs, opts).unwrap();
    let handle = ring.abort_handle();
    let aborter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        handle.abort();
    });
    let t0 = Instant::now();
    let err = ring
        .all_reduce(&mut [1.0; 10], ReduceOp::Sum, "bucket 0")
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(matches!(err, CollectiveError::Aborted { .. }), "{err}");
    aborter.join().unwrap();
    tx.send(()).unwrap();
    peer.join().unwrap();

    // A peer that is gone: a connection error naming it, not a hang.
    let (mut ls, addrs) = listeners(2);
    let l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    let addrs1 = addrs.clone();
    let opts = options(64, Duration::from_secs(60));
    let o1 = opts.clone();
    let peer = std::thread::spawn(move || drop(TcpRing::connect(1, l1, &addrs1, o1).unwrap()));
    let mut ring = TcpRing::connect(0, l0, &addrs, opts).unwrap();
    peer.join().unwrap();
    let err = ring
        .all_reduce(&mut [1.0; 10], ReduceOp::Sum, "bucket 0")
        .unwrap_err();
    assert!(
        matches!(err, CollectiveError::Peer { peer: 1, .. }),
        "{err}"
    );
}

#[test]
fn a_ring_of_another_generation_is_refused() {
    let (mut ls, addrs) = listeners(2);
    let l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    let addrs1 = addrs.clone();
    let stale = std::thread::spawn(move || {
        let mut o = options(64, Duration::from_secs(3));
        o.generation = 6;
        TcpRing::connect(1, l1, &addrs1, o)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let err = TcpRing::connect(0, l0, &addrs, options(64, Duration::from_secs(3)))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("generation 7") && err.contains("generation 6"),
        "{err}"
    );
    let _ = stale.join().unwrap();
}

#[test]
fn one_rank_out_of_step_fails_every_rank_quickly_and_the_ring_stays_broken() {
    // Only rank 1 sees rank 0's header differ; its failure closes its connections, so
    // ranks 0 and 2 fail too, long before the 30 s timeout.
    let t0 = Instant::now();
    let out = on_ring(3, options(64, Duration::from_secs(30)), |ring| {
        let n = if ring.rank() == 0 { 100 } else { 101 };
        let first = ring
            .all_reduce(&mut vec![1.0; n], ReduceOp::Sum, "bucket 0")
            .map_err(|e| e.to_string());
        let again = ring
            .all_reduce(&mut [1.0; 4], ReduceOp::Sum, "bucket 1")
            .map_err(|e| e.to_string());
        (first, again)
    });
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    for (rank, (first, again)) in out.into_iter().enumerate() {
        assert!(first.is_err(), "rank {rank} did not fail");
        let again = again.unwrap_err();
        assert!(again.contains("broken"), "rank {rank}: {again}");
    }
    let err = on_ring(2, options(64, Duration::from_secs(30)), |ring| {
        // Two ranks that each think they are the root of a broadcast.
        let root = ring.rank();
        ring.broadcast(&mut [0.0; 10], root, "parameters")
            .map_err(|e| e.to_string())
    });
    for e in err {
        let e = e.unwrap_err();
        assert!(
            e.contains("broadcast") && e.contains("argument 0") && e.contains("argument 1"),
            "{e}"
        );
    }
}
