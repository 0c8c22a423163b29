//! The training loader: deterministic batches in the epoch order for every rank, identical
//! for any thread count, exact resume from a saved cursor, flips keyed by the sample's place,
//! shard-backed datasets through the bounded cache, and the bad-sample policy on real photos.

use ddpm_config::{BadSamplePolicy, DataConfig};
use ddpm_data::epoch::{Cursor, Order};
use ddpm_data::loader::{flips, Batch, Loader, LoaderOptions};
use ddpm_data::samples::{open_sample_source, MemorySource, SampleSource};
use ddpm_data::shard_cache::{ShardCacheOptions, ShardFetcher, ShardSource};
use ddpm_data::shards::{
    sha256_hex, shard_name, DatasetManifest, ShardEntry, DATASET_FORMAT, RAW_UINT8_CHW,
};
use ddpm_data::DataError;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use tch::Tensor;

/// `n` samples of shape [3, 2, 4]; every pixel encodes the sample, channel, row and column.
fn pixels(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (0..24).map(move |p| ((i * 7 + p * 3) % 251) as u8))
        .collect()
}

fn memory(n: usize) -> Arc<dyn SampleSource> {
    Arc::new(MemorySource::new(pixels(n), [3, 2, 4], "mem").unwrap())
}

/// `inner` with `hook(index)` run before every read (a delay, a panic).
fn hooked(
    inner: Arc<dyn SampleSource>,
    hook: impl Fn(usize) + Send + Sync + 'static,
) -> Arc<dyn SampleSource> {
    struct Hooked<F>(Arc<dyn SampleSource>, F);
    impl<F: Fn(usize) + Send + Sync> SampleSource for Hooked<F> {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn shape(&self) -> [usize; 3] {
            self.0.shape()
        }
        fn read(&self, index: usize, out: &mut [u8]) -> Result<(), DataError> {
            (self.1)(index);
            self.0.read(index, out)
        }
        fn describe(&self) -> String {
            format!("hooked {}", self.0.describe())
        }
    }
    Arc::new(Hooked(inner, hook))
}

fn opts(global_batch: usize, world: usize, rank: usize, threads: usize) -> LoaderOptions {
    LoaderOptions {
        global_batch,
        world,
        rank,
        seed: 11,
        random_flip: true,
        threads,
        prefetch_batches: 2,
        on_bad_sample: BadSamplePolicy::Fail,
        max_bad_fraction: 0.0,
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

/// What batch `draws` must hold: each sample's pixels in [-1, 1], mirrored when it flips.
fn expected(source: &dyn SampleSource, draws: &[ddpm_data::epoch::Draw], seed: u64) -> Vec<f32> {
    let [c, h, w] = source.shape();
    let mut out = Vec::new();
    let mut px = vec![0u8; c * h * w];
    for d in draws {
        source.read(d.index as usize, &mut px).unwrap();
        for row in px.chunks(w) {
            let row: Vec<u8> = if flips(seed, d) {
                row.iter().rev().copied().collect()
            } else {
                row.to_vec()
            };
            out.extend(row.iter().map(|&v| v as f32 / 127.5 - 1.0));
        }
    }
    out
}

fn take(loader: &mut Loader, steps: usize) -> Vec<Batch> {
    (0..steps).map(|_| loader.next_batch().unwrap()).collect()
}

#[test]
fn every_rank_gets_its_slice_of_the_epoch_order_with_keyed_flips() {
    let n = 23;
    let src = memory(n);
    for world in 1..=5 {
        let per_rank = 3;
        let steps = 3 * n / (world * per_rank) + 2;
        let mut all = Vec::new();
        for rank in 0..world {
            let mut loader = Loader::start(
                src.clone(),
                Cursor::default(),
                opts(per_rank * world, world, rank, 2),
            )
            .unwrap();
            let mut reference = Cursor::default();
            for _ in 0..steps {
                let b = loader.next_batch().unwrap();
                let draws = reference.next_rank_draws(
                    &Order::Uniform(n),
                    per_rank * world,
                    world,
                    rank,
                    11,
                );
                assert_eq!(b.indices, draws.iter().map(|d| d.index).collect::<Vec<_>>());
                assert_eq!(b.draws, draws, "each row's epoch and position");
                assert!(b.skipped.is_empty());
                assert_eq!(b.images.size(), [3, 3, 2, 4]);
                assert_eq!(values(&b.images), expected(&*src, &draws, 11));
                assert_eq!(b.cursor, reference);
                all.push((b.cursor.epoch, b.cursor.position, rank, b.indices));
            }
        }
        // Together the ranks deal each epoch exactly once.
        all.sort();
        let stream: Vec<u32> = all.into_iter().flat_map(|(_, _, _, i)| i).collect();
        for epoch in stream.chunks_exact(n) {
            let mut e = epoch.to_vec();
            e.sort_unstable();
            assert_eq!(e, (0..n as u32).collect::<Vec<_>>(), "world {world}");
        }
    }
}

#[test]
fn batches_do_not_depend_on_the_thread_count_and_resume_exactly() {
    let src = memory(17);
    let run = |threads| {
        let mut l = Loader::start(src.clone(), Cursor::default(), opts(4, 1, 0, threads)).unwrap();
        take(&mut l, 12)
    };
    let one = run(1);
    let four = run(4);
    for (a, b) in one.iter().zip(&four) {
        assert_eq!(a.indices, b.indices);
        assert!(a.images.equal(&b.images));
    }
    // Restarted from the cursor saved after batch 5, the loader continues identically.
    let saved = one[4].cursor.clone();
    let mut resumed = Loader::start(
        src.clone(),
        Cursor::at(saved.epoch, saved.position),
        opts(4, 1, 0, 2),
    )
    .unwrap();
    for b in &one[5..] {
        let r = resumed.next_batch().unwrap();
        assert_eq!(r.indices, b.indices);
        assert!(r.images.equal(&b.images));
    }
}

#[test]
fn flips_are_half_of_the_samples_and_off_when_disabled() {
    let flipped = (0..10_000u64)
        .filter(|&p| {
            flips(
                3,
                &ddpm_data::epoch::Draw {
                    index: 0,
                    epoch: p / 100,
                    position: p % 100,
                },
            )
        })
        .count();
    assert!(
        (4_700..5_300).contains(&flipped),
        "{flipped} of 10000 flipped"
    );
    let src = memory(8);
    let mut o = opts(8, 1, 0, 1);
    o.random_flip = false;
    let mut l = Loader::start(src.clone(), Cursor::default(), o).unwrap();
    let b = l.next_batch().unwrap();
    let mut px = vec![0u8; 24];
    let mut want = Vec::new();
    for &i in &b.indices {
        src.read(i as usize, &mut px).unwrap();
        want.extend(px.iter().map(|&v| v as f32 / 127.5 - 1.0));
    }
    assert_eq!(values(&b.images), want);
}

struct Shards(HashMap<String, Vec<u8>>);

impl ShardFetcher for Shards {
    fn fetch(&self, name: &str) -> Result<Vec<u8>, DataError> {
        std::thread::sleep(std::time::Duration::from_millis(2));
        self.0.get(name).cloned().ok_or_else(|| DataError::Format {
            path: name.into(),
            reason: "no such object".into(),
        })
    }
}

#[test]
fn shard_datasets_deal_every_sample_once_per_epoch_within_the_cache() {
    let (n, shard_size) = (50usize, 6usize);
    let all = pixels(n);
    let mut objects = HashMap::new();
    let mut entries = Vec::new();
    for (i, chunk) in all.chunks(shard_size * 24).enumerate() {
        entries.push(ShardEntry {
            name: shard_name(i),
            samples: (chunk.len() / 24) as u64,
            bytes: chunk.len() as u64,
            sha256: sha256_hex(chunk),
            skipped: vec![],
        });
        objects.insert(shard_name(i), chunk.to_vec());
    }
    let manifest = DatasetManifest {
        format: DATASET_FORMAT,
        encoding: RAW_UINT8_CHW.into(),
        source: "test".into(),
        resolution: 2,
        channels: 6, // [6, 2, 2] = 24 bytes, the same bytes as [3, 2, 4]
        shard_size: shard_size as u64,
        samples: n as u64,
        shards: entries,
    };
    let options = ShardCacheOptions {
        cache_shards: 4,
        window: 2,
        fetch_threads: 2,
    };
    let shards = Arc::new(
        ShardSource::new(manifest, Arc::new(Shards(objects)), options, "mem://d").unwrap(),
    );
    let src: Arc<dyn SampleSource> = shards.clone();
    let mut px = [0u8; 24];
    for i in 0..n {
        src.read(i, &mut px).unwrap();
        assert_eq!(px[..], all[i * 24..(i + 1) * 24], "sample {i}");
    }
    let mut l = Loader::start(src.clone(), Cursor::default(), opts(5, 1, 0, 2)).unwrap();
    let mut seen = Vec::new();
    let mut c = Cursor::default();
    for _ in 0..30 {
        let b = l.next_batch().unwrap();
        let draws = c.next_draws(&src.order(), 5, 11);
        assert_eq!(values(&b.images), expected(&*src, &draws, 11));
        assert_eq!(b.indices, draws.iter().map(|d| d.index).collect::<Vec<_>>());
        assert!(
            shards.cached_shards() <= 4,
            "{} shards cached",
            shards.cached_shards()
        );
        seen.extend(b.indices);
    }
    for epoch in seen.chunks_exact(n) {
        let mut e = epoch.to_vec();
        e.sort_unstable();
        assert_eq!(e, (0..n as u32).collect::<Vec<_>>());
    }
}

fn photos() -> std::path::PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/photos");
    assert!(
        p.join("astronaut.png").exists(),
        "real photos not found in {} (run `make test-tools`)",
        p.display()
    );
    p
}

/// A folder of the real photos and one truncated JPEG (`broken.jpg`).
fn photo_folder(root: &Path) -> std::path::PathBuf {
    let dir = root.join("photos");
    std::fs::create_dir_all(&dir).unwrap();
    for name in [
        "astronaut.png",
        "camera.png",
        "chelsea.png",
        "coffee.png",
        "rocket.jpg",
    ] {
        std::fs::copy(photos().join(name), dir.join(name)).unwrap();
    }
    let jpeg = std::fs::read(photos().join("rocket.jpg")).unwrap();
    // Cut inside the headers: no decoder recovers an image from it.
    std::fs::write(dir.join("broken.jpg"), &jpeg[..300]).unwrap();
    dir
}

fn folder_cfg(dir: &Path, policy: BadSamplePolicy, max_bad_fraction: f64) -> DataConfig {
    DataConfig {
        source: format!("folder:{}", dir.display()),
        resolution: 16,
        channels: 3,
        on_bad_sample: policy,
        max_bad_fraction,
        ..DataConfig::default()
    }
}

#[test]
fn undecodable_photos_fail_naming_the_file_or_are_skipped_up_to_the_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = photo_folder(tmp.path());
    let load = |cfg: &DataConfig, batch| {
        let src = open_sample_source(cfg).unwrap();
        assert_eq!(src.len(), 6);
        let mut o = LoaderOptions::from_config(cfg, 5, batch, 1, 0);
        o.threads = 2;
        Loader::start(src, Cursor::default(), o).unwrap()
    };
    // fail: the error names the file.
    let mut l = load(&folder_cfg(&dir, BadSamplePolicy::Fail, 0.0), 6);
    let err = l.next_batch().unwrap_err().to_string();
    assert!(err.contains("broken.jpg"), "{err}");
    // skip: the batch is one short, every epoch, and the rest are real photos.
    let mut l = load(&folder_cfg(&dir, BadSamplePolicy::Skip, 0.2), 6);
    for epoch in 0..3 {
        let b = l.next_batch().unwrap();
        assert_eq!(b.images.size(), [5, 3, 16, 16]);
        assert_eq!(b.indices.len(), 5);
        // The skipped draw is broken.jpg (index 1 in sorted order); the used draws and
        // the skipped one together are the whole epoch, each position once.
        assert_eq!(b.skipped.len(), 1);
        assert_eq!((b.skipped[0].index, b.skipped[0].epoch), (1, epoch));
        assert_eq!(
            b.indices,
            b.draws.iter().map(|d| d.index).collect::<Vec<_>>()
        );
        let mut positions: Vec<u64> = b
            .draws
            .iter()
            .chain(&b.skipped)
            .map(|d| d.position)
            .collect();
        positions.sort_unstable();
        assert_eq!(positions, (0..6).collect::<Vec<u64>>());
        let std = b.images.std(true).double_value(&[]);
        assert!(std > 0.1, "photos should not be flat (std {std})");
    }
    // skip, but one bad file of six is over a limit of 10%: it fails as soon as it is met.
    let mut l = load(&folder_cfg(&dir, BadSamplePolicy::Skip, 0.1), 6);
    let err = l.next_batch().unwrap_err().to_string();
    assert!(
        err.contains("1 of 6") && err.contains("broken.jpg"),
        "{err}"
    );
}

#[test]
fn the_training_thread_waits_only_when_the_pool_is_slower() {
    // The pool needs ~40 ms a batch and training takes none: nearly all of it is waiting.
    let mut l = Loader::start(
        hooked(memory(16), |_| {
            std::thread::sleep(std::time::Duration::from_millis(10))
        }),
        Cursor::default(),
        opts(4, 1, 0, 1),
    )
    .unwrap();
    take(&mut l, 5);
    assert!(l.waited().as_secs_f64() > 0.1, "waited {:?}", l.waited());
    // With 50 ms of "training" a step the pool keeps ahead: after the first batch, no wait.
    let mut l = Loader::start(
        hooked(memory(16), |_| {
            std::thread::sleep(std::time::Duration::from_millis(10))
        }),
        Cursor::default(),
        opts(4, 1, 0, 2),
    )
    .unwrap();
    l.next_batch().unwrap();
    let first = l.waited();
    for _ in 0..4 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        l.next_batch().unwrap();
    }
    let later = l.waited() - first;
    assert!(
        later.as_secs_f64() < 0.02,
        "waited {later:?} after the first batch"
    );
}

#[test]
fn a_panicking_read_fails_its_batch_instead_of_hanging() {
    let mut l = Loader::start(
        hooked(memory(8), |index| {
            assert!(index != 3, "decoder bug on sample 3")
        }),
        Cursor::default(),
        opts(8, 1, 0, 2),
    )
    .unwrap();
    let err = l.next_batch().unwrap_err().to_string();
    assert!(
        err.contains("panicked") && err.contains("decoder bug on sample 3"),
        "{err}"
    );
}

#[test]
fn a_folder_of_only_bad_images_fails_even_with_no_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bad");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..3 {
        std::fs::write(dir.join(format!("{i}.png")), b"\x89PNG not really").unwrap();
    }
    let cfg = folder_cfg(&dir, BadSamplePolicy::Skip, 1.0);
    let src = open_sample_source(&cfg).unwrap();
    let mut o = LoaderOptions::from_config(&cfg, 5, 1, 1, 0);
    o.threads = 1;
    let mut l = Loader::start(src, Cursor::default(), o).unwrap();
    let mut last = None;
    for _ in 0..5 {
        match l.next_batch() {
            Ok(b) => assert_eq!(b.indices.len(), 0),
            Err(e) => {
                last = Some(e.to_string());
                break;
            }
        }
    }
    let err = last.expect("the loader must stop once every image is bad");
    assert!(err.contains("3 of 3"), "{err}");
}
