//! Deterministic sample order: each epoch is a seeded permutation of the dataset, and a
//! cursor walks through consecutive epochs so batches never lose or repeat a sample within
//! an epoch.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

/// The permutation of `0..n` used in `epoch` of a run seeded with `seed`.
pub fn epoch_permutation(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(b"ddpm-epo");
    let mut rng = ChaCha8Rng::from_seed(key);
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(&mut rng);
    order
}

/// How the permutation of each epoch is drawn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    /// A uniform shuffle of `0..n` ([`epoch_permutation`]), for datasets held or read with
    /// random access.
    Uniform(usize),
    /// For datasets in shards fetched whole: the shards in a shuffled order, taken `window`
    /// at a time, and the samples of each window shuffled together. A reader then needs at
    /// most `window` shards at once (two windows with prefetch). With `window` >= the shard
    /// count it is a uniform shuffle of all samples.
    Windowed {
        /// Samples in each shard, in dataset order (shard `i` holds the next `shard_samples[i]`
        /// sample indices).
        shard_samples: Arc<[u64]>,
        /// Shards mixed together.
        window: usize,
    },
}

impl Order {
    /// Samples per epoch.
    pub fn len(&self) -> usize {
        match self {
            Order::Uniform(n) => *n,
            Order::Windowed { shard_samples, .. } => shard_samples.iter().sum::<u64>() as usize,
        }
    }

    /// Whether an epoch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A stable name of the order, saved with checkpoints: a cursor's position means
    /// something only under the order it was taken in.
    pub fn describe(&self) -> String {
        match self {
            Order::Uniform(_) => "uniform".into(),
            Order::Windowed { window, .. } => format!("shard-windows:{window}"),
        }
    }

    /// The permutation of epoch `epoch` of a run seeded with `seed`.
    pub fn permutation(&self, seed: u64, epoch: u64) -> Vec<u32> {
        match self {
            Order::Uniform(n) => epoch_permutation(*n, seed, epoch),
            Order::Windowed {
                shard_samples,
                window,
            } => windowed_permutation(shard_samples, (*window).max(1), seed, epoch),
        }
    }
}

fn windowed_permutation(shard_samples: &[u64], window: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut starts = Vec::with_capacity(shard_samples.len());
    let mut total = 0u64;
    for &n in shard_samples {
        starts.push(total);
        total += n;
    }
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(b"ddpm-win");
    let mut rng = ChaCha8Rng::from_seed(key);
    let mut shards: Vec<usize> = (0..shard_samples.len()).collect();
    shards.shuffle(&mut rng);
    let mut order = Vec::with_capacity(total as usize);
    for group in shards.chunks(window) {
        let from = order.len();
        for &s in group {
            order.extend((starts[s]..starts[s] + shard_samples[s]).map(|i| i as u32));
        }
        order[from..].shuffle(&mut rng);
    }
    order
}

/// One sample handed out: its dataset index and where it sits in the stream of epochs. The
/// position keys per-sample randomness (the flip), so that it does not depend on the world
/// size or on which rank draws the sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draw {
    /// Dataset index.
    pub index: u32,
    /// Epoch it was drawn in.
    pub epoch: u64,
    /// Position within that epoch's permutation.
    pub position: u64,
}

/// Position in the stream of epochs: `(epoch, position within the epoch's permutation)`.
/// The current epoch's permutation is cached, so a batch costs O(batch).
#[derive(Debug, Clone, Default)]
pub struct Cursor {
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Samples of the current epoch already handed out.
    pub position: u64,
    /// (order, seed, epoch) and the permutation they give.
    cached: Option<(Order, u64, u64, Vec<u32>)>,
}

impl PartialEq for Cursor {
    fn eq(&self, other: &Self) -> bool {
        (self.epoch, self.position) == (other.epoch, other.position)
    }
}

impl Cursor {
    /// A cursor at `position` within `epoch`.
    pub fn at(epoch: u64, position: u64) -> Self {
        Self {
            epoch,
            position,
            cached: None,
        }
    }

    fn permutation(&mut self, order: &Order, seed: u64) -> &[u32] {
        let stale = self
            .cached
            .as_ref()
            .is_none_or(|(o, s, e, _)| (*s, *e) != (seed, self.epoch) || o != order);
        if stale {
            let perm = order.permutation(seed, self.epoch);
            self.cached = Some((order.clone(), seed, self.epoch, perm));
        }
        &self.cached.as_ref().expect("just filled").3
    }

    /// Takes the next `batch` samples of `order`, continuing into the next epoch's
    /// permutation when the current one runs out.
    pub fn next_draws(&mut self, order: &Order, batch: usize, seed: u64) -> Vec<Draw> {
        let n = order.len();
        assert!(n > 0, "cannot draw batches from an empty dataset");
        let mut out = Vec::with_capacity(batch);
        while out.len() < batch {
            if self.position as usize >= n {
                self.epoch += 1;
                self.position = 0;
            }
            let take = (batch - out.len()).min(n - self.position as usize);
            let start = self.position as usize;
            let epoch = self.epoch;
            let perm = self.permutation(order, seed);
            out.extend(
                perm[start..start + take]
                    .iter()
                    .enumerate()
                    .map(|(k, &index)| Draw {
                        index,
                        epoch,
                        position: (start + k) as u64,
                    }),
            );
            self.position += take as u64;
        }
        out
    }

    /// The next `batch` sample indices of a uniformly shuffled dataset of `n` samples.
    pub fn next_batch(&mut self, n: usize, batch: usize, seed: u64) -> Vec<u32> {
        self.next_draws(&Order::Uniform(n), batch, seed)
            .into_iter()
            .map(|d| d.index)
            .collect()
    }

    /// One data-parallel step: takes the next global batch of `global` samples (continuing
    /// into the next epoch when needed) and returns rank `rank`'s rows of it,
    /// [`ddpm_config::rank_rows`] (shares differ by at most one when `world` does not divide
    /// `global`). Every rank keeps an identical cursor and calls this with its own `rank`,
    /// so the ranks' slices partition the global stream: within an epoch no sample is lost
    /// or seen twice, for any world size. The cursor (epoch, position) counts global samples,
    /// so a run saved at one world size resumes at another with the rest of the epoch dealt
    /// to the new ranks.
    pub fn next_rank_draws(
        &mut self,
        order: &Order,
        global: usize,
        world: usize,
        rank: usize,
        seed: u64,
    ) -> Vec<Draw> {
        let rows = ddpm_config::rank_rows(global, world, rank);
        let draws = self.next_draws(order, global, seed);
        draws[rows].to_vec()
    }

    /// [`Cursor::next_rank_draws`] over a uniformly shuffled dataset of `n`, as indices.
    pub fn next_rank_batch(
        &mut self,
        n: usize,
        global: usize,
        world: usize,
        rank: usize,
        seed: u64,
    ) -> Vec<u32> {
        self.next_rank_draws(&Order::Uniform(n), global, world, rank, seed)
            .into_iter()
            .map(|d| d.index)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first `len` samples of the stream of epochs (epoch 0's permutation, then 1's...).
    fn stream(n: usize, seed: u64, len: usize) -> Vec<u32> {
        (0..)
            .flat_map(|e| epoch_permutation(n, seed, e))
            .take(len)
            .collect()
    }

    #[test]
    fn ranks_partition_every_epoch_for_any_world_size() {
        for n in [1usize, 10, 37] {
            for world in 1..=5 {
                // Even and uneven splits of the global batch.
                for global in [world, 3 * world + 1, 8 * world - 1] {
                    let steps = 3 * n / global + 2; // several epochs
                    let mut cursors = vec![Cursor::default(); world];
                    let mut seen = Vec::new();
                    for _ in 0..steps {
                        for (rank, c) in cursors.iter_mut().enumerate() {
                            seen.extend(c.next_rank_batch(n, global, world, rank, 9));
                        }
                    }
                    assert_eq!(
                        seen,
                        stream(n, 9, seen.len()),
                        "n {n} world {world} batch {global}"
                    );
                    // So each complete epoch holds every sample exactly once.
                    for epoch in seen.chunks_exact(n) {
                        let mut e = epoch.to_vec();
                        e.sort_unstable();
                        assert_eq!(e, (0..n as u32).collect::<Vec<_>>());
                    }
                }
            }
        }
    }

    #[test]
    fn a_saved_cursor_resumes_at_another_world_size_without_loss_or_repeats() {
        let (n, seed) = (37usize, 4u64);
        for (w1, w2) in [(4usize, 2usize), (2, 5), (3, 1), (1, 3)] {
            let mut seen = Vec::new();
            let mut cursors = vec![Cursor::default(); w1];
            for _ in 0..5 {
                for (rank, c) in cursors.iter_mut().enumerate() {
                    seen.extend(c.next_rank_batch(n, 12, w1, rank, seed));
                }
            }
            // Checkpointed as (epoch, position); every rank had the same cursor.
            let saved = (cursors[0].epoch, cursors[0].position);
            assert!(cursors.iter().all(|c| (c.epoch, c.position) == saved));
            let mut resumed = vec![Cursor::at(saved.0, saved.1); w2];
            for _ in 0..6 {
                for (rank, c) in resumed.iter_mut().enumerate() {
                    seen.extend(c.next_rank_batch(n, 12, w2, rank, seed));
                }
            }
            assert_eq!(seen, stream(n, seed, seen.len()), "{w1} -> {w2} ranks");
        }
    }

    #[test]
    fn permutation_is_deterministic_and_complete() {
        let a = epoch_permutation(1000, 7, 3);
        assert_eq!(a, epoch_permutation(1000, 7, 3));
        assert_ne!(a, epoch_permutation(1000, 7, 4));
        assert_ne!(a, epoch_permutation(1000, 8, 3));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..1000).collect::<Vec<u32>>());
    }

    #[test]
    fn cursor_covers_each_epoch_exactly_once() {
        let n = 10;
        let mut c = Cursor::default();
        let mut seen: Vec<u32> = Vec::new();
        for _ in 0..7 {
            seen.extend(c.next_batch(n, 3, 1));
        }
        // 21 samples: two full epochs and one sample of the third.
        for e in 0..2 {
            let mut ep = seen[e * n..(e + 1) * n].to_vec();
            ep.sort();
            assert_eq!(ep, (0..n as u32).collect::<Vec<_>>());
        }
        assert_eq!(c, Cursor::at(2, 1));
        // A cursor rebuilt at a position continues identically.
        let mut d = Cursor::at(2, 1);
        assert_eq!(d.next_batch(n, 4, 1), c.next_batch(n, 4, 1));
    }

    #[test]
    fn windowed_orders_are_permutations_that_keep_to_their_window() {
        let sizes: Arc<[u64]> = vec![5u64, 5, 5, 5, 3].into();
        for window in [1usize, 2, 3, 5, 9] {
            let order = Order::Windowed {
                shard_samples: sizes.clone(),
                window,
            };
            assert_eq!(order.len(), 23);
            let p = order.permutation(3, 1);
            assert_eq!(p, order.permutation(3, 1));
            assert_ne!(p, order.permutation(3, 2));
            let mut s = p.clone();
            s.sort_unstable();
            assert_eq!(s, (0..23).collect::<Vec<u32>>());
            // The epoch is a run of windows: `window` shards (fewer in the last), each
            // window holding exactly its shards' samples.
            let shard_of = |i: u32| (i / 5) as usize;
            let (mut at, mut windows) = (0, 0);
            while at < p.len() {
                let mut shards = std::collections::BTreeSet::new();
                let mut end = at;
                loop {
                    shards.insert(shard_of(p[end]));
                    end += 1;
                    assert!(shards.len() <= window, "window {window}: {shards:?}");
                    let span: u64 = shards.iter().map(|&s| sizes[s]).sum();
                    if (end - at) as u64 == span && (shards.len() == window || end == p.len()) {
                        break;
                    }
                }
                at = end;
                windows += 1;
            }
            assert_eq!(windows, 5usize.div_ceil(window), "window {window}");
        }
    }

    #[test]
    fn draws_carry_their_epoch_and_position() {
        let order = Order::Uniform(5);
        let mut c = Cursor::default();
        let d = c.next_draws(&order, 7, 2);
        let perm0 = epoch_permutation(5, 2, 0);
        let perm1 = epoch_permutation(5, 2, 1);
        assert_eq!(
            d.iter().map(|d| (d.epoch, d.position)).collect::<Vec<_>>(),
            vec![(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1)]
        );
        assert_eq!(d[4].index, perm0[4]);
        assert_eq!(d[6].index, perm1[1]);
    }
}
