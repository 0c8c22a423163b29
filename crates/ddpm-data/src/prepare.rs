//! Reading a `data.source` shard by shard for `ddpm prepare`: source items
//! `[i * shard_size, (i + 1) * shard_size)` become shard `i` (raw uint8 `[n, C, R, R]`),
//! so an interrupted prepare can redo exactly the shards it had not finished.

use crate::encoded::{preprocess_chunk, Encoded};
use crate::{DataError, Result};
use ddpm_config::DataConfig;
use std::path::{Path, PathBuf};

enum Items {
    Lsun(crate::lsun::LsunDb),
    Folder(Vec<PathBuf>),
    /// Already-decoded images (IDX, CIFAR-10), padded and checked against the config.
    InMemory(crate::ImageSet),
}

/// One shard's worth of preprocessed samples.
pub struct ShardData {
    /// `[samples, C, R, R]` uint8.
    pub pixels: Vec<u8>,
    /// Samples kept.
    pub samples: u64,
    /// Items left out (origin, reason).
    pub skipped: Vec<(String, String)>,
}

/// A `data.source` opened for sharding.
pub struct SourceReader {
    items: Items,
    len: usize,
    /// LSUN: (index of the next item, key of the item before it), so consecutive shards
    /// continue from a key instead of walking the cursor from the start.
    lsun_next: std::sync::Mutex<Option<(usize, String)>>,
}

impl SourceReader {
    /// Opens `cfg.source` (`lsun:`, `folder:`, `idx:`, `cifar10:`, `cifar10-test:`).
    pub fn open(cfg: &DataConfig) -> Result<Self> {
        let (kind, path) = crate::source::source_kind(cfg)?;
        let items = match kind {
            "lsun" => Items::Lsun(crate::lsun::LsunDb::open(Path::new(path))?),
            "folder" => Items::Folder(crate::folder::list_images(Path::new(path))?),
            _ => Items::InMemory(crate::open_source(cfg)?),
        };
        let len = match &items {
            Items::Lsun(db) => db.len()?,
            Items::Folder(f) => f.len(),
            Items::InMemory(set) => set.len(),
        };
        Ok(Self {
            items,
            len,
            lsun_next: std::sync::Mutex::new(None),
        })
    }

    /// Source items.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the source has no items.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shard `index` of `shard_size` items, preprocessed to the config's resolution and
    /// channels on `data.workers` threads, with the bad-image policy.
    pub fn shard(
        &self,
        index: usize,
        shard_size: usize,
        cfg: &DataConfig,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Result<ShardData> {
        let start = index * shard_size;
        let end = (start + shard_size).min(self.len);
        if start >= end {
            return Err(DataError::Internal(format!(
                "shard {index} is past the end of the source ({} items)",
                self.len
            )));
        }
        let encoded: Vec<Encoded> = match &self.items {
            Items::Lsun(db) => {
                let mut next = self.lsun_next.lock().expect("lsun cursor");
                let entries = match next.as_ref() {
                    Some((i, after)) if *i == start => {
                        db.range_after(after.as_bytes(), end - start)?
                    }
                    // Not where the last shard ended (first shard, or after reused shards):
                    // walk there once, then continue by key.
                    _ => db.range(start, end - start)?,
                };
                *next = entries.last().map(|e| (end, e.key.clone()));
                entries.into_iter().map(Encoded::from).collect()
            }
            Items::Folder(files) => files[start..end]
                .iter()
                .map(|p| Encoded {
                    origin: p.display().to_string(),
                    bytes: std::fs::read(p).map_err(|e| DataError::Io {
                        path: p.display().to_string(),
                        source: e,
                    }),
                })
                .collect(),
            Items::InMemory(set) => {
                let slice = set
                    .images()
                    .narrow(0, start as i64, (end - start) as i64)
                    .contiguous();
                let pixels: Vec<u8> = Vec::try_from(slice.flatten(0, -1))
                    .map_err(|e| DataError::Internal(format!("reading images: {e}")))?;
                progress(end - start);
                return Ok(ShardData {
                    pixels,
                    samples: (end - start) as u64,
                    skipped: Vec::new(),
                });
            }
        };
        let p = preprocess_chunk(encoded.into_iter(), cfg, progress)?;
        Ok(ShardData {
            pixels: p.pixels,
            samples: p.count as u64,
            skipped: p.skipped,
        })
    }
}
