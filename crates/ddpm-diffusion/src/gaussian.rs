//! The forward process q, its posterior, and the model's reverse distribution p_theta.

use crate::schedule::Schedule;
use crate::Result;
use ddpm_config::{DiffusionConfig, LossKind, MeanType, VarType};
use tch::{Device, Kind, Tensor};

/// Per-timestep coefficients as float64 tensors on the model's device.
#[derive(Debug)]
struct Coefficients {
    betas: Tensor,
    sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor,
    log_one_minus_alphas_cumprod: Tensor,
    sqrt_recip_alphas_cumprod: Tensor,
    sqrt_recipm1_alphas_cumprod: Tensor,
    posterior_variance: Tensor,
    posterior_log_variance_clipped: Tensor,
    posterior_mean_coef1: Tensor,
    posterior_mean_coef2: Tensor,
    fixedlarge_log_variance: Tensor,
}

/// The model's reverse distribution p_theta(x_{t-1} | x_t) and its x_0 estimate.
#[derive(Debug)]
pub struct ModelPrediction {
    /// mu_theta(x_t, t).
    pub mean: Tensor,
    /// sigma_t^2 (broadcastable to x_t).
    pub variance: Tensor,
    /// log sigma_t^2 (broadcastable to x_t).
    pub log_variance: Tensor,
    /// The model's estimate of x_0 (clipped to [-1, 1] when asked).
    pub pred_xstart: Tensor,
}

/// A Gaussian diffusion process with a chosen parameterisation and objective.
#[derive(Debug)]
pub struct GaussianDiffusion {
    schedule: Schedule,
    /// What the network predicts.
    pub mean_type: MeanType,
    /// The reverse-process variance.
    pub var_type: VarType,
    /// The training loss.
    pub loss_type: LossKind,
    device: Device,
    c: Coefficients,
}

impl GaussianDiffusion {
    /// Builds the process of a `[diffusion]` config section with coefficients on `device`.
    pub fn new(config: &DiffusionConfig, device: Device) -> Result<Self> {
        let schedule = Schedule::from_config(config)?;
        Ok(Self::from_schedule(
            schedule,
            config.model_mean_type,
            config.model_var_type,
            config.loss_type,
            device,
        ))
    }

    /// Builds the process from an explicit schedule.
    pub fn from_schedule(
        schedule: Schedule,
        mean_type: MeanType,
        var_type: VarType,
        loss_type: LossKind,
        device: Device,
    ) -> Self {
        let t = |v: &[f64]| Tensor::from_slice(v).to_device(device);
        let s = &schedule;
        let c = Coefficients {
            betas: t(&s.betas),
            sqrt_alphas_cumprod: t(&s.sqrt_alphas_cumprod),
            sqrt_one_minus_alphas_cumprod: t(&s.sqrt_one_minus_alphas_cumprod),
            log_one_minus_alphas_cumprod: t(&s.log_one_minus_alphas_cumprod),
            sqrt_recip_alphas_cumprod: t(&s.sqrt_recip_alphas_cumprod),
            sqrt_recipm1_alphas_cumprod: t(&s.sqrt_recipm1_alphas_cumprod),
            posterior_variance: t(&s.posterior_variance),
            posterior_log_variance_clipped: t(&s.posterior_log_variance_clipped),
            posterior_mean_coef1: t(&s.posterior_mean_coef1),
            posterior_mean_coef2: t(&s.posterior_mean_coef2),
            fixedlarge_log_variance: t(&s.fixedlarge_log_variance),
        };
        Self {
            schedule,
            mean_type,
            var_type,
            loss_type,
            device,
            c,
        }
    }

    /// The float64 schedule.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Number of diffusion steps T.
    pub fn num_timesteps(&self) -> i64 {
        self.schedule.num_timesteps() as i64
    }

    /// Device the coefficients live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Gathers `a[t]` cast to `like`'s dtype, shaped `[B, 1, 1, ...]` to broadcast over `like`.
    pub(crate) fn extract(&self, a: &Tensor, t: &Tensor, like: &Tensor) -> Tensor {
        let b = t.size()[0];
        let mut shape = vec![b];
        shape.extend(std::iter::repeat_n(1, like.dim().saturating_sub(1)));
        a.index_select(0, &t.to_device(a.device()).to_kind(Kind::Int64))
            .to_kind(like.kind())
            .to_device(like.device())
            .view(shape.as_slice())
    }

    /// Mean, variance and log variance of q(x_t | x_0); the variances are `[B, 1, 1, ...]`
    /// and broadcast over x_0.
    pub fn q_mean_variance(&self, x_start: &Tensor, t: &Tensor) -> (Tensor, Tensor, Tensor) {
        let mean = self.extract(&self.c.sqrt_alphas_cumprod, t, x_start) * x_start;
        let var = self
            .extract(&self.c.sqrt_one_minus_alphas_cumprod, t, x_start)
            .square();
        let log_var = self.extract(&self.c.log_one_minus_alphas_cumprod, t, x_start);
        (mean, var, log_var)
    }

    /// Samples x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with the given noise.
    pub fn q_sample(&self, x_start: &Tensor, t: &Tensor, noise: &Tensor) -> Tensor {
        self.extract(&self.c.sqrt_alphas_cumprod, t, x_start) * x_start
            + self.extract(&self.c.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
    }

    /// Mean, variance and clipped log variance of the posterior q(x_{t-1} | x_t, x_0).
    pub fn q_posterior(
        &self,
        x_start: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
    ) -> (Tensor, Tensor, Tensor) {
        let mean = self.extract(&self.c.posterior_mean_coef1, t, x_t) * x_start
            + self.extract(&self.c.posterior_mean_coef2, t, x_t) * x_t;
        let var = self.extract(&self.c.posterior_variance, t, x_t);
        let log_var = self.extract(&self.c.posterior_log_variance_clipped, t, x_t);
        (mean, var, log_var)
    }

    /// x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).
    pub fn predict_xstart_from_eps(&self, x_t: &Tensor, t: &Tensor, eps: &Tensor) -> Tensor {
        self.extract(&self.c.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self.extract(&self.c.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    }

    /// eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1).
    pub fn predict_eps_from_xstart(&self, x_t: &Tensor, t: &Tensor, x_start: &Tensor) -> Tensor {
        (self.extract(&self.c.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x_start)
            / self.extract(&self.c.sqrt_recipm1_alphas_cumprod, t, x_t)
    }

    /// Inverts the posterior mean: x_0 = (mu-tilde - coef2 x_t) / coef1.
    pub fn predict_xstart_from_xprev(&self, x_t: &Tensor, t: &Tensor, xprev: &Tensor) -> Tensor {
        (xprev - self.extract(&self.c.posterior_mean_coef2, t, x_t) * x_t)
            / self.extract(&self.c.posterior_mean_coef1, t, x_t)
    }

    /// Splits a network output into its mean part and, for a learned variance, the log variance.
    pub fn split_output(&self, model_output: &Tensor, x_t: &Tensor) -> (Tensor, Option<Tensor>) {
        let c = x_t.size()[1];
        match self.var_type {
            VarType::Learned => {
                let parts = model_output.split_with_sizes([c, c], 1);
                (parts[0].shallow_clone(), Some(parts[1].shallow_clone()))
            }
            _ => (model_output.shallow_clone(), None),
        }
    }

    /// The model's p(x_{t-1} | x_t) from its raw output, as in the official implementation.
    pub fn p_mean_variance(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &Tensor,
        clip_denoised: bool,
    ) -> ModelPrediction {
        let (out, learned_log_var) = self.split_output(model_output, x_t);
        let (variance, log_variance) = match (self.var_type, learned_log_var) {
            (VarType::Learned, Some(lv)) => (lv.exp(), lv),
            (VarType::Fixedsmall, _) => (
                self.extract(&self.c.posterior_variance, t, x_t),
                self.extract(&self.c.posterior_log_variance_clipped, t, x_t),
            ),
            _ => (
                self.extract(&self.c.betas, t, x_t),
                self.extract(&self.c.fixedlarge_log_variance, t, x_t),
            ),
        };
        let clip = |x: Tensor| if clip_denoised { x.clamp(-1.0, 1.0) } else { x };
        let (mean, pred_xstart) = match self.mean_type {
            MeanType::Xprev => (
                out.shallow_clone(),
                clip(self.predict_xstart_from_xprev(x_t, t, &out)),
            ),
            MeanType::Xstart => {
                let x0 = clip(out);
                (self.q_posterior(&x0, x_t, t).0, x0)
            }
            MeanType::Eps => {
                let x0 = clip(self.predict_xstart_from_eps(x_t, t, &out));
                (self.q_posterior(&x0, x_t, t).0, x0)
            }
        };
        ModelPrediction {
            mean,
            variance,
            log_variance,
            pred_xstart,
        }
    }

    /// The model's epsilon estimate whatever it parameterises (used by DDIM).
    pub fn model_eps(&self, model_output: &Tensor, x_t: &Tensor, t: &Tensor) -> Tensor {
        let (out, _) = self.split_output(model_output, x_t);
        match self.mean_type {
            MeanType::Eps => out,
            MeanType::Xstart => self.predict_eps_from_xstart(x_t, t, &out),
            MeanType::Xprev => {
                let x0 = self.predict_xstart_from_xprev(x_t, t, &out);
                self.predict_eps_from_xstart(x_t, t, &x0)
            }
        }
    }

    /// A vector of `n` copies of timestep `t` on the coefficients' device.
    pub fn timesteps_like(&self, t: i64, n: i64) -> Tensor {
        Tensor::full([n], t, (Kind::Int64, self.device))
    }

    pub(crate) fn alphas_cumprod_at(&self, t: i64) -> f64 {
        self.schedule.alphas_cumprod[t as usize]
    }
}
