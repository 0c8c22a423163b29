//! Collectives for data-parallel training: every rank calls the same operation in the same
//! order; all-reduce sums (or averages) a buffer across ranks, broadcast copies rank
//! `root`'s buffer to all, barrier waits for everyone. Every operation has a timeout, and an
//! [`AbortHandle`] can interrupt a blocked operation from another thread. Errors name the
//! collective, this rank and the peer it was waiting for.
//!
//! Backends: [`tcp::TcpRing`], a pipelined ring (reduce-scatter + all-gather) over TCP for
//! CPU workers, and, with the cargo feature `nccl`, `nccl::NcclComm`: NCCL on device memory
//! (the tensors' device pointers, on their CUDA stream), loaded at run time.

#[cfg(feature = "nccl")]
pub mod nccl;
pub mod tcp;

use std::time::Duration;

/// Errors of a collective operation.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A peer did not send or take data within the timeout.
    #[error(
        "{collective} on rank {rank}: timed out after {waited:?} waiting for rank {peer} ({addr})"
    )]
    Timeout {
        /// The operation and the caller's context (e.g. "all_reduce bucket 3 at step 120").
        collective: String,
        /// This rank.
        rank: usize,
        /// The rank waited for.
        peer: usize,
        /// Its address.
        addr: String,
        /// How long.
        waited: Duration,
    },
    /// The connection to a peer failed (it died, or the network did).
    #[error("{collective} on rank {rank}: connection to rank {peer} ({addr}) failed: {source}")]
    Peer {
        /// The operation and the caller's context.
        collective: String,
        /// This rank.
        rank: usize,
        /// The peer.
        peer: usize,
        /// Its address.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The ranks disagree (buffer sizes, operation order, world size, generation).
    #[error("{collective} on rank {rank}: {reason}")]
    Mismatch {
        /// The operation and the caller's context.
        collective: String,
        /// This rank.
        rank: usize,
        /// What differs.
        reason: String,
    },
    /// [`AbortHandle::abort`] was called.
    #[error("{collective} on rank {rank}: aborted")]
    Aborted {
        /// The operation and the caller's context.
        collective: String,
        /// This rank.
        rank: usize,
    },
    /// Bad arguments (the caller's bug).
    #[error("{0}")]
    Invalid(String),
    /// The operation did not finish within the timeout, and the backend cannot tell which
    /// peer is late (NCCL: every rank takes part in every step). The communicator has been
    /// aborted.
    #[error(
        "{collective} on rank {rank}: timed out after {waited:?} waiting for {peers} (NCCL does not say which rank is late); the communicator was aborted"
    )]
    GroupTimeout {
        /// The operation and the caller's context (e.g. "all_reduce bucket 3 at step 120").
        collective: String,
        /// This rank.
        rank: usize,
        /// The ranks waited for, in words (e.g. "ranks 1-3").
        peers: String,
        /// How long.
        waited: Duration,
    },
    /// [`AbortHandle::abort`] was called while (or before) this rank waited for every other
    /// rank (NCCL).
    #[error("{collective} on rank {rank}: aborted while waiting for {peers}")]
    GroupAborted {
        /// The operation and the caller's context.
        collective: String,
        /// This rank.
        rank: usize,
        /// The ranks waited for, in words (e.g. "ranks 1-3").
        peers: String,
    },
    /// The backend's library reported an error (an NCCL or CUDA error code, or NCCL's report
    /// of a failed peer).
    #[error("{collective} on rank {rank}: {reason}")]
    Backend {
        /// The operation and the caller's context.
        collective: String,
        /// This rank.
        rank: usize,
        /// The library's error and what it means here.
        reason: String,
    },
    /// The backend cannot run on this host (its libraries are missing or too old); the
    /// message says what to install or which backend to use instead.
    #[error("{0}")]
    Unavailable(String),
}

/// Result alias for this crate.
pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;

/// How all-reduce combines the ranks' buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise mean (the sum divided by the world size): what data-parallel gradients need.
    Avg,
}

/// Interrupts the operations of one collective from another thread.
pub trait AbortHandle: Send + Sync {
    /// Makes the blocked operation (and every later one) fail with [`CollectiveError::Aborted`].
    fn abort(&self);
}

/// An [`AbortHandle`] for the time before a collective exists: forming a ring or a
/// communicator checks it while it waits for its peers ([`tcp::RingOptions::abort`],
/// [`nccl::NcclOptions::abort`]), so a caller that learns the group is gone (a peer died,
/// the coordinator moved on) need not wait out the timeout.
#[derive(Debug, Default)]
pub struct AbortFlag(std::sync::atomic::AtomicBool);

impl AbortFlag {
    /// Whether [`AbortHandle::abort`] was called.
    pub fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl AbortHandle for AbortFlag {
    fn abort(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The operations every backend offers. `what` names the call in errors and logs (e.g.
/// "gradient bucket 2 at step 140").
pub trait Collective: Send {
    /// This rank.
    fn rank(&self) -> usize;
    /// Ranks taking part.
    fn world_size(&self) -> usize;
    /// Combines `buf` across ranks in place; every rank ends with the same values.
    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp, what: &str) -> Result<()>;
    /// Copies rank `root`'s `buf` into every rank's `buf`.
    fn broadcast(&mut self, buf: &mut [f32], root: usize, what: &str) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&mut self, what: &str) -> Result<()>;
    /// A handle that aborts this collective's operations from another thread.
    fn abort_handle(&self) -> std::sync::Arc<dyn AbortHandle>;
}
