//! Building a U-Net from a config plus a weights file, and writing weight snapshots.

use crate::{Result, TrainError};
use ddpm_config::Config;
use ddpm_unet::weights::{self, WeightsFormat};
use ddpm_unet::{UNet, UNetConfig};
use std::path::Path;
use tch::{nn, Device};

/// Builds the U-Net described by `config` on `device` and loads `weights` into it (our names
/// or diffusers names, any float dtype). The variables are frozen (inference only).
pub fn load_model(
    config: &Config,
    weights_path: &Path,
    device: Device,
) -> Result<(nn::VarStore, UNet, WeightsFormat)> {
    let cfg = UNetConfig::from_config(config);
    let mut vs = nn::VarStore::new(device);
    let net = UNet::new(&vs.root(), &cfg)?;
    let format = weights::load(&vs, cfg.levels(), weights_path)?;
    vs.freeze();
    Ok((vs, net, format))
}

/// Writes `ema.safetensors`, `model.safetensors` (our names) and the resolved `config.toml`
/// into `dir`, each through a temporary file renamed into place.
pub fn save_weights_dir(
    dir: &Path,
    config: &Config,
    model: &nn::VarStore,
    ema: &nn::VarStore,
) -> Result<()> {
    let io = |source| TrainError::Io {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let levels = config.model.ch_mult.len();
    for (name, vs) in [("model.safetensors", model), ("ema.safetensors", ema)] {
        let tmp = dir.join(format!(".{name}.tmp"));
        weights::save(vs, levels, &tmp, WeightsFormat::Ours)?;
        std::fs::rename(&tmp, dir.join(name)).map_err(io)?;
    }
    let tmp = dir.join(".config.toml.tmp");
    std::fs::write(&tmp, config.to_toml()).map_err(io)?;
    std::fs::rename(&tmp, dir.join("config.toml")).map_err(io)?;
    Ok(())
}
