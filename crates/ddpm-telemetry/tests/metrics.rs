//! The Prometheus endpoint on 127.0.0.1:0: histograms of seconds come out with the shared
//! buckets, and every series carries the component label.

use std::io::{Read, Write};

fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

#[test]
fn seconds_histograms_have_buckets_and_every_series_names_its_component() {
    let addr = ddpm_telemetry::serve_component_metrics("127.0.0.1:0".parse().unwrap(), "worker")
        .expect("serving metrics");
    assert_ne!(addr.port(), 0, "the bound port is returned");
    metrics::histogram!("ddpm_test_step_seconds", "rank" => "3").record(0.003);
    metrics::histogram!("ddpm_test_step_seconds", "rank" => "3").record(42.0);
    metrics::gauge!("ddpm_test_loss", "rank" => "3").set(0.5);
    // The exporter's listener starts on its own thread: retry briefly.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let body = loop {
        match std::panic::catch_unwind(|| scrape(addr)) {
            Ok(b) if b.contains("ddpm_test_loss") => break b,
            _ if std::time::Instant::now() < end => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            Ok(b) => panic!("no ddpm_test_loss in\n{b}"),
            Err(_) => panic!("/metrics on {addr} never answered"),
        }
    };
    for line in [
        "ddpm_test_step_seconds_bucket{component=\"worker\",rank=\"3\",le=\"0.0025\"} 0",
        "ddpm_test_step_seconds_bucket{component=\"worker\",rank=\"3\",le=\"0.005\"} 1",
        "ddpm_test_step_seconds_bucket{component=\"worker\",rank=\"3\",le=\"60\"} 2",
        "ddpm_test_step_seconds_bucket{component=\"worker\",rank=\"3\",le=\"+Inf\"} 2",
        "ddpm_test_step_seconds_count{component=\"worker\",rank=\"3\"} 2",
        "ddpm_test_loss{component=\"worker\",rank=\"3\"} 0.5",
    ] {
        assert!(body.contains(line), "no {line:?} in\n{body}");
    }
    // A second exporter in the same process is refused with the address in the message.
    let err = ddpm_telemetry::serve_metrics("127.0.0.1:0".parse().unwrap()).unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:0"), "{err}");
}
