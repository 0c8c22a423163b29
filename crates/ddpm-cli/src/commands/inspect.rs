//! `ddpm inspect`: the U-Net of a config, block by block.

use super::load_config;
use anyhow::Result;
use clap::Args;
use ddpm_unet::weights::to_diffusers_name;
use ddpm_unet::{parameter_count, UNet, UNetConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{nn, Device};

/// Arguments of `ddpm inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Config file (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Also list every tensor with its shape (and its diffusers name).
    #[arg(long)]
    pub tensors: bool,
}

/// Runs `ddpm inspect`.
pub fn run(a: InspectArgs) -> Result<()> {
    let cfg = load_config(&a.config)?;
    let ucfg = UNetConfig::from_config(&cfg);
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = UNet::new(&vs.root(), &ucfg)?;
    let vars = vs.variables();
    println!("config: {}", a.config.display());
    println!(
        "U-Net: ch {} x {:?}, {} res blocks/level, attention at {:?}, dropout {}, {}x{}x{} -> {} channels",
        ucfg.ch, ucfg.ch_mult, ucfg.num_res_blocks, ucfg.attn_resolutions, ucfg.dropout,
        ucfg.in_channels, ucfg.resolution, ucfg.resolution, ucfg.out_channels
    );
    // Group by block: the name up to the layer (e.g. down.1.block.0).
    let mut blocks: BTreeMap<String, (i64, Vec<String>)> = BTreeMap::new();
    for (name, t) in &vars {
        let parts: Vec<&str> = name.split('.').collect();
        let key = match parts.as_slice() {
            ["down" | "up", i, kind, j, ..] => format!("{}.{i}.{kind}.{j}", parts[0]),
            ["mid", b, ..] => format!("mid.{b}"),
            [first, ..] => first.to_string(),
            [] => name.clone(),
        };
        let e = blocks.entry(key).or_default();
        e.0 += t.numel() as i64;
        if name.ends_with("weight") && t.dim() >= 2 {
            e.1.push(format!("{:?}", t.size()));
        }
    }
    println!("{:<28} {:>12}  weight shapes", "block", "parameters");
    for (k, (n, shapes)) in &blocks {
        println!("{k:<28} {n:>12}  {}", shapes.join(" "));
    }
    if a.tensors {
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        for n in names {
            let diff = to_diffusers_name(n, ucfg.levels()).unwrap_or_default();
            println!("{n:<40} {:<20} {diff}", format!("{:?}", vars[n].size()));
        }
    }
    println!("total parameters: {}", parameter_count(&vs));
    Ok(())
}
