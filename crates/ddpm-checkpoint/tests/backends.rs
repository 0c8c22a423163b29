//! Every checkpoint scenario on every kind of store: in-memory, the local file system and a
//! real S3 API (moto_server on 127.0.0.1).

mod common;

use common::moto::Moto;
use ddpm_checkpoint::{open_url, CheckpointStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_store() {
    common::scenarios::all("memory", open_url("memory://").unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_file_system_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_url(&format!("file://{}", dir.path().display())).unwrap();
    common::scenarios::all("file", store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_api_store() {
    let moto = Moto::start();
    common::scenarios::all("s3", moto.store("ckpt")).await;
}

#[test]
fn plain_http_s3_needs_to_be_asked_for() {
    let moto = Moto::start();
    let mut opts = moto.options();
    opts.remove("aws_allow_http");
    let err = ddpm_checkpoint::open_url_with("s3://nohttp/x", &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plain http") && err.contains("aws_allow_http"),
        "{err}"
    );
}

#[test]
fn run_and_blob_names_cannot_escape_their_prefix() {
    let (store, prefix) = open_url("memory://").unwrap();
    let err = CheckpointStore::new(store, prefix, "../other")
        .unwrap_err()
        .to_string();
    assert!(err.contains("../other"), "{err}");
    let err = open_url("not a url").unwrap_err().to_string();
    assert!(err.contains("not a url"), "{err}");
}
