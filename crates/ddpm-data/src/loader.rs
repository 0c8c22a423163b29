//! The training loader: a planner thread walks the deterministic epoch order (this rank's
//! slice of every global batch) and hands whole batches to a pool of threads, which read,
//! decode, flip and convert them to float tensors. At most `prefetch_batches` plus one per
//! thread are in flight ahead of the one the training thread takes, so memory stays bounded; the training
//! thread waits only when the pool cannot keep up, and that wait is exported as
//! `ddpm_data_wait_seconds`.

use crate::epoch::{Cursor, Draw, Order};
use crate::samples::SampleSource;
use crate::{DataError, Result};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use ddpm_config::{BadSamplePolicy, DataConfig};
use std::collections::{BTreeMap, BTreeSet};
use std::mem::MaybeUninit;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// What the loader deals and how.
#[derive(Debug, Clone)]
pub struct LoaderOptions {
    /// Samples per step over all ranks (`train.batch_size`).
    pub global_batch: usize,
    /// Ranks taking part (each gets its rows of every global batch,
    /// [`ddpm_config::rank_rows`]).
    pub world: usize,
    /// This rank.
    pub rank: usize,
    /// `run.seed`: keys the epoch permutations and the flips.
    pub seed: u64,
    /// Random horizontal flips with p = 0.5, keyed by the sample's place in the epoch.
    pub random_flip: bool,
    /// Pool threads (>= 1).
    pub threads: usize,
    /// Batches planned ahead of the one being taken (>= 1).
    pub prefetch_batches: usize,
    /// `data.on_bad_sample`.
    pub on_bad_sample: BadSamplePolicy,
    /// `data.max_bad_fraction`, of the whole dataset.
    pub max_bad_fraction: f64,
}

impl LoaderOptions {
    /// The options of `[data]` for rank `rank` of `world`, training on global batches of
    /// `global_batch` samples.
    pub fn from_config(
        data: &DataConfig,
        seed: u64,
        global_batch: usize,
        world: usize,
        rank: usize,
    ) -> Self {
        let threads = crate::encoded::workers(data);
        Self {
            global_batch,
            world,
            rank,
            seed,
            random_flip: data.random_flip,
            threads,
            prefetch_batches: data.prefetch_batches.max(1) as usize,
            on_bad_sample: data.on_bad_sample,
            max_bad_fraction: data.max_bad_fraction,
        }
    }
}

/// One batch for this rank.
#[derive(Debug)]
pub struct Batch {
    /// float32 `[B, C, H, W]` in [-1, 1]; B is smaller than the batch size only when samples
    /// were skipped as undecodable.
    pub images: Tensor,
    /// The dataset indices in the batch, in order (skipped samples left out).
    pub indices: Vec<u32>,
    /// Where each row of `images` was drawn (index, epoch, position), in order: the draws
    /// behind `indices` (skipped samples left out).
    pub draws: Vec<Draw>,
    /// This rank's draws that were skipped as undecodable (`data.on_bad_sample = "skip"`):
    /// dealt and consumed, but not in `images`.
    pub skipped: Vec<Draw>,
    /// The data cursor after this batch: save it with a checkpoint taken after this step.
    pub cursor: Cursor,
}

/// Whether the sample at `draw` is flipped: a hash of (seed, epoch, position), so it depends
/// neither on the world size nor on the rank that draws it.
pub fn flips(seed: u64, draw: &Draw) -> bool {
    let mut z = seed
        ^ draw.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ draw.position.wrapping_mul(0xD6E8_FEB8_6659_FD93)
        ^ 0x666c_6970; // "flip"
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & 1 == 1
}

struct Job {
    seq: u64,
    draws: Vec<Draw>,
    cursor: Cursor,
}

/// Samples skipped so far (distinct indices) and the first reason. Counted by the consumer
/// in batch order, so the batch that passes the limit does not depend on thread timing.
#[derive(Default)]
struct BadSamples {
    indices: BTreeSet<u32>,
    first: Option<String>,
}

/// What a pool thread made of one job: the batch, and the samples it left out and why.
type Built = Result<(Batch, Vec<(u32, String)>)>;

/// Deals batches of a [`SampleSource`] in the deterministic epoch order; see the module docs.
pub struct Loader {
    results: Receiver<(u64, Built)>,
    credits: Option<Sender<()>>,
    pending: BTreeMap<u64, Built>,
    bad: BadSamples,
    dataset_len: usize,
    max_bad_fraction: f64,
    next_seq: u64,
    waited: Duration,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Loader {
    /// Starts dealing from `start` (a fresh cursor, or the one saved with a checkpoint).
    pub fn start(
        source: Arc<dyn SampleSource>,
        start: Cursor,
        opts: LoaderOptions,
    ) -> Result<Self> {
        if opts.world == 0
            || opts.global_batch < opts.world
            || opts.rank >= opts.world
            || opts.threads == 0
        {
            return Err(DataError::Internal(format!(
                "loader: global batch {} on rank {} of {} with {} threads",
                opts.global_batch, opts.rank, opts.world, opts.threads
            )));
        }
        if source.is_empty() {
            return Err(DataError::Source {
                source_spec: source.describe(),
                reason: "the dataset has no samples".into(),
            });
        }
        let depth = opts.prefetch_batches.max(1) + opts.threads;
        let (credit_tx, credit_rx) = bounded::<()>(depth);
        for _ in 0..depth {
            credit_tx.send(()).expect("room for every credit");
        }
        let (job_tx, job_rx) = unbounded::<Job>();
        let (result_tx, result_rx) = unbounded();
        let mut threads = Vec::new();
        let order = source.order();
        {
            let (source, opts, order) = (source.clone(), opts.clone(), order.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("data-planner".into())
                    .spawn(move || plan(source, order, start, opts, credit_rx, job_tx))
                    .map_err(|e| DataError::Internal(format!("spawning the data planner: {e}")))?,
            );
        }
        for i in 0..opts.threads {
            let (source, opts, jobs, results) = (
                source.clone(),
                opts.clone(),
                job_rx.clone(),
                result_tx.clone(),
            );
            threads.push(
                std::thread::Builder::new()
                    .name(format!("data-{i}"))
                    .spawn(move || {
                        for job in jobs {
                            let seq = job.seq;
                            // A panic (a decoder bug, an allocation failure in libtorch) fails
                            // this batch instead of leaving the consumer waiting for it.
                            let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                                build(&*source, job, &opts)
                            }))
                            .unwrap_or_else(|p| {
                                Err(DataError::Internal(format!(
                                    "a data thread panicked building batch {seq}: {}",
                                    panic_message(&*p)
                                )))
                            });
                            if results.send((seq, r)).is_err() {
                                return;
                            }
                        }
                    })
                    .map_err(|e| DataError::Internal(format!("spawning a data thread: {e}")))?,
            );
        }
        Ok(Self {
            results: result_rx,
            credits: Some(credit_tx),
            pending: BTreeMap::new(),
            bad: BadSamples::default(),
            dataset_len: source.len(),
            max_bad_fraction: opts.max_bad_fraction,
            next_seq: 0,
            waited: Duration::ZERO,
            threads,
        })
    }

    /// The next batch, in order. Blocks only while the pool has not finished it; that time
    /// is added to [`Loader::waited`] and to `ddpm_data_wait_seconds`. An error (a sample
    /// that cannot be read under `on_bad_sample = "fail"`, too many skipped, a shard that
    /// does not verify) ends the stream.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let t0 = Instant::now();
        let out = loop {
            if let Some(r) = self.pending.remove(&self.next_seq) {
                break r;
            }
            match self.results.recv() {
                Ok((seq, r)) => {
                    self.pending.insert(seq, r);
                }
                Err(_) => {
                    break Err(DataError::Internal(
                        "the data threads stopped (a thread panicked?)".into(),
                    ))
                }
            }
        };
        let waited = t0.elapsed();
        self.waited += waited;
        metrics::histogram!("ddpm_data_wait_seconds").record(waited.as_secs_f64());
        self.next_seq += 1;
        if let Some(c) = &self.credits {
            let _ = c.send(());
        }
        let (batch, skipped) = out?;
        for (index, reason) in skipped {
            self.skip(index, reason)?;
        }
        Ok(batch)
    }

    /// Counts a skipped sample; fails once more than `max_bad_fraction` of the dataset is bad.
    fn skip(&mut self, index: u32, reason: String) -> Result<()> {
        let b = &mut self.bad;
        if b.indices.insert(index) {
            metrics::counter!("ddpm_data_bad_samples_total").increment(1);
            tracing::warn!(error = %reason, "skipped a sample that cannot be decoded (data.on_bad_sample = \"skip\")");
            b.first.get_or_insert(reason);
        }
        let n = self.dataset_len;
        // Every sample bad ends it too, whatever the limit: nothing could ever be trained on.
        if b.indices.len() as f64 > self.max_bad_fraction * n as f64 || b.indices.len() == n {
            return Err(DataError::TooManyBad {
                bad: b.indices.len(),
                total: n,
                max_fraction: self.max_bad_fraction,
                first: b.first.clone().unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// Total time [`Loader::next_batch`] has blocked.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // The planner stops when the credits are gone; the pool when the planner has.
        self.credits = None;
        self.pending.clear();
        while self.results.try_recv().is_ok() {}
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

fn plan(
    source: Arc<dyn SampleSource>,
    order: Order,
    start: Cursor,
    opts: LoaderOptions,
    credits: Receiver<()>,
    jobs: Sender<Job>,
) {
    let (g, w, r, seed) = (opts.global_batch, opts.world, opts.rank, opts.seed);
    let mut cursor = start.clone();
    // The scout runs `lookahead` samples ahead and announces what will be read.
    let mut scout = start;
    // Whole global batches, so the scout's rank slices line up with the real ones.
    let ahead = source.lookahead().div_ceil(g) * g;
    if ahead > 0 {
        let skip = scout.next_draws(&order, ahead, seed);
        source.will_need(&rank_slice(&skip, g, w, r));
    }
    for seq in 0.. {
        if credits.recv().is_err() {
            return;
        }
        let draws = cursor.next_rank_draws(&order, g, w, r, seed);
        source.will_need(&draws.iter().map(|d| d.index).collect::<Vec<_>>());
        if ahead > 0 {
            let far = scout.next_rank_draws(&order, g, w, r, seed);
            source.will_need(&far.iter().map(|d| d.index).collect::<Vec<_>>());
        }
        let job = Job {
            seq,
            draws,
            cursor: Cursor::at(cursor.epoch, cursor.position),
        };
        if jobs.send(job).is_err() {
            return;
        }
    }
}

/// The indices of `draws` (whole global batches of `g`) that rank `r` of `w` reads.
fn rank_slice(draws: &[Draw], g: usize, w: usize, r: usize) -> Vec<u32> {
    let rows = ddpm_config::rank_rows(g, w, r);
    draws
        .chunks(g)
        .flat_map(|batch| batch.get(rows.clone()).unwrap_or_default())
        .map(|d| d.index)
        .collect()
}

fn build(source: &dyn SampleSource, job: Job, opts: &LoaderOptions) -> Built {
    let [c, h, w] = source.shape();
    let per = c * h * w;
    let mut pixels = vec![0u8; per];
    let n = job.draws.len();
    // Written in place: no zero fill and no copy into a tensor afterwards.
    let images = Tensor::empty(
        [n as i64, c as i64, h as i64, w as i64],
        (Kind::Float, Device::Cpu),
    );
    // SAFETY: `images` is a new contiguous float32 CPU tensor of exactly `n * per` elements,
    // uninitialised, hence viewed as MaybeUninit; nothing else refers to its storage until it
    // is returned, and only the rows written (the first `kept`) are exposed.
    let out = unsafe {
        std::slice::from_raw_parts_mut(images.data_ptr() as *mut MaybeUninit<f32>, n * per)
    };
    let mut kept = Vec::with_capacity(n);
    let mut skipped = Vec::new();
    let mut skipped_draws = Vec::new();
    for d in &job.draws {
        match source.read(d.index as usize, &mut pixels) {
            Ok(()) => {}
            Err(e @ DataError::Decode { .. }) if opts.on_bad_sample == BadSamplePolicy::Skip => {
                skipped.push((d.index, e.to_string()));
                skipped_draws.push(*d);
                continue;
            }
            Err(e) => return Err(e),
        }
        let dst = &mut out[kept.len() * per..(kept.len() + 1) * per];
        let flip = opts.random_flip && flips(opts.seed, d);
        to_unit_range(&pixels, dst, w, flip);
        kept.push(*d);
    }
    let images = if kept.len() < n {
        images.narrow(0, 0, kept.len() as i64)
    } else {
        images
    };
    let batch = Batch {
        images,
        indices: kept.iter().map(|d| d.index).collect(),
        draws: kept,
        skipped: skipped_draws,
        cursor: job.cursor,
    };
    Ok((batch, skipped))
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// `x / 127.5 - 1`, mirroring each row of width `w` when `flip`.
fn to_unit_range(src: &[u8], dst: &mut [MaybeUninit<f32>], w: usize, flip: bool) {
    for (s, d) in src.chunks_exact(w).zip(dst.chunks_exact_mut(w)) {
        if flip {
            for (x, v) in d.iter_mut().zip(s.iter().rev()) {
                x.write(*v as f32 / 127.5 - 1.0);
            }
        } else {
            for (x, v) in d.iter_mut().zip(s) {
                x.write(*v as f32 / 127.5 - 1.0);
            }
        }
    }
}
