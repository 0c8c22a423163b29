//! CIFAR-10 binary batches written byte for byte in the distributed format from real photos
//! (scikit-image's sample images, installed by `make test-tools`), read back through
//! `cifar10:` / `cifar10-test:` sources and the training loader; broken files are named.

use ddpm_config::DataConfig;
use ddpm_data::decode::{center_crop_resize, decode};
use ddpm_data::epoch::Cursor;
use ddpm_data::loader::{Loader, LoaderOptions};
use ddpm_data::samples::open_sample_source;
use std::path::Path;

const PHOTOS: [&str; 5] = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
];

/// 32x32 CHW crops of the photos: the centre crop, then shifted corners, so every record
/// differs.
fn thumbnails() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/photos");
    assert!(
        dir.join("astronaut.png").exists(),
        "real photos not found in {} (run `make test-tools`)",
        dir.display()
    );
    let mut out = Vec::new();
    for name in PHOTOS {
        let img = decode(&std::fs::read(dir.join(name)).unwrap(), name).unwrap();
        let (w, h) = (img.width(), img.height());
        for k in 0..4u32 {
            let side = w.min(h) * (4 - k) / 4;
            let crop = img.crop_imm((w - side) * k / 4, (h - side) * k / 4, side, side);
            out.push(center_crop_resize(&crop, 32, 3).unwrap());
        }
    }
    out
}

/// One record: label byte, then the 1024 R, 1024 G and 1024 B bytes.
fn record(label: u8, chw: &[u8]) -> Vec<u8> {
    assert_eq!(chw.len(), 3072);
    let mut r = Vec::with_capacity(3073);
    r.push(label);
    r.extend_from_slice(chw);
    r
}

/// `cifar-10-batches-bin/` with `per_batch` records in each of the five training batches and
/// the test batch; returns the expected (label, pixels) of the training split in order.
fn write_cifar(dir: &Path, per_batch: usize) -> Vec<(u8, Vec<u8>)> {
    let thumbs = thumbnails();
    let mut train = Vec::new();
    let mut k = 0;
    for name in (1..=5)
        .map(|b| format!("data_batch_{b}.bin"))
        .chain(["test_batch.bin".to_string()])
    {
        let mut bytes = Vec::new();
        for _ in 0..per_batch {
            let (label, px) = ((k % 10) as u8, &thumbs[k % thumbs.len()]);
            bytes.extend(record(label, px));
            if name != "test_batch.bin" {
                train.push((label, px.clone()));
            }
            k += 1;
        }
        assert_eq!(bytes.len(), per_batch * 3073);
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    train
}

fn cfg(source: String) -> DataConfig {
    DataConfig {
        source,
        resolution: 32,
        channels: 3,
        random_flip: false,
        ..DataConfig::default()
    }
}

#[test]
fn batches_of_real_photos_read_back_exactly_through_the_loader() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&dir).unwrap();
    let train = write_cifar(&dir, 7);
    let parsed = ddpm_data::cifar10::read(&dir, ddpm_data::cifar10::Split::Train).unwrap();
    assert_eq!(parsed.labels, train.iter().map(|t| t.0).collect::<Vec<_>>());
    assert_eq!(
        parsed.pixels,
        train.iter().flat_map(|t| t.1.clone()).collect::<Vec<_>>()
    );

    let src = open_sample_source(&cfg(format!("cifar10:{}", dir.display()))).unwrap();
    assert_eq!((src.len(), src.shape()), (35, [3, 32, 32]));
    let test = open_sample_source(&cfg(format!("cifar10-test:{}", dir.display()))).unwrap();
    assert_eq!(test.len(), 7);

    // One epoch through the loader: every photo record once, pixels exact in [-1, 1].
    let c = cfg(format!("cifar10:{}", dir.display()));
    let mut loader = Loader::start(
        src,
        Cursor::default(),
        LoaderOptions::from_config(&c, 1, 5, 1, 0),
    )
    .unwrap();
    let mut seen = [false; 35];
    for _ in 0..7 {
        let b = loader.next_batch().unwrap();
        let v = Vec::<f32>::try_from(b.images.flatten(0, -1)).unwrap();
        for (j, &i) in b.indices.iter().enumerate() {
            assert!(!seen[i as usize], "sample {i} twice in an epoch");
            seen[i as usize] = true;
            let want: Vec<f32> = train[i as usize]
                .1
                .iter()
                .map(|&p| p as f32 / 127.5 - 1.0)
                .collect();
            assert_eq!(v[j * 3072..(j + 1) * 3072], want[..], "sample {i}");
        }
    }
    assert!(seen.iter().all(|&s| s));
}

#[test]
fn broken_batches_are_named_with_what_was_expected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_cifar(dir, 2);
    // A truncated batch.
    let path = dir.join("data_batch_3.bin");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let err = open_sample_source(&cfg(format!("cifar10:{}", dir.display())))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("data_batch_3.bin") && err.contains("3073"),
        "{err}"
    );
    // A label outside 0..=9.
    let mut bytes = bytes.clone();
    bytes[3073] = 10;
    std::fs::write(&path, &bytes).unwrap();
    let err = open_sample_source(&cfg(format!("cifar10:{}", dir.display())))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("data_batch_3.bin") && err.contains("label 10"),
        "{err}"
    );
    // A missing batch (the others intact).
    bytes[3073] = 1;
    std::fs::write(&path, &bytes).unwrap();
    std::fs::remove_file(dir.join("data_batch_5.bin")).unwrap();
    let err = open_sample_source(&cfg(format!("cifar10:{}", dir.display())))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("data_batch_5.bin"), "{err}");
}
