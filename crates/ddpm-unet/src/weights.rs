//! Weight names, file formats and conversion to and from diffusers `UNet2DModel`.
//!
//! Our names follow the official implementation's module structure:
//! `temb.dense.{0,1}`, `conv_in`, `down.{i}.block.{j}.{norm1,conv1,temb_proj,norm2,conv2,
//! nin_shortcut}`, `down.{i}.attn.{j}.{norm,q,k,v,proj_out}`, `down.{i}.downsample.conv`,
//! `mid.{block_1,attn_1,block_2}`, `up.{i}.block.{j}`, `up.{i}.attn.{j}`,
//! `up.{i}.upsample.conv`, `norm_out`, `conv_out`, where level `i` counts from the
//! full-resolution level in both paths. diffusers numbers its up blocks from the lowest
//! resolution, names the attention projections `to_q/to_k/to_v/to_out.0` (older exports:
//! `query/key/value/proj_attn`), and stores the same shapes.

use crate::{Result, UNetConfig, UNetError};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tch::{nn, Tensor};

/// Naming scheme of a weights file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    /// This project's names (see the module docs).
    Ours,
    /// diffusers `UNet2DModel` names.
    Diffusers,
}

impl std::str::FromStr for WeightsFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ours" | "ddpm" => Ok(Self::Ours),
            "diffusers" => Ok(Self::Diffusers),
            _ => Err(format!(
                "unknown weights format {s:?}: expected `ours` or `diffusers`"
            )),
        }
    }
}

fn map_resnet_part(part: &str, to_diffusers: bool) -> Option<&'static str> {
    const PAIRS: [(&str, &str); 6] = [
        ("norm1", "norm1"),
        ("conv1", "conv1"),
        ("temb_proj", "time_emb_proj"),
        ("norm2", "norm2"),
        ("conv2", "conv2"),
        ("nin_shortcut", "conv_shortcut"),
    ];
    PAIRS
        .iter()
        .find(|(o, d)| if to_diffusers { *o == part } else { *d == part })
        .map(|(o, d)| if to_diffusers { *d } else { *o })
}

fn map_attn_part_to_diffusers(part: &str) -> Option<&'static str> {
    Some(match part {
        "norm" => "group_norm",
        "q" => "to_q",
        "k" => "to_k",
        "v" => "to_v",
        "proj_out" => "to_out.0",
        _ => return None,
    })
}

/// Maps one of our variable names to its diffusers name (`levels` = len(ch_mult)).
pub fn to_diffusers_name(name: &str, levels: usize) -> Option<String> {
    let (module, leaf) = name.rsplit_once('.')?;
    if !matches!(leaf, "weight" | "bias") {
        return None;
    }
    let s: Vec<&str> = module.split('.').collect();
    let mapped = match s.as_slice() {
        ["conv_in"] => "conv_in".to_string(),
        ["conv_out"] => "conv_out".to_string(),
        ["norm_out"] => "conv_norm_out".to_string(),
        ["temb", "dense", "0"] => "time_embedding.linear_1".to_string(),
        ["temb", "dense", "1"] => "time_embedding.linear_2".to_string(),
        [path @ ("down" | "up"), i, kind, rest @ ..] => {
            let i: usize = i.parse().ok().filter(|&i| i < levels)?;
            let (blocks, idx) = if *path == "down" {
                ("down_blocks", i)
            } else {
                ("up_blocks", levels - 1 - i)
            };
            match (*kind, rest) {
                ("block", [j, part]) => format!(
                    "{blocks}.{idx}.resnets.{j}.{}",
                    map_resnet_part(part, true)?
                ),
                ("attn", [j, part]) => format!(
                    "{blocks}.{idx}.attentions.{j}.{}",
                    map_attn_part_to_diffusers(part)?
                ),
                ("downsample", ["conv"]) if *path == "down" => {
                    format!("{blocks}.{idx}.downsamplers.0.conv")
                }
                ("upsample", ["conv"]) if *path == "up" => {
                    format!("{blocks}.{idx}.upsamplers.0.conv")
                }
                _ => return None,
            }
        }
        ["mid", which, part] => {
            let p = *part;
            match *which {
                "block_1" => format!("mid_block.resnets.0.{}", map_resnet_part(p, true)?),
                "block_2" => format!("mid_block.resnets.1.{}", map_resnet_part(p, true)?),
                "attn_1" => format!("mid_block.attentions.0.{}", map_attn_part_to_diffusers(p)?),
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(format!("{mapped}.{leaf}"))
}

fn map_attn_part_from_diffusers(parts: &[&str]) -> Option<&'static str> {
    Some(match parts {
        ["group_norm"] => "norm",
        ["to_q"] | ["query"] => "q",
        ["to_k"] | ["key"] => "k",
        ["to_v"] | ["value"] => "v",
        ["to_out", "0"] | ["proj_attn"] => "proj_out",
        _ => return None,
    })
}

/// Maps a diffusers `UNet2DModel` parameter name (current or pre-0.15 attention names) to ours.
pub fn from_diffusers_name(name: &str, levels: usize) -> Option<String> {
    let (module, leaf) = name.rsplit_once('.')?;
    if !matches!(leaf, "weight" | "bias") {
        return None;
    }
    let s: Vec<&str> = module.split('.').collect();
    let mapped = match s.as_slice() {
        ["conv_in"] => "conv_in".to_string(),
        ["conv_out"] => "conv_out".to_string(),
        ["conv_norm_out"] => "norm_out".to_string(),
        ["time_embedding", "linear_1"] => "temb.dense.0".to_string(),
        ["time_embedding", "linear_2"] => "temb.dense.1".to_string(),
        [blocks @ ("down_blocks" | "up_blocks"), idx, kind, rest @ ..] => {
            let idx: usize = idx.parse().ok().filter(|&i| i < levels)?;
            let (path, i) = if *blocks == "down_blocks" {
                ("down", idx)
            } else {
                ("up", levels - 1 - idx)
            };
            match (*kind, rest) {
                ("resnets", [j, part]) => {
                    format!("{path}.{i}.block.{j}.{}", map_resnet_part(part, false)?)
                }
                ("attentions", [j, part @ ..]) => format!(
                    "{path}.{i}.attn.{j}.{}",
                    map_attn_part_from_diffusers(part)?
                ),
                ("downsamplers", ["0", "conv"]) if path == "down" => {
                    format!("down.{i}.downsample.conv")
                }
                ("upsamplers", ["0", "conv"]) if path == "up" => format!("up.{i}.upsample.conv"),
                _ => return None,
            }
        }
        ["mid_block", "resnets", j @ ("0" | "1"), part] => {
            let which = if *j == "0" { "block_1" } else { "block_2" };
            format!("mid.{which}.{}", map_resnet_part(part, false)?)
        }
        ["mid_block", "attentions", "0", part @ ..] => {
            format!("mid.attn_1.{}", map_attn_part_from_diffusers(part)?)
        }
        _ => return None,
    };
    Some(format!("{mapped}.{leaf}"))
}

/// Guesses the naming scheme of a set of tensor names.
pub fn detect_format<'a>(names: impl IntoIterator<Item = &'a str>) -> WeightsFormat {
    let diffusers = names.into_iter().any(|n| {
        n.starts_with("time_embedding.")
            || n.starts_with("down_blocks.")
            || n.starts_with("mid_block.")
    });
    if diffusers {
        WeightsFormat::Diffusers
    } else {
        WeightsFormat::Ours
    }
}

/// Reads a safetensors file into (name, tensor) pairs.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.exists() {
        return Err(UNetError::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    Tensor::read_safetensors(path).map_err(|e| UNetError::Weights {
        path: path.display().to_string(),
        reason: format!("not a readable safetensors file: {e}"),
    })
}

/// Loads named tensors (either naming scheme, any float dtype) into the variables of `vs`.
/// Every variable must be present with its exact shape and nothing may be left over;
/// otherwise the error lists each missing, unexpected and mis-shaped tensor by name.
pub fn load_into(
    vs: &nn::VarStore,
    levels: usize,
    tensors: Vec<(String, Tensor)>,
    origin: &str,
) -> Result<WeightsFormat> {
    let format = detect_format(tensors.iter().map(|(n, _)| n.as_str()));
    let mut by_ours: BTreeMap<String, (String, Tensor)> = BTreeMap::new();
    let mut problems = Vec::new();
    for (name, t) in tensors {
        let ours = match format {
            WeightsFormat::Ours => Some(name.clone()),
            WeightsFormat::Diffusers => from_diffusers_name(&name, levels),
        };
        match ours {
            Some(o) => {
                by_ours.insert(o, (name, t));
            }
            None => problems.push(format!(
                "unexpected tensor `{name}` (not a parameter of this U-Net)"
            )),
        }
    }
    let vars = vs.variables();
    let file_name = |ours: &str| match format {
        WeightsFormat::Ours => ours.to_string(),
        WeightsFormat::Diffusers => {
            to_diffusers_name(ours, levels).unwrap_or_else(|| ours.to_string())
        }
    };
    for (name, var) in vars.iter().collect::<BTreeMap<_, _>>() {
        match by_ours.get(name) {
            None => problems.push(format!(
                "missing tensor `{}` (expected shape {:?})",
                file_name(name),
                var.size()
            )),
            Some((src_name, src)) if src.size() != var.size() => problems.push(format!(
                "tensor `{src_name}` has shape {:?}, expected {:?}",
                src.size(),
                var.size()
            )),
            Some(_) => {}
        }
    }
    let known: BTreeSet<&String> = vars.keys().collect();
    for (ours, (src_name, _)) in &by_ours {
        if !known.contains(ours) {
            problems.push(format!(
                "unexpected tensor `{src_name}` (not a parameter of this U-Net)"
            ));
        }
    }
    if !problems.is_empty() {
        return Err(UNetError::Weights {
            path: origin.to_string(),
            reason: format!(
                "{} problem(s) for a U-Net with {} levels: {}",
                problems.len(),
                levels,
                problems.join("; ")
            ),
        });
    }
    tch::no_grad(|| -> Result<()> {
        for (name, var) in &vars {
            let (_, src) = &by_ours[name];
            let mut var = var.shallow_clone();
            var.f_copy_(&src.to_kind(var.kind()).to_device(var.device()))?;
        }
        Ok(())
    })?;
    Ok(format)
}

/// Loads a safetensors weights file (either naming scheme) into `vs`.
pub fn load(vs: &nn::VarStore, levels: usize, path: &Path) -> Result<WeightsFormat> {
    let tensors = read_safetensors(path)?;
    load_into(vs, levels, tensors, &path.display().to_string())
}

/// The variables of `vs` as (name, tensor) pairs in the chosen naming, sorted by name.
pub fn named_tensors(
    vs: &nn::VarStore,
    levels: usize,
    format: WeightsFormat,
) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (name, t) in vs.variables() {
        let n = match format {
            WeightsFormat::Ours => name,
            WeightsFormat::Diffusers => {
                to_diffusers_name(&name, levels).ok_or_else(|| UNetError::Weights {
                    path: "<model>".into(),
                    reason: format!("variable `{name}` has no diffusers equivalent"),
                })?
            }
        };
        out.push((n, t.detach().to_device(tch::Device::Cpu).contiguous()));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Writes the variables of `vs` as safetensors in the chosen naming.
pub fn save(vs: &nn::VarStore, levels: usize, path: &Path, format: WeightsFormat) -> Result<()> {
    let tensors = named_tensors(vs, levels, format)?;
    Tensor::write_safetensors(&tensors, path).map_err(|e| UNetError::Weights {
        path: path.display().to_string(),
        reason: format!("cannot write: {e}"),
    })
}

/// The diffusers `UNet2DModel` config.json equivalent to `c` (conv resampling only).
pub fn diffusers_config(c: &UNetConfig) -> Result<Value> {
    if !c.resamp_with_conv {
        return Err(UNetError::Config {
            key: "model.resamp_with_conv".into(),
            reason: "diffusers' UNet2DModel always resamples with convolutions; false cannot be exported".into(),
        });
    }
    let levels = c.levels();
    let attn_at = |i: usize| c.attn_resolutions.contains(&(c.resolution >> i));
    let down: Vec<&str> = (0..levels)
        .map(|i| {
            if attn_at(i) {
                "AttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let up: Vec<&str> = (0..levels)
        .rev()
        .map(|i| {
            if attn_at(i) {
                "AttnUpBlock2D"
            } else {
                "UpBlock2D"
            }
        })
        .collect();
    let block_out: Vec<i64> = c.ch_mult.iter().map(|m| m * c.ch).collect();
    Ok(json!({
        "_class_name": "UNet2DModel",
        "act_fn": "silu",
        "add_attention": true,
        "attention_head_dim": null,
        "block_out_channels": block_out,
        "center_input_sample": false,
        "down_block_types": down,
        "downsample_padding": 0,
        "dropout": c.dropout,
        "flip_sin_to_cos": false,
        "freq_shift": 1,
        "in_channels": c.in_channels,
        "layers_per_block": c.num_res_blocks,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-6,
        "norm_num_groups": 32,
        "out_channels": c.out_channels,
        "resnet_time_scale_shift": "default",
        "sample_size": c.resolution,
        "time_embedding_type": "positional",
        "up_block_types": up,
    }))
}

/// Reads the U-Net architecture from a diffusers `UNet2DModel` config.json, rejecting
/// (by key) every setting this implementation does not reproduce.
pub fn config_from_diffusers(v: &Value, origin: &str) -> Result<UNetConfig> {
    let err = |key: &str, reason: String| UNetError::Config {
        key: format!("{origin}: {key}"),
        reason,
    };
    let int = |key: &str| {
        v.get(key)
            .and_then(Value::as_i64)
            .ok_or_else(|| err(key, "expected an integer".into()))
    };
    let expect = |key: &str, want: Value, default: Value| -> Result<()> {
        let got = v.get(key).cloned().unwrap_or(default);
        let same = match (&got, &want) {
            (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
            _ => got == want,
        };
        if same {
            Ok(())
        } else {
            Err(err(
                key,
                format!("expected {want}, got {got} (not the DDPM architecture)"),
            ))
        }
    };
    expect("downsample_padding", json!(0), json!(1))?;
    expect("flip_sin_to_cos", json!(false), json!(true))?;
    expect("freq_shift", json!(1), json!(0))?;
    expect("norm_num_groups", json!(32), json!(32))?;
    expect("act_fn", json!("silu"), json!("silu"))?;
    expect(
        "time_embedding_type",
        json!("positional"),
        json!("positional"),
    )?;
    expect("center_input_sample", json!(false), json!(false))?;
    expect("mid_block_scale_factor", json!(1), json!(1))?;
    expect(
        "resnet_time_scale_shift",
        json!("default"),
        json!("default"),
    )?;
    let eps = v.get("norm_eps").and_then(Value::as_f64).unwrap_or(1e-5);
    if (eps - 1e-6).abs() > 1e-12 {
        return Err(err("norm_eps", format!("expected 1e-6, got {eps}")));
    }
    expect("add_attention", json!(true), json!(true))?;
    expect("downsample_type", json!("conv"), json!("conv"))?;
    expect("upsample_type", json!("conv"), json!("conv"))?;
    for key in ["time_embedding_dim", "class_embed_type", "num_class_embeds"] {
        expect(key, Value::Null, Value::Null)?;
    }
    let block_out: Vec<i64> = v
        .get("block_out_channels")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<i64>>>())
        .filter(|b| !b.is_empty() && b.iter().all(|&c| c > 0))
        .ok_or_else(|| {
            err(
                "block_out_channels",
                "expected a non-empty list of positive integers".into(),
            )
        })?;
    let ch = block_out[0];
    if block_out.iter().any(|b| b % ch != 0) {
        return Err(err(
            "block_out_channels",
            format!("{block_out:?} are not multiples of the first entry"),
        ));
    }
    // diffusers' UNet2DModel defaults attention_head_dim to 8 (several heads); the paper's
    // attention has one head, which diffusers spells null or the block's channel count.
    let head = v.get("attention_head_dim").cloned().unwrap_or(json!(8));
    let one_head = |channels: i64| head.is_null() || head.as_i64() == Some(channels);
    let mid_channels = *block_out.last().expect("non-empty");
    if !one_head(mid_channels) {
        return Err(err(
            "attention_head_dim",
            format!("expected null (one head), got {head}"),
        ));
    }
    let resolution = int("sample_size")?;
    let names = |key: &str| -> Result<Vec<String>> {
        v.get(key)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .ok_or_else(|| err(key, "expected a list of block type names".into()))
    };
    let down = names("down_block_types")?;
    let up = names("up_block_types")?;
    let levels = block_out.len();
    if down.len() != levels || up.len() != levels {
        return Err(err(
            "down_block_types",
            format!("expected {levels} down and up block types"),
        ));
    }
    let mut attn = Vec::new();
    for (i, d) in down.iter().enumerate() {
        let res = resolution >> i;
        let has = match d.as_str() {
            "AttnDownBlock2D" => true,
            "DownBlock2D" => false,
            other => {
                return Err(err(
                    "down_block_types",
                    format!("unsupported block {other:?}"),
                ))
            }
        };
        let up_name = &up[levels - 1 - i];
        let up_has = match up_name.as_str() {
            "AttnUpBlock2D" => true,
            "UpBlock2D" => false,
            other => {
                return Err(err(
                    "up_block_types",
                    format!("unsupported block {other:?}"),
                ))
            }
        };
        if has != up_has {
            return Err(err(
                "up_block_types",
                format!("attention at resolution {res} must be used on both paths"),
            ));
        }
        if has {
            attn.push(res);
            if !one_head(block_out[i]) {
                return Err(err(
                    "attention_head_dim",
                    format!("expected null (one head), got {head}"),
                ));
            }
        }
    }
    Ok(UNetConfig {
        in_channels: int("in_channels")?,
        out_channels: int("out_channels")?,
        ch,
        ch_mult: block_out.iter().map(|b| b / ch).collect(),
        num_res_blocks: int("layers_per_block")?,
        attn_resolutions: attn,
        dropout: v.get("dropout").and_then(Value::as_f64).unwrap_or(0.0),
        resamp_with_conv: true,
        resolution,
    })
}
