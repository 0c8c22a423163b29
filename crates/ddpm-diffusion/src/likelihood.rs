//! Closed-form log-likelihood pieces of the variational bound (as in the official code).

use tch::Tensor;

/// KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.
pub fn normal_kl(mean1: &Tensor, logvar1: &Tensor, mean2: &Tensor, logvar2: &Tensor) -> Tensor {
    ((logvar2 - logvar1) - 1.0
        + (logvar1 - logvar2).exp()
        + (mean1 - mean2).square() * (-logvar2).exp())
        * 0.5
}

/// A fast approximation of the standard normal CDF (the tanh approximation of the paper's code).
pub fn approx_standard_normal_cdf(x: &Tensor) -> Tensor {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    ((x + x.pow_tensor_scalar(3) * 0.044715) * c)
        .tanh()
        .g_add_scalar(1.0)
        * 0.5
}

/// Log-likelihood of data `x` (uint8 values scaled to [-1, 1]) under a Gaussian discretized to
/// the 256 bins of width 2/255, with the edge bins extended to infinity (the paper's decoder
/// L_0). Elementwise, in nats.
pub fn discretized_gaussian_log_likelihood(
    x: &Tensor,
    means: &Tensor,
    log_scales: &Tensor,
) -> Tensor {
    let centered = x - means;
    let inv_stdv = (-log_scales).exp();
    let cdf_plus = approx_standard_normal_cdf(&(&inv_stdv * (&centered + 1.0 / 255.0)));
    let cdf_min = approx_standard_normal_cdf(&(&inv_stdv * (&centered - 1.0 / 255.0)));
    let log_cdf_plus = cdf_plus.clamp_min(1e-12).log();
    let log_one_minus_cdf_min = (cdf_min.neg() + 1.0).clamp_min(1e-12).log();
    let cdf_delta = cdf_plus - cdf_min;
    let log_delta = cdf_delta.clamp_min(1e-12).log();
    let upper = log_one_minus_cdf_min.where_self(&x.gt(0.999), &log_delta);
    log_cdf_plus.where_self(&x.lt(-0.999), &upper)
}

/// Mean over all dimensions except the first (batch) one.
pub fn mean_flat(x: &Tensor) -> Tensor {
    if x.dim() <= 1 {
        return x.shallow_clone();
    }
    let dims: Vec<i64> = (1..x.dim() as i64).collect();
    x.mean_dim(dims.as_slice(), false, x.kind())
}

/// Natural log of 2, to turn nats into bits.
pub const LN_2: f64 = std::f64::consts::LN_2;
