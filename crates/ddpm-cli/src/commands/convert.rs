//! `ddpm convert`: our weight names <-> diffusers UNet2DModel.

use super::load_config;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use ddpm_unet::weights::{self, WeightsFormat};
use ddpm_unet::{UNet, UNetConfig};
use std::path::{Path, PathBuf};
use tch::{nn, Device};

/// Target naming.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Target {
    /// A diffusers model directory: config.json + diffusion_pytorch_model.safetensors,
    /// loadable with `UNet2DModel.from_pretrained(DIR)`.
    Diffusers,
    /// One safetensors file with this project's names.
    Ours,
}

/// Arguments of `ddpm convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Source weights: a safetensors file (either naming) or a diffusers model directory
    /// (with config.json, e.g. a download of google/ddpm-cifar10-32).
    #[arg(long)]
    pub input: PathBuf,
    /// Target naming.
    #[arg(long, value_enum)]
    pub to: Target,
    /// Output: a directory for `diffusers`, a .safetensors file for `ours`.
    #[arg(long)]
    pub output: PathBuf,
    /// Config giving the architecture; needed unless --input is a diffusers directory.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

fn diffusers_dir(dir: &Path) -> Result<(UNetConfig, PathBuf)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("reading {}", cfg_path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", cfg_path.display()))?;
    let cfg = weights::config_from_diffusers(&json, &cfg_path.display().to_string())?;
    let st = dir.join("diffusion_pytorch_model.safetensors");
    if !st.exists() {
        let bin = dir.join("diffusion_pytorch_model.bin");
        if bin.exists() {
            bail!(
                "{}: only a pickled .bin checkpoint is present; convert it to safetensors first \
                 (python: safetensors.torch.save_file(torch.load(BIN), '{}'))",
                dir.display(),
                st.display()
            );
        }
        bail!("{}: no diffusion_pytorch_model.safetensors", dir.display());
    }
    Ok((cfg, st))
}

/// Runs `ddpm convert`.
pub fn run(a: ConvertArgs) -> Result<()> {
    let (ucfg, src) = if a.input.is_dir() {
        diffusers_dir(&a.input)?
    } else {
        let Some(cfg_path) = &a.config else {
            bail!(
                "--config is required when --input is a weights file (it gives the architecture)"
            );
        };
        (
            UNetConfig::from_config(&load_config(cfg_path)?),
            a.input.clone(),
        )
    };
    let vs = nn::VarStore::new(Device::Cpu);
    UNet::new(&vs.root(), &ucfg)?;
    let from = weights::load(&vs, ucfg.levels(), &src)?;
    match a.to {
        Target::Diffusers => {
            std::fs::create_dir_all(&a.output)
                .with_context(|| format!("creating {}", a.output.display()))?;
            let json = weights::diffusers_config(&ucfg)?;
            let cfg_out = a.output.join("config.json");
            std::fs::write(&cfg_out, serde_json::to_string_pretty(&json)? + "\n")
                .with_context(|| format!("writing {}", cfg_out.display()))?;
            weights::save(
                &vs,
                ucfg.levels(),
                &a.output.join("diffusion_pytorch_model.safetensors"),
                WeightsFormat::Diffusers,
            )?;
        }
        Target::Ours => {
            weights::save(&vs, ucfg.levels(), &a.output, WeightsFormat::Ours)?;
        }
    }
    println!(
        "converted {} ({from:?} names) -> {} ({:?})",
        src.display(),
        a.output.display(),
        a.to
    );
    Ok(())
}
