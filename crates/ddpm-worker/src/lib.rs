//! A DDPM-RS training worker: `worker --rank N --coordinator URL` joins a run, all-reduces
//! its gradients with the other ranks and trains its share of every global batch. The
//! training loop, checkpoint access and dataset opening here are also what `ddpm train`
//! runs in one process.
//!
//! - [`client`]: registration, the lease, progress reports (tokio, off the training thread).
//! - [`comm`]: the collective of a generation (TCP ring or, with the feature `nccl`, NCCL
//!   on the device's buffers) and the `ncclUniqueId` a registration carries.
//! - [`exchange`]: the size-weighted gradient average and the parameter broadcast.
//! - [`train_loop`]: the loop shared with `ddpm train`.
//! - [`checkpoints`], [`dataset`]: the run's checkpoints and `data.source`.
//! - [`run`]: one worker process from registration to its last step.
//! - [`ledger`]: the data ledger (a test mode): which samples each rank consumed at each
//!   step, and the check that every completed epoch was consumed exactly once.

pub mod checkpoints;
pub mod client;
pub mod comm;
pub mod dataset;
mod error;
pub mod exchange;
pub mod ledger;
pub mod run;
pub mod train_loop;

pub use error::{chain, Context, Result, WorkerError};
