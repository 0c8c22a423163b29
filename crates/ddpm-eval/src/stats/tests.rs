use super::*;

fn features(n: i64, d: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn([n, d], (Kind::Double, Device::Cpu)) * 3.0 + 1000.0
}

/// numpy.cov(x, rowvar=False) by the two-pass formula.
fn two_pass(x: &Tensor) -> (Tensor, Tensor) {
    let mu = x.mean_dim(0, false, Kind::Double);
    let y = x - &mu;
    let n = x.size()[0] as f64;
    (mu, y.tr().matmul(&y) / (n - 1.0))
}

#[test]
fn accumulated_batches_equal_the_two_pass_covariance() {
    let x = features(37, 6, 1);
    let mut acc = StatsAccumulator::new();
    for (i, chunk) in x.split(10, 0).iter().enumerate() {
        acc.add(chunk, &format!("batch {i}")).unwrap();
    }
    assert_eq!(acc.count(), 37);
    let got = acc.finish("test").unwrap();
    let (mu, sigma) = two_pass(&x);
    assert!((got.mu - mu).abs().max().double_value(&[]) < 1e-10);
    assert!((got.sigma - sigma).abs().max().double_value(&[]) < 1e-9);
}

#[test]
fn npz_and_safetensors_round_trip_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let x = features(9, 5, 2);
    let (mu, sigma) = two_pass(&x);
    let stats = FeatureStats::new(mu, sigma, "test").unwrap();
    for name in ["s.npz", "s.safetensors"] {
        let path = dir.path().join(name);
        stats.write(&path).unwrap();
        let back = FeatureStats::read(&path).unwrap();
        assert!(
            back.mu.equal(&stats.mu) && back.sigma.equal(&stats.sigma),
            "{name}"
        );
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        2,
        "no partial files left"
    );
}

#[test]
fn too_few_images_nan_features_and_other_dimensions_are_named() {
    let mut acc = StatsAccumulator::new();
    acc.add(&features(1, 4, 3), "first").unwrap();
    let err = acc.finish("reference folder").unwrap_err().to_string();
    assert!(err.contains("reference folder: 1 image"), "{err}");

    let mut acc = StatsAccumulator::new();
    let nan = features(2, 4, 3).fill_diagonal_(f64::NAN, false);
    let err = acc.add(&nan, "batch 7").unwrap_err().to_string();
    assert!(err.contains("batch 7") && err.contains("NaN"), "{err}");

    acc.add(&features(2, 4, 3), "batch 0").unwrap();
    let err = acc
        .add(&features(2, 5, 3), "batch 1")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("dimension 5") && err.contains("had 4"),
        "{err}"
    );
}

#[test]
fn wrong_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.safetensors");
    let sigma = Tensor::eye(3, (Kind::Double, Device::Cpu));
    Tensor::write_safetensors(
        &[
            ("mu", &Tensor::zeros([4], (Kind::Double, Device::Cpu))),
            ("sigma", &sigma),
        ],
        &wrong,
    )
    .unwrap();
    let err = FeatureStats::read(&wrong).unwrap_err().to_string();
    assert!(
        err.contains("wrong.safetensors") && err.contains("[4, 4]"),
        "{err}"
    );

    let junk = dir.path().join("junk.npz");
    std::fs::write(&junk, b"hello world").unwrap();
    let err = FeatureStats::read(&junk).unwrap_err().to_string();
    assert!(err.contains("junk.npz"), "{err}");

    let missing = dir.path().join("missing.npz");
    let err = FeatureStats::read(&missing).unwrap_err().to_string();
    assert!(
        err.contains("missing.npz") && err.contains("cannot read"),
        "{err}"
    );
}
