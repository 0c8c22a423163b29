//! The evaluator: for every committed checkpoint of a run (every `eval.every_steps`), it
//! samples `eval.num_samples` images from the EMA weights, feeds them to Inception as they
//! come, and writes `<checkpoint root>/<run>/eval/step-<N>.json` (FID, IS, sampler, time) with
//! a grid PNG beside it. The JSON is written last, in one put: a checkpoint without it is
//! (re-)evaluated by the next evaluator to start, so a stop mid-evaluation loses nothing and
//! no result is half-written.

mod evaluate;
mod grid;

pub use evaluate::{EvalResult, Evaluator};
pub use grid::grid_png;

/// Errors of the evaluator; each names the key, file, checkpoint or step at fault.
#[derive(Debug, thiserror::Error)]
pub enum EvaluatorError {
    /// The config lacks what the evaluator needs; the message names the key.
    #[error("{key}: {reason}")]
    Config {
        /// The dotted config key.
        key: String,
        /// What was expected.
        reason: String,
    },
    /// The checkpoint store failed.
    #[error("checkpoints: {0}")]
    Checkpoint(#[from] ddpm_checkpoint::CheckpointError),
    /// Inception, the statistics or the metric failed.
    #[error(transparent)]
    Eval(#[from] ddpm_eval::EvalError),
    /// Sampling or the model failed.
    #[error("step {step}: {reason}")]
    Step {
        /// The checkpoint's step.
        step: u64,
        /// What went wrong.
        reason: String,
    },
    /// A stop was asked for mid-evaluation; nothing was written.
    #[error("stopped during the evaluation of step {0}; nothing was written for it")]
    Interrupted(u64),
    /// A libtorch error.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result alias for this crate.
pub type Result<T, E = EvaluatorError> = std::result::Result<T, E>;
