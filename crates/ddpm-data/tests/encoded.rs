//! `lsun:` and `folder:` sources on real photos (scikit-image's sample images, installed by
//! `make test-tools` into .tools/photos): decode, centre crop, antialiased resize, bad-image
//! policy.

use ddpm_config::{BadSamplePolicy, DataConfig};
use ddpm_data::open_source;
mod common;

use common::write_lmdb;
use image::ImageFormat;
use std::path::{Path, PathBuf};

fn photos() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/photos");
    assert!(
        p.join("astronaut.png").exists(),
        "real photos not found in {} (run `make test-tools`)",
        p.display()
    );
    p
}

fn photo(name: &str) -> image::DynamicImage {
    image::open(photos().join(name)).unwrap()
}

fn encode(img: &image::DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    // WebP and JPEG encoders take RGB.
    image::DynamicImage::ImageRgb8(img.to_rgb8())
        .write_to(&mut out, format)
        .unwrap();
    out.into_inner()
}

fn data_cfg(source: String, resolution: i64, channels: i64) -> DataConfig {
    DataConfig {
        source,
        resolution,
        channels,
        ..DataConfig::default()
    }
}

/// The centre crop of `img` box-averaged to `res` (a plain reference downscaler).
fn box_reference(img: &image::DynamicImage, res: u32) -> Vec<f64> {
    let rgb = img.to_rgb8();
    let side = rgb.width().min(rgb.height());
    let (x0, y0) = ((rgb.width() - side) / 2, (rgb.height() - side) / 2);
    let f = side as f64 / res as f64;
    let mut out = vec![0.0; 3 * (res * res) as usize];
    for c in 0..3 {
        for y in 0..res {
            for x in 0..res {
                let (ya, yb) = ((y as f64 * f) as u32, ((y + 1) as f64 * f) as u32);
                let (xa, xb) = ((x as f64 * f) as u32, ((x + 1) as f64 * f) as u32);
                let mut sum = 0.0;
                for yy in ya..yb {
                    for xx in xa..xb {
                        sum += rgb.get_pixel(x0 + xx, y0 + yy)[c] as f64;
                    }
                }
                out[(c as u32 * res * res + y * res + x) as usize] =
                    sum / ((yb - ya) * (xb - xa)) as f64;
            }
        }
    }
    out
}

#[test]
fn a_folder_of_photos_is_cropped_resized_channels_first_in_path_order() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("nested")).unwrap();
    std::fs::copy(photos().join("astronaut.png"), d.path().join("a.png")).unwrap();
    std::fs::copy(photos().join("rocket.jpg"), d.path().join("nested/b.JPG")).unwrap();
    std::fs::write(
        d.path().join("nested/c.webp"),
        encode(&photo("chelsea.png"), ImageFormat::WebP),
    )
    .unwrap();
    std::fs::write(d.path().join("readme.txt"), "not an image").unwrap();
    let set = open_source(&data_cfg(format!("folder:{}", d.path().display()), 32, 3)).unwrap();
    assert_eq!(set.images().size(), [3, 3, 32, 32]);
    // The first image is the astronaut (path order), channels-first, close to a box-filtered
    // centre crop of the photo (Lanczos is sharper than a box, so allow a few levels).
    let ours: Vec<u8> = Vec::try_from(set.images().get(0).flatten(0, -1)).unwrap();
    let reference = box_reference(&photo("astronaut.png"), 32);
    let mad: f64 = ours
        .iter()
        .zip(&reference)
        .map(|(&a, &b)| (a as f64 - b).abs())
        .sum::<f64>()
        / ours.len() as f64;
    assert!(
        mad < 8.0,
        "mean absolute difference to a box-filtered crop: {mad}"
    );
    // Grey works from colour photos too.
    let grey = open_source(&data_cfg(format!("folder:{}", d.path().display()), 16, 1)).unwrap();
    assert_eq!(grey.images().size(), [3, 1, 16, 16]);
}

/// An LMDB of real photos under 40-hex keys, photo `i` encoded as `format(i)`.
fn lmdb_of_photos(dir: &Path, names: &[&str], format: impl Fn(usize) -> ImageFormat) {
    let entries: Vec<(String, Vec<u8>)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let key = format!("{:040x}", (i as u128 + 1) * 0x9e37_79b9_7f4a_7c15);
            (key, encode(&photo(n), format(i)))
        })
        .collect();
    write_lmdb(dir, &entries);
}

#[test]
fn an_lsun_lmdb_of_webp_and_jpeg_photos_is_a_source() {
    let d = tempfile::tempdir().unwrap();
    lmdb_of_photos(
        d.path(),
        &[
            "astronaut.png",
            "chelsea.png",
            "coffee.png",
            "motorcycle_left.png",
        ],
        |i| {
            if i % 2 == 0 {
                ImageFormat::WebP
            } else {
                ImageFormat::Jpeg
            }
        },
    );
    let set = open_source(&data_cfg(format!("lsun:{}", d.path().display()), 64, 3)).unwrap();
    assert_eq!(set.images().size(), [4, 3, 64, 64]);
    // Distinct photos give distinct images.
    let a = set.images().get(0);
    let b = set.images().get(1);
    assert!(
        a.to_kind(tch::Kind::Float)
            .f_sub(&b.to_kind(tch::Kind::Float))
            .unwrap()
            .abs()
            .mean(tch::Kind::Float)
            .double_value(&[])
            > 5.0
    );
}

#[test]
fn undecodable_images_fail_or_are_skipped_and_counted() {
    let d = tempfile::tempdir().unwrap();
    for (i, n) in ["astronaut.png", "chelsea.png", "coffee.png"]
        .iter()
        .enumerate()
    {
        std::fs::copy(photos().join(n), d.path().join(format!("{i}.png"))).unwrap();
    }
    let mut jpeg = std::fs::read(photos().join("rocket.jpg")).unwrap();
    jpeg.truncate(200);
    std::fs::write(d.path().join("3-truncated.jpg"), jpeg).unwrap();
    let source = format!("folder:{}", d.path().display());

    let err = open_source(&data_cfg(source.clone(), 16, 3))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("3-truncated.jpg") && err.contains("decode"),
        "{err}"
    );

    let mut skip = data_cfg(source.clone(), 16, 3);
    skip.on_bad_sample = BadSamplePolicy::Skip;
    skip.max_bad_fraction = 0.3;
    let set = open_source(&skip).unwrap();
    assert_eq!(set.len(), 3);

    skip.max_bad_fraction = 0.2;
    let err = open_source(&skip).unwrap_err().to_string();
    assert!(
        err.contains("1 of 4")
            && err.contains("max_bad_fraction = 0.2")
            && err.contains("3-truncated.jpg"),
        "{err}"
    );
}

#[test]
fn an_lsun_source_read_shard_by_shard_equals_reading_it_whole() {
    let d = tempfile::tempdir().unwrap();
    lmdb_of_photos(
        d.path(),
        &[
            "astronaut.png",
            "chelsea.png",
            "coffee.png",
            "motorcycle_left.png",
            "camera.png",
        ],
        |_| ImageFormat::WebP,
    );
    let cfg = data_cfg(format!("lsun:{}", d.path().display()), 16, 3);
    let whole: Vec<u8> = Vec::try_from(open_source(&cfg).unwrap().images().flatten(0, -1)).unwrap();
    let reader = ddpm_data::prepare::SourceReader::open(&cfg).unwrap();
    assert_eq!(reader.len(), 5);
    let none = |_: usize| {};
    // In order (continuing by key), then out of order (walking from the start).
    let mut sequential = Vec::new();
    for i in 0..3 {
        sequential.extend(reader.shard(i, 2, &cfg, &none).unwrap().pixels);
    }
    assert_eq!(sequential, whole);
    let last = reader.shard(2, 2, &cfg, &none).unwrap();
    assert_eq!(last.samples, 1);
    assert_eq!(last.pixels, whole[4 * 768..]);
    let first = reader.shard(0, 2, &cfg, &none).unwrap();
    assert_eq!(first.pixels, whole[..2 * 768]);
}
