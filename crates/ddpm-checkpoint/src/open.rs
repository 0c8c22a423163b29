//! Opening an object store from a URL. One code path for every backend: `file://`,
//! `memory://`, `s3://`, `gs://` and `az://`.

use crate::{CheckpointError, Result};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ClientConfigKey, ObjectStore, ObjectStoreScheme};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

/// Backend options by object_store's key names (`aws_endpoint`, `aws_region`,
/// `aws_allow_http`, `google_service_account`, `azure_storage_account_name`, ...).
pub type StoreOptions = BTreeMap<String, String>;

/// The checkpoint root of a run: `url` (`checkpoint.url`) when set, else the directory
/// `<out_dir>/checkpoints` on the local disk (created) as an absolute `file://` URL, so every
/// process of the run resolves the same root whatever its working directory later.
pub fn resolve_root_url(url: &str, out_dir: &std::path::Path) -> Result<String> {
    if !url.is_empty() {
        return Ok(url.to_string());
    }
    let dir = out_dir.join("checkpoints");
    let bad = |reason: String| CheckpointError::Url {
        url: dir.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(&dir).map_err(|e| bad(format!("creating the directory: {e}")))?;
    let abs = dir
        .canonicalize()
        .map_err(|e| bad(format!("resolving the directory: {e}")))?;
    let parsed = url::Url::from_directory_path(&abs)
        .map_err(|()| bad("not an absolute directory path".into()))?;
    Ok(parsed.as_str().trim_end_matches('/').to_string())
}

/// Opens `url` with no extra options; see [`open_url_with`].
pub fn open_url(url: &str) -> Result<(Arc<dyn ObjectStore>, Path)> {
    open_url_with(url, &StoreOptions::new())
}

/// Opens `url` and returns the store and the path prefix inside it.
///
/// - `file:///abs/dir`: the local file system, with fsync on every write (a checkpoint whose
///   blobs could still be in the page cache when its manifest is durable is not a checkpoint).
/// - `memory://`: a fresh in-memory store (tests, dry runs).
/// - `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`: configured first
///   from the environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`), then from `options`, which win.
///   Plain-http endpoints are refused unless `aws_allow_http` (or the backend's equivalent)
///   is `true`.
pub fn open_url_with(url: &str, options: &StoreOptions) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let bad = |reason: String| CheckpointError::Url {
        url: url.to_string(),
        reason,
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    let (scheme, prefix) = ObjectStoreScheme::parse(&parsed).map_err(|e| bad(e.to_string()))?;
    let no_options = |backend: &str| {
        if options.is_empty() {
            Ok(())
        } else {
            Err(bad(format!(
                "options {:?} do not apply to {backend} stores",
                options.keys().collect::<Vec<_>>()
            )))
        }
    };
    let store: Arc<dyn ObjectStore> = match scheme {
        ObjectStoreScheme::Local => {
            no_options("file://")?;
            Arc::new(LocalFileSystem::new().with_fsync(true))
        }
        ObjectStoreScheme::Memory => {
            no_options("memory://")?;
            Arc::new(InMemory::new())
        }
        ObjectStoreScheme::AmazonS3 => {
            let mut b = AmazonS3Builder::from_env().with_url(url);
            for (k, v) in options {
                b = b.with_config(key::<AmazonS3ConfigKey>(url, "s3", k)?, v);
            }
            let endpoint = b.get_config_value(&AmazonS3ConfigKey::Endpoint);
            let allow_http = b
                .get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp))
                .is_some_and(|v| v.eq_ignore_ascii_case("true"));
            if let Some(e) = endpoint.filter(|e| e.starts_with("http://")) {
                if !allow_http {
                    return Err(bad(format!(
                        "endpoint {e} is plain http; set aws_allow_http = \"true\" (or \
                         AWS_ALLOW_HTTP=true) to allow it, for local servers only"
                    )));
                }
            }
            Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            let mut b = GoogleCloudStorageBuilder::from_env().with_url(url);
            for (k, v) in options {
                b = b.with_config(key::<GoogleConfigKey>(url, "gs", k)?, v);
            }
            Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
        }
        ObjectStoreScheme::MicrosoftAzure => {
            let mut b = MicrosoftAzureBuilder::from_env().with_url(url);
            for (k, v) in options {
                b = b.with_config(key::<AzureConfigKey>(url, "az", k)?, v);
            }
            Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
        }
        other => {
            return Err(bad(format!(
                "{other:?} stores are not supported; use file://, memory://, s3://, gs:// or az://"
            )))
        }
    };
    Ok((store, prefix))
}

fn key<K: FromStr>(url: &str, backend: &str, name: &str) -> Result<K> {
    name.parse().map_err(|_| CheckpointError::Url {
        url: url.to_string(),
        reason: format!(
            "unknown {backend} option {name:?} (options use object_store's key names, e.g. \
             aws_endpoint, aws_region, aws_allow_http, google_service_account, \
             azure_storage_account_name)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_options_and_schemes_are_named() {
        let mut opts = StoreOptions::new();
        opts.insert("aws_endpoint_typo".into(), "http://127.0.0.1:1".into());
        let err = open_url_with("s3://bucket/x", &opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("aws_endpoint_typo"), "{err}");
        let err = open_url_with("memory://", &opts).unwrap_err().to_string();
        assert!(err.contains("do not apply to memory://"), "{err}");
        let err = open_url("ftp://host/x").unwrap_err().to_string();
        assert!(err.contains("ftp://host/x"), "{err}");
    }

    #[test]
    fn prefixes_come_from_the_url_path() {
        let (_, p) = open_url("file:///tmp/ckpt").unwrap();
        assert_eq!(p.as_ref(), "tmp/ckpt");
        let mut opts = StoreOptions::new();
        opts.insert("aws_region".into(), "us-east-1".into());
        let (_, p) = open_url_with("s3://bucket/runs/a", &opts).unwrap();
        assert_eq!(p.as_ref(), "runs/a");
    }
}
