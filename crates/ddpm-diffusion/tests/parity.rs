//! Parity with diffusers' schedulers and with direct transcriptions of the paper's formulas,
//! against the golden fixtures made by tests/parity/make_fixtures.py.

use ddpm_config::{DiffusionConfig, LossKind, MeanType, ScheduleKind, VarType};
use ddpm_diffusion::likelihood::{discretized_gaussian_log_likelihood, normal_kl};
use ddpm_diffusion::schedule::{linear_betas, Schedule};
use ddpm_diffusion::{ddim_timesteps, GaussianDiffusion};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = format!(
        "{}/../../tests/parity/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .into_iter()
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn vec64(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn diffusion(mean: MeanType, var: VarType) -> GaussianDiffusion {
    let c = DiffusionConfig {
        model_mean_type: mean,
        model_var_type: var,
        loss_type: LossKind::Mse,
        ..Default::default()
    };
    GaussianDiffusion::new(&c, Device::Cpu).unwrap()
}

fn close_vec(ours: &[f64], reference: &Tensor, tol: f64, what: &str) {
    let r = vec64(reference);
    assert_eq!(ours.len(), r.len(), "{what}: length");
    let worst = ours
        .iter()
        .zip(&r)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst <= tol, "{what}: max abs diff {worst:e} > {tol:e}");
}

#[test]
fn schedules_match_diffusers_and_the_official_float64_tables() {
    let f = fixture("scheduler.safetensors");
    let s = Schedule::from_config(&DiffusionConfig::default()).unwrap();
    close_vec(
        &s.betas,
        &f["linear_betas_f64"],
        1e-15,
        "linear betas vs numpy f64",
    );
    close_vec(
        &s.alphas_cumprod,
        &f["linear_alphas_cumprod_f64"],
        1e-13,
        "alphas_cumprod vs numpy f64",
    );
    close_vec(
        &s.betas,
        &f["linear_betas_f32"],
        1e-6,
        "linear betas vs diffusers",
    );
    close_vec(
        &s.alphas_cumprod,
        &f["linear_alphas_cumprod_f32"],
        1e-6,
        "alphas_cumprod vs diffusers",
    );
    close_vec(
        &s.posterior_mean_coef1,
        &f["posterior_mean_coef1_f64"],
        1e-12,
        "posterior coef1",
    );
    close_vec(
        &s.posterior_mean_coef2,
        &f["posterior_mean_coef2_f64"],
        1e-12,
        "posterior coef2",
    );
    close_vec(
        &s.posterior_variance,
        &f["posterior_variance_f64"],
        1e-15,
        "posterior variance",
    );
    close_vec(
        &s.posterior_log_variance_clipped,
        &f["posterior_log_variance_clipped_f64"],
        1e-12,
        "clipped log variance",
    );
    close_vec(
        &s.posterior_variance,
        &f["var_fixed_small_f32"],
        1e-6,
        "fixed_small variance vs diffusers",
    );
    close_vec(
        &s.betas,
        &f["var_fixed_large_f32"],
        1e-6,
        "fixed_large variance vs diffusers",
    );

    let cosine = DiffusionConfig {
        schedule: ScheduleKind::Cosine,
        ..Default::default()
    };
    let cos = Schedule::from_config(&cosine).unwrap();
    close_vec(
        &cos.betas,
        &f["cosine_betas_f32"],
        1e-6,
        "cosine betas vs diffusers",
    );
    close_vec(
        &cos.alphas_cumprod,
        &f["cosine_alphas_cumprod_f32"],
        1e-6,
        "cosine alphas_cumprod vs diffusers",
    );
    assert_eq!(linear_betas(1e-4, 0.02, 1000)[999], 0.02);
}

#[test]
fn one_reverse_step_matches_diffusers_ddpm_scheduler() {
    let f = fixture("ddpm_step.safetensors");
    let mut checked = 0;
    for (var_name, var) in [
        ("fixed_small", VarType::Fixedsmall),
        ("fixed_large", VarType::Fixedlarge),
    ] {
        for (pred_name, mean) in [("epsilon", MeanType::Eps), ("sample", MeanType::Xstart)] {
            let d = diffusion(mean, var);
            for t in [999i64, 500, 1, 0] {
                let key = format!("{var_name}_{pred_name}_t{t}");
                let get = |s: &str| &f[&format!("{key}_{s}")];
                let tt = Tensor::from_slice(&[t, t]);
                let (prev, x0) = d.p_sample(get("model_output"), get("x"), &tt, get("noise"), true);
                let e_x0 = max_abs_diff(&x0, get("pred_x0"));
                assert!(e_x0 <= 1e-5, "{key}: pred_x0 differs by {e_x0:e}");
                // Against the official float64 formulas: <= 1e-5 everywhere.
                let e64 = max_abs_diff(&prev, get("prev_f64"));
                assert!(
                    e64 <= 1e-5,
                    "{key}: x_(t-1) differs from the float64 reference by {e64:e}"
                );
                // Against diffusers: <= 1e-5, except at t = 1 where diffusers' float32
                // 1 - alphas_cumprod cancels (its own error vs float64 is up to 8e-5).
                let ed = max_abs_diff(&prev, get("prev"));
                let tol = if t == 1 { 1e-4 } else { 1e-5 };
                assert!(
                    ed <= tol,
                    "{key}: x_(t-1) differs from diffusers by {ed:e} > {tol:e}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 16);
}

#[test]
fn one_ddim_step_matches_diffusers_ddim_scheduler() {
    let f = fixture("ddim_step.safetensors");
    let taus = ddim_timesteps(1000, 50).unwrap();
    let mut expected: Vec<i64> = Vec::try_from(&f["timesteps"]).unwrap();
    expected.reverse();
    assert_eq!(taus, expected, "DDIM timesteps tau_i = floor(i T / S)");
    let d = diffusion(MeanType::Eps, VarType::Fixedlarge);
    let mut checked = 0;
    for clip in [false, true] {
        for (eta_name, eta) in [("0", 0.0), ("05", 0.5)] {
            for t in [980i64, 480, 0] {
                let key = format!("ddim_clip{}_eta{eta_name}_t{t}", clip as u8);
                let get = |s: &str| &f[&format!("{key}_{s}")];
                let pos = taus.iter().position(|&x| x == t).unwrap();
                let t_prev = (pos > 0).then(|| taus[pos - 1]);
                let (prev, _) = d
                    .ddim_step(
                        get("model_output"),
                        get("x"),
                        t,
                        t_prev,
                        eta,
                        clip,
                        Some(get("noise")),
                    )
                    .unwrap();
                let e = max_abs_diff(&prev, get("prev"));
                assert!(e <= 1e-5, "{key}: differs from diffusers by {e:e}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 12);
}

#[test]
fn kl_and_decoder_likelihood_match_the_papers_formulas() {
    let f = fixture("likelihood.safetensors");
    let kl = normal_kl(
        &f["kl_mean1"],
        &f["kl_logvar1"],
        &f["kl_mean2"],
        &f["kl_logvar2"],
    );
    let rel = ((kl.to_kind(Kind::Double) - &f["kl_out"]).abs() / f["kl_out"].abs().clamp_min(1.0))
        .max()
        .double_value(&[]);
    assert!(rel <= 1e-6, "normal_kl relative error {rel:e}");
    // In float64 (as the fixture) the decoder likelihood agrees everywhere to 1e-6 relative to
    // max(1, |log p|): tail entries (log p near log 1e-12) are differences of CDFs that agree
    // to 15 digits, where two float64 transcriptions already differ by ~1e-6 absolute.
    let d64 = |k: &str| f[k].to_kind(Kind::Double);
    let dgl64 = discretized_gaussian_log_likelihood(
        &d64("dgl_x"),
        &d64("dgl_means"),
        &d64("dgl_log_scales"),
    );
    let e = ((&dgl64 - &f["dgl_out"]).abs() / f["dgl_out"].abs().clamp_min(1.0))
        .max()
        .double_value(&[]);
    assert!(
        e <= 1e-6,
        "float64 decoder log-likelihood relative error {e:e}"
    );
    // In float32, entries in the far tail (log p < -10) are ill-conditioned; compare the rest.
    let dgl32 =
        discretized_gaussian_log_likelihood(&f["dgl_x"], &f["dgl_means"], &f["dgl_log_scales"]);
    let mask = f["dgl_out"].gt(-10.0);
    let e32 = (dgl32.to_kind(Kind::Double) - &f["dgl_out"])
        .abs()
        .masked_select(&mask)
        .max()
        .double_value(&[]);
    assert!(
        e32 <= 1e-3,
        "float32 decoder log-likelihood differs by {e32:e}"
    );
    let bins = vec64(&f["dgl_x"]);
    assert_eq!(
        (bins[0], bins[255]),
        (-1.0, 1.0),
        "fixture covers both edge bins"
    );
}
