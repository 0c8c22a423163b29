//! Helpers shared by the `ddpm` integration tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub fn ddpm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("ddpm runs")
}

/// Runs `ddpm` with `RUST_LOG=level` and returns (exit status, stderr).
pub fn ddpm_log(args: &[&str], level: &str) -> (std::process::ExitStatus, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ddpm"))
        .args(args)
        .env("RUST_LOG", level)
        .output()
        .expect("ddpm runs");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn ok(args: &[&str]) -> String {
    let out = ddpm(args);
    assert!(
        out.status.success(),
        "ddpm {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn fails(args: &[&str]) -> String {
    let out = ddpm(args);
    assert!(!out.status.success(), "ddpm {args:?} should have failed");
    String::from_utf8(out.stderr).unwrap()
}

/// Writes a gzipped IDX file of 32 grey 16x16 images (stripes and squares).
pub fn write_idx(path: &Path) {
    write_idx_images(path, 32, 16, |i, x, y| {
        if i % 2 == 0 {
            (x + i) % 6 < 3
        } else {
            (4..12).contains(&x) && (4..12).contains(&y)
        }
    });
}

/// Writes a gzipped IDX file of `n` grey `side`x`side` images whose pixel (x, y) of image i
/// is bright where `on(i, x, y)`.
pub fn write_idx_images(
    path: &Path,
    n: usize,
    side: usize,
    on: impl Fn(usize, usize, usize) -> bool,
) {
    use std::io::Write;
    let mut bytes = vec![0, 0, 8, 3];
    for d in [n, side, side] {
        bytes.extend_from_slice(&(d as u32).to_be_bytes());
    }
    for i in 0..n {
        for y in 0..side {
            for x in 0..side {
                bytes.push(if on(i, x, y) { 230 } else { 20 });
            }
        }
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&bytes).unwrap();
    std::fs::write(path, gz.finish().unwrap()).unwrap();
}

/// A path as a string.
pub fn path(p: &Path) -> String {
    p.display().to_string()
}

/// A binary built next to `ddpm` (cargo builds every binary of the workspace before tests).
pub fn sibling(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_ddpm")).with_file_name(name);
    assert!(
        p.is_file(),
        "{} is not built (cargo test --workspace builds it)",
        p.display()
    );
    p
}

/// Starts the `coordinator` binary with `args` (plus `--listen 127.0.0.1:0`), its stderr into
/// `stderr`; returns it and the address it listens on (its first line on stdout).
pub fn start_coordinator(args: &[&str], stderr: Stdio) -> (Child, String) {
    use std::io::{BufRead, BufReader};
    let mut coordinator = Command::new(sibling("coordinator"))
        .args(args)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("coordinator starts");
    let mut first = String::new();
    BufReader::new(coordinator.stdout.take().expect("stdout piped"))
        .read_line(&mut first)
        .expect("coordinator prints its address");
    let addr = first
        .trim()
        .strip_prefix("coordinator listening on ")
        .unwrap_or_else(|| panic!("coordinator's first line {first:?}"))
        .to_string();
    (coordinator, addr)
}
