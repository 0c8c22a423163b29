//! A prepared dataset read shard by shard from an object store: whole shards are fetched
//! (and sha256-verified) into a bounded in-memory cache, ahead of use on background fetch
//! threads, and evicted least recently used. The object-store client lives with the caller
//! ([`ShardFetcher`]): this crate links tch and stays off tokio.

use crate::epoch::Order;
use crate::samples::SampleSource;
use crate::shards::DatasetManifest;
use crate::{DataError, Result};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// Gets one object of a prepared dataset, blocking.
pub trait ShardFetcher: Send + Sync {
    /// The bytes of object `name` (e.g. `shard-00003.bin`); errors name the object and store.
    fn fetch(&self, name: &str) -> Result<Vec<u8>>;
}

/// Cache and fetch settings of a [`ShardSource`].
#[derive(Debug, Clone, Copy)]
pub struct ShardCacheOptions {
    /// Shards held in memory at most (besides those being read right now).
    pub cache_shards: usize,
    /// Shards whose samples are shuffled together (see [`Order::Windowed`]).
    pub window: usize,
    /// Background fetch threads.
    pub fetch_threads: usize,
}

enum Slot {
    Loading,
    /// `read`: whether a reader has used it yet (prefetched shards are kept until then).
    Ready {
        bytes: Arc<Vec<u8>>,
        used: u64,
        read: bool,
    },
    /// A background fetch failed; the next reader fetches it again itself.
    Failed,
}

struct Cache {
    slots: HashMap<usize, Slot>,
    tick: u64,
}

struct Inner {
    manifest: DatasetManifest,
    /// First sample index of each shard, plus the total at the end.
    starts: Vec<u64>,
    fetcher: Arc<dyn ShardFetcher>,
    options: ShardCacheOptions,
    cache: Mutex<Cache>,
    changed: Condvar,
    origin: String,
    /// Set when the source is dropped: queued prefetches are skipped.
    closing: AtomicBool,
}

/// A [`SampleSource`] over the shards of a prepared dataset.
pub struct ShardSource {
    inner: Arc<Inner>,
    prefetch: Option<crossbeam_channel::Sender<usize>>,
    fetchers: Vec<std::thread::JoinHandle<()>>,
}

impl ShardSource {
    /// Serves the samples of `manifest`, fetching shards through `fetcher`; `origin` (the
    /// dataset URL) names it in errors.
    pub fn new(
        manifest: DatasetManifest,
        fetcher: Arc<dyn ShardFetcher>,
        options: ShardCacheOptions,
        origin: &str,
    ) -> Result<Self> {
        if options.cache_shards < options.window.max(1) {
            return Err(DataError::Internal(format!(
                "data.cache_shards = {} must hold at least a window of data.shuffle_window_shards = {} shards",
                options.cache_shards, options.window
            )));
        }
        let mut starts = vec![0u64];
        for s in &manifest.shards {
            starts.push(starts.last().expect("non-empty") + s.samples);
        }
        if manifest.samples == 0 {
            return Err(DataError::Format {
                path: origin.into(),
                reason: "the dataset has no samples".into(),
            });
        }
        let inner = Arc::new(Inner {
            manifest,
            starts,
            fetcher,
            options,
            cache: Mutex::new(Cache {
                slots: HashMap::new(),
                tick: 0,
            }),
            changed: Condvar::new(),
            origin: origin.into(),
            closing: AtomicBool::new(false),
        });
        let (tx, rx) = crossbeam_channel::unbounded::<usize>();
        let fetchers = (0..options.fetch_threads.max(1))
            .map(|i| {
                let (inner, rx) = (inner.clone(), rx.clone());
                std::thread::Builder::new()
                    .name(format!("shard-fetch-{i}"))
                    .spawn(move || {
                        for shard in rx {
                            if inner.closing.load(Ordering::Relaxed) {
                                break;
                            }
                            // Failures are kept as `Failed`; the reader retries and reports.
                            let _ = inner.load(shard, false);
                        }
                    })
                    .expect("spawning a fetch thread")
            })
            .collect();
        Ok(Self {
            inner,
            prefetch: Some(tx),
            fetchers,
        })
    }

    /// The dataset manifest.
    pub fn manifest(&self) -> &DatasetManifest {
        &self.inner.manifest
    }

    /// Shards in memory now (for tests and metrics).
    pub fn cached_shards(&self) -> usize {
        let c = self.inner.cache.lock().expect("cache lock");
        c.slots
            .values()
            .filter(|s| matches!(s, Slot::Ready { .. }))
            .count()
    }
}

impl Drop for ShardSource {
    fn drop(&mut self) {
        self.inner.closing.store(true, Ordering::Relaxed);
        self.prefetch = None;
        for h in self.fetchers.drain(..) {
            let _ = h.join();
        }
    }
}

impl Inner {
    fn shard_of(&self, index: usize) -> usize {
        self.starts.partition_point(|&s| s <= index as u64) - 1
    }

    /// Fetches and verifies `shard` into its slot (which the caller marked `Loading`), and
    /// returns it; `read` marks it used by the caller.
    fn load(&self, shard: usize, read: bool) -> Result<Arc<Vec<u8>>> {
        let entry = &self.manifest.shards[shard];
        let t0 = Instant::now();
        let name = || format!("{}/{}", self.origin, entry.name);
        // A panicking fetcher must not leave the slot `Loading` with readers waiting on it.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.fetcher.fetch(&entry.name)))
            .unwrap_or_else(|_| {
                Err(DataError::Internal(format!(
                    "{}: the fetch panicked",
                    name()
                )))
            })
            .and_then(|bytes| {
                self.manifest
                    .verify_shard(entry, &bytes)
                    .map_err(|e| DataError::Format {
                        path: name(),
                        reason: e.to_string(),
                    })?;
                Ok(Arc::new(bytes))
            });
        metrics::histogram!("ddpm_data_shard_fetch_seconds").record(t0.elapsed().as_secs_f64());
        let mut c = self.cache.lock().expect("cache lock");
        c.tick += 1;
        let tick = c.tick;
        let slot = match &result {
            Ok(bytes) => {
                metrics::counter!("ddpm_data_shard_bytes_total").increment(bytes.len() as u64);
                Slot::Ready {
                    bytes: bytes.clone(),
                    used: tick,
                    read,
                }
            }
            Err(_) => Slot::Failed,
        };
        c.slots.insert(shard, slot);
        self.evict(&mut c, shard);
        drop(c);
        self.changed.notify_all();
        result
    }

    /// Drops ready shards beyond the capacity, never `keep`: least recently used first
    /// among those already read, and prefetched ones not yet read only when no other is left.
    fn evict(&self, c: &mut Cache, keep: usize) {
        loop {
            let held = c
                .slots
                .values()
                .filter(|s| !matches!(s, Slot::Failed))
                .count();
            if held <= self.options.cache_shards {
                return;
            }
            let victim = c
                .slots
                .iter()
                .filter_map(|(&k, s)| match s {
                    Slot::Ready { used, read, .. } if k != keep => Some((!*read, *used, k)),
                    _ => None,
                })
                .min();
            match victim {
                Some((_, _, k)) => {
                    c.slots.remove(&k);
                }
                None => return,
            }
        }
    }

    /// The bytes of `shard`, fetching on this thread when nobody else is (and again when a
    /// background fetch failed, so a transient error there costs one retry, not the run).
    fn get(&self, shard: usize) -> Result<Arc<Vec<u8>>> {
        let mut c = self.cache.lock().expect("cache lock");
        loop {
            c.tick += 1;
            let tick = c.tick;
            match c.slots.get_mut(&shard) {
                Some(Slot::Ready { bytes, used, read }) => {
                    *used = tick;
                    *read = true;
                    return Ok(bytes.clone());
                }
                Some(Slot::Loading) => {
                    let t0 = Instant::now();
                    c = self.changed.wait(c).expect("cache lock");
                    metrics::histogram!("ddpm_data_shard_wait_seconds")
                        .record(t0.elapsed().as_secs_f64());
                }
                None | Some(Slot::Failed) => {
                    c.slots.insert(shard, Slot::Loading);
                    drop(c);
                    return self.load(shard, true).map_err(|e| DataError::Source {
                        source_spec: self.origin.clone(),
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
}

impl SampleSource for ShardSource {
    fn len(&self) -> usize {
        self.inner.manifest.samples as usize
    }

    fn shape(&self) -> [usize; 3] {
        let m = &self.inner.manifest;
        let r = m.resolution as usize;
        [m.channels as usize, r, r]
    }

    fn read(&self, index: usize, out: &mut [u8]) -> Result<()> {
        let inner = &self.inner;
        if index >= self.len() {
            return Err(DataError::Internal(format!(
                "{}: sample {index} out of range",
                inner.origin
            )));
        }
        let shard = inner.shard_of(index);
        let bytes = inner.get(shard)?;
        let per = out.len();
        let at = (index as u64 - inner.starts[shard]) as usize * per;
        out.copy_from_slice(&bytes[at..at + per]);
        Ok(())
    }

    fn order(&self) -> Order {
        Order::Windowed {
            shard_samples: self
                .inner
                .manifest
                .shards
                .iter()
                .map(|s| s.samples)
                .collect(),
            window: self.inner.options.window,
        }
    }

    fn will_need(&self, indices: &[u32]) {
        let Some(tx) = &self.prefetch else { return };
        let mut shards: Vec<usize> = indices
            .iter()
            .map(|&i| self.inner.shard_of(i as usize))
            .collect();
        shards.sort_unstable();
        shards.dedup();
        let mut c = self.inner.cache.lock().expect("cache lock");
        for s in shards {
            if let std::collections::hash_map::Entry::Vacant(v) = c.slots.entry(s) {
                v.insert(Slot::Loading);
                let _ = tx.send(s);
            }
        }
    }

    /// One window of shards ahead of the one being read, when the cache holds both.
    fn lookahead(&self) -> usize {
        let o = &self.inner.options;
        let spare = o.cache_shards.saturating_sub(o.window);
        spare.min(o.window) * self.inner.manifest.shard_size as usize
    }

    fn describe(&self) -> String {
        self.inner.origin.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shards::{sha256_hex, shard_name, ShardEntry, DATASET_FORMAT, RAW_UINT8_CHW};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Shards of 1x2x2 samples whose every byte is the sample index.
    struct Fake {
        shards: HashMap<String, Vec<u8>>,
        fetches: AtomicUsize,
    }

    impl ShardFetcher for Fake {
        fn fetch(&self, name: &str) -> Result<Vec<u8>> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            self.shards
                .get(name)
                .cloned()
                .ok_or_else(|| DataError::Format {
                    path: name.into(),
                    reason: "not found".into(),
                })
        }
    }

    fn dataset(sizes: &[u64]) -> (DatasetManifest, Arc<Fake>) {
        let mut shards = HashMap::new();
        let mut entries = Vec::new();
        let mut next = 0u8;
        for (i, &n) in sizes.iter().enumerate() {
            let bytes: Vec<u8> = (0..n)
                .flat_map(|_| {
                    next += 1;
                    [next - 1; 4]
                })
                .collect();
            entries.push(ShardEntry {
                name: shard_name(i),
                samples: n,
                bytes: bytes.len() as u64,
                sha256: sha256_hex(&bytes),
                skipped: vec![],
            });
            shards.insert(shard_name(i), bytes);
        }
        let m = DatasetManifest {
            format: DATASET_FORMAT,
            encoding: RAW_UINT8_CHW.into(),
            source: "test".into(),
            resolution: 2,
            channels: 1,
            shard_size: sizes[0],
            samples: sizes.iter().sum(),
            shards: entries,
        };
        let fake = Arc::new(Fake {
            shards,
            fetches: AtomicUsize::new(0),
        });
        (m, fake)
    }

    fn options(cache: usize) -> ShardCacheOptions {
        ShardCacheOptions {
            cache_shards: cache,
            window: 1,
            fetch_threads: 2,
        }
    }

    #[test]
    fn samples_come_from_their_shard_and_the_cache_stays_bounded() {
        let (m, fake) = dataset(&[3, 3, 3, 2]);
        let src = ShardSource::new(m, fake.clone(), options(2), "mem://d").unwrap();
        assert_eq!(src.len(), 11);
        let mut px = [0u8; 4];
        for i in 0..11 {
            src.read(i, &mut px).unwrap();
            assert_eq!(px, [i as u8; 4]);
            assert!(src.cached_shards() <= 2);
        }
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 4);
        // Re-reading the last shard is a hit; the first one was evicted.
        src.read(10, &mut px).unwrap();
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 4);
        src.read(0, &mut px).unwrap();
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn will_need_fetches_in_the_background_once() {
        let (m, fake) = dataset(&[3, 3, 3]);
        let src = ShardSource::new(m, fake.clone(), options(3), "mem://d").unwrap();
        src.will_need(&[0, 1, 4, 8]);
        src.will_need(&[2, 5]);
        let t0 = Instant::now();
        while src.cached_shards() < 3 {
            assert!(t0.elapsed().as_secs() < 10, "prefetch never finished");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut px = [0u8; 4];
        src.read(7, &mut px).unwrap();
        assert_eq!(px, [7; 4]);
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_corrupt_shard_is_an_error_naming_it() {
        let (m, fake) = dataset(&[2, 2]);
        let mut shards = fake.shards.clone();
        shards.get_mut(&shard_name(1)).unwrap()[0] ^= 1;
        let fake = Arc::new(Fake {
            shards,
            fetches: AtomicUsize::new(0),
        });
        let src = ShardSource::new(m, fake, options(2), "s3://b/d").unwrap();
        let mut px = [0u8; 4];
        src.read(1, &mut px).unwrap();
        let err = src.read(2, &mut px).unwrap_err().to_string();
        assert!(
            err.contains("s3://b/d/shard-00001.bin") && err.contains("sha256"),
            "{err}"
        );
    }

    /// Fails the first fetch of every shard, then serves it.
    struct Flaky {
        inner: Arc<Fake>,
        failed: Mutex<std::collections::HashSet<String>>,
    }

    impl ShardFetcher for Flaky {
        fn fetch(&self, name: &str) -> Result<Vec<u8>> {
            if self.failed.lock().unwrap().insert(name.to_string()) {
                return Err(DataError::Format {
                    path: name.into(),
                    reason: "connection reset".into(),
                });
            }
            self.inner.fetch(name)
        }
    }

    #[test]
    fn a_failed_prefetch_is_fetched_again_by_its_reader() {
        let (m, fake) = dataset(&[3, 3]);
        let flaky = Arc::new(Flaky {
            inner: fake.clone(),
            failed: Mutex::new(Default::default()),
        });
        let src = ShardSource::new(m, flaky, options(2), "mem://d").unwrap();
        src.will_need(&[4]);
        let t0 = Instant::now();
        while fake.fetches.load(Ordering::SeqCst) == 0
            && !matches!(
                src.inner.cache.lock().unwrap().slots.get(&1),
                Some(Slot::Failed)
            )
        {
            assert!(t0.elapsed().as_secs() < 10, "prefetch never finished");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let mut px = [0u8; 4];
        src.read(4, &mut px).unwrap();
        assert_eq!(px, [4; 4]);
        // A reader's own failed fetch is reported, naming the shard; the next read retries.
        let err = src.read(0, &mut px).unwrap_err().to_string();
        assert!(
            err.contains("shard-00000.bin") && err.contains("connection reset"),
            "{err}"
        );
        src.read(0, &mut px).unwrap();
        assert_eq!(px, [0; 4]);
    }

    #[test]
    fn prefetched_shards_outlive_read_ones_in_the_cache() {
        let (m, fake) = dataset(&[1, 1, 1, 1]);
        let src = ShardSource::new(m, fake.clone(), options(2), "mem://d").unwrap();
        let mut px = [0u8; 4];
        src.read(0, &mut px).unwrap();
        src.read(1, &mut px).unwrap();
        // Shard 2 is announced; when it lands, a read shard makes room, not it.
        src.will_need(&[2]);
        let t0 = Instant::now();
        while fake.fetches.load(Ordering::SeqCst) < 3 || src.cached_shards() < 2 {
            assert!(t0.elapsed().as_secs() < 10, "prefetch never finished");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        src.read(3, &mut px).unwrap(); // evicts the other read shard, not the prefetched one
        src.read(2, &mut px).unwrap();
        assert_eq!(px, [2; 4]);
        assert_eq!(
            fake.fetches.load(Ordering::SeqCst),
            4,
            "shard 2 fetched twice"
        );
    }
}
