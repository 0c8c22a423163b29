//! Opening `data.source` for training: prepared datasets (`shards:URL`) on
//! any object store, through ddpm-data's shard cache, and everything else through
//! `ddpm_data::samples::open_sample_source`.

use crate::error::{ensure, Context, Result};
use ddpm_checkpoint::{open_url_with, StoreOptions};
use ddpm_config::DataConfig;
use ddpm_data::samples::{open_sample_source, SampleSource};
use ddpm_data::shard_cache::{ShardCacheOptions, ShardFetcher, ShardSource};
use ddpm_data::shards::{DatasetManifest, DATASET_MANIFEST};
use ddpm_data::DataError;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use std::sync::Arc;

/// Blocking reads of a prepared dataset's objects, on a small runtime of its own.
pub struct StoreFetcher {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
    rt: tokio::runtime::Runtime,
}

impl StoreFetcher {
    /// Opens the dataset at `url` with `[data.options]`.
    pub fn open(url: &str, options: &StoreOptions) -> Result<Self> {
        let (store, prefix) = open_url_with(url, options).context("data.source shards:URL")?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("shard-io")
            .enable_all()
            .build()
            .context("starting the shard-fetch runtime")?;
        Ok(Self {
            store,
            prefix,
            url: url.trim_end_matches('/').to_string(),
            rt,
        })
    }

    /// The object `name`, or None when it does not exist.
    fn get(&self, name: &str) -> Result<Option<bytes::Bytes>> {
        let path = self.prefix.clone().join(name);
        self.rt.block_on(async {
            match self.store.get(&path).await {
                Ok(r) => Ok(Some(r.bytes().await.with_context(|| path.to_string())?)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e).with_context(|| path.to_string()),
            }
        })
    }

    /// Reads and checks `dataset.json`.
    pub fn manifest(&self) -> Result<DatasetManifest> {
        let origin = format!("{}/{DATASET_MANIFEST}", self.url);
        let bytes = self.get(DATASET_MANIFEST)?.with_context(|| {
            format!("{origin}: not found (was `ddpm prepare` run to completion?)")
        })?;
        Ok(DatasetManifest::parse(&bytes, &origin)?)
    }
}

impl ShardFetcher for StoreFetcher {
    fn fetch(&self, name: &str) -> Result<Vec<u8>, DataError> {
        let origin = format!("{}/{name}", self.url);
        match self.get(name) {
            Ok(Some(b)) => Ok(b.to_vec()),
            Ok(None) => Err(DataError::Format {
                path: origin,
                reason: "listed in the dataset manifest but missing".into(),
            }),
            Err(e) => Err(DataError::Format {
                path: origin,
                reason: crate::error::chain(&e),
            }),
        }
    }
}

/// The prepared dataset at `url` as a shard-cached sample source, checked against
/// `data.channels` and `data.resolution`.
pub fn open_prepared(url: &str, data: &DataConfig) -> Result<ShardSource> {
    let fetcher = StoreFetcher::open(url, &data.options)?;
    let m = fetcher.manifest()?;
    ensure!(
        m.channels as i64 == data.channels && m.resolution as i64 == data.resolution,
        "data.source {url}: prepared at {} channel(s), {r}x{r}; the config wants data.channels = {}, data.resolution = {}",
        m.channels,
        data.channels,
        data.resolution,
        r = m.resolution,
    );
    let options = ShardCacheOptions {
        cache_shards: data.cache_shards as usize,
        window: data.shuffle_window_shards as usize,
        fetch_threads: 4,
    };
    Ok(ShardSource::new(m, Arc::new(fetcher), options, url)?)
}

/// The samples of `data.source`, for the training loader.
pub fn open_training_source(data: &DataConfig) -> Result<Arc<dyn SampleSource>> {
    if let Some(url) = data.source.strip_prefix("shards:") {
        return Ok(Arc::new(open_prepared(url, data)?));
    }
    Ok(open_sample_source(data)?)
}
