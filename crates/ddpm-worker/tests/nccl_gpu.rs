//! The worker's NCCL path on a GPU (feature `nccl-gpu-tests`): needs a CUDA device, a CUDA
//! build of libtorch 2.11 (libtorch_cuda.so on the library path) and NCCL (libnccl.so.2, or
//! DDPM_NCCL_LIBRARY). `scripts/gpu-checks.sh` runs it; see the crate README.
//!
//! A world of one rank on cuda:0: the gradient exchange and the start-of-run broadcast go
//! through NCCL in place on the trainer's CUDA buffers, and give what the TCP path gives on
//! a host copy.
#![cfg(feature = "nccl-gpu-tests")]

use ddpm_collective::nccl::{NcclComm, NcclOptions};
use ddpm_collective::tcp::{RingOptions, TcpRing};
use ddpm_collective::{AbortHandle, Collective, CollectiveError, ReduceOp};
use ddpm_config::Config;
use ddpm_proto::Rendezvous;
use ddpm_trainer::Trainer;
use ddpm_worker::client::Joined;
use ddpm_worker::comm::{self, Comm, DeviceCollective};
use ddpm_worker::exchange::{broadcast_from_rank0, GradientExchange};
use std::net::TcpListener;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// One test at a time: they share the GPU, libtorch's generator and NCCL's state.
fn gpu() -> (MutexGuard<'static, ()>, Device) {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    // Loads libtorch_cuda (and with it, by name, its NCCL) before NCCL is first used.
    let dev = ddpm_unet::device::resolve("cuda:0").expect("a CUDA device and libtorch_cuda");
    (guard, dev)
}

fn config(bucket_mb: u32) -> Config {
    Config::parse(
        &format!(
            "[data]\nchannels = 3\nresolution = 32\n[model]\nch = 64\nch_mult = [1, 2]\nnum_res_blocks = 1\nattn_resolutions = [16]\n[train]\nbatch_size = 8\n[distributed]\nbackend = \"nccl\"\nbucket_mb = {bucket_mb}\ncollective_timeout_secs = 60\n"
        ),
        "nccl-gpu-test",
    )
    .unwrap()
}

fn nccl_world_of_one() -> NcclComm {
    let id = NcclComm::unique_id().unwrap();
    NcclComm::init(
        0,
        1,
        &id,
        0,
        NcclOptions {
            timeout: Duration::from_secs(60),
            generation: 1,
            abort: None,
        },
    )
    .unwrap()
}

fn tcp_world_of_one() -> TcpRing {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let me = l.local_addr().unwrap();
    TcpRing::connect(0, l, &[me], RingOptions::default()).unwrap()
}

/// Puts deterministic values of both signs and several magnitudes into the trainer's
/// gradient buffer, as a backward pass would.
fn fake_gradient(trainer: &Trainer) -> Tensor {
    let g = trainer.gradients();
    let n = g.numel() as i64;
    let values = (Tensor::arange(n, (Kind::Float, g.device())).fmod(1013.0) - 506.0) * 0.0037;
    let mut dst = g.shallow_clone();
    tch::no_grad(|| {
        dst.copy_(&values);
    });
    g
}

/// NcclComm with counts of what went through the device and what through host slices.
struct Counting {
    inner: NcclComm,
    device_reduces: usize,
    device_broadcasts: usize,
    host_values: usize,
}

impl Counting {
    fn new(inner: NcclComm) -> Self {
        Self {
            inner,
            device_reduces: 0,
            device_broadcasts: 0,
            host_values: 0,
        }
    }
}

impl Collective for Counting {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce(
        &mut self,
        buf: &mut [f32],
        op: ReduceOp,
        what: &str,
    ) -> Result<(), CollectiveError> {
        self.host_values += buf.len();
        self.inner.all_reduce(buf, op, what)
    }
    fn broadcast(
        &mut self,
        buf: &mut [f32],
        root: usize,
        what: &str,
    ) -> Result<(), CollectiveError> {
        self.host_values += buf.len();
        self.inner.broadcast(buf, root, what)
    }
    fn barrier(&mut self, what: &str) -> Result<(), CollectiveError> {
        self.inner.barrier(what)
    }
    fn abort_handle(&self) -> Arc<dyn AbortHandle> {
        self.inner.abort_handle()
    }
}

impl DeviceCollective for Counting {
    fn device_ordinal(&self) -> usize {
        DeviceCollective::device_ordinal(&self.inner)
    }
    unsafe fn device_all_reduce_sum(
        &mut self,
        ptr: u64,
        len: usize,
        what: &str,
    ) -> Result<(), CollectiveError> {
        self.device_reduces += 1;
        // SAFETY: the caller's contract, forwarded.
        unsafe { self.inner.device_all_reduce_sum(ptr, len, what) }
    }
    unsafe fn device_broadcast(
        &mut self,
        ptr: u64,
        len: usize,
        root: usize,
        what: &str,
    ) -> Result<(), CollectiveError> {
        self.device_broadcasts += 1;
        // SAFETY: the caller's contract, forwarded.
        unsafe { self.inner.device_broadcast(ptr, len, root, what) }
    }
}

impl Comm for Counting {
    fn device(&mut self) -> Option<&mut dyn DeviceCollective> {
        Some(self)
    }
}

/// The largest difference between two tensors, relative to the larger magnitude (at least 1).
fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_device(Device::Cpu), b.to_device(Device::Cpu));
    let diff = (&a - &b).abs().max().double_value(&[]);
    diff / a.abs().max().double_value(&[]).max(1.0)
}

#[test]
fn the_gradient_average_runs_in_place_on_the_device_and_equals_the_tcp_paths() {
    let (_gpu, dev) = gpu();
    let cfg = config(1);
    let trainer = Trainer::new(&cfg, dev).unwrap();
    let g = fake_gradient(&trainer);
    assert_eq!(g.device(), dev);
    let n = g.numel();
    let buf_before = g.data_ptr();
    // The TCP path on a host copy: what a CPU worker's exchange does with these values.
    let host = g.to_device(Device::Cpu);
    let (loss, examples, step) = (0.75, 5usize, 9u64);
    let want = GradientExchange::new(1)
        .average(&mut tcp_world_of_one(), &host, loss, examples, step)
        .unwrap();
    let mut nccl = Counting::new(nccl_world_of_one());
    let got = GradientExchange::new(1)
        .average(&mut nccl, &g, loss, examples, step)
        .unwrap();
    assert_eq!((got.examples, got.loss), (want.examples, want.loss));
    assert_eq!(got.examples, 5);
    assert!((got.loss - 0.75).abs() < 1e-6, "{}", got.loss);
    // 1 MiB buckets of 262144 floats, each all-reduced on the device; only the example
    // count and the loss went through host memory.
    assert!(n > 262_144, "the model has {n} parameters: one bucket only");
    assert_eq!(nccl.device_reduces, n.div_ceil(262_144));
    assert_eq!(nccl.host_values, 2);
    assert_eq!(g.data_ptr(), buf_before, "in place");
    let d = max_rel_diff(&g, &host);
    assert!(
        d <= 1e-6,
        "NCCL's average differs from the TCP path's by {d:e}"
    );
    // Scaled by 5 and then by 1/5: the input again, to rounding.
    let input =
        (Tensor::arange(n as i64, (Kind::Float, Device::Cpu)).fmod(1013.0) - 506.0) * 0.0037;
    let d = max_rel_diff(&g, &input);
    assert!(
        d <= 1e-6,
        "the average of one rank differs from its gradient by {d:e}"
    );
}

#[test]
fn the_start_of_run_broadcast_runs_on_the_device() {
    let (_gpu, dev) = gpu();
    let trainer = Trainer::new(&config(25), dev).unwrap();
    let (flat, ema) = trainer.flat();
    let (params, ema_before) = (
        flat.params.to_device(Device::Cpu),
        ema.to_device(Device::Cpu),
    );
    let mut nccl = Counting::new(nccl_world_of_one());
    // SAFETY: the trainer's buffers are this thread's, and nothing else uses them meanwhile.
    unsafe {
        broadcast_from_rank0(&mut nccl, &flat.params, "broadcast of the parameters").unwrap();
        broadcast_from_rank0(&mut nccl, ema, "broadcast of the EMA weights").unwrap();
    }
    assert_eq!((nccl.device_broadcasts, nccl.host_values), (2, 0));
    assert_eq!(max_rel_diff(&flat.params, &params), 0.0);
    assert_eq!(max_rel_diff(ema, &ema_before), 0.0);
}

/// What `worker` does with an NCCL rendezvous: the communicator from the coordinator's id,
/// the exchange through it, its abort handle (what the heartbeat task calls), and the error
/// after an abort asking for a new generation.
#[test]
fn the_worker_forms_nccl_from_the_rendezvous_and_an_abort_asks_for_a_new_generation() {
    let (_gpu, dev) = gpu();
    let cfg = config(4);
    let trainer = Trainer::new(&cfg, dev).unwrap();
    let g = fake_gradient(&trainer);
    let joined = Joined {
        rank: 0,
        ring_rank: 0,
        world_size: 1,
        generation: 2,
        rendezvous: Rendezvous::Nccl {
            unique_id: comm::registration_id(Some(cfg.distributed.backend), dev)
                .unwrap()
                .id,
        },
        config_toml: String::new(),
        lease: Duration::from_secs(10),
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut group = comm::form(&joined, listener, &cfg, dev, &Default::default()).unwrap();
    assert_eq!(
        (group.backend_name(), group.rank(), group.world_size()),
        ("nccl", 0, 1)
    );
    assert_eq!(group.device().map(|d| d.device_ordinal()), Some(0));
    let mut exchange = GradientExchange::new(cfg.distributed.bucket_mb as usize);
    let a = exchange.average(&mut group, &g, 1.5, 8, 1).unwrap();
    assert_eq!(a.examples, 8);
    group.abort_handle().abort();
    let err = exchange.average(&mut group, &g, 1.5, 8, 2).unwrap_err();
    assert!(err.needs_reform(), "{err}");
    assert!(err.to_string().contains("at step 2"), "{err}");
    drop(group);
    // The next generation forms a fresh communicator and ends it in order.
    let joined = Joined {
        generation: 3,
        rendezvous: Rendezvous::Nccl {
            unique_id: NcclComm::unique_id().unwrap().to_vec(),
        },
        ..joined
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut group = comm::form(&joined, listener, &cfg, dev, &Default::default()).unwrap();
    let a = exchange.average(&mut group, &g, 1.5, 8, 3).unwrap();
    assert_eq!(a.examples, 8);
    group.finish("the end of the test").unwrap();
}
