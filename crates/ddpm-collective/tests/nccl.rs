//! The NCCL backend on a GPU (feature `nccl-gpu-tests`): needs libcuda, libnccl.so.2 (on the
//! library path or named by DDPM_NCCL_LIBRARY) and at least one CUDA device. See the crate
//! README for the command.
//!
//! NCCL refuses two ranks of one communicator on the same GPU, so the two-rank tests run
//! in two threads on devices 0 and 1 when there are two; on a one-GPU host they check that
//! the refusal is an error naming the initialisation, not a hang.
#![cfg(feature = "nccl-gpu-tests")]

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use ddpm_collective::nccl::{NcclComm, NcclOptions};
use ddpm_collective::{AbortFlag, AbortHandle, Collective, CollectiveError, ReduceOp};
use std::ffi::c_void;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One GPU test at a time: they share the device and NCCL's per-process state.
fn gpu() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn options(timeout_secs: u64) -> NcclOptions {
    NcclOptions {
        timeout: Duration::from_secs(timeout_secs),
        generation: 5,
        abort: None,
    }
}

/// Sizes that are not multiples of anything NCCL chunks by; the last is 100 MB.
const SIZES: [usize; 3] = [1, 1023, 25_000_007];

/// Rank r's contribution: integers below 2^13, so sums and halves are exact in f32.
fn contribution(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + rank * 1000) % 4093) as f32 + rank as f32)
        .collect()
}

/// The device address of `buf`, for work on `stream`.
fn address(stream: &Arc<CudaStream>, buf: &CudaSlice<f32>) -> u64 {
    let (ptr, _record) = buf.device_ptr(stream);
    ptr
}

fn download(stream: &Arc<CudaStream>, buf: &CudaSlice<f32>) -> Vec<f32> {
    let host = stream.clone_dtoh(buf).unwrap();
    stream.synchronize().unwrap();
    host
}

const LEGACY: *mut c_void = std::ptr::null_mut();

#[test]
fn one_rank_reduces_and_broadcasts_device_buffers_of_odd_sizes_on_any_stream() {
    let _gpu = gpu();
    let id = NcclComm::unique_id().unwrap();
    assert!(id.iter().any(|&b| b != 0), "an all-zero ncclUniqueId");
    let mut comm = NcclComm::init(0, 1, &id, 0, options(60)).unwrap();
    assert_eq!(
        (comm.rank(), comm.world_size(), comm.device_ordinal()),
        (0, 1, 0)
    );
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.default_stream();
    for n in SIZES {
        let host = contribution(0, n);
        let buf = stream.clone_htod(&host).unwrap();
        let p = address(&stream, &buf);
        // SAFETY: `buf` holds n floats on device 0 and is used by nothing else meanwhile.
        unsafe {
            comm.all_reduce_device(p, n, LEGACY, ReduceOp::Sum, &format!("sum of {n}"))
                .unwrap();
            comm.all_reduce_device(p, n, LEGACY, ReduceOp::Avg, &format!("mean of {n}"))
                .unwrap();
            comm.broadcast_device(p, n, 0, LEGACY, &format!("broadcast of {n}"))
                .unwrap();
        }
        assert_eq!(download(&stream, &buf), host, "n = {n}");
    }
    // SAFETY: the legacy default stream.
    unsafe { comm.barrier_device(LEGACY, "after the sizes") }.unwrap();

    // A stream of its own: the operation is ordered after the copy on that stream.
    let own = ctx.new_stream().unwrap();
    let host = contribution(3, 1023);
    let buf = own.clone_htod(&host).unwrap();
    let p = address(&own, &buf);
    // SAFETY: as above, on `own`, a live stream of device 0's primary context.
    unsafe {
        comm.all_reduce_device(
            p,
            1023,
            own.cu_stream() as *mut c_void,
            ReduceOp::Sum,
            "own stream",
        )
    }
    .unwrap();
    assert_eq!(download(&own, &buf), host);

    // Nothing to do is no error, a null pointer with data is.
    // SAFETY: no memory is touched for an empty buffer or a refused call.
    unsafe {
        comm.all_reduce_device(0, 0, LEGACY, ReduceOp::Sum, "empty")
            .unwrap();
        let err = comm
            .all_reduce_device(0, 5, LEGACY, ReduceOp::Sum, "null")
            .unwrap_err();
        assert!(matches!(err, CollectiveError::Invalid(_)), "{err}");
        let err = comm.broadcast_device(p, 1, 1, LEGACY, "root").unwrap_err();
        assert!(err.to_string().contains("root 1 of a world of 1"), "{err}");
    }
}

#[test]
fn host_slices_go_through_the_collective_trait_and_an_abort_ends_the_communicator() {
    let _gpu = gpu();
    let id = NcclComm::unique_id().unwrap();
    let mut comm = NcclComm::init(0, 1, &id, 0, options(60)).unwrap();
    let c: &mut dyn Collective = &mut comm;
    let mut totals = [3.5f32, -2.0, 7.0];
    c.all_reduce(&mut totals, ReduceOp::Sum, "the example count at step 1")
        .unwrap();
    assert_eq!(totals, [3.5, -2.0, 7.0]);
    let mut big = contribution(1, 70_001); // larger than the first staging buffer
    c.broadcast(&mut big, 0, "parameters").unwrap();
    assert_eq!(big, contribution(1, 70_001));
    c.all_reduce(&mut [], ReduceOp::Avg, "nothing").unwrap();
    c.barrier("the end of training").unwrap();

    let handle = c.abort_handle();
    handle.abort();
    let t0 = Instant::now();
    let err = c
        .all_reduce(&mut [1.0], ReduceOp::Sum, "bucket 1/1 at step 3")
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(1));
    let msg = err.to_string();
    assert!(
        matches!(err, CollectiveError::GroupAborted { .. })
            && msg.contains("bucket 1/1 at step 3")
            && msg.contains("aborted"),
        "{msg}"
    );
    assert!(matches!(
        c.barrier("later").unwrap_err(),
        CollectiveError::GroupAborted { .. }
    ));
    drop(comm);
    handle.abort(); // the handle outlives the communicator: nothing left to abort
}

#[test]
fn a_rank_that_never_joins_fails_the_init_within_the_timeout_naming_it() {
    let _gpu = gpu();
    let id = NcclComm::unique_id().unwrap();
    let t0 = Instant::now();
    let err = NcclComm::init(0, 2, &id, 0, options(3)).unwrap_err();
    let took = t0.elapsed();
    let msg = err.to_string();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(30),
        "took {took:?}: {msg}"
    );
    assert!(
        matches!(&err, CollectiveError::GroupTimeout { peers, .. } if peers == "rank 1"),
        "{msg}"
    );
    assert!(
        msg.contains("ncclCommInitRankConfig")
            && msg.contains("generation 5")
            && msg.contains("waiting for rank 1")
            && msg.contains("does not say which rank is late"),
        "{msg}"
    );
    // The aborted attempt left NCCL usable: a new communicator forms.
    let id = NcclComm::unique_id().unwrap();
    let mut comm = NcclComm::init(0, 1, &id, 0, options(60)).unwrap();
    comm.barrier("after the timeout").unwrap();
}

#[test]
fn forming_stops_when_its_abort_flag_is_set_long_before_the_timeout() {
    let _gpu = gpu();
    let id = NcclComm::unique_id().unwrap();
    let flag = Arc::new(AbortFlag::default());
    let setter = {
        let flag = flag.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            flag.abort();
        })
    };
    let t0 = Instant::now();
    let err = NcclComm::init(
        0,
        2,
        &id,
        0,
        NcclOptions {
            abort: Some(flag),
            ..options(120)
        },
    )
    .unwrap_err();
    setter.join().unwrap();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(30), "took {took:?}: {err}");
    assert!(
        matches!(&err, CollectiveError::GroupAborted { .. }),
        "{err}"
    );
    // NCCL is still usable.
    let id = NcclComm::unique_id().unwrap();
    let mut comm = NcclComm::init(0, 1, &id, 0, options(60)).unwrap();
    comm.barrier("after the abort").unwrap();
}

#[test]
fn two_ranks() {
    let _gpu = gpu();
    if CudaContext::device_count().unwrap() >= 2 {
        two_ranks_on_two_gpus();
    } else {
        two_ranks_on_one_gpu_are_refused();
    }
}

/// NCCL refuses a communicator with two ranks on one device ("Duplicate GPU detected"):
/// both ranks get an error naming the initialisation, long before the timeout.
fn two_ranks_on_one_gpu_are_refused() {
    let id = NcclComm::unique_id().unwrap();
    let t0 = Instant::now();
    let results: Vec<_> = std::thread::scope(|s| {
        let ranks: Vec<_> = (0..2)
            .map(|r| {
                let id = &id;
                s.spawn(move || {
                    let _ctx = CudaContext::new(0).unwrap();
                    NcclComm::init(r, 2, id, 0, options(120)).map(drop)
                })
            })
            .collect();
        ranks.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    for (r, res) in results.into_iter().enumerate() {
        let err = res.expect_err("two ranks on one GPU formed a communicator");
        let msg = err.to_string();
        assert!(
            matches!(err, CollectiveError::Backend { rank, .. } if rank == r)
                && msg.contains("ncclCommInitRankConfig"),
            "{msg}"
        );
    }
}

/// Runs `f(rank, comm, stream)` for ranks 0 and 1 on devices 0 and 1, each in a thread.
fn on_two_gpus<T: Send>(
    timeout_secs: u64,
    f: impl Fn(usize, &mut NcclComm, &Arc<CudaStream>) -> T + Sync,
) -> Vec<T> {
    let id = NcclComm::unique_id().unwrap();
    std::thread::scope(|s| {
        let ranks: Vec<_> = (0..2)
            .map(|r| {
                let (id, f) = (&id, &f);
                s.spawn(move || {
                    let ctx = CudaContext::new(r).unwrap();
                    let stream = ctx.default_stream();
                    let mut comm = NcclComm::init(r, 2, id, r, options(timeout_secs)).unwrap();
                    f(r, &mut comm, &stream)
                })
            })
            .collect();
        ranks.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn two_ranks_on_two_gpus() {
    // Sums, means and a broadcast from rank 1, every rank ending with the same values.
    on_two_gpus(120, |r, comm, stream| {
        for n in SIZES {
            let parts = [contribution(0, n), contribution(1, n)];
            let sum: Vec<f32> = (0..n).map(|i| parts[0][i] + parts[1][i]).collect();
            let buf = stream.clone_htod(&parts[r]).unwrap();
            let p = address(stream, &buf);
            // SAFETY: `buf` holds n floats on this rank's device, used by nothing else.
            unsafe { comm.all_reduce_device(p, n, LEGACY, ReduceOp::Sum, &format!("sum {n}")) }
                .unwrap();
            assert_eq!(download(stream, &buf), sum, "rank {r} n {n}");
            let buf = stream.clone_htod(&parts[r]).unwrap();
            let p = address(stream, &buf);
            // SAFETY: as above.
            unsafe { comm.all_reduce_device(p, n, LEGACY, ReduceOp::Avg, &format!("mean {n}")) }
                .unwrap();
            let mean: Vec<f32> = sum.iter().map(|s| s / 2.0).collect();
            assert_eq!(download(stream, &buf), mean, "rank {r} n {n}");
            let buf = stream.clone_htod(&parts[r]).unwrap();
            let p = address(stream, &buf);
            // SAFETY: as above.
            unsafe { comm.broadcast_device(p, n, 1, LEGACY, &format!("broadcast {n}")) }.unwrap();
            assert_eq!(download(stream, &buf), parts[1], "rank {r} n {n}");
        }
        let mut totals = [r as f32 + 1.0, 10.0];
        comm.all_reduce(&mut totals, ReduceOp::Sum, "example counts")
            .unwrap();
        assert_eq!(totals, [3.0, 20.0]);
        comm.barrier("end").unwrap();
    });

    // Rank 1 skips an all-reduce: rank 0 times out within its 3 s, naming rank 1 and the
    // step, instead of hanging.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let rx = Mutex::new(rx);
    let out = on_two_gpus(3, |r, comm, stream| {
        if r == 1 {
            let _ = rx.lock().unwrap().recv();
            return None;
        }
        let buf = stream.clone_htod(&contribution(0, 1023)).unwrap();
        let t0 = Instant::now();
        // SAFETY: as above.
        let err = unsafe {
            comm.all_reduce_device(
                address(stream, &buf),
                1023,
                LEGACY,
                ReduceOp::Sum,
                "gradient bucket 1/1 at step 7",
            )
        }
        .unwrap_err();
        let took = t0.elapsed();
        tx.send(()).unwrap();
        Some((err, took))
    });
    let (err, took) = out.into_iter().flatten().next().unwrap();
    let msg = err.to_string();
    assert!(took < Duration::from_secs(30), "took {took:?}: {msg}");
    assert!(
        matches!(err, CollectiveError::GroupTimeout { .. })
            && msg.contains("gradient bucket 1/1 at step 7")
            && msg.contains("on rank 0")
            && msg.contains("waiting for rank 1"),
        "{msg}"
    );

    // An abort from another thread ends a blocked all-reduce long before its timeout.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let rx = Mutex::new(rx);
    let out = on_two_gpus(120, |r, comm, stream| {
        if r == 1 {
            let _ = rx.lock().unwrap().recv();
            return None;
        }
        let handle = comm.abort_handle();
        let aborter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            handle.abort();
        });
        let buf = stream.clone_htod(&contribution(0, 1023)).unwrap();
        let t0 = Instant::now();
        // SAFETY: as above.
        let err = unsafe {
            comm.all_reduce_device(
                address(stream, &buf),
                1023,
                LEGACY,
                ReduceOp::Sum,
                "bucket at step 8",
            )
        }
        .unwrap_err();
        let took = t0.elapsed();
        aborter.join().unwrap();
        tx.send(()).unwrap();
        Some((err, took))
    });
    let (err, took) = out.into_iter().flatten().next().unwrap();
    assert!(took < Duration::from_secs(30), "took {took:?}: {err}");
    assert!(
        matches!(err, CollectiveError::GroupAborted { .. }) && err.to_string().contains("step 8"),
        "{err}"
    );
}
