//! Reading datasets of encoded images (LSUN LMDB, image folders) into memory: decode, centre
//! crop and antialiased resize on a pool of threads, with the configured policy for images
//! that cannot be decoded.

use crate::decode::decode_sample;
use crate::{DataError, Result};
use ddpm_config::{BadSamplePolicy, DataConfig};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Images decoded per batch handed to the thread pool.
const CHUNK: usize = 256;

/// One encoded sample: where it came from (file, LMDB key) and its bytes.
pub struct Encoded {
    /// File path or `LSUN key <hex>`; names the sample in errors.
    pub origin: String,
    /// The encoded image, or the error reading it.
    pub bytes: Result<Vec<u8>>,
}

impl From<crate::lsun::LsunEntry> for Encoded {
    fn from(e: crate::lsun::LsunEntry) -> Self {
        Self {
            origin: e.origin,
            bytes: Ok(e.bytes),
        }
    }
}

/// What [`preprocess_all`] produced.
pub struct Preprocessed {
    /// `[n, channels, R, R]` uint8, channels-first, in source order.
    pub pixels: Vec<u8>,
    /// Images kept.
    pub count: usize,
    /// Images left out under `on_bad_sample = "skip"`: (origin, reason).
    pub skipped: Vec<(String, String)>,
}

/// Threads of `data.workers` (0: one per CPU).
pub fn workers(cfg: &DataConfig) -> usize {
    if cfg.workers > 0 {
        cfg.workers as usize
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Decodes and preprocesses every sample of `items` to `data.resolution` and
/// `data.channels`, in order, on `data.workers` threads. A sample that cannot be read or
/// decoded stops everything (`on_bad_sample = "fail"`, the error names it) or is skipped and
/// counted (`"skip"`); more than `max_bad_fraction` skipped is an error too.
/// [`preprocess_chunk`] is the same without the fraction check, for one shard of many.
pub fn preprocess_all(
    items: impl Iterator<Item = Encoded>,
    cfg: &DataConfig,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Preprocessed> {
    let out = preprocess_chunk(items, cfg, progress)?;
    check_bad_fraction(out.count + out.skipped.len(), &out.skipped, cfg)?;
    Ok(out)
}

/// [`preprocess_all`] without the `max_bad_fraction` check (a shard of a larger dataset).
pub fn preprocess_chunk(
    items: impl Iterator<Item = Encoded>,
    cfg: &DataConfig,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Preprocessed> {
    let res = cfg.resolution as u32;
    let channels = cfg.channels as u8;
    let per_image = channels as usize * (res * res) as usize;
    let threads = workers(cfg);
    let mut out = Preprocessed {
        pixels: Vec::new(),
        count: 0,
        skipped: Vec::new(),
    };
    let mut items = items.peekable();
    while items.peek().is_some() {
        let chunk: Vec<Encoded> = items.by_ref().take(CHUNK).collect();
        let next = AtomicUsize::new(0);
        let mut results: Vec<Option<Result<Vec<u8>>>> = (0..chunk.len()).map(|_| None).collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads.min(chunk.len()))
                .map(|_| {
                    s.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(item) = chunk.get(i) else { break done };
                            let r = match &item.bytes {
                                Ok(b) => decode_sample(b, &item.origin, res, channels),
                                Err(e) => Err(DataError::Decode {
                                    origin: item.origin.clone(),
                                    reason: e.to_string(),
                                }),
                            };
                            progress(1);
                            done.push((i, r));
                        }
                    })
                })
                .collect();
            for h in handles {
                for (i, r) in h.join().expect("a decode thread panicked") {
                    results[i] = Some(r);
                }
            }
        });
        for (item, r) in chunk.iter().zip(results) {
            match r.expect("every slot is filled") {
                Ok(px) => {
                    debug_assert_eq!(px.len(), per_image);
                    out.pixels.extend_from_slice(&px);
                    out.count += 1;
                }
                Err(e) => match cfg.on_bad_sample {
                    BadSamplePolicy::Fail => return Err(e),
                    BadSamplePolicy::Skip => out.skipped.push((item.origin.clone(), e.to_string())),
                },
            }
        }
    }
    Ok(out)
}

/// Fails when more than `data.max_bad_fraction` of `total` items were skipped (or there are
/// no items at all); the error names the first skipped one.
pub fn check_bad_fraction(
    total: usize,
    skipped: &[(String, String)],
    cfg: &DataConfig,
) -> Result<()> {
    if total == 0 {
        return Err(DataError::Internal("the dataset has no samples".into()));
    }
    if skipped.len() as f64 / total as f64 > cfg.max_bad_fraction {
        let (origin, reason) = &skipped[0];
        return Err(DataError::TooManyBad {
            bad: skipped.len(),
            total,
            max_fraction: cfg.max_bad_fraction,
            first: format!("{origin}: {reason}"),
        });
    }
    Ok(())
}

/// The samples of an image folder, read lazily (a read error is the sample's error).
pub fn folder_items(dir: &Path) -> Result<impl Iterator<Item = Encoded>> {
    let files = crate::folder::list_images(dir)?;
    Ok(files.into_iter().map(|p| Encoded {
        origin: p.display().to_string(),
        bytes: std::fs::read(&p).map_err(|e| DataError::Io {
            path: p.display().to_string(),
            source: e,
        }),
    }))
}

/// The samples of an LSUN LMDB, in key order (copied out of the read transaction).
pub fn lsun_items(dir: &Path) -> Result<Vec<Encoded>> {
    let db = crate::lsun::LsunDb::open(dir)?;
    Ok(db
        .range(0, usize::MAX)?
        .into_iter()
        .map(Encoded::from)
        .collect())
}
