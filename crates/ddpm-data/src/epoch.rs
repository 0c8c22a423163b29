//! Deterministic sample order: each epoch is a seeded permutation of the dataset, and a
//! cursor walks through consecutive epochs so batches never lose or repeat a sample within
//! an epoch.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

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

/// Position in the stream of epochs: `(epoch, position within the epoch's permutation)`.
/// The current epoch's permutation is cached, so a batch costs O(batch).
#[derive(Debug, Clone, Default)]
pub struct Cursor {
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Samples of the current epoch already handed out.
    pub position: u64,
    /// (n, seed, epoch) and the permutation they give.
    cached: Option<((usize, u64, u64), Vec<u32>)>,
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

    fn permutation(&mut self, n: usize, seed: u64) -> &[u32] {
        let key = (n, seed, self.epoch);
        if self.cached.as_ref().is_none_or(|(k, _)| *k != key) {
            self.cached = Some((key, epoch_permutation(n, seed, self.epoch)));
        }
        &self.cached.as_ref().expect("just filled").1
    }

    /// Takes the next `batch` sample indices of a dataset of `n` samples, continuing into the
    /// next epoch's permutation when the current one runs out.
    pub fn next_batch(&mut self, n: usize, batch: usize, seed: u64) -> Vec<u32> {
        assert!(n > 0, "cannot draw batches from an empty dataset");
        let mut out = Vec::with_capacity(batch);
        while out.len() < batch {
            if self.position as usize >= n {
                self.epoch += 1;
                self.position = 0;
            }
            let take = (batch - out.len()).min(n - self.position as usize);
            let start = self.position as usize;
            let perm = self.permutation(n, seed);
            out.extend_from_slice(&perm[start..start + take]);
            self.position += take as u64;
        }
        out
    }
}

impl Cursor {
    /// One data-parallel step: takes the next global batch of `world * per_rank` samples
    /// (continuing into the next epoch when needed) and returns the `rank`-th slice of
    /// `per_rank`. Every rank keeps an identical cursor and calls this with its own `rank`,
    /// so the ranks' slices partition the global stream: within an epoch no sample is lost
    /// or seen twice, for any world size. The cursor (epoch, position) counts global samples,
    /// so a run saved at one world size resumes at another with the rest of the epoch dealt
    /// to the new ranks.
    pub fn next_rank_batch(
        &mut self,
        n: usize,
        per_rank: usize,
        world: usize,
        rank: usize,
        seed: u64,
    ) -> Vec<u32> {
        assert!(
            world > 0 && rank < world,
            "rank {rank} of world size {world}"
        );
        let global = self.next_batch(n, per_rank * world, seed);
        global[rank * per_rank..(rank + 1) * per_rank].to_vec()
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
                for per_rank in [1usize, 3, 7] {
                    let steps = 3 * n / (world * per_rank) + 2; // several epochs
                    let mut cursors = vec![Cursor::default(); world];
                    let mut seen = Vec::new();
                    for _ in 0..steps {
                        for (rank, c) in cursors.iter_mut().enumerate() {
                            seen.extend(c.next_rank_batch(n, per_rank, world, rank, 9));
                        }
                    }
                    assert_eq!(
                        seen,
                        stream(n, 9, seen.len()),
                        "n {n} world {world} batch {per_rank}"
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
                    seen.extend(c.next_rank_batch(n, 3, w1, rank, seed));
                }
            }
            // Checkpointed as (epoch, position); every rank had the same cursor.
            let saved = (cursors[0].epoch, cursors[0].position);
            assert!(cursors.iter().all(|c| (c.epoch, c.position) == saved));
            let mut resumed = vec![Cursor::at(saved.0, saved.1); w2];
            for _ in 0..6 {
                for (rank, c) in resumed.iter_mut().enumerate() {
                    seen.extend(c.next_rank_batch(n, 3, w2, rank, seed));
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
}
