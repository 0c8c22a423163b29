//! Random access to the samples of a dataset, whatever holds them: memory (IDX, CIFAR-10),
//! encoded images decoded on demand (LSUN LMDB, image folders), or prepared shards in an
//! object store ([`crate::shard_cache::ShardSource`]). The loader reads through
//! [`SampleSource`] from its pool of threads.

use crate::decode::decode_sample;
use crate::epoch::Order;
use crate::lsun::LsunDb;
use crate::{DataError, Result};
use ddpm_config::DataConfig;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A dataset whose samples can be read by index from many threads.
pub trait SampleSource: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;

    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[channels, height, width]` of every sample.
    fn shape(&self) -> [usize; 3];

    /// Writes sample `index` as channels-first uint8 into `out` (`C * H * W` bytes). An
    /// undecodable sample is a [`DataError::Decode`] naming it; other errors (a missing
    /// shard, a sha256 mismatch) are never skipped.
    fn read(&self, index: usize, out: &mut [u8]) -> Result<()>;

    /// How epochs are shuffled: uniformly, or shard windows for shard-backed sources.
    fn order(&self) -> Order {
        Order::Uniform(self.len())
    }

    /// A hint that `indices` will be read soon (a shard-backed source starts fetching).
    fn will_need(&self, _indices: &[u32]) {}

    /// How many samples ahead of the batch being built the loader should announce with
    /// [`SampleSource::will_need`].
    fn lookahead(&self) -> usize {
        0
    }

    /// Names the source in logs.
    fn describe(&self) -> String;
}

/// Samples held in memory as one uint8 buffer `[N, C, H, W]`.
pub struct MemorySource {
    pixels: Vec<u8>,
    shape: [usize; 3],
    name: String,
}

impl MemorySource {
    /// Wraps `pixels` (`n * C * H * W` bytes).
    pub fn new(pixels: Vec<u8>, shape: [usize; 3], name: &str) -> Result<Self> {
        let per = shape.iter().product::<usize>();
        if per == 0 || pixels.is_empty() || !pixels.len().is_multiple_of(per) {
            return Err(DataError::Format {
                path: name.into(),
                reason: format!(
                    "{} bytes is not a non-empty whole number of {shape:?} samples",
                    pixels.len()
                ),
            });
        }
        Ok(Self {
            pixels,
            shape,
            name: name.into(),
        })
    }

    /// Copies an in-memory [`crate::ImageSet`].
    pub fn from_image_set(set: &crate::ImageSet, name: &str) -> Result<Self> {
        let [c, h, w] = set.image_shape();
        let pixels = Vec::<u8>::try_from(set.images().contiguous().view([-1]))
            .map_err(|e| DataError::Internal(format!("{name}: reading the images: {e}")))?;
        Self::new(pixels, [c as usize, h as usize, w as usize], name)
    }
}

impl SampleSource for MemorySource {
    fn len(&self) -> usize {
        self.pixels.len() / self.shape.iter().product::<usize>()
    }

    fn shape(&self) -> [usize; 3] {
        self.shape
    }

    fn read(&self, index: usize, out: &mut [u8]) -> Result<()> {
        let per = out.len();
        let from = index * per;
        let src = self.pixels.get(from..from + per).ok_or_else(|| {
            DataError::Internal(format!("{}: sample {index} out of range", self.name))
        })?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

enum Items {
    Files(Vec<PathBuf>),
    Lsun { db: LsunDb, keys: Vec<[u8; 40]> },
}

/// Encoded images (an LSUN LMDB or an image folder) decoded, centre-cropped and resized on
/// every read, so a dataset of any size streams without a preprocessing pass.
pub struct EncodedSource {
    items: Items,
    resolution: u32,
    channels: u8,
    name: String,
}

impl EncodedSource {
    /// An image folder (PNG, JPEG, WebP; recursive, in path order).
    pub fn folder(dir: &Path, resolution: u32, channels: u8) -> Result<Self> {
        let files = crate::folder::list_images(dir)?;
        Self::build(Items::Files(files), dir, resolution, channels)
    }

    /// An LSUN LMDB environment, in key order.
    pub fn lsun(dir: &Path, resolution: u32, channels: u8) -> Result<Self> {
        let db = LsunDb::open(dir)?;
        let keys = db.keys()?;
        Self::build(Items::Lsun { db, keys }, dir, resolution, channels)
    }

    fn build(items: Items, dir: &Path, resolution: u32, channels: u8) -> Result<Self> {
        let s = Self {
            items,
            resolution,
            channels,
            name: dir.display().to_string(),
        };
        if s.is_empty() {
            return Err(DataError::Format {
                path: s.name,
                reason: "no images".into(),
            });
        }
        Ok(s)
    }
}

impl SampleSource for EncodedSource {
    fn len(&self) -> usize {
        match &self.items {
            Items::Files(f) => f.len(),
            Items::Lsun { keys, .. } => keys.len(),
        }
    }

    fn shape(&self) -> [usize; 3] {
        let r = self.resolution as usize;
        [self.channels as usize, r, r]
    }

    fn read(&self, index: usize, out: &mut [u8]) -> Result<()> {
        let (res, ch) = (self.resolution, self.channels);
        let px = match &self.items {
            Items::Files(files) => {
                let path = &files[index];
                let origin = path.display().to_string();
                let bytes = std::fs::read(path).map_err(|e| DataError::Decode {
                    origin: origin.clone(),
                    reason: format!("cannot read the file: {e}"),
                })?;
                decode_sample(&bytes, &origin, res, ch)?
            }
            Items::Lsun { db, keys } => {
                let key = &keys[index];
                db.with_value(key, |bytes| decode_sample(bytes, &db.origin(key), res, ch))??
            }
        };
        out.copy_from_slice(&px);
        Ok(())
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// The [`SampleSource`] of `data.source` for the kinds read from local files: `idx:` and
/// `cifar10:` are loaded into memory (and padded by `data.pad`); `lsun:` and `folder:`
/// stream, decoding on every read. Prepared `shards:` datasets need an object store and are
/// opened by the caller ([`crate::shard_cache::ShardSource`]).
pub fn open_sample_source(cfg: &DataConfig) -> Result<Arc<dyn SampleSource>> {
    let src_err = |reason: String| DataError::Source {
        source_spec: cfg.source.clone(),
        reason,
    };
    let (kind, path) = crate::source::source_kind(cfg)?;
    if kind == "lsun" || kind == "folder" {
        if cfg.pad != 0 {
            return Err(src_err(format!(
                "data.pad = {} applies to idx and cifar10 sources; {kind} images are resized to data.resolution",
                cfg.pad
            )));
        }
        if !(cfg.channels == 1 || cfg.channels == 3) {
            return Err(src_err(format!(
                "data.channels = {}: expected 1 or 3",
                cfg.channels
            )));
        }
        let (r, c) = (cfg.resolution as u32, cfg.channels as u8);
        let s = if kind == "lsun" {
            EncodedSource::lsun(Path::new(path), r, c)?
        } else {
            EncodedSource::folder(Path::new(path), r, c)?
        };
        return Ok(Arc::new(s));
    }
    let set = crate::open_source(cfg)?;
    Ok(Arc::new(MemorySource::from_image_set(&set, path)?))
}
