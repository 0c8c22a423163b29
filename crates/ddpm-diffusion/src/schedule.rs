//! Beta schedules and the quantities derived from them, in float64 as the official
//! implementation computes them (they are cast to the data's dtype when used).

use crate::{DiffusionError, Result};
use ddpm_config::{DiffusionConfig, ScheduleKind};

/// Linear betas from `start` to `end` inclusive over `n` steps (numpy `linspace` semantics).
pub fn linear_betas(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    let mut b: Vec<f64> = (0..n).map(|i| start + step * i as f64).collect();
    b[n - 1] = end;
    b
}

/// Cosine schedule of Nichol & Dhariwal (2021): alpha-bar(t) = cos^2(((t/T)+s)/(1+s) * pi/2)
/// with s = 0.008 and each beta capped at 0.999.
pub fn cosine_betas(n: usize) -> Vec<f64> {
    let alpha_bar = |u: f64| {
        ((u + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
        })
        .collect()
}

/// Every per-timestep coefficient of the forward process and its posterior (index = t, 0-based).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// beta_t.
    pub betas: Vec<f64>,
    /// alpha-bar_t = prod_{s<=t} (1 - beta_s).
    pub alphas_cumprod: Vec<f64>,
    /// alpha-bar_{t-1}, with alpha-bar_{-1} = 1.
    pub alphas_cumprod_prev: Vec<f64>,
    /// sqrt(alpha-bar_t).
    pub sqrt_alphas_cumprod: Vec<f64>,
    /// sqrt(1 - alpha-bar_t).
    pub sqrt_one_minus_alphas_cumprod: Vec<f64>,
    /// log(1 - alpha-bar_t).
    pub log_one_minus_alphas_cumprod: Vec<f64>,
    /// 1 / sqrt(alpha-bar_t).
    pub sqrt_recip_alphas_cumprod: Vec<f64>,
    /// sqrt(1 / alpha-bar_t - 1).
    pub sqrt_recipm1_alphas_cumprod: Vec<f64>,
    /// beta-tilde_t = beta_t (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t).
    pub posterior_variance: Vec<f64>,
    /// log beta-tilde_t with the t = 0 entry (which is 0) replaced by beta-tilde_1.
    pub posterior_log_variance_clipped: Vec<f64>,
    /// Coefficient of x_0 in the posterior mean mu-tilde.
    pub posterior_mean_coef1: Vec<f64>,
    /// Coefficient of x_t in the posterior mean mu-tilde.
    pub posterior_mean_coef2: Vec<f64>,
    /// log of the fixed-large variance: log(append(beta-tilde_1, beta_1..)).
    pub fixedlarge_log_variance: Vec<f64>,
}

impl Schedule {
    /// Builds the schedule described by a `[diffusion]` config section.
    pub fn from_config(c: &DiffusionConfig) -> Result<Self> {
        let n = usize::try_from(c.num_timesteps)
            .ok()
            .filter(|&n| n >= 2)
            .ok_or_else(|| DiffusionError::InvalidArgument {
                name: "num_timesteps",
                reason: format!("expected >= 2, got {}", c.num_timesteps),
            })?;
        let betas = match c.schedule {
            ScheduleKind::Linear => linear_betas(c.beta_start, c.beta_end, n),
            ScheduleKind::Cosine => cosine_betas(n),
        };
        Self::from_betas(betas)
    }

    /// Derives every quantity from a list of betas, each in (0, 1).
    pub fn from_betas(betas: Vec<f64>) -> Result<Self> {
        if betas.len() < 2 || betas.iter().any(|&b| !(b > 0.0 && b < 1.0)) {
            return Err(DiffusionError::InvalidArgument {
                name: "betas",
                reason: "expected at least two betas, each in (0, 1)".into(),
            });
        }
        let n = betas.len();
        let mut acp = Vec::with_capacity(n);
        let mut prod = 1.0f64;
        for b in &betas {
            prod *= 1.0 - b;
            acp.push(prod);
        }
        let mut acp_prev = vec![1.0];
        acp_prev.extend_from_slice(&acp[..n - 1]);
        let map = |f: &dyn Fn(usize) -> f64| (0..n).map(f).collect::<Vec<f64>>();
        let posterior_variance = map(&|i| betas[i] * (1.0 - acp_prev[i]) / (1.0 - acp[i]));
        let posterior_log_variance_clipped = map(&|i| {
            let v = if i == 0 {
                posterior_variance[1]
            } else {
                posterior_variance[i]
            };
            v.ln()
        });
        let fixedlarge_log_variance = map(&|i| {
            let v = if i == 0 {
                posterior_variance[1]
            } else {
                betas[i]
            };
            v.ln()
        });
        Ok(Self {
            sqrt_alphas_cumprod: map(&|i| acp[i].sqrt()),
            sqrt_one_minus_alphas_cumprod: map(&|i| (1.0 - acp[i]).sqrt()),
            log_one_minus_alphas_cumprod: map(&|i| (1.0 - acp[i]).ln()),
            sqrt_recip_alphas_cumprod: map(&|i| (1.0 / acp[i]).sqrt()),
            sqrt_recipm1_alphas_cumprod: map(&|i| (1.0 / acp[i] - 1.0).sqrt()),
            posterior_mean_coef1: map(&|i| betas[i] * acp_prev[i].sqrt() / (1.0 - acp[i])),
            posterior_mean_coef2: map(&|i| {
                (1.0 - acp_prev[i]) * (1.0 - betas[i]).sqrt() / (1.0 - acp[i])
            }),
            posterior_variance,
            posterior_log_variance_clipped,
            fixedlarge_log_variance,
            alphas_cumprod_prev: acp_prev,
            alphas_cumprod: acp,
            betas,
        })
    }

    /// Number of diffusion steps T.
    pub fn num_timesteps(&self) -> usize {
        self.betas.len()
    }
}
