//! Host snapshots of the training state for asynchronous checkpoints.
//!
//! The training thread pays only for copying four flat buffers (parameters, EMA, Adam's two
//! moments) into host buffers that are reused from one checkpoint to the next
//! ([`SnapshotPool`]), so the copy does not page-fault fresh memory every time. The
//! safetensors blobs are then a small header plus the host buffers themselves
//! ([`StateSnapshot::into_segments`]): no serialisation copy, and the buffers go back to the
//! pool when the uploader drops the last reference.

use crate::flat::Slot;
use crate::state::{EMA_BLOB, MODEL_BLOB, OPTIMIZER_BLOB};
use crate::{Result, TrainError, Trainer};
use bytes::Bytes;
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

/// Spare host buffers for snapshots, shared by the training thread (takes) and the
/// uploader (gives back on drop). Holds at most one snapshot's worth.
#[derive(Clone, Default)]
pub struct SnapshotPool {
    spare: Arc<Mutex<Vec<Tensor>>>,
}

/// At most this many spare buffers are kept (one snapshot: params, EMA, two moments).
const POOL_CAPACITY: usize = 4;

impl SnapshotPool {
    /// A host buffer of `numel` floats: a spare one when the pool has it, else a new one
    /// (page-locked when the source is on a GPU, for fast device-to-host copies).
    fn take(&self, numel: i64, source: Device) -> Tensor {
        let mut spare = self.spare.lock().expect("snapshot pool");
        if let Some(i) = spare.iter().position(|t| t.numel() as i64 == numel) {
            return spare.swap_remove(i);
        }
        drop(spare);
        let t = Tensor::empty([numel], (Kind::Float, Device::Cpu));
        if source.is_cuda() {
            // Pinned memory when the CUDA runtime allows it; pageable memory works too.
            return t.f_pin_memory(source).unwrap_or(t);
        }
        t
    }

    fn give_back(&self, t: Tensor) {
        let mut spare = self.spare.lock().expect("snapshot pool");
        if spare.len() < POOL_CAPACITY {
            spare.push(t);
        }
    }
}

/// A host buffer that returns to its pool when the last reference is dropped.
struct PooledBuffer {
    tensor: Option<Tensor>,
    pool: SnapshotPool,
}

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        let t = self.tensor.as_ref().expect("buffer present until drop");
        let len = t.numel() * 4;
        if len == 0 {
            return &[];
        }
        // SAFETY: `t` is a contiguous float32 CPU tensor of `numel` elements that this value
        // owns exclusively (it came from the pool or a fresh allocation and no other handle
        // to its storage exists), so its storage is `len` initialised, immutable bytes for
        // as long as `self` lives.
        unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) }
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(t) = self.tensor.take() {
            self.pool.give_back(t);
        }
    }
}

/// Host copies of the full training state, taken on the training thread by
/// [`Trainer::snapshot`]; turned into blobs on another thread.
pub struct StateSnapshot {
    slots: Vec<Slot>,
    step: i64,
    buffers: [PooledBuffer; 4],
}

/// The safetensors header for `slots` laid out back to back over one or more flat buffers
/// of `numel` floats each, names prefixed per buffer. Padded with spaces to 8 bytes.
fn header(prefixes: &[&str], slots: &[Slot], numel: i64) -> Result<Bytes> {
    let mut map = serde_json::Map::new();
    for (k, prefix) in prefixes.iter().enumerate() {
        let base = k as i64 * numel * 4;
        for s in slots {
            let name = if prefix.is_empty() {
                s.name.clone()
            } else {
                format!("{prefix}.{}", s.name)
            };
            let begin = base + s.offset * 4;
            map.insert(
                name,
                serde_json::json!({
                    "dtype": "F32",
                    "shape": s.shape,
                    "data_offsets": [begin, begin + s.numel() * 4],
                }),
            );
        }
    }
    let covered: i64 = slots.iter().map(Slot::numel).sum();
    if covered != numel {
        return Err(TrainError::Internal(format!(
            "slots cover {covered} of {numel} elements of the flat buffer"
        )));
    }
    let mut json = serde_json::to_vec(&map).expect("header serialises");
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(Bytes::from(out))
}

impl StateSnapshot {
    /// Completed updates when the snapshot was taken.
    pub fn step(&self) -> i64 {
        self.step
    }

    /// The model, EMA and optimizer blobs as (name, segments): a safetensors header followed
    /// by the host buffers, without copying them. The buffers return to the pool once every
    /// segment is dropped.
    pub fn into_segments(self) -> Result<Vec<(&'static str, Vec<Bytes>)>> {
        let numel = self.buffers[0].tensor.as_ref().expect("buffer").numel() as i64;
        let [params, ema, m, v] = self.buffers;
        let owned = |b: PooledBuffer| Bytes::from_owner(b);
        Ok(vec![
            (
                MODEL_BLOB,
                vec![header(&[""], &self.slots, numel)?, owned(params)],
            ),
            (
                EMA_BLOB,
                vec![header(&[""], &self.slots, numel)?, owned(ema)],
            ),
            (
                OPTIMIZER_BLOB,
                vec![
                    header(&["exp_avg", "exp_avg_sq"], &self.slots, numel)?,
                    owned(m),
                    owned(v),
                ],
            ),
        ])
    }

    /// The blobs as contiguous safetensors bytes (a copy; for tests and small exports).
    pub fn into_blobs(self) -> Result<Vec<(&'static str, Vec<u8>)>> {
        Ok(self
            .into_segments()?
            .into_iter()
            .map(|(name, segments)| (name, segments.concat()))
            .collect())
    }
}

/// Copies `src` (a flat float32 buffer on any device) into a pooled host buffer.
fn copy_to_host(src: &Tensor, pool: &SnapshotPool) -> PooledBuffer {
    let mut dst = pool.take(src.numel() as i64, src.device());
    tch::no_grad(|| {
        dst.copy_(&src.detach().to_kind(Kind::Float).reshape([-1]));
    });
    PooledBuffer {
        tensor: Some(dst),
        pool: pool.clone(),
    }
}

impl Trainer {
    /// Allocates (and touches) one snapshot's host buffers in `pool` now, so the first
    /// checkpoint does not pay for faulting in fresh memory on the training thread.
    pub fn warm_snapshot_pool(&self, pool: &SnapshotPool) {
        drop(self.snapshot(pool));
    }

    /// Copies the model, EMA and Adam buffers to host memory, reusing `pool`'s buffers (the
    /// only part of a checkpoint that has to run on the training thread).
    pub fn snapshot(&self, pool: &SnapshotPool) -> StateSnapshot {
        let (flat, ema) = self.flat();
        let (m, v) = self.adam_moments();
        StateSnapshot {
            slots: flat.slots.clone(),
            step: self.global_step(),
            buffers: [
                copy_to_host(&flat.params, pool),
                copy_to_host(ema, pool),
                copy_to_host(m, pool),
                copy_to_host(v, pool),
            ],
        }
    }
}
