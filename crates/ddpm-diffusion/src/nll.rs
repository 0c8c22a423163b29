//! Negative log-likelihood in bits/dim: every term of the variational bound plus the prior.

use crate::likelihood::{mean_flat, normal_kl, LN_2};
use crate::sampling::NoiseFn;
use crate::GaussianDiffusion;
use tch::Tensor;

/// The bound's decomposition for a batch (all in bits/dim).
#[derive(Debug)]
pub struct NllTerms {
    /// Total bound per example: sum of every term plus the prior term.
    pub total_bpd: Tensor,
    /// KL(q(x_T | x_0) || N(0, I)) per example.
    pub prior_bpd: Tensor,
    /// `[B, T]`: L_{t} for t = 0..T-1 (column t is the term at timestep t; column 0 is the
    /// decoder NLL).
    pub terms_bpd: Tensor,
    /// `[B, T]`: mean squared error of the predicted x_0 at each t.
    pub xstart_mse: Tensor,
}

impl GaussianDiffusion {
    /// The prior term KL(q(x_T | x_0) || N(0, I)) in bits/dim per example.
    pub fn prior_bpd(&self, x_start: &Tensor) -> Tensor {
        let n = x_start.size()[0];
        let t = self.timesteps_like(self.num_timesteps() - 1, n);
        let (mean, _, log_var) = self.q_mean_variance(x_start, &t);
        let zeros = Tensor::zeros_like(&mean);
        mean_flat(&normal_kl(&mean, &log_var, &zeros, &zeros)) / LN_2
    }

    /// The full variational bound in bits/dim (the paper's Table 1 "NLL Test"): every
    /// L_t, t = T-1..0, with x_t drawn from q with fresh noise, plus the prior term.
    /// `x_start` must be data on the 256-level grid scaled to [-1, 1].
    pub fn nll_bpd(
        &self,
        model: &mut dyn FnMut(&Tensor, &Tensor) -> Tensor,
        x_start: &Tensor,
        clip_denoised: bool,
        noise: &mut NoiseFn,
        on_step: &mut dyn FnMut(i64),
    ) -> NllTerms {
        let _guard = tch::no_grad_guard();
        let n = x_start.size()[0];
        let steps = self.num_timesteps();
        let mut terms: Vec<Tensor> = (0..steps).map(|_| Tensor::new()).collect();
        let mut mses: Vec<Tensor> = (0..steps).map(|_| Tensor::new()).collect();
        for i in (0..steps).rev() {
            let t = self.timesteps_like(i, n);
            let x_t = self.q_sample(x_start, &t, &noise(&x_start.size()));
            let out = model(&x_t, &t);
            let (vb, x0) = self.vb_terms_bpd(&out, x_start, &x_t, &t, clip_denoised);
            mses[i as usize] = mean_flat(&(x0 - x_start).square());
            terms[i as usize] = vb;
            on_step(i);
        }
        let terms_bpd = Tensor::stack(&terms, 1);
        let xstart_mse = Tensor::stack(&mses, 1);
        let prior_bpd = self.prior_bpd(x_start);
        let total_bpd = terms_bpd.sum_dim_intlist(1, false, terms_bpd.kind()) + &prior_bpd;
        NllTerms {
            total_bpd,
            prior_bpd,
            terms_bpd,
            xstart_mse,
        }
    }
}
