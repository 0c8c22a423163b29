//! Weight files for the Inception-v3: reading them, checking every tensor's name and shape,
//! and the name mapping from NVIDIA's TorchScript port of the TF graph.

use super::torch_save::{read_state_dict, ZIP_MAGIC};
use crate::{EvalError, Result};
use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// How many problems an error message lists before it summarises the rest.
const MAX_LISTED: usize = 12;

/// The one-line conversion a user can run when a `.pth` file cannot be read.
pub(crate) const CONVERT_HINT: &str = "re-save it as safetensors with: python -c \"import sys, torch; \
from safetensors.torch import save_file; \
save_file({k: v.contiguous() for k, v in torch.load(sys.argv[1], map_location='cpu').items()}, sys.argv[2])\" \
IN.pth OUT.safetensors";

/// Named tensors being consumed by the network builder. Each `take` checks the name and
/// shape; problems are collected so that one error lists all of them.
pub(crate) struct Params {
    tensors: BTreeMap<String, Tensor>,
    used: HashSet<String>,
    problems: Vec<String>,
    device: Device,
}

impl Params {
    pub(crate) fn new(tensors: impl IntoIterator<Item = (String, Tensor)>, device: Device) -> Self {
        Params {
            tensors: tensors.into_iter().collect(),
            used: HashSet::new(),
            problems: Vec::new(),
            device,
        }
    }

    /// The tensor `name` as float32 on the device, if it exists with shape `shape` and a float
    /// dtype; otherwise records the problem and returns zeros.
    pub(crate) fn take(&mut self, name: &str, shape: &[i64]) -> Tensor {
        if self.tensors.contains_key(name) {
            self.used.insert(name.to_string());
        }
        let problem = match self.tensors.get(name) {
            None => format!("missing tensor `{name}` (expected shape {shape:?})"),
            Some(t) if t.size() != shape => {
                format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    t.size()
                )
            }
            Some(t) if !t.is_floating_point() => {
                format!(
                    "tensor `{name}` has dtype {:?}, expected a float dtype",
                    t.kind()
                )
            }
            Some(t) => return t.to_kind(Kind::Float).to_device(self.device),
        };
        self.problems.push(problem);
        Tensor::zeros(shape, (Kind::Float, self.device))
    }

    /// Fails, naming `path`, if a tensor was missing or mis-shaped or a file tensor was not
    /// used (BatchNorm's `num_batches_tracked` counters are ignored).
    pub(crate) fn finish(mut self, path: &Path) -> Result<()> {
        for name in self.tensors.keys() {
            if !self.used.contains(name) && !name.ends_with(".num_batches_tracked") {
                self.problems.push(format!(
                    "unexpected tensor `{name}` (not a parameter of the FID Inception-v3)"
                ));
            }
        }
        if self.problems.is_empty() {
            return Ok(());
        }
        let n = self.problems.len();
        let mut listed = self.problems[..n.min(MAX_LISTED)].join("; ");
        if n > MAX_LISTED {
            listed.push_str(&format!("; and {} more", n - MAX_LISTED));
        }
        Err(file_error(
            path,
            format!("{n} problem(s) in the Inception-v3 weights: {listed}"),
        ))
    }
}

pub(crate) fn file_error(path: &Path, reason: impl Into<String>) -> EvalError {
    EvalError::File {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Reads the named tensors of a `.safetensors` file or a `torch.save` state dict (zip or
/// legacy format), chosen by content, not by extension.
pub(crate) fn read_weights(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut head = [0u8; 16];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| file_error(path, format!("cannot read the weights file: {e}")))?;
    let head = &head[..n];
    // safetensors: an 8-byte little-endian header length, then the JSON header.
    if head.len() > 8 && head[8] == b'{' && !head.starts_with(ZIP_MAGIC) {
        return Tensor::read_safetensors(path)
            .map_err(|e| file_error(path, format!("not a readable safetensors file: {e}")));
    }
    let bytes = std::fs::read(path)
        .map_err(|e| file_error(path, format!("cannot read the weights file: {e}")))?;
    read_state_dict(&bytes).map_err(|e| {
        file_error(
            path,
            format!("cannot read this torch.save file ({e}); {CONVERT_HINT}"),
        )
    })
}

/// TorchScript module names of NVIDIA's TF-Inception port (`net.layers.<block>`), with the
/// torchvision block name and the branch table of that block.
const TS_BLOCKS: &[(&str, &str, Branches)] = &[
    ("conv", "Conv2d_1a_3x3", STEM),
    ("conv_1", "Conv2d_2a_3x3", STEM),
    ("conv_2", "Conv2d_2b_3x3", STEM),
    ("conv_3", "Conv2d_3b_1x1", STEM),
    ("conv_4", "Conv2d_4a_3x3", STEM),
    ("mixed", "Mixed_5b", A),
    ("mixed_1", "Mixed_5c", A),
    ("mixed_2", "Mixed_5d", A),
    ("mixed_3", "Mixed_6a", B),
    ("mixed_4", "Mixed_6b", C),
    ("mixed_5", "Mixed_6c", C),
    ("mixed_6", "Mixed_6d", C),
    ("mixed_7", "Mixed_6e", C),
    ("mixed_8", "Mixed_7a", D),
    ("mixed_9", "Mixed_7b", E),
    ("mixed_10", "Mixed_7c", E),
];
/// (TorchScript branch, torchvision branch) pairs of one kind of block.
type Branches = &'static [(&'static str, &'static str)];
const STEM: Branches = &[("", "")];
const A: Branches = &[
    ("conv", "branch1x1"),
    ("tower.conv", "branch5x5_1"),
    ("tower.conv_1", "branch5x5_2"),
    ("tower_1.conv", "branch3x3dbl_1"),
    ("tower_1.conv_1", "branch3x3dbl_2"),
    ("tower_1.conv_2", "branch3x3dbl_3"),
    ("tower_2.conv", "branch_pool"),
];
const B: Branches = &[
    ("conv", "branch3x3"),
    ("tower.conv", "branch3x3dbl_1"),
    ("tower.conv_1", "branch3x3dbl_2"),
    ("tower.conv_2", "branch3x3dbl_3"),
];
const C: Branches = &[
    ("conv", "branch1x1"),
    ("tower.conv", "branch7x7_1"),
    ("tower.conv_1", "branch7x7_2"),
    ("tower.conv_2", "branch7x7_3"),
    ("tower_1.conv", "branch7x7dbl_1"),
    ("tower_1.conv_1", "branch7x7dbl_2"),
    ("tower_1.conv_2", "branch7x7dbl_3"),
    ("tower_1.conv_3", "branch7x7dbl_4"),
    ("tower_1.conv_4", "branch7x7dbl_5"),
    ("tower_2.conv", "branch_pool"),
];
const D: Branches = &[
    ("tower.conv", "branch3x3_1"),
    ("tower.conv_1", "branch3x3_2"),
    ("tower_1.conv", "branch7x7x3_1"),
    ("tower_1.conv_1", "branch7x7x3_2"),
    ("tower_1.conv_2", "branch7x7x3_3"),
    ("tower_1.conv_3", "branch7x7x3_4"),
];
const E: Branches = &[
    ("conv", "branch1x1"),
    ("tower_conv", "branch3x3_1"),
    ("tower_mixed_conv", "branch3x3_2a"),
    ("tower_mixed_conv_1", "branch3x3_2b"),
    ("tower_1_conv", "branch3x3dbl_1"),
    ("tower_1_conv_1", "branch3x3dbl_2"),
    ("tower_1_mixed_conv", "branch3x3dbl_3a"),
    ("tower_1_mixed_conv_1", "branch3x3dbl_3b"),
    ("tower_2_conv", "branch_pool"),
];

/// The torchvision name of a parameter of NVIDIA's TorchScript TF-Inception
/// (`net.layers.mixed_10.tower_2_conv.beta` -> `Mixed_7c.branch_pool.bn.bias`).
pub(crate) fn torchvision_name(ts: &str) -> Option<String> {
    let (layer, param) = ts.strip_prefix("net.layers.")?.rsplit_once('.')?;
    let suffix = match param {
        "weight" => "conv.weight",
        "beta" => "bn.bias",
        "mean" => "bn.running_mean",
        "var" => "bn.running_var",
        _ => return None,
    };
    let (block, sub) = layer.split_once('.').unwrap_or((layer, ""));
    let (_, tv_block, table) = TS_BLOCKS.iter().find(|(b, _, _)| *b == block)?;
    let (_, branch) = table.iter().find(|(s, _)| *s == sub)?;
    Some(match *branch {
        "" => format!("{tv_block}.{suffix}"),
        b => format!("{tv_block}.{b}.{suffix}"),
    })
}

/// Reads the parameters of NVIDIA's TorchScript TF-Inception (pool3 only) under torchvision
/// names. TF's batch norm has no scale, so each `bn.weight` is 1.
pub(crate) fn read_torchscript(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let module = tch::CModule::load(path)
        .map_err(|e| file_error(path, format!("not a loadable TorchScript module: {e}")))?;
    let mut out = Vec::new();
    for (name, t) in module.named_parameters()? {
        let tv = torchvision_name(&name).ok_or_else(|| {
            file_error(
                path,
                format!("parameter `{name}` is not one of the TF Inception port's (net.layers.*)"),
            )
        })?;
        if let Some(prefix) = tv.strip_suffix(".bn.bias") {
            out.push((format!("{prefix}.bn.weight"), t.ones_like()));
        }
        out.push((tv, t.detach()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchscript_names_map_to_torchvision_names() {
        let cases = [
            ("net.layers.conv.weight", "Conv2d_1a_3x3.conv.weight"),
            ("net.layers.conv_4.var", "Conv2d_4a_3x3.bn.running_var"),
            (
                "net.layers.mixed.tower.conv_1.weight",
                "Mixed_5b.branch5x5_2.conv.weight",
            ),
            (
                "net.layers.mixed_3.tower.conv_2.mean",
                "Mixed_6a.branch3x3dbl_3.bn.running_mean",
            ),
            (
                "net.layers.mixed_7.tower_1.conv_4.beta",
                "Mixed_6e.branch7x7dbl_5.bn.bias",
            ),
            (
                "net.layers.mixed_8.tower_1.conv_3.weight",
                "Mixed_7a.branch7x7x3_4.conv.weight",
            ),
            (
                "net.layers.mixed_10.tower_2_conv.beta",
                "Mixed_7c.branch_pool.bn.bias",
            ),
            (
                "net.layers.mixed_9.tower_1_mixed_conv_1.var",
                "Mixed_7b.branch3x3dbl_3b.bn.running_var",
            ),
        ];
        for (ts, tv) in cases {
            assert_eq!(torchvision_name(ts).as_deref(), Some(tv), "{ts}");
        }
        assert_eq!(torchvision_name("net.layers.mixed_11.conv.weight"), None);
        assert_eq!(torchvision_name("net.layers.conv.gamma"), None);
        assert_eq!(
            torchvision_name("net.layers.mixed.tower_3.conv.weight"),
            None
        );
    }
}
