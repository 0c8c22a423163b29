//! The crate's error type and the context helpers its modules use.

use std::fmt::Display;

/// Errors of a worker, each naming what failed (file, key, checkpoint, peer, step).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// An operation failed; `context` says which, `source` why. Printed with its chain
    /// (`{:#}` through anyhow) the message reads "context: cause".
    #[error("{context}")]
    Context {
        /// What was being done.
        context: String,
        /// The failure underneath.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A value or state that cannot be used, with what was expected.
    #[error("{0}")]
    Invalid(String),
    /// Checkpoint store.
    #[error(transparent)]
    Checkpoint(#[from] ddpm_checkpoint::CheckpointError),
    /// Dataset reading.
    #[error(transparent)]
    Data(#[from] ddpm_data::DataError),
    /// The training step.
    #[error(transparent)]
    Train(#[from] ddpm_trainer::TrainError),
    /// A collective operation (all-reduce, broadcast) failed or timed out.
    #[error(transparent)]
    Collective(#[from] ddpm_collective::CollectiveError),
    /// The resolved config did not parse or validate.
    #[error(transparent)]
    Config(#[from] ddpm_config::ConfigError),
    /// libtorch.
    #[error(transparent)]
    Tch(#[from] tch::TchError),
    /// The token or TLS files to reach the coordinator with cannot be used.
    #[error(transparent)]
    Auth(#[from] ddpm_auth::AuthError),
    /// The ring of this generation cannot go on (a peer died or hung, or the coordinator
    /// moved the run to another generation): the worker registers again and trains on in
    /// the next generation.
    #[error("{0}")]
    Reform(String),
    /// The coordinator refused a request or could not be reached.
    #[error("coordinator {what}: {status}")]
    Rpc {
        /// The call, e.g. "Register".
        what: String,
        /// Its status (code and message).
        status: Box<tonic::Status>,
    },
}

impl WorkerError {
    /// Whether the worker should register again and go on in the next generation, rather
    /// than stop: the coordinator moved the run on, or a collective failed because of a
    /// peer (it died, hung, or belongs to another generation). A collective used wrongly
    /// by this process is not, nor a backend this host cannot run (`Unavailable`).
    ///
    /// NCCL cannot say which peer failed, and an NCCL or CUDA error leaves the
    /// communicator aborted: its timeouts, aborts and errors (`GroupTimeout`,
    /// `GroupAborted`, `Backend`) all need a new communicator, that is a new generation.
    /// A cause on this host that repeats is bounded by [`crate::run::MAX_FRUITLESS_GENERATIONS`].
    pub fn needs_reform(&self) -> bool {
        use ddpm_collective::CollectiveError as C;
        match self {
            WorkerError::Reform(_) => true,
            WorkerError::Collective(c) => matches!(
                c,
                C::Timeout { .. }
                    | C::Peer { .. }
                    | C::Aborted { .. }
                    | C::Mismatch { .. }
                    | C::GroupTimeout { .. }
                    | C::GroupAborted { .. }
                    | C::Backend { .. }
            ),
            _ => false,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

/// `e` and its sources, joined by ": " (the whole story of a wrapped error).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

/// Adds what was being done to an error, as anyhow's `Context` does.
pub trait Context<T> {
    /// Wraps the error with `context`.
    fn context(self, context: impl Display) -> Result<T>;
    /// Wraps the error with the context `f` builds (only on failure).
    fn with_context<D: Display>(self, f: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl Display) -> Result<T> {
        self.map_err(|e| WorkerError::Context {
            context: context.to_string(),
            source: Box::new(e),
        })
    }

    fn with_context<D: Display>(self, f: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| WorkerError::Context {
            context: f().to_string(),
            source: Box::new(e),
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, context: impl Display) -> Result<T> {
        self.ok_or_else(|| WorkerError::Invalid(context.to_string()))
    }

    fn with_context<D: Display>(self, f: impl FnOnce() -> D) -> Result<T> {
        self.ok_or_else(|| WorkerError::Invalid(f().to_string()))
    }
}

/// Returns [`WorkerError::Invalid`] with the formatted message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::WorkerError::Invalid(format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure;
