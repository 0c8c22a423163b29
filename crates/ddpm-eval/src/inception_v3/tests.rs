//! The weight readers and the errors of the Inception-v3 loader. The forward passes are
//! tested against PyTorch in `tests/inception_v3.rs`.

use super::weights::{read_weights, CONVERT_HINT};
use super::InceptionV3;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/parity/fixtures")
        .join(name)
}

fn weights_fixture() -> (PathBuf, Vec<(String, Tensor)>) {
    let path = fixture("inception_is_weights.pth");
    let tensors = read_weights(&path).unwrap();
    (path, tensors)
}

/// The error of building a model with a head from `tensors`, said to come from `path`.
fn build_error(tensors: Vec<(String, Tensor)>, path: &Path) -> String {
    match InceptionV3::build(tensors, path, Device::Cpu, true) {
        Ok(_) => panic!("loading succeeded"),
        Err(e) => e.to_string(),
    }
}

fn load_error(path: &Path) -> String {
    match InceptionV3::load(path, Device::Cpu) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.flatten(0, -1).to_kind(Kind::Double)).unwrap()
}

#[test]
fn zip_and_legacy_torch_save_files_give_the_stored_tensors() {
    // tests/parity/inception_is.py, make_torch_save_formats(): base = arange(40) / 8.
    let base = |i: i64| i as f64 / 8.0;
    let expected: Vec<(&str, Vec<i64>, Kind, Vec<f64>)> = vec![
        (
            "a.weight",
            vec![3, 4],
            Kind::Float,
            (0..3)
                .flat_map(|i| (0..4).map(move |j| base(2 + 5 * i + j)))
                .collect(),
        ),
        ("a.bias", vec![3], Kind::Float, (10..13).map(base).collect()),
        (
            "a.t",
            vec![2, 3],
            Kind::Float,
            (0..2)
                .flat_map(|i| (0..3).map(move |j| base(20 + i + 2 * j)))
                .collect(),
        ),
        ("p", vec![2], Kind::Float, vec![0.5, 0.5]),
        (
            "h",
            vec![2, 3],
            Kind::Half,
            (0..6).map(|i| i as f64 - 2.5).collect(),
        ),
        ("d", vec![5], Kind::Double, vec![-1.0, -0.5, 0.0, 0.5, 1.0]),
        ("bn.num_batches_tracked", vec![], Kind::Int64, vec![7.0]),
    ];
    for file in [
        "inception_torch_save_zip.pth",
        "inception_torch_save_legacy.pth",
    ] {
        let got = read_weights(&fixture(file)).unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        let want: Vec<&str> = expected.iter().map(|(n, ..)| *n).collect();
        assert_eq!(names, want, "{file}: names in file order");
        let got: HashMap<String, Tensor> = got.into_iter().collect();
        for (name, shape, kind, vals) in &expected {
            let t = &got[*name];
            assert_eq!(
                (t.size(), t.kind()),
                (shape.clone(), *kind),
                "{file}: {name}"
            );
            assert_eq!(&values(t), vals, "{file}: {name}");
        }
    }
}

#[test]
fn a_missing_tensor_is_named_with_its_shape() {
    let (path, mut tensors) = weights_fixture();
    tensors.retain(|(n, _)| n != "Mixed_6c.branch7x7dbl_3.bn.running_var");
    let e = build_error(tensors, &path);
    assert!(e.starts_with(&path.display().to_string()), "{e}");
    assert!(e.contains("1 problem(s)"), "{e}");
    assert!(
        e.contains(
            "missing tensor `Mixed_6c.branch7x7dbl_3.bn.running_var` (expected shape [160])"
        ),
        "{e}"
    );
}

#[test]
fn a_mis_shaped_or_non_float_tensor_is_named() {
    let (path, mut tensors) = weights_fixture();
    for (name, t) in tensors.iter_mut() {
        if name == "fc.weight" {
            *t = Tensor::zeros([1000, 2048], (Kind::Float, Device::Cpu));
        } else if name == "Conv2d_1a_3x3.bn.running_mean" {
            *t = t.to_kind(Kind::Int64);
        }
    }
    let e = build_error(tensors, &path);
    assert!(e.contains("2 problem(s)"), "{e}");
    assert!(
        e.contains("tensor `fc.weight` has shape [1000, 2048], expected [1008, 2048]"),
        "{e}"
    );
    assert!(
        e.contains("tensor `Conv2d_1a_3x3.bn.running_mean` has dtype Int64"),
        "{e}"
    );
}

#[test]
fn an_unexpected_tensor_is_named_and_batch_counters_are_ignored() {
    let (path, mut tensors) = weights_fixture();
    assert!(tensors
        .iter()
        .any(|(n, _)| n.ends_with(".num_batches_tracked")));
    tensors.push((
        "AuxLogits.fc.weight".into(),
        Tensor::zeros([1000, 768], (Kind::Float, Device::Cpu)),
    ));
    let e = build_error(tensors, &path);
    assert!(
        e.contains("1 problem(s)") && e.contains("unexpected tensor `AuxLogits.fc.weight`"),
        "{e}"
    );
}

#[test]
fn a_file_of_other_weights_gets_a_summarised_list() {
    let path = fixture("inception_torch_save_zip.pth");
    let e = load_error(&path);
    assert!(e.starts_with(&path.display().to_string()), "{e}");
    assert!(
        e.contains("missing tensor `Conv2d_1a_3x3.conv.weight` (expected shape [32, 3, 3, 3])"),
        "{e}"
    );
    assert!(
        e.contains("unexpected tensor `a.weight`") || e.contains("more"),
        "{e}"
    );
    assert!(e.contains("and ") && e.contains(" more"), "{e}");
}

#[test]
fn safetensors_files_are_recognised_by_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.bin");
    let w = Tensor::zeros([32, 3, 5, 5], (Kind::Half, Device::Cpu));
    Tensor::write_safetensors(&[("Conv2d_1a_3x3.conv.weight", &w)], &path).unwrap();
    let e = load_error(&path);
    assert!(e.starts_with(&path.display().to_string()), "{e}");
    assert!(
        e.contains(
            "tensor `Conv2d_1a_3x3.conv.weight` has shape [32, 3, 5, 5], expected [32, 3, 3, 3]"
        ),
        "{e}"
    );
}

#[test]
fn unreadable_files_are_named_with_the_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.pth");
    let e = load_error(&missing);
    assert!(
        e.contains("absent.pth") && e.contains("cannot read the weights file"),
        "{e}"
    );

    let not_torch = dir.path().join("notes.pth");
    std::fs::write(&not_torch, b"these are not weights at all").unwrap();
    let e = load_error(&not_torch);
    assert!(
        e.contains("notes.pth") && e.contains("neither a zip-format nor a legacy torch.save"),
        "{e}"
    );
    assert!(e.contains(CONVERT_HINT), "{e}");

    for (file, cut) in [
        ("inception_torch_save_legacy.pth", 600),
        ("inception_torch_save_zip.pth", 2000),
    ] {
        let bytes = std::fs::read(fixture(file)).unwrap();
        let truncated = dir.path().join(format!("truncated-{file}"));
        std::fs::write(&truncated, &bytes[..cut]).unwrap();
        let e = load_error(&truncated);
        assert!(
            e.contains(&format!("truncated-{file}"))
                && e.contains("cannot read this torch.save file"),
            "{e}"
        );
        assert!(e.contains("save_file("), "{e}");
    }
}

#[test]
fn hostile_pickles_and_views_are_refused_not_crashed_on() {
    use super::pickle::{unpickle, MAX_CONTAINERS};
    use super::torch_objects::{StorageRef, TensorRef};
    // Nesting one list per byte, deeper than any state dict: refused before it is built.
    let mut data = b"\x80\x02".to_vec();
    data.extend(std::iter::repeat_n(b']', MAX_CONTAINERS + 1));
    data.push(b'.');
    let err = unpickle(&data, 0).unwrap_err();
    assert!(
        err.contains(&format!("more than {MAX_CONTAINERS}")),
        "{err}"
    );
    // A 10^10-element view of a 4-element storage by stride 0, and strides that overflow.
    let storage = Tensor::zeros([4], (Kind::Float, Device::Cpu));
    let t = |size: Vec<i64>, stride: Vec<i64>| TensorRef {
        storage: StorageRef {
            key: "0".into(),
            kind: Kind::Float,
            view_offset: 0,
        },
        offset: 0,
        size,
        stride,
    };
    let err =
        super::torch_save::view(&storage, &t(vec![100_000, 100_000], vec![0, 0])).unwrap_err();
    assert!(err.contains("10000000000 elements"), "{err}");
    let err = super::torch_save::view(&storage, &t(vec![3, 2], vec![i64::MAX, 1])).unwrap_err();
    assert!(err.contains("overflow"), "{err}");
}
