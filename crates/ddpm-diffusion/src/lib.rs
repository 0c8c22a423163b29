//! The diffusion model of Ho, Jain & Abbeel (2020) on libtorch.
//!
//! * [`schedule`]: beta schedules and every derived quantity, computed in float64.
//! * [`GaussianDiffusion`]: q(x_t | x_0), the posterior, the model's p(x_{t-1} | x_t) for the
//!   three mean parameterisations and three variance choices, and the training objectives of
//!   the paper's Table 2 ([`GaussianDiffusion::training_losses`]).
//! * [`likelihood`]: Gaussian KL and the discretized Gaussian decoder likelihood.
//! * Samplers: ancestral (Algorithm 2), progressive x_0 predictions, DDIM, interpolation,
//!   and NLL in bits/dim ([`GaussianDiffusion::nll_bpd`]).
//!
//! The network is any `Fn(&Tensor x_t, &Tensor t) -> Tensor`; this crate does no I/O.

mod gaussian;
pub mod likelihood;
mod losses;
mod nll;
mod sampling;
pub mod schedule;

pub use gaussian::{GaussianDiffusion, ModelPrediction};
pub use nll::NllTerms;
pub use sampling::{ddim_timesteps, NoiseFn};

/// Errors raised by this crate for invalid arguments.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    /// An argument is outside its allowed range; the message names it.
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument's name.
        name: &'static str,
        /// What was expected.
        reason: String,
    },
    /// A libtorch error (shape mismatch and the like).
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result alias for this crate.
pub type Result<T, E = DiffusionError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests;
