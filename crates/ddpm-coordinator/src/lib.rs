//! The coordinator of a DDPM-RS run. This first part is the membership state: registration
//! and rank assignment, leases kept by heartbeats, and ring generations
//! ([`membership::Membership`]). The gRPC service over it, the data and checkpoint schedule,
//! and the `coordinator` binary are not built yet (issue 4). Never links tch.

pub mod membership;

/// Errors of the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A registration that cannot be admitted; nothing changed.
    #[error("{0}")]
    Refused(String),
    /// A request from a member that no longer holds its rank, or of an old generation.
    #[error("{0}")]
    Stale(String),
}
