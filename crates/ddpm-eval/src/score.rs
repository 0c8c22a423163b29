//! The Inception Score (Salimans et al. 2016): `exp(E_x KL(p(y|x) || p(y)))` over the
//! Inception classifier's softmax, computed on 10 splits of the samples and reported as the
//! splits' mean and (population) standard deviation, as the original implementation and the
//! paper's Table 1 do. The logits are the Inception head's without its bias
//! ([`crate::InceptionV3::is_logits`]), as the original code takes them.

use crate::{EvalError, Result};
use tch::{Kind, Tensor};

/// Splits of the standard Inception Score.
pub const IS_SPLITS: i64 = 10;

/// `(mean, std)` of the Inception Score of `[N, classes]` logits over `splits` consecutive
/// splits (split k holds rows `k*N/splits .. (k+1)*N/splits`), in float64.
pub fn inception_score(logits: &Tensor, splits: i64) -> Result<(f64, f64)> {
    let size = logits.size();
    if size.len() != 2 || size[1] < 2 {
        return Err(EvalError::Invalid(format!(
            "Inception Score needs logits [N, classes], got shape {size:?}"
        )));
    }
    let n = size[0];
    if splits < 1 || n < splits {
        return Err(EvalError::Invalid(format!(
            "Inception Score over {splits} splits needs at least {splits} samples, got {n}"
        )));
    }
    let logits = logits.to_kind(Kind::Double);
    if !bool::try_from(logits.isfinite().all())? {
        return Err(EvalError::Invalid(
            "the Inception logits have NaN or infinite values".into(),
        ));
    }
    let log_p = logits.log_softmax(1, Kind::Double);
    let mut scores = Vec::with_capacity(splits as usize);
    for k in 0..splits {
        let part = log_p.narrow(0, k * n / splits, (k + 1) * n / splits - k * n / splits);
        let p = part.exp();
        let log_py = p.mean_dim(0, true, Kind::Double).log();
        let kl = (&p * (&part - log_py)).sum_dim_intlist(1, false, Kind::Double);
        scores.push(kl.mean(Kind::Double).double_value(&[]).exp());
    }
    let mean = scores.iter().sum::<f64>() / scores.len() as f64;
    let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / scores.len() as f64;
    Ok((mean, var.sqrt()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn one_hot_predictions_spread_over_k_classes_score_k() {
        // Confident and uniform over 5 classes in every split: IS = 5 exactly.
        let labels = Tensor::arange(50, (Kind::Int64, Device::Cpu)).remainder(5);
        let logits = labels.one_hot(8).to_kind(Kind::Double) * 200.0;
        let (mean, std) = inception_score(&logits, 10).unwrap();
        assert!((mean - 5.0).abs() < 1e-9 && std < 1e-9, "{mean} {std}");
    }

    #[test]
    fn too_few_samples_are_refused() {
        let err = inception_score(&Tensor::zeros([3, 10], (Kind::Float, Device::Cpu)), 10)
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 10 samples, got 3"), "{err}");
    }
}
