//! Samplers: ancestral (Algorithm 2), progressive x_0 predictions, DDIM and interpolation.

use crate::{DiffusionError, GaussianDiffusion, Result};
use tch::Tensor;

/// Draws noise of a given shape; samplers take one so callers control the randomness.
pub type NoiseFn<'a> = dyn FnMut(&[i64]) -> Tensor + 'a;

/// DDIM's sub-sequence tau_i = floor(i T / S) for i = 0..S-1, ascending (visit it reversed).
pub fn ddim_timesteps(num_timesteps: i64, steps: i64) -> Result<Vec<i64>> {
    if steps < 1 || steps > num_timesteps {
        return Err(DiffusionError::InvalidArgument {
            name: "steps",
            reason: format!("DDIM steps must be in 1..={num_timesteps}, got {steps}"),
        });
    }
    Ok((0..steps).map(|i| i * num_timesteps / steps).collect())
}

fn batch_mask(t: &Tensor, like: &Tensor) -> Tensor {
    let mut shape = vec![t.size()[0]];
    shape.extend(std::iter::repeat_n(1, like.dim() - 1));
    t.ne(0)
        .to_kind(like.kind())
        .to_device(like.device())
        .view(shape.as_slice())
}

impl GaussianDiffusion {
    /// One ancestral step: x_{t-1} = mu_theta + sigma_t z (no noise at t = 0).
    /// Returns (x_{t-1}, predicted x_0).
    pub fn p_sample(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
        noise: &Tensor,
        clip_denoised: bool,
    ) -> (Tensor, Tensor) {
        let p = self.p_mean_variance(model_output, x_t, t, clip_denoised);
        let x_prev = p.mean + batch_mask(t, x_t) * (p.log_variance * 0.5).exp() * noise;
        (x_prev, p.pred_xstart)
    }

    /// Algorithm 2: runs the reverse process from `x_t` at timestep `start` (T-1 for a full
    /// sample) down to 0. `on_step(t, x_{t-1}, pred_x0)` sees every step.
    pub fn sample_ancestral_from(
        &self,
        model: &mut dyn FnMut(&Tensor, &Tensor) -> Tensor,
        x_t: Tensor,
        start: i64,
        clip_denoised: bool,
        noise: &mut NoiseFn,
        on_step: &mut dyn FnMut(i64, &Tensor, &Tensor),
    ) -> Result<Tensor> {
        if start < 0 || start >= self.num_timesteps() {
            return Err(DiffusionError::InvalidArgument {
                name: "start",
                reason: format!(
                    "expected a timestep in [0, {}), got {start}",
                    self.num_timesteps()
                ),
            });
        }
        let _guard = tch::no_grad_guard();
        let n = x_t.size()[0];
        let mut x = x_t;
        for i in (0..=start).rev() {
            let t = self.timesteps_like(i, n);
            let out = model(&x, &t);
            let z = noise(&x.size());
            let (next, x0) = self.p_sample(&out, &x, &t, &z, clip_denoised);
            on_step(i, &next, &x0);
            x = next;
        }
        Ok(x)
    }

    /// Algorithm 2 from x_T (e.g. standard normal noise).
    pub fn sample_ancestral(
        &self,
        model: &mut dyn FnMut(&Tensor, &Tensor) -> Tensor,
        x_last: Tensor,
        clip_denoised: bool,
        noise: &mut NoiseFn,
        on_step: &mut dyn FnMut(i64, &Tensor, &Tensor),
    ) -> Result<Tensor> {
        self.sample_ancestral_from(
            model,
            x_last,
            self.num_timesteps() - 1,
            clip_denoised,
            noise,
            on_step,
        )
    }

    /// Progressive generation (the paper's Fig. 6): samples from `x_last` and keeps the
    /// predicted x_0 at each timestep in `record_at`. Returns the samples and
    /// `(t, pred_x0)` in the order visited (high t first).
    pub fn sample_progressive(
        &self,
        model: &mut dyn FnMut(&Tensor, &Tensor) -> Tensor,
        x_last: Tensor,
        record_at: &[i64],
        clip_denoised: bool,
        noise: &mut NoiseFn,
        on_step: &mut dyn FnMut(i64),
    ) -> Result<(Tensor, Vec<(i64, Tensor)>)> {
        let mut kept = Vec::new();
        let x = self.sample_ancestral(model, x_last, clip_denoised, noise, &mut |t, _, x0| {
            if record_at.contains(&t) {
                kept.push((t, x0.copy()));
            }
            on_step(t);
        })?;
        Ok((x, kept))
    }

    /// One DDIM step from timestep `t` to `t_prev` (`None`: to alpha-bar = 1, i.e. x_0).
    /// `noise` is used only when `eta > 0`. Returns (x_prev, predicted x_0).
    #[allow(clippy::too_many_arguments)]
    pub fn ddim_step(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: i64,
        t_prev: Option<i64>,
        eta: f64,
        clip_denoised: bool,
        noise: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let tt = self.timesteps_like(t, x_t.size()[0]);
        let eps = self.model_eps(model_output, x_t, &tt);
        let a_t = self.alphas_cumprod_at(t);
        let a_prev = t_prev.map_or(1.0, |p| self.alphas_cumprod_at(p));
        let mut x0 = (x_t - &eps * (1.0 - a_t).sqrt()) / a_t.sqrt();
        if clip_denoised {
            x0 = x0.clamp(-1.0, 1.0);
        }
        let sigma = eta
            * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
                .max(0.0)
                .sqrt();
        let dir = eps * (1.0 - a_prev - sigma * sigma).max(0.0).sqrt();
        let mut x_prev = &x0 * a_prev.sqrt() + dir;
        if eta > 0.0 {
            let z = noise.ok_or(DiffusionError::InvalidArgument {
                name: "noise",
                reason: "a DDIM step with eta > 0 needs noise".into(),
            })?;
            x_prev += z * sigma;
        }
        Ok((x_prev, x0))
    }

    /// DDIM sampling (Song et al. 2021) over `steps` timesteps tau_i = floor(i T / S).
    #[allow(clippy::too_many_arguments)]
    pub fn sample_ddim(
        &self,
        model: &mut dyn FnMut(&Tensor, &Tensor) -> Tensor,
        x_last: Tensor,
        steps: i64,
        eta: f64,
        clip_denoised: bool,
        noise: &mut NoiseFn,
        on_step: &mut dyn FnMut(i64, &Tensor, &Tensor),
    ) -> Result<Tensor> {
        let taus = ddim_timesteps(self.num_timesteps(), steps)?;
        let _guard = tch::no_grad_guard();
        let n = x_last.size()[0];
        let mut x = x_last;
        for k in (0..taus.len()).rev() {
            let t = taus[k];
            let t_prev = if k == 0 { None } else { Some(taus[k - 1]) };
            let out = model(&x, &self.timesteps_like(t, n));
            let z = (eta > 0.0).then(|| noise(&x.size()));
            let (next, x0) = self.ddim_step(&out, &x, t, t_prev, eta, clip_denoised, z.as_ref())?;
            on_step(t, &next, &x0);
            x = next;
        }
        Ok(x)
    }

    /// Interpolation in latent space (Sec. 4.4, Fig. 8): encodes `x_a` and `x_b` (each `[1, C, H, W]`)
    /// to step `t` (1..=T) with q, mixes `(1 - lambda) x_t + lambda x'_t` for every lambda,
    /// and decodes the mixtures with the reverse process from `t`. The reverse-process noise
    /// is shared across lambdas, so the rows differ only through the mixture.
    #[allow(clippy::too_many_arguments)]
    pub fn interpolate(
        &self,
        model: &mut dyn FnMut(&Tensor, &Tensor) -> Tensor,
        x_a: &Tensor,
        x_b: &Tensor,
        t: i64,
        lambdas: &[f64],
        clip_denoised: bool,
        noise: &mut NoiseFn,
        on_step: &mut dyn FnMut(i64),
    ) -> Result<Tensor> {
        if t < 1 || t > self.num_timesteps() {
            return Err(DiffusionError::InvalidArgument {
                name: "t",
                reason: format!(
                    "interpolation step must be in 1..={}, got {t}",
                    self.num_timesteps()
                ),
            });
        }
        if x_a.size() != x_b.size() || x_a.dim() != 4 || x_a.size()[0] != 1 {
            return Err(DiffusionError::InvalidArgument {
                name: "x_a, x_b",
                reason: format!(
                    "expected two [1, C, H, W] images, got {:?} and {:?}",
                    x_a.size(),
                    x_b.size()
                ),
            });
        }
        if lambdas.is_empty() {
            return Err(DiffusionError::InvalidArgument {
                name: "lambdas",
                reason: "expected at least one lambda".into(),
            });
        }
        let _guard = tch::no_grad_guard();
        let shape = x_a.size();
        let t_enc = self.timesteps_like(t - 1, 1);
        let xa_t = self.q_sample(x_a, &t_enc, &noise(&shape));
        let xb_t = self.q_sample(x_b, &t_enc, &noise(&shape));
        let lam = Tensor::from_slice(lambdas)
            .to_kind(x_a.kind())
            .to_device(x_a.device())
            .view([lambdas.len() as i64, 1, 1, 1]);
        let mixed = xa_t * (lam.neg() + 1.0) + xb_t * lam;
        let l = lambdas.len() as i64;
        let mut shared =
            |s: &[i64]| noise(&[1, s[1], s[2], s[3]]).expand([l, s[1], s[2], s[3]], false);
        self.sample_ancestral_from(
            model,
            mixed,
            t - 1,
            clip_denoised,
            &mut shared,
            &mut |i, _, _| on_step(i),
        )
    }
}
