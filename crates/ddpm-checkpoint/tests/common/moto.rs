//! A real S3 API on 127.0.0.1: moto_server, started per test and killed on drop. Also used
//! by the ddpm-cli tests (included by path).

#![allow(dead_code)]

use ddpm_checkpoint::{open_url_with, StoreOptions};
use object_store::path::Path;
use object_store::ObjectStore;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A running moto_server.
pub struct Moto {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

/// The moto_server executable: $DDPM_MOTO_SERVER, or the one `make test-tools` installs
/// under .tools/moto in the repository.
fn moto_binary() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("DDPM_MOTO_SERVER") {
        return p.into();
    }
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/moto/bin/moto_server");
    assert!(
        p.exists(),
        "moto_server not found at {} (run `make test-tools`, or set DDPM_MOTO_SERVER)",
        p.display()
    );
    p
}

impl Moto {
    /// Starts moto_server on an ephemeral port and waits until it answers.
    pub fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(moto_binary())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        let moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while moto.request("GET", "/").is_none() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    /// One plain HTTP/1.1 request; the status line, or None when nothing answers.
    fn request(&self, method: &str, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.lines().next().map(str::to_string)
    }

    /// Creates `bucket` (moto accepts unsigned requests).
    pub fn create_bucket(&self, bucket: &str) {
        let status = self
            .request("PUT", &format!("/{bucket}"))
            .expect("moto answers");
        assert!(
            status.contains(" 200"),
            "creating bucket {bucket}: {status}"
        );
    }

    /// The options that point object_store at this server.
    pub fn options(&self) -> StoreOptions {
        [
            ("aws_endpoint", format!("http://127.0.0.1:{}", self.port)),
            ("aws_allow_http", "true".into()),
            ("aws_region", "us-east-1".into()),
            ("aws_access_key_id", "test".into()),
            // Distinctive, so tests can check it is never written out.
            ("aws_secret_access_key", "moto-secret-never-stored".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A fresh bucket opened through the same code path as every other store URL.
    pub fn store(&self, bucket: &str) -> (Arc<dyn ObjectStore>, Path) {
        self.create_bucket(bucket);
        open_url_with(&format!("s3://{bucket}/checkpoints"), &self.options()).unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
