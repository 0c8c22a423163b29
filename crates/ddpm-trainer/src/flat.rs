//! Flat parameter and gradient buffers.
//!
//! Every trainable variable of a var store is re-pointed into one contiguous buffer, and
//! every gradient into another, in a fixed (name-sorted) order. Backward accumulates straight
//! into the flat gradient, so clipping, Adam, the EMA and (later) all-reduce each touch one
//! tensor instead of hundreds.

use crate::{Result, TrainError};
use tch::{nn, Kind, Tensor};

/// One variable's place in the flat buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    /// Variable name in the var store.
    pub name: String,
    /// Offset in elements.
    pub offset: i64,
    /// Shape.
    pub shape: Vec<i64>,
}

impl Slot {
    /// Number of elements.
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
}

/// The flat views of one var store.
#[derive(Debug)]
pub struct FlatParams {
    /// All parameters, concatenated.
    pub params: Tensor,
    /// All gradients, concatenated (backward accumulates here).
    pub grads: Tensor,
    /// Layout.
    pub slots: Vec<Slot>,
}

fn sorted_vars(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Re-points the variables of `vs` into a fresh contiguous buffer (values kept) and returns it.
pub fn flatten_into_buffer(vs: &nn::VarStore) -> (Tensor, Vec<Slot>, Vec<Tensor>) {
    let vars = sorted_vars(vs);
    let mut slots = Vec::with_capacity(vars.len());
    let mut offset = 0;
    for (name, t) in &vars {
        slots.push(Slot {
            name: name.clone(),
            offset,
            shape: t.size(),
        });
        offset += t.numel() as i64;
    }
    let flat = tch::no_grad(|| {
        Tensor::cat(
            &vars
                .iter()
                .map(|(_, t)| t.detach().reshape([-1]))
                .collect::<Vec<_>>(),
            0,
        )
    });
    let mut handles = Vec::with_capacity(vars.len());
    tch::no_grad(|| {
        for ((_, t), s) in vars.into_iter().zip(&slots) {
            let mut t = t;
            t.set_data(&flat.narrow(0, s.offset, s.numel()).view(s.shape.as_slice()));
            handles.push(t);
        }
    });
    (flat, slots, handles)
}

impl FlatParams {
    /// Flattens the parameters of `vs` and sets up gradients as views of one buffer.
    pub fn new(vs: &nn::VarStore) -> Result<Self> {
        let (params, slots, handles) = flatten_into_buffer(vs);
        let grads = params.zeros_like();
        // Materialise every .grad with a zero backward, then re-point each one into the
        // flat gradient buffer; autograd accumulates in place into an existing gradient.
        let zero = handles
            .iter()
            .map(|t| t.sum(Kind::Float) * 0.0)
            .fold(Tensor::zeros([], (Kind::Float, params.device())), |a, b| {
                a + b
            });
        zero.backward();
        tch::no_grad(|| {
            for (t, s) in handles.iter().zip(&slots) {
                let mut g = t.grad();
                if !g.defined() {
                    return Err(TrainError::Internal(format!(
                        "variable {} has no gradient",
                        s.name
                    )));
                }
                g.set_data(
                    &grads
                        .narrow(0, s.offset, s.numel())
                        .view(s.shape.as_slice()),
                );
            }
            Ok(())
        })?;
        let me = Self {
            params,
            grads,
            slots,
        };
        me.check_views(vs)?;
        Ok(me)
    }

    /// Verifies that every variable and gradient still aliases the flat buffers.
    pub fn check_views(&self, vs: &nn::VarStore) -> Result<()> {
        let vars = vs.variables();
        for s in &self.slots {
            let v = &vars[&s.name];
            let want = self.params.narrow(0, s.offset, s.numel()).data_ptr();
            let gwant = self.grads.narrow(0, s.offset, s.numel()).data_ptr();
            if v.data_ptr() != want || v.grad().data_ptr() != gwant {
                return Err(TrainError::Internal(format!(
                    "variable {} no longer aliases the flat buffers",
                    s.name
                )));
            }
        }
        Ok(())
    }

    /// Zeroes the flat gradient.
    pub fn zero_grad(&mut self) {
        let _ = self.grads.zero_();
    }
}

/// Re-points the variables of `vs` (same layout as `slots`) into views of `flat`.
pub fn alias_into(vs: &nn::VarStore, flat: &Tensor, slots: &[Slot]) -> Result<()> {
    let vars = vs.variables();
    tch::no_grad(|| {
        for s in slots {
            let Some(v) = vars.get(&s.name) else {
                return Err(TrainError::Internal(format!("variable {} missing", s.name)));
            };
            if v.size() != s.shape {
                return Err(TrainError::Internal(format!(
                    "variable {} has shape {:?}, expected {:?}",
                    s.name,
                    v.size(),
                    s.shape
                )));
            }
            let mut v = v.shallow_clone();
            v.set_data(&flat.narrow(0, s.offset, s.numel()).view(s.shape.as_slice()));
        }
        Ok(())
    })
}
