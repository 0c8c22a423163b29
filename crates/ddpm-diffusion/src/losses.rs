//! The training objectives of the paper's Table 2.

use crate::likelihood::{discretized_gaussian_log_likelihood, mean_flat, normal_kl, LN_2};
use crate::GaussianDiffusion;
use ddpm_config::{LossKind, MeanType, VarType};
use tch::Tensor;

impl GaussianDiffusion {
    /// One term of the variational bound in bits/dim per example: KL(q(x_{t-1}|x_t,x_0) ||
    /// p(x_{t-1}|x_t)) for t > 0 and the discretized decoder NLL -log p(x_0|x_1) at t = 0.
    pub fn vb_terms_bpd(
        &self,
        model_output: &Tensor,
        x_start: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
        clip_denoised: bool,
    ) -> (Tensor, Tensor) {
        let (true_mean, _, true_log_var) = self.q_posterior(x_start, x_t, t);
        let p = self.p_mean_variance(model_output, x_t, t, clip_denoised);
        let kl = mean_flat(&normal_kl(
            &true_mean,
            &true_log_var,
            &p.mean,
            &p.log_variance,
        )) / LN_2;
        let nll = -mean_flat(&discretized_gaussian_log_likelihood(
            x_start,
            &p.mean,
            &(&p.log_variance * 0.5),
        )) / LN_2;
        let at_zero = t.eq(0).to_device(kl.device());
        (nll.where_self(&at_zero, &kl), p.pred_xstart)
    }

    /// Per-example training loss at timesteps `t` with the given noise (Algorithm 1 for
    /// eps + mse). `model` maps (x_t, t) to the network output.
    ///
    /// * `mse`: mean squared error against the parameterisation's target: eps (L_simple),
    ///   x_0, or the posterior mean mu-tilde (the paper's ||mu-tilde - mu_theta||^2 baseline).
    /// * `kl`: the variational bound term L_{t-1} (or L_0 at t = 0) in bits/dim, which also
    ///   trains a learned variance.
    pub fn training_losses<F>(
        &self,
        model: F,
        x_start: &Tensor,
        t: &Tensor,
        noise: &Tensor,
    ) -> Tensor
    where
        F: FnOnce(&Tensor, &Tensor) -> Tensor,
    {
        let x_t = self.q_sample(x_start, t, noise);
        let out = model(&x_t, t);
        match self.loss_type {
            LossKind::Kl => self.vb_terms_bpd(&out, x_start, &x_t, t, false).0,
            LossKind::Mse => {
                debug_assert!(
                    self.var_type != VarType::Learned,
                    "config validation rejects mse + learned"
                );
                let (out, _) = self.split_output(&out, &x_t);
                let target = match self.mean_type {
                    MeanType::Eps => noise.shallow_clone(),
                    MeanType::Xstart => x_start.shallow_clone(),
                    MeanType::Xprev => self.q_posterior(x_start, &x_t, t).0,
                };
                mean_flat(&(target - out).square())
            }
        }
    }
}
