//! The full training state as checkpoint blobs: model, EMA and Adam moments as safetensors
//! bytes. Together with the step (and the caller's data cursor) they make resume exact.

use crate::flat::Slot;
use crate::snapshot::SnapshotPool;
use crate::{Result, TrainError, Trainer};
use safetensors::tensor::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use tch::{Device, Kind, Tensor};

/// Blob names of the training state.
pub const MODEL_BLOB: &str = "model.safetensors";
/// EMA weights (our names): what samplers and the evaluator load.
pub const EMA_BLOB: &str = "ema.safetensors";
/// Adam's first and second moments over the flat parameter buffer.
pub const OPTIMIZER_BLOB: &str = "optimizer.safetensors";

struct HostTensor {
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn to_host(t: &Tensor) -> HostTensor {
    let t = t
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let numel = t.numel();
    let mut data = vec![0u8; numel * 4];
    t.copy_data_u8(&mut data, numel);
    HostTensor {
        shape: t.size().iter().map(|&d| d as usize).collect(),
        data,
    }
}

/// Serialises named float32 tensors as safetensors bytes.
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let host: Vec<(String, HostTensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), to_host(t)))
        .collect();
    safetensors::tensor::serialize(host.iter().map(|(n, h)| (n.as_str(), h)), &None)
        .map_err(|e| TrainError::Internal(format!("serialising safetensors: {e:?}")))
}

/// Parses a state blob and checks its tensor count.
fn parse<'a>(blob: &str, bytes: &'a [u8], expected: usize) -> Result<SafeTensors<'a>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| TrainError::State {
        blob: blob.to_string(),
        reason: format!("not safetensors: {e:?}"),
    })?;
    if st.len() != expected {
        return Err(TrainError::State {
            blob: blob.to_string(),
            reason: format!("{} tensors, the model needs {expected}", st.len()),
        });
    }
    Ok(st)
}

/// Copies the tensors named by `slots` from `st` into their places in `flat`.
fn read_into(blob: &str, st: &SafeTensors, slots: &[Slot], flat: &Tensor) -> Result<()> {
    let bad = |reason: String| TrainError::State {
        blob: blob.to_string(),
        reason,
    };
    tch::no_grad(|| {
        for s in slots {
            let view = st
                .tensor(&s.name)
                .map_err(|_| bad(format!("missing tensor `{}`", s.name)))?;
            let t = Tensor::try_from(view).map_err(|e| bad(format!("tensor `{}`: {e}", s.name)))?;
            if t.size() != s.shape || t.kind() != Kind::Float {
                return Err(bad(format!(
                    "tensor `{}` is {:?} {:?}, expected Float {:?}",
                    s.name,
                    t.kind(),
                    t.size(),
                    s.shape
                )));
            }
            let mut dst = flat.narrow(0, s.offset, s.numel());
            dst.copy_(&t.reshape([-1]).to_device(flat.device()));
        }
        Ok(())
    })
}

fn prefixed(slots: &[Slot], prefix: &str) -> Vec<Slot> {
    slots
        .iter()
        .map(|s| Slot {
            name: format!("{prefix}.{}", s.name),
            ..s.clone()
        })
        .collect()
}

impl Trainer {
    /// The model, EMA and optimizer state as (blob name, safetensors bytes).
    pub fn export_state(&self) -> Result<Vec<(&'static str, Vec<u8>)>> {
        self.snapshot(&SnapshotPool::default()).into_blobs()
    }

    /// Restores a state written by [`Trainer::export_state`] after `step` updates. Every blob
    /// must be present and match the model tensor for tensor; the error names the blob.
    pub fn import_state(&mut self, blobs: &[(String, Vec<u8>)], step: i64) -> Result<()> {
        let get = |name: &str| {
            blobs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, b)| b.as_slice())
                .ok_or_else(|| TrainError::State {
                    blob: name.to_string(),
                    reason: "missing from the checkpoint".into(),
                })
        };
        let (flat, ema) = self.flat();
        let slots = &flat.slots;
        let (m, v) = self.adam_moments();
        let model = parse(MODEL_BLOB, get(MODEL_BLOB)?, slots.len())?;
        let ema_st = parse(EMA_BLOB, get(EMA_BLOB)?, slots.len())?;
        let opt = parse(OPTIMIZER_BLOB, get(OPTIMIZER_BLOB)?, 2 * slots.len())?;
        read_into(MODEL_BLOB, &model, slots, &flat.params)?;
        read_into(EMA_BLOB, &ema_st, slots, ema)?;
        read_into(OPTIMIZER_BLOB, &opt, &prefixed(slots, "exp_avg"), m)?;
        read_into(OPTIMIZER_BLOB, &opt, &prefixed(slots, "exp_avg_sq"), v)?;
        self.set_global_step(step);
        Ok(())
    }
}
