//! The Frechet distance between two Gaussians, the FID:
//! `||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))`, in float64.
//!
//! The standard tools take `scipy.linalg.sqrtm(S1 @ S2)`, a Schur-form square root of a
//! non-symmetric product that goes complex or inaccurate when the covariances are singular
//! (fewer images than 2048 dimensions) or nearly so. Only the trace of the square root is
//! needed, and `S1 S2` is similar to the symmetric positive semi-definite
//! `M = S1^(1/2) S2 S1^(1/2)`, so `Tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(M))`. Both steps
//! are symmetric eigendecompositions (LAPACK `syevd` through libtorch), which are backward
//! stable: no complex parts, no inverse, no offset added to the diagonal. Eigenvalues that
//! are below rounding level (`D * eps * largest`, or negative from rounding) are zero, so
//! the null space of a singular covariance adds nothing, instead of the square roots of
//! rounding noise.

use crate::stats::FeatureStats;
use crate::{EvalError, Result};
use tch::{Kind, Tensor};

/// The FID between two sets of statistics of the same dimension.
pub fn frechet_distance(a: &FeatureStats, b: &FeatureStats) -> Result<f64> {
    if a.dim() != b.dim() {
        return Err(EvalError::Invalid(format!(
            "the statistics have different feature dimensions: {} and {}",
            a.dim(),
            b.dim()
        )));
    }
    let diff = &a.mu - &b.mu;
    let mean_term = diff.dot(&diff).double_value(&[]);
    let traces = a.sigma.trace().double_value(&[]) + b.sigma.trace().double_value(&[]);
    let fid = mean_term + traces - 2.0 * trace_sqrt_product(&a.sigma, &b.sigma)?;
    if !fid.is_finite() {
        return Err(EvalError::Invalid(format!(
            "the Frechet distance is not finite ({fid})"
        )));
    }
    Ok(fid)
}

/// `Tr((s1 s2)^(1/2))` for symmetric positive semi-definite `s1`, `s2`.
pub fn trace_sqrt_product(s1: &Tensor, s2: &Tensor) -> Result<f64> {
    let s1 = symmetric(s1);
    let (w, v) = s1.f_linalg_eigh("L")?;
    let root = &v * clamp_to_rank(&w).sqrt().unsqueeze(0);
    let root = root.matmul(&v.tr());
    let m = symmetric(&root.matmul(&symmetric(s2)).matmul(&root));
    let lambda = m.f_linalg_eigvalsh("L")?;
    Ok(clamp_to_rank(&lambda)
        .sqrt()
        .sum(Kind::Double)
        .double_value(&[]))
}

fn symmetric(s: &Tensor) -> Tensor {
    let s = s.to_kind(Kind::Double);
    (&s + s.tr()) / 2.0
}

/// Eigenvalues below rounding level (relative to the largest) set to zero.
fn clamp_to_rank(w: &Tensor) -> Tensor {
    let n = w.size()[0] as f64;
    let largest = w.abs().max().double_value(&[]);
    let floor = n * f64::EPSILON * largest;
    w.where_self(&w.gt(floor), &w.zeros_like())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn stats(mu: &[f64], sigma: Tensor) -> FeatureStats {
        FeatureStats::new(Tensor::from_slice(mu), sigma, "test").unwrap()
    }

    #[test]
    fn diagonal_covariances_have_the_closed_form() {
        // Tr((S1 S2)^(1/2)) = sum sqrt(a_i b_i) for diagonal S1, S2.
        let a = [1.0, 4.0, 9.0];
        let b = [4.0, 1.0, 0.0];
        let s1 = Tensor::from_slice(&a).diag(0);
        let s2 = Tensor::from_slice(&b).diag(0);
        let fid = frechet_distance(&stats(&[0.0, 1.0, 2.0], s1), &stats(&[1.0, 1.0, 0.0], s2));
        let expected = 1.0 + 4.0 + (14.0 + 5.0) - 2.0 * (2.0 + 2.0 + 0.0);
        assert!((fid.unwrap() - expected).abs() < 1e-12);
    }

    #[test]
    fn identical_singular_statistics_are_at_distance_zero() {
        let x = Tensor::randn([3, 64], (Kind::Double, Device::Cpu));
        let s = x.tr().matmul(&x) / 3.0; // rank 3 of 64
        let mu: Vec<f64> = vec![0.5; 64];
        let fid = frechet_distance(&stats(&mu, s.copy()), &stats(&mu, s)).unwrap();
        assert!(fid.abs() < 1e-9, "{fid}");
    }

    #[test]
    fn different_dimensions_are_refused() {
        let a = stats(&[0.0, 0.0], Tensor::eye(2, (Kind::Double, Device::Cpu)));
        let b = stats(&[0.0; 3], Tensor::eye(3, (Kind::Double, Device::Cpu)));
        let err = frechet_distance(&a, &b).unwrap_err().to_string();
        assert!(err.contains("2 and 3"), "{err}");
    }
}
