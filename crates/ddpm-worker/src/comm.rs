//! The collective a generation trains with: the TCP ring or (cargo feature `nccl`) NCCL,
//! chosen by the coordinator's rendezvous, behind one trait ([`Comm`]) that the gradient
//! exchange and the training loop use.
//!
//! [`Comm`] is [`Collective`] (host slices: the example counts and losses of every step,
//! and everything on the TCP ring) plus, where the backend has them, operations in place on
//! device memory ([`DeviceCollective`]): NCCL all-reduces a CUDA trainer's gradient buffer
//! and broadcasts its parameters where they are, without copying them to the host.
//!
//! # The `ncclUniqueId` of a registration
//!
//! On the NCCL backend the coordinator refuses a registration without a 128-byte
//! `ncclUniqueId`, and it hands every member of a ring its first member's. But a worker
//! learns the backend only from the config in the answer to its registration. So
//! ([`registration_id`]):
//!
//! - before the first answer, a worker built with `nccl` that trains on a CUDA device
//!   creates an id and sends it (the coordinator ignores it on the TCP backend); a CPU
//!   worker, or one built without `nccl`, sends none. If creating the id fails (no NCCL on
//!   this host), the worker registers without one and keeps the error: when the coordinator
//!   then refuses the registration for the missing id, that error, not the refusal, stops
//!   the worker ([`explain_refusal`]). On the TCP backend nothing is lost.
//! - after an answer the backend is known: a TCP run sends no id; an NCCL run creates a
//!   fresh id for every registration (every generation is a new communicator), and a
//!   failure to create it stops the worker at once.
//!
//! The control flow does not depend on the coordinator's wording: a refusal is always an
//! error that stops the worker; the refusal's text only decides which error it reports.
//! Each id starts NCCL's bootstrap listener (a thread and a socket) in this process. Only
//! the ring's first member's id is used; the listeners of the others (and, on the TCP
//! backend, of a CUDA worker's first registration) wait idle in their processes. That is
//! the cost of the coordinator choosing the id from the ring it forms.
//!
//! NCCL is loaded at the first id: `worker --device cuda:K` loads libtorch_cuda before, so
//! NCCL is found by the name libtorch's wheel ships it under (see ddpm-collective's README,
//! and `DDPM_NCCL_LIBRARY`).

use crate::client::Joined;
use crate::error::{ensure, Context, Result, WorkerError};
use ddpm_collective::tcp::{RingOptions, TcpRing};
use ddpm_collective::{AbortFlag, AbortHandle, Collective, CollectiveError, ReduceOp};
use ddpm_config::{CollectiveBackend, Config};
use ddpm_proto::Rendezvous;
use std::net::{TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;
use tch::Device;

#[cfg(feature = "nccl")]
use ddpm_collective::nccl::{NcclComm, NcclOptions, UNIQUE_ID_BYTES};

/// The cargo command that builds the `worker` binary with the NCCL backend.
pub const BUILD_WITH_NCCL: &str = "cargo build --release -p ddpm-worker --features nccl";

/// Collective operations in place on float32 device memory, on the legacy default CUDA
/// stream (the one libtorch uses, since tch selects no other): each is ordered after the
/// kernels already queued there (the backward pass that wrote the gradients) and returns
/// once it has run on the GPU.
pub trait DeviceCollective {
    /// The CUDA device the collective works on.
    fn device_ordinal(&self) -> usize;

    /// Sums `len` float32 values at device address `ptr` over the ranks, in place. `what`
    /// names the call in errors (e.g. "gradient bucket 2/7 at step 140").
    ///
    /// # Safety
    ///
    /// `ptr` must be memory of device [`device_ordinal`](Self::device_ordinal) holding
    /// `len` float32 values, which nothing else reads or writes until the call returns.
    unsafe fn device_all_reduce_sum(
        &mut self,
        ptr: u64,
        len: usize,
        what: &str,
    ) -> Result<(), CollectiveError>;

    /// Copies rank `root`'s `len` float32 values at device address `ptr` into every rank's
    /// `ptr`, in place.
    ///
    /// # Safety
    ///
    /// As [`device_all_reduce_sum`](Self::device_all_reduce_sum).
    unsafe fn device_broadcast(
        &mut self,
        ptr: u64,
        len: usize,
        root: usize,
        what: &str,
    ) -> Result<(), CollectiveError>;
}

/// A collective the worker trains with: [`Collective`] on host slices and, when the backend
/// can work on device memory, [`DeviceCollective`].
pub trait Comm: Collective {
    /// The device operations, if this backend has them (NCCL); None: host slices only.
    fn device(&mut self) -> Option<&mut dyn DeviceCollective> {
        None
    }
}

impl Comm for TcpRing {}

#[cfg(feature = "nccl")]
impl DeviceCollective for NcclComm {
    fn device_ordinal(&self) -> usize {
        NcclComm::device_ordinal(self)
    }

    unsafe fn device_all_reduce_sum(
        &mut self,
        ptr: u64,
        len: usize,
        what: &str,
    ) -> Result<(), CollectiveError> {
        // SAFETY: the caller's contract is all_reduce_device's; null is the legacy default
        // stream.
        unsafe { self.all_reduce_device(ptr, len, std::ptr::null_mut(), ReduceOp::Sum, what) }
    }

    unsafe fn device_broadcast(
        &mut self,
        ptr: u64,
        len: usize,
        root: usize,
        what: &str,
    ) -> Result<(), CollectiveError> {
        // SAFETY: as above.
        unsafe { self.broadcast_device(ptr, len, root, std::ptr::null_mut(), what) }
    }
}

#[cfg(feature = "nccl")]
impl Comm for NcclComm {
    fn device(&mut self) -> Option<&mut dyn DeviceCollective> {
        Some(self)
    }
}

enum Backend {
    Tcp(TcpRing),
    #[cfg(feature = "nccl")]
    Nccl(NcclComm),
}

/// The collective of one generation, formed from the coordinator's rendezvous ([`form`]).
///
/// Dropped without [`finish`](Self::finish) (the generation failed, or this rank stops with
/// an error), an NCCL communicator is aborted, not finalized: finalizing would wait for
/// peers that may be gone. The TCP ring closes its sockets, so the peers fail at once.
pub struct GroupComm {
    backend: Backend,
    finished: bool,
}

impl GroupComm {
    /// The collective used through the traits.
    fn inner(&self) -> &dyn Comm {
        match &self.backend {
            Backend::Tcp(r) => r,
            #[cfg(feature = "nccl")]
            Backend::Nccl(c) => c,
        }
    }

    fn inner_mut(&mut self) -> &mut dyn Comm {
        match &mut self.backend {
            Backend::Tcp(r) => r,
            #[cfg(feature = "nccl")]
            Backend::Nccl(c) => c,
        }
    }

    /// The backend's name: "tcp" or "nccl".
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Tcp(_) => "tcp",
            #[cfg(feature = "nccl")]
            Backend::Nccl(_) => "nccl",
        }
    }

    /// The end of a successful generation: a barrier (`what` names it), then the collective
    /// is closed in order (NCCL: finalized and destroyed).
    pub fn finish(mut self, what: &str) -> Result<()> {
        self.barrier(what)?;
        self.finished = true;
        Ok(())
    }
}

impl Drop for GroupComm {
    fn drop(&mut self) {
        if self.finished {
            tracing::debug!(backend = self.backend_name(), "collective closed");
        } else {
            match &self.backend {
                // Dropped with the struct: the sockets close and the peers fail at once.
                Backend::Tcp(_) => {}
                #[cfg(feature = "nccl")]
                Backend::Nccl(c) => {
                    tracing::info!("aborting the NCCL communicator of the failed generation");
                    c.abort_handle().abort();
                }
            }
        }
    }
}

impl Collective for GroupComm {
    fn rank(&self) -> usize {
        self.inner().rank()
    }

    fn world_size(&self) -> usize {
        self.inner().world_size()
    }

    fn all_reduce(
        &mut self,
        buf: &mut [f32],
        op: ReduceOp,
        what: &str,
    ) -> Result<(), CollectiveError> {
        self.inner_mut().all_reduce(buf, op, what)
    }

    fn broadcast(
        &mut self,
        buf: &mut [f32],
        root: usize,
        what: &str,
    ) -> Result<(), CollectiveError> {
        self.inner_mut().broadcast(buf, root, what)
    }

    fn barrier(&mut self, what: &str) -> Result<(), CollectiveError> {
        self.inner_mut().barrier(what)
    }

    fn abort_handle(&self) -> Arc<dyn AbortHandle> {
        self.inner().abort_handle()
    }
}

impl Comm for GroupComm {
    fn device(&mut self) -> Option<&mut dyn DeviceCollective> {
        self.inner_mut().device()
    }
}

/// Why this worker cannot train on the NCCL backend: it was built without it.
pub fn nccl_not_built() -> WorkerError {
    WorkerError::Invalid(format!(
        "distributed.backend = \"nccl\": this worker was built without the NCCL backend; build it with `{BUILD_WITH_NCCL}` (or use distributed.backend = \"tcp\")"
    ))
}

/// Why this worker cannot train on the NCCL backend: NCCL works on CUDA devices only.
#[cfg(feature = "nccl")]
fn nccl_needs_cuda(device: Device) -> WorkerError {
    WorkerError::Invalid(format!(
        "distributed.backend = \"nccl\" works on CUDA devices, but this worker trains on {device:?}; start it with --device cuda:K (or use distributed.backend = \"tcp\")"
    ))
}

/// Whether this worker can train on the run's backend on `device`: the TCP ring always;
/// NCCL when the worker was built with it (feature `nccl`) and `device` is a CUDA device.
pub fn check_backend(cfg: &Config, device: Device) -> Result<()> {
    match cfg.distributed.backend {
        CollectiveBackend::Tcp => Ok(()),
        #[cfg(not(feature = "nccl"))]
        CollectiveBackend::Nccl => {
            let _ = device;
            Err(nccl_not_built())
        }
        #[cfg(feature = "nccl")]
        CollectiveBackend::Nccl => match device {
            Device::Cuda(_) => Ok(()),
            other => Err(nccl_needs_cuda(other)),
        },
    }
}

/// The `ncclUniqueId` one registration carries (see the module docs).
#[derive(Debug, Default)]
pub struct RegistrationId {
    /// 128 bytes, or empty: none.
    pub id: Vec<u8>,
    /// Why `id` is empty although the run may be on the NCCL backend (the backend is not
    /// known yet): the error to stop with if the coordinator refuses the registration for
    /// its missing id.
    pub missing: Option<WorkerError>,
}

/// The `ncclUniqueId` to register with, given the run's backend (`None`: not known yet, at
/// the first registration) and this worker's device. An NCCL run gets a fresh id, or the
/// error that stops the worker (built without NCCL, not a CUDA device, or NCCL not loadable:
/// [`CollectiveError::Unavailable`]).
pub fn registration_id(
    backend: Option<CollectiveBackend>,
    device: Device,
) -> Result<RegistrationId> {
    match backend {
        Some(CollectiveBackend::Tcp) => Ok(RegistrationId::default()),
        #[cfg(not(feature = "nccl"))]
        Some(CollectiveBackend::Nccl) => {
            let _ = device;
            Err(nccl_not_built())
        }
        #[cfg(not(feature = "nccl"))]
        None => Ok(RegistrationId {
            id: Vec::new(),
            missing: Some(nccl_not_built()),
        }),
        #[cfg(feature = "nccl")]
        Some(CollectiveBackend::Nccl) => match device {
            Device::Cuda(_) => Ok(RegistrationId {
                id: NcclComm::unique_id()?.to_vec(),
                missing: None,
            }),
            other => Err(nccl_needs_cuda(other)),
        },
        #[cfg(feature = "nccl")]
        None => Ok(match device {
            Device::Cuda(_) => match NcclComm::unique_id() {
                Ok(id) => RegistrationId {
                    id: id.to_vec(),
                    missing: None,
                },
                Err(e) => {
                    tracing::debug!(error = %e, "no ncclUniqueId: registering without one (enough on the TCP backend)");
                    RegistrationId {
                        id: Vec::new(),
                        missing: Some(e.into()),
                    }
                }
            },
            other => RegistrationId {
                id: Vec::new(),
                missing: Some(nccl_needs_cuda(other)),
            },
        }),
    }
}

/// The error a failed registration stops the worker with: when the coordinator refused it
/// for its missing `ncclUniqueId` (FAILED_PRECONDITION naming the id) and this worker knows
/// why it sent none (`missing`), that reason; otherwise `e` as it is.
pub fn explain_refusal(e: WorkerError, missing: Option<WorkerError>) -> WorkerError {
    match (&e, missing) {
        (WorkerError::Rpc { status, .. }, Some(why))
            if status.code() == tonic::Code::FailedPrecondition
                && status.message().contains("ncclUniqueId") =>
        {
            tracing::info!(refusal = %status.message(), "the coordinator runs the NCCL backend, which this worker cannot join");
            why
        }
        _ => e,
    }
}

/// Forms this generation's collective from the coordinator's rendezvous: the TCP ring
/// (accepting on `listener`), or the NCCL communicator on `device` (ring rank =
/// NCCL rank). Either waits for every rank within `distributed.collective_timeout_secs`,
/// or until `abort` is set (the coordinator moved on: a rank died before the ring formed).
pub fn form(
    joined: &Joined,
    listener: TcpListener,
    cfg: &Config,
    device: Device,
    abort: &Arc<AbortFlag>,
) -> Result<GroupComm> {
    let timeout = Duration::from_secs(cfg.distributed.collective_timeout_secs as u64);
    let backend = match &joined.rendezvous {
        Rendezvous::Tcp { peers } => {
            Backend::Tcp(form_ring(joined, peers, listener, timeout, abort)?)
        }
        Rendezvous::Nccl { unique_id } => {
            drop(listener);
            form_nccl(joined, unique_id, device, timeout, abort)?
        }
    };
    Ok(GroupComm {
        backend,
        finished: false,
    })
}

/// How long a ring member's address may refuse connections before forming fails. Every
/// worker binds its ring socket before it registers and holds it until its ring is formed,
/// so a refusal means that member's process is gone (or it left this generation): the ring
/// re-forms now instead of after the member's lease or the collective timeout.
const REFUSED_PATIENCE: Duration = Duration::from_secs(2);

fn form_ring(
    joined: &Joined,
    peers: &[String],
    listener: TcpListener,
    timeout: Duration,
    abort: &Arc<AbortFlag>,
) -> Result<TcpRing> {
    let addrs = peers
        .iter()
        .enumerate()
        .map(|(r, p)| {
            p.to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .with_context(|| format!("rank {r}'s ring address {p:?} does not resolve"))
        })
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        addrs.len() == joined.world_size as usize,
        "the rendezvous lists {} ring addresses for world size {}",
        addrs.len(),
        joined.world_size
    );
    let options = RingOptions {
        timeout,
        generation: joined.generation,
        abort: Some(abort.clone()),
        refused_patience: Some(REFUSED_PATIENCE),
        ..RingOptions::default()
    };
    Ok(TcpRing::connect(
        joined.ring_rank as usize,
        listener,
        &addrs,
        options,
    )?)
}

#[cfg(not(feature = "nccl"))]
fn form_nccl(
    _joined: &Joined,
    _unique_id: &[u8],
    _device: Device,
    _timeout: Duration,
    _abort: &Arc<AbortFlag>,
) -> Result<Backend> {
    Err(nccl_not_built())
}

#[cfg(feature = "nccl")]
fn form_nccl(
    joined: &Joined,
    unique_id: &[u8],
    device: Device,
    timeout: Duration,
    abort: &Arc<AbortFlag>,
) -> Result<Backend> {
    let ordinal = match device {
        Device::Cuda(k) => k,
        other => return Err(nccl_needs_cuda(other)),
    };
    let id: &[u8; UNIQUE_ID_BYTES] = unique_id.try_into().map_err(|_| {
        WorkerError::Invalid(format!(
            "the coordinator's NCCL rendezvous holds an ncclUniqueId of {} bytes, expected {UNIQUE_ID_BYTES}",
            unique_id.len()
        ))
    })?;
    let options = NcclOptions {
        timeout,
        generation: joined.generation,
        abort: Some(abort.clone()),
    };
    Ok(Backend::Nccl(NcclComm::init(
        joined.ring_rank as usize,
        joined.world_size as usize,
        id,
        ordinal,
        options,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error of forming an NCCL communicator (a well-formed rendezvous) on the CPU.
    fn nccl_form_on_cpu_error() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let rendezvous = Rendezvous::Nccl {
            unique_id: vec![1; 128],
        };
        match form(
            &joined(rendezvous),
            listener,
            &config("nccl"),
            Device::Cpu,
            &Default::default(),
        ) {
            Ok(_) => panic!("formed an NCCL communicator on the CPU"),
            Err(e) => e.to_string(),
        }
    }

    fn config(backend: &str) -> Config {
        Config::parse(
            &format!("[distributed]\nbackend = \"{backend}\"\n"),
            "comm-test",
        )
        .unwrap()
    }

    fn joined(rendezvous: Rendezvous) -> Joined {
        Joined {
            rank: 0,
            ring_rank: 0,
            world_size: 1,
            generation: 3,
            rendezvous,
            config_toml: String::new(),
            lease: Duration::from_secs(10),
        }
    }

    /// The coordinator's refusal of a registration without an id (its wording).
    fn id_refusal() -> WorkerError {
        WorkerError::Rpc {
            what: "Register".into(),
            status: Box::new(tonic::Status::failed_precondition(
                "backend nccl: m on h must register with its ncclUniqueId of 128 bytes, got 0 bytes",
            )),
        }
    }

    #[test]
    fn the_tcp_backend_needs_no_id_and_any_device() {
        for device in [Device::Cpu, Device::Cuda(0)] {
            check_backend(&config("tcp"), device).unwrap();
            let r = registration_id(Some(CollectiveBackend::Tcp), device).unwrap();
            assert!(r.id.is_empty() && r.missing.is_none(), "{r:?}");
        }
    }

    #[test]
    fn a_world_of_one_forms_a_tcp_ring_from_its_rendezvous() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let me = listener.local_addr().unwrap().to_string();
        let mut comm = form(
            &joined(Rendezvous::Tcp { peers: vec![me] }),
            listener,
            &config("tcp"),
            Device::Cpu,
            &Default::default(),
        )
        .unwrap();
        assert_eq!(
            (comm.backend_name(), comm.rank(), comm.world_size()),
            ("tcp", 0, 1)
        );
        assert!(comm.device().is_none(), "the TCP ring has no device path");
        let mut buf = [1.5f32, 2.5];
        comm.all_reduce(&mut buf, ReduceOp::Sum, "test").unwrap();
        assert_eq!(buf, [1.5, 2.5]);
        comm.finish("the end of the test").unwrap();
    }

    #[test]
    fn a_rendezvous_with_the_wrong_number_of_addresses_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut j = joined(Rendezvous::Tcp {
            peers: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
        });
        j.world_size = 3;
        let err = match form(
            &j,
            listener,
            &config("tcp"),
            Device::Cpu,
            &Default::default(),
        ) {
            Ok(_) => panic!("formed a ring of 3 from 2 addresses"),
            Err(e) => e.to_string(),
        };
        assert_eq!(
            err,
            "the rendezvous lists 2 ring addresses for world size 3"
        );
    }

    #[test]
    fn other_refusals_are_reported_as_they_are() {
        let other = WorkerError::Rpc {
            what: "Register".into(),
            status: Box::new(tonic::Status::failed_precondition(
                "protocol version 9 is not supported",
            )),
        };
        let e = explain_refusal(other, Some(WorkerError::Invalid("no NCCL".into())));
        assert!(e.to_string().contains("protocol version 9"), "{e}");
        // Without a reason for the missing id, the refusal itself is the error.
        let e = explain_refusal(id_refusal(), None);
        assert!(
            e.to_string()
                .contains("must register with its ncclUniqueId"),
            "{e}"
        );
    }

    #[cfg(not(feature = "nccl"))]
    #[test]
    fn without_the_feature_nccl_is_refused_naming_the_cargo_command() {
        let command = "`cargo build --release -p ddpm-worker --features nccl`";
        for device in [Device::Cpu, Device::Cuda(0)] {
            let msg = check_backend(&config("nccl"), device)
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains("built without the NCCL backend") && msg.contains(command),
                "{msg}"
            );
            let msg = registration_id(Some(CollectiveBackend::Nccl), device)
                .unwrap_err()
                .to_string();
            assert!(msg.contains(command), "{msg}");
            // Before the backend is known: no id, and the reason kept for a refusal.
            let r = registration_id(None, device).unwrap();
            assert!(r.id.is_empty(), "{r:?}");
            let e = explain_refusal(id_refusal(), r.missing);
            assert!(e.to_string().contains(command), "{e}");
        }
        let err = nccl_form_on_cpu_error();
        assert!(err.contains(command), "{err}");
    }

    #[cfg(feature = "nccl")]
    #[test]
    fn nccl_needs_a_cuda_device() {
        check_backend(&config("nccl"), Device::Cuda(0)).unwrap();
        let msg = check_backend(&config("nccl"), Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("--device cuda:K"), "{msg}");
        let msg = registration_id(Some(CollectiveBackend::Nccl), Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("--device cuda:K"), "{msg}");
        // A CPU worker sends no id, and says why if the run turns out to be on NCCL.
        let r = registration_id(None, Device::Cpu).unwrap();
        assert!(r.id.is_empty(), "{r:?}");
        let e = explain_refusal(id_refusal(), r.missing);
        assert!(e.to_string().contains("--device cuda:K"), "{e}");
        let err = nccl_form_on_cpu_error();
        assert!(err.contains("--device cuda:K"), "{err}");
    }

    /// A worker whose run is on NCCL, on a host where NCCL cannot be loaded, stops with
    /// ddpm-collective's `Unavailable` error (what to install), from the id it registers
    /// with, from a refusal of the first registration, and from forming the communicator.
    /// Where NCCL loads (a GPU host), the id is a fresh 128-byte `ncclUniqueId`.
    #[cfg(feature = "nccl")]
    #[test]
    fn a_host_without_nccl_stops_an_nccl_worker_with_unavailable() {
        let cuda = Device::Cuda(0);
        match NcclComm::unique_id() {
            Ok(_) => {
                let a = registration_id(Some(CollectiveBackend::Nccl), cuda).unwrap();
                let b = registration_id(None, cuda).unwrap();
                for r in [&a, &b] {
                    assert_eq!(r.id.len(), UNIQUE_ID_BYTES, "{r:?}");
                    assert!(r.missing.is_none(), "{r:?}");
                }
                assert_ne!(a.id, b.id, "every registration gets a fresh id");
            }
            Err(expected) => {
                let expected = expected.to_string();
                let unavailable = |e: WorkerError| match e {
                    WorkerError::Collective(CollectiveError::Unavailable(msg)) => {
                        assert_eq!(msg, expected);
                    }
                    other => panic!("expected Unavailable, got {other:?}"),
                };
                unavailable(registration_id(Some(CollectiveBackend::Nccl), cuda).unwrap_err());
                let r = registration_id(None, cuda).unwrap();
                assert!(r.id.is_empty(), "{r:?}");
                unavailable(explain_refusal(id_refusal(), r.missing));
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let rendezvous = Rendezvous::Nccl {
                    unique_id: vec![1; UNIQUE_ID_BYTES],
                };
                match form(
                    &joined(rendezvous),
                    listener,
                    &config("nccl"),
                    cuda,
                    &Default::default(),
                ) {
                    Ok(_) => panic!("formed an NCCL communicator without NCCL"),
                    Err(e) => {
                        assert!(!e.needs_reform(), "{e}");
                        unavailable(e);
                    }
                }
            }
        }
    }

    #[cfg(feature = "nccl")]
    #[test]
    fn an_nccl_rendezvous_with_a_short_id_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let rendezvous = Rendezvous::Nccl {
            unique_id: vec![1; 5],
        };
        let err = match form(
            &joined(rendezvous),
            listener,
            &config("nccl"),
            Device::Cuda(0),
            &Default::default(),
        ) {
            Ok(_) => panic!("formed an NCCL communicator from 5 bytes"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("ncclUniqueId of 5 bytes, expected 128"),
            "{err}"
        );
    }
}
