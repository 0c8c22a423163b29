//! LSUN LMDB fixtures written here in the export's format (40-hex keys, WebP and JPEG
//! values), read back read-only without a lock file.

use ddpm_data::decode::{center_crop_resize, decode, sniff, Encoding};
use ddpm_data::lsun::LsunDb;
mod common;

use common::write_lmdb;
use image::{ImageFormat, Rgb, RgbImage};

fn encoded(i: u32, format: ImageFormat) -> Vec<u8> {
    let img = RgbImage::from_fn(40 + i, 30, |x, y| {
        Rgb([(x * 6) as u8, (y * 8) as u8, (i * 40) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn key(i: u32) -> String {
    format!("{:040x}", 0x1234_5678_9abc_def0u64 * (i as u64 + 1))
}

#[test]
fn webp_and_jpeg_entries_are_read_in_key_order_without_a_lock_file() {
    let d = tempfile::tempdir().unwrap();
    let entries: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            let f = if i % 2 == 0 {
                ImageFormat::WebP
            } else {
                ImageFormat::Jpeg
            };
            (key(i), encoded(i, f))
        })
        .collect();
    write_lmdb(d.path(), &entries);
    let db = LsunDb::open(d.path()).unwrap();
    assert_eq!(db.len().unwrap(), 6);
    let mut seen = Vec::new();
    db.for_each(0, |k, v| {
        let enc = sniff(v).unwrap();
        let img = decode(v, k)?;
        let chw = center_crop_resize(&img, 16, 3)?;
        assert_eq!(chw.len(), 3 * 16 * 16);
        seen.push((k.to_string(), enc));
        Ok(())
    })
    .unwrap();
    let mut keys: Vec<String> = entries.iter().map(|(k, _)| k.clone()).collect();
    keys.sort();
    assert_eq!(
        seen.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        keys
    );
    assert!(seen.iter().any(|(_, e)| *e == Encoding::Webp));
    assert!(seen.iter().any(|(_, e)| *e == Encoding::Jpeg));
    let mut skipped = 0;
    db.for_each(4, |_, _| {
        skipped += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(skipped, 2);
    assert!(
        !d.path().join("lock.mdb").exists(),
        "a lock file was written"
    );
}

#[test]
fn a_corrupt_value_names_its_key_and_bad_keys_or_dirs_are_named() {
    let d = tempfile::tempdir().unwrap();
    let mut truncated = encoded(1, ImageFormat::Jpeg);
    truncated.truncate(40);
    write_lmdb(
        d.path(),
        &[(key(0), encoded(0, ImageFormat::WebP)), (key(1), truncated)],
    );
    let db = LsunDb::open(d.path()).unwrap();
    let err = db
        .for_each(0, |k, v| decode(v, &format!("LSUN key {k}")).map(|_| ()))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&key(1)), "{err}");

    let bad = tempfile::tempdir().unwrap();
    write_lmdb(bad.path(), &[("not-a-hex-key".into(), vec![1, 2, 3])]);
    let err = LsunDb::open(bad.path())
        .unwrap()
        .for_each(0, |_, _| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not-a-hex-key") && err.contains("40-character hex"),
        "{err}"
    );

    let missing = d.path().join("church_outdoor_train_lmdb");
    let err = LsunDb::open(&missing).err().unwrap().to_string();
    assert!(
        err.contains("church_outdoor_train_lmdb") && err.contains("data.mdb"),
        "{err}"
    );
}
