//! The coordinator of a DDPM-RS run: who is in the run and where training stands. Never
//! links tch; it never touches a tensor.
//!
//! - [`membership::Membership`]: registration and rank assignment, leases kept by
//!   heartbeats, ring generations (elastic: which members form each ring) and what each rank
//!   last reported. Pure state.
//! - [`generation`]: the run's newest ring generation, kept in the checkpoint store so a
//!   restarted coordinator continues after its predecessor's generations.
//! - [`plan::Plan`]: where training starts, read from the newest committed checkpoint of
//!   the run's store (a fresh run when there is none).
//! - [`service::CoordinatorService`]: the gRPC `Coordinator` service of ddpm-proto over
//!   both, with its metrics and logs, and [`service::CoordinatorService::expire_loop`], the
//!   lease reaper.
//!
//! The `coordinator --config FILE` binary (src/main.rs) serves it.

pub mod generation;
pub mod membership;
pub mod plan;
pub mod service;

/// Errors of the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A registration that cannot be admitted; nothing changed.
    #[error("{0}")]
    Refused(String),
    /// A registration for a rank that a member of the current generation holds: refused,
    /// nothing changed. Distinct from [`CoordinatorError::Refused`] (ALREADY_EXISTS) because
    /// a replacement may retry until the holder's lease runs out.
    #[error("{0}")]
    Taken(String),
    /// A request from a member that no longer holds its rank, or of an old generation.
    #[error("{0}")]
    Stale(String),
    /// A request the run cannot serve in its present phase (e.g. work while waiting for
    /// workers, a checkpoint notice from a rank other than 0).
    #[error("{0}")]
    NotNow(String),
    /// The checkpoint store of the run could not be opened or read.
    #[error("checkpoint store {url}: {error}")]
    Store {
        /// The store's root URL.
        url: String,
        /// What failed (names the run, step and object).
        error: Box<ddpm_checkpoint::CheckpointError>,
    },
    /// A committed checkpoint whose train state cannot be used.
    #[error("checkpoint {url}/{run}/step-{step}: {blob}: {reason}")]
    State {
        /// The store's root URL.
        url: String,
        /// The run.
        run: String,
        /// The checkpoint's step.
        step: u64,
        /// The blob at fault.
        blob: String,
        /// What is wrong (names the key).
        reason: String,
    },
}

impl From<CoordinatorError> for tonic::Status {
    /// Refusals are FAILED_PRECONDITION with the message (a rank held by a live member:
    /// ALREADY_EXISTS); store failures are UNAVAILABLE
    /// (a retry may succeed).
    fn from(e: CoordinatorError) -> Self {
        match e {
            CoordinatorError::Refused(_)
            | CoordinatorError::Stale(_)
            | CoordinatorError::NotNow(_) => tonic::Status::failed_precondition(e.to_string()),
            CoordinatorError::Taken(_) => tonic::Status::already_exists(e.to_string()),
            CoordinatorError::Store { .. } => tonic::Status::unavailable(e.to_string()),
            CoordinatorError::State { .. } => tonic::Status::failed_precondition(e.to_string()),
        }
    }
}
