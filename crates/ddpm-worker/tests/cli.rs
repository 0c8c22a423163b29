//! The `worker` binary's own errors, before any coordinator is involved. (Runs against a real
//! coordinator are in crates/ddpm-cli/tests/launch.rs.)

use std::process::Command;

fn worker(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("worker runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn help_explains_the_rank_and_the_coordinator() {
    let (ok, text) = worker(&["--help"]);
    assert!(ok, "{text}");
    for flag in [
        "--coordinator",
        "--rank",
        "--device",
        "--ring-listen",
        "--advertise",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}: {text}");
    }
}

#[test]
fn an_unreachable_coordinator_is_named_after_the_patience_runs_out() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let (ok, text) = worker(&["--coordinator", &url, "--connect-timeout-secs", "1"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!("connecting to the coordinator at {url}")),
        "{text}"
    );
}

#[test]
fn an_unspecified_ring_address_needs_advertise_and_bad_urls_are_named() {
    let (ok, text) = worker(&[
        "--coordinator",
        "http://127.0.0.1:1",
        "--ring-listen",
        "0.0.0.0:0",
    ]);
    assert!(!ok && text.contains("--advertise"), "{text}");
    let (ok, text) = worker(&["--coordinator", "not a url"]);
    assert!(
        !ok && text.contains("--coordinator \"not a url\""),
        "{text}"
    );
}
