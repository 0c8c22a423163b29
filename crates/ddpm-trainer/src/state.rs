//! The full training state as checkpoint blobs: model, EMA and Adam moments as safetensors
//! bytes. Together with the step (and the caller's data cursor) they make resume exact.

use crate::flat::Slot;
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

/// Host copies of the full training state, taken on the training thread by
/// [`Trainer::snapshot`] and serialised elsewhere ([`StateSnapshot::into_blobs`]), so the
/// training thread only pays for four buffer copies.
pub struct StateSnapshot {
    slots: Vec<Slot>,
    step: i64,
    params: Tensor,
    ema: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// A copy of a flat buffer in host memory (a plain copy when it already lives there).
fn host_copy(t: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let t = t.detach();
        if t.device() == Device::Cpu {
            t.copy()
        } else {
            t.to_device(Device::Cpu)
        }
    })
}

/// Views of consecutive slots over one flat host buffer's bytes.
struct FlatBytes<'a> {
    bytes: &'a [u8],
    shape: Vec<usize>,
}

impl View for &FlatBytes<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// The bytes of a contiguous float32 host tensor.
fn host_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_kind(Kind::Float).contiguous();
    let numel = t.numel();
    let mut data = vec![0u8; numel * 4];
    t.copy_data_u8(&mut data, numel);
    data
}

/// Safetensors bytes of the slots (names prefixed with `prefix.` when given) of one or more
/// flat buffers.
fn serialise(parts: &[(&str, &[u8])], slots: &[Slot]) -> Result<Vec<u8>> {
    let mut views: Vec<(String, FlatBytes)> = Vec::with_capacity(parts.len() * slots.len());
    for (prefix, bytes) in parts {
        for s in slots {
            let start = s.offset as usize * 4;
            let name = if prefix.is_empty() {
                s.name.clone()
            } else {
                format!("{prefix}.{}", s.name)
            };
            views.push((
                name,
                FlatBytes {
                    bytes: &bytes[start..start + s.numel() as usize * 4],
                    shape: s.shape.iter().map(|&d| d as usize).collect(),
                },
            ));
        }
    }
    safetensors::tensor::serialize(views.iter().map(|(n, v)| (n.as_str(), v)), &None)
        .map_err(|e| TrainError::Internal(format!("serialising safetensors: {e:?}")))
}

impl StateSnapshot {
    /// Completed updates when the snapshot was taken.
    pub fn step(&self) -> i64 {
        self.step
    }

    /// The model, EMA and optimizer state as (blob name, safetensors bytes). Each buffer is
    /// released as soon as its blob is written, to bound peak host memory.
    pub fn into_blobs(self) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let Self {
            slots,
            params,
            ema,
            exp_avg,
            exp_avg_sq,
            ..
        } = self;
        let bytes = host_bytes(&params);
        drop(params);
        let model = serialise(&[("", &bytes)], &slots)?;
        drop(bytes);
        let bytes = host_bytes(&ema);
        drop(ema);
        let ema = serialise(&[("", &bytes)], &slots)?;
        drop(bytes);
        let (m, v) = (host_bytes(&exp_avg), host_bytes(&exp_avg_sq));
        drop((exp_avg, exp_avg_sq));
        let optimizer = serialise(&[("exp_avg", &m), ("exp_avg_sq", &v)], &slots)?;
        Ok(vec![
            (MODEL_BLOB, model),
            (EMA_BLOB, ema),
            (OPTIMIZER_BLOB, optimizer),
        ])
    }
}

impl Trainer {
    /// Copies the model, EMA and Adam buffers to host memory (the only part of a checkpoint
    /// that has to run on the training thread).
    pub fn snapshot(&self) -> StateSnapshot {
        let (flat, ema) = self.flat();
        let (m, v) = self.adam_moments();
        StateSnapshot {
            slots: flat.slots.clone(),
            step: self.global_step(),
            params: host_copy(&flat.params),
            ema: host_copy(ema),
            exp_avg: host_copy(m),
            exp_avg_sq: host_copy(v),
        }
    }

    /// The model, EMA and optimizer state as (blob name, safetensors bytes).
    pub fn export_state(&self) -> Result<Vec<(&'static str, Vec<u8>)>> {
        self.snapshot().into_blobs()
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
