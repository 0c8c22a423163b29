//! `ddpm prepare`: a `data.source` (LSUN LMDB, image folder, CIFAR-10, IDX) preprocessed once
//! into shards of raw uint8 samples in any object store, with a manifest written last. An
//! interrupted prepare resumes without redoing finished shards; `data.source =
//! "shards:URL"` trains from the result.

use super::progress;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use ddpm_checkpoint::{open_url_with, put_blob, Blob, StoreOptions, UploadPolicy};
use ddpm_config::{BadSamplePolicy, DataConfig};
use ddpm_data::prepare::SourceReader;
use ddpm_data::shards::{
    sha256_hex, shard_name, DatasetManifest, ShardEntry, DATASET_FORMAT, DATASET_MANIFEST,
    RAW_UINT8_CHW,
};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::sync::Arc;

/// Policy for images that cannot be decoded.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnBad {
    /// Stop, naming the image.
    Fail,
    /// Leave it out and count it (see --max-bad-fraction).
    Skip,
}

/// Arguments of `ddpm prepare`.
#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// What to prepare: lsun:LMDB_DIR, folder:DIR, cifar10:DIR, cifar10-test:DIR or idx:FILE.
    #[arg(long)]
    pub source: String,
    /// Side of the square samples (centre crop, then Lanczos-3 resize).
    #[arg(long)]
    pub resolution: u32,
    /// 3 (RGB) or 1 (grey).
    #[arg(long, default_value_t = 3)]
    pub channels: u32,
    /// Zero padding on each side for idx/cifar10 sources (Fashion-MNIST 28 + 2*2 = 32).
    #[arg(long, default_value_t = 0)]
    pub pad: u32,
    /// Where to write: file:///abs/dir, s3://bucket/prefix, gs://..., az://...
    #[arg(long)]
    pub out: String,
    /// Source items per shard.
    #[arg(long, default_value_t = 1024)]
    pub shard_size: usize,
    /// Decoding threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Images that cannot be decoded: fail (naming them) or skip (counted).
    #[arg(long, value_enum, default_value = "fail")]
    pub on_bad_sample: OnBad,
    /// With --on-bad-sample skip: the largest share of images that may be left out.
    #[arg(long, default_value_t = 0.001)]
    pub max_bad_fraction: f64,
    /// Store option KEY=VALUE (object_store key names, e.g. aws_endpoint); repeatable.
    #[arg(long = "option", value_name = "KEY=VALUE")]
    pub options: Vec<String>,
}

/// Parses repeated `--option KEY=VALUE`.
pub fn parse_options(kvs: &[String]) -> Result<StoreOptions> {
    let mut out = StoreOptions::new();
    for kv in kvs {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--option {kv:?}: expected KEY=VALUE");
        };
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Object recording the parameters of the prepare that writes into `--out`.
const PREPARE_PARAMS: &str = "prepare.json";

/// The shard's sidecar: its entry, written after the shard, so a resumed prepare can trust
/// the shard without reading it back.
fn sidecar(name: &str) -> String {
    format!("{name}.json")
}

pub(crate) async fn get_opt(store: &Arc<dyn ObjectStore>, path: &Path) -> Result<Option<Bytes>> {
    match store.get(path).await {
        Ok(r) => Ok(Some(r.bytes().await?)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Runs `ddpm prepare`.
pub fn run(a: PrepareArgs) -> Result<()> {
    anyhow::ensure!(a.shard_size > 0, "--shard-size: expected >= 1");
    anyhow::ensure!(
        (1..=8192).contains(&a.resolution),
        "--resolution: expected 1..=8192, got {}",
        a.resolution
    );
    let kind = a.source.split_once(':').map(|(k, _)| k).unwrap_or("");
    anyhow::ensure!(
        a.pad == 0 || !matches!(kind, "lsun" | "folder"),
        "--pad applies to idx: and cifar10: sources only (lsun:/folder: images are cropped and resized to --resolution)"
    );
    anyhow::ensure!(matches!(a.channels, 1 | 3), "--channels: expected 1 or 3");
    anyhow::ensure!(
        (0.0..=1.0).contains(&a.max_bad_fraction),
        "--max-bad-fraction: expected 0..=1"
    );
    let cfg = DataConfig {
        source: a.source.clone(),
        resolution: a.resolution as i64,
        channels: a.channels as i64,
        pad: a.pad as i64,
        on_bad_sample: match a.on_bad_sample {
            OnBad::Fail => BadSamplePolicy::Fail,
            OnBad::Skip => BadSamplePolicy::Skip,
        },
        max_bad_fraction: a.max_bad_fraction,
        workers: a.workers as i64,
        ..DataConfig::default()
    };
    let (store, prefix) =
        open_url_with(&a.out, &parse_options(&a.options)?).context("--out / --option")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let manifest_path = prefix.clone().join(DATASET_MANIFEST);
    if let Some(bytes) = rt.block_on(get_opt(&store, &manifest_path))? {
        let m = DatasetManifest::parse(&bytes, &format!("{}/{DATASET_MANIFEST}", a.out))?;
        if m.source == a.source
            && m.resolution == a.resolution
            && m.channels == a.channels
            && m.shard_size == a.shard_size as u64
        {
            println!(
                "{}: already prepared ({} samples in {} shards)",
                a.out,
                m.samples,
                m.shards.len()
            );
            return Ok(());
        }
        bail!(
            "{}: holds another prepared dataset ({} at {}x{}, {} channels); choose another --out",
            a.out,
            m.source,
            m.resolution,
            m.resolution,
            m.channels
        );
    }
    let reader = SourceReader::open(&cfg).with_context(|| format!("--source {}", a.source))?;
    let n_shards = reader.len().div_ceil(a.shard_size);
    // What the shards in --out are made from. Shards are reused only by a rerun with the
    // same parameters over the same source; anything else is refused, naming the difference.
    let params = serde_json::json!({
        "source": a.source, "resolution": a.resolution, "channels": a.channels, "pad": a.pad,
        "shard_size": a.shard_size, "source_items": reader.len(),
    });
    let params_path = prefix.clone().join(PREPARE_PARAMS);
    match rt.block_on(get_opt(&store, &params_path))? {
        Some(b) => {
            let earlier: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
            anyhow::ensure!(
                earlier == params,
                "{}: holds an unfinished prepare with other parameters or another source ({earlier}; now {params}); choose another --out or delete it",
                a.out
            );
        }
        None => rt
            .block_on(store.put(
                &params_path,
                PutPayload::from(serde_json::to_vec_pretty(&params)?),
            ))
            .with_context(|| format!("writing {}/{PREPARE_PARAMS}", a.out))
            .map(|_| ())?,
    }
    let pb = progress(reader.len() as u64, "prepare");
    let sample_bytes = a.channels as u64 * a.resolution as u64 * a.resolution as u64;
    let mut shards = Vec::with_capacity(n_shards);
    let mut reused = 0;
    for i in 0..n_shards {
        let name = shard_name(i);
        let path = prefix.clone().join(name.as_str());
        let side = prefix.clone().join(sidecar(&name).as_str());
        // A finished shard has its sidecar and the size the sidecar says.
        let done = rt.block_on(async {
            let Some(b) = get_opt(&store, &side).await? else {
                return Ok::<_, anyhow::Error>(None);
            };
            let Ok(entry) = serde_json::from_slice::<ShardEntry>(&b) else {
                return Ok(None);
            };
            let consistent = entry.name == name && entry.bytes == entry.samples * sample_bytes;
            match store.head(&path).await {
                Ok(meta) if consistent && meta.size == entry.bytes => Ok(Some(entry)),
                Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            }
        })?;
        if let Some(entry) = done {
            let items = (reader.len() - i * a.shard_size).min(a.shard_size);
            pb.inc(items as u64);
            reused += 1;
            shards.push(entry);
            continue;
        }
        let data = reader.shard(i, a.shard_size, &cfg, &|k| pb.inc(k as u64))?;
        let entry = ShardEntry {
            name: name.clone(),
            samples: data.samples,
            bytes: data.samples * sample_bytes,
            sha256: sha256_hex(&data.pixels),
            skipped: data.skipped,
        };
        let json = serde_json::to_vec_pretty(&entry)?;
        rt.block_on(async {
            // The sidecar goes first and comes back last: a shard is trusted only once it is
            // completely written.
            match store.delete(&side).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            // Multipart above 64 MiB: a shard of large images can pass S3's 5 GiB put limit.
            let blob = Blob::from_segments(vec![Bytes::from(data.pixels)]);
            put_blob(store.as_ref(), &path, &blob, &UploadPolicy::default()).await?;
            store.put(&side, PutPayload::from(json)).await
        })
        .with_context(|| format!("writing {name} to {}", a.out))?;
        shards.push(entry);
        // Stop as soon as the limit is certainly passed, not after the whole source.
        let skipped_so_far: Vec<(String, String)> = shards
            .iter()
            .flat_map(|s| s.skipped.iter().cloned())
            .collect();
        if skipped_so_far.len() as f64 > a.max_bad_fraction * reader.len() as f64 {
            pb.finish_and_clear();
            ddpm_data::encoded::check_bad_fraction(reader.len(), &skipped_so_far, &cfg)
                .context("stopped early; the finished shards stay and a rerun reuses them")?;
        }
    }
    pb.finish_and_clear();
    let skipped: Vec<(String, String)> = shards
        .iter()
        .flat_map(|s| s.skipped.iter().cloned())
        .collect();
    ddpm_data::encoded::check_bad_fraction(reader.len(), &skipped, &cfg)
        .context("nothing is lost: the finished shards stay and a rerun reuses them")?;
    let kept: u64 = shards.iter().map(|s| s.samples).sum();
    anyhow::ensure!(
        kept > 0,
        "{}: no image of the source could be used",
        a.source
    );
    let manifest = DatasetManifest {
        format: DATASET_FORMAT,
        encoding: RAW_UINT8_CHW.into(),
        source: a.source.clone(),
        resolution: a.resolution,
        channels: a.channels,
        shard_size: a.shard_size as u64,
        samples: shards.iter().map(|s| s.samples).sum(),
        shards,
    };
    let create = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    rt.block_on(store.put_opts(
        &manifest_path,
        PutPayload::from(serde_json::to_vec_pretty(&manifest)?),
        create,
    ))
    .with_context(|| format!("writing {}/{DATASET_MANIFEST}", a.out))?;
    for (origin, reason) in skipped.iter().take(10) {
        tracing::warn!(%origin, %reason, "skipped an image that cannot be decoded");
    }
    println!(
        "prepared {} samples of {}x{}x{} in {} shards ({} reused from an earlier run, {} images skipped) at {}",
        manifest.samples,
        a.channels,
        a.resolution,
        a.resolution,
        manifest.shards.len(),
        reused,
        skipped.len(),
        a.out
    );
    Ok(())
}
