//! `ddpm ckpt ls | inspect | verify | export`: operators' view of a run's checkpoints in any
//! object store.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use ddpm_checkpoint::{open_url_with, parse_step_dir, CheckpointStore, MANIFEST};
use ddpm_config::Config;
use ddpm_unet::weights::{self, WeightsFormat};
use ddpm_unet::{UNet, UNetConfig};
use object_store::ObjectStoreExt;
use std::path::PathBuf;
use tch::{nn, Device, Tensor};

/// `ddpm ckpt` subcommands.
#[derive(Subcommand, Debug)]
pub enum CkptCommand {
    /// List a run's committed checkpoints: step, blobs, total size, time; marks the latest.
    Ls(Target),
    /// Show one checkpoint (default: the latest): step, data cursor, blobs with sizes and
    /// sha256, parameter count, and the key settings of its resolved config.
    Inspect(Target),
    /// Verify every blob's size and sha256 of one checkpoint, or of all of a run's
    /// checkpoints; exits non-zero naming each blob that fails.
    Verify(Target),
    /// Write a checkpoint's EMA weights for use elsewhere.
    Export(ExportArgs),
}

/// Where the checkpoints are.
#[derive(Args, Debug)]
pub struct Target {
    /// `<checkpoint.url>/<run.name>`, optionally followed by `/step-N`, e.g.
    /// file:///data/ckpt/cifar10/step-800000 or s3://bucket/ckpt/lsun_church.
    pub url: String,
    /// Store option KEY=VALUE by object_store's key names (aws_endpoint, aws_region,
    /// aws_allow_http, ...); repeatable. Credentials also come from AWS_* / GOOGLE_* / AZURE_*.
    #[arg(long = "option", value_name = "KEY=VALUE")]
    pub options: Vec<String>,
}

/// Arguments of `ddpm ckpt export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    target: Target,
    /// `safetensors`: ema.safetensors with this project's names plus config.toml (what
    /// `ddpm sample --weights` reads); `diffusers`: a UNet2DModel directory (config.json +
    /// diffusion_pytorch_model.safetensors).
    #[arg(long, value_enum)]
    format: ExportFormat,
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
}

/// Export formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    /// This project's names, one safetensors file.
    Safetensors,
    /// diffusers' UNet2DModel directory.
    Diffusers,
}

/// A parsed checkpoint URL.
struct Located {
    store: CheckpointStore,
    step: Option<u64>,
    rt: tokio::runtime::Runtime,
}

/// Splits `<root>/<run>[/step-N]` into (root URL, run, step).
fn split_url(url: &str) -> Result<(String, String, Option<u64>)> {
    let parsed = url::Url::parse(url).with_context(|| format!("{url:?} is not a URL"))?;
    let mut segments: Vec<String> = parsed
        .path_segments()
        .map(|s| s.filter(|p| !p.is_empty()).map(str::to_string).collect())
        .unwrap_or_default();
    let step = match segments.last().and_then(|s| parse_step_dir(s)) {
        Some(step) => {
            segments.pop();
            Some(step)
        }
        None => None,
    };
    let Some(run) = segments.pop() else {
        bail!("{url}: expected <checkpoint url>/<run name>[/step-N]");
    };
    let mut root = parsed.clone();
    root.set_path(&format!("/{}", segments.join("/")));
    let root = root.as_str().trim_end_matches('/').to_string();
    Ok((root, run, step))
}

fn locate(t: &Target) -> Result<Located> {
    let (root, run, step) = split_url(&t.url)?;
    let (store, prefix) = open_url_with(&root, &super::prepare::parse_options(&t.options)?)?;
    Ok(Located {
        store: CheckpointStore::new(store, prefix, &run)?,
        step,
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
    })
}

impl Located {
    /// The step in the URL, or the latest committed one.
    fn step_or_latest(&self) -> Result<u64> {
        if let Some(s) = self.step {
            return Ok(s);
        }
        self.rt
            .block_on(self.store.latest_step())?
            .with_context(|| format!("run {:?} has no committed checkpoint", self.store.run()))
    }
}

fn human(bytes: u64) -> String {
    let mut v = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if v < 1024.0 || unit == "GiB" {
            return if unit == "B" {
                format!("{bytes} B")
            } else {
                format!("{v:.1} {unit}")
            };
        }
        v /= 1024.0;
    }
    unreachable!()
}

/// Parameter count from a safetensors header read with two range requests.
fn parameter_count(l: &Located, step: u64, blob: &str) -> Result<u64> {
    let len = l.rt.block_on(l.store.read_blob_range(step, blob, 0..8))?;
    let n = u64::from_le_bytes(len[..8].try_into().context("short safetensors header")?);
    anyhow::ensure!(n < 100 << 20, "{blob}: safetensors header of {n} bytes");
    let header =
        l.rt.block_on(l.store.read_blob_range(step, blob, 8..8 + n))?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).with_context(|| format!("{blob}: header"))?;
    let obj = v.as_object().context("header is not an object")?;
    Ok(obj
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, t)| {
            t["shape"]
                .as_array()
                .map(|s| s.iter().map(|d| d.as_u64().unwrap_or(0)).product::<u64>())
                .unwrap_or(0)
        })
        .sum())
}

/// Runs `ddpm ckpt`.
pub fn run(cmd: CkptCommand) -> Result<()> {
    match cmd {
        CkptCommand::Ls(t) => ls(&t),
        CkptCommand::Inspect(t) => inspect(&t),
        CkptCommand::Verify(t) => verify(&t),
        CkptCommand::Export(a) => export(&a),
    }
}

fn ls(t: &Target) -> Result<()> {
    let l = locate(t)?;
    let steps = l.rt.block_on(l.store.committed_steps())?;
    if steps.is_empty() {
        println!("run {:?}: no committed checkpoints", l.store.run());
        return Ok(());
    }
    let latest = l.rt.block_on(l.store.latest_step())?;
    println!(
        "{:>12}  {:>5}  {:>10}  {:<24}",
        "step", "blobs", "size", "committed"
    );
    for step in steps {
        let m = match l.rt.block_on(l.store.read_manifest(step)) {
            Ok(m) => m,
            Err(e) => {
                println!("{step:>12}  unreadable manifest: {e}");
                continue;
            }
        };
        let meta = l.rt.block_on(
            l.store
                .object_store()
                .head(&l.store.blob_path(step, MANIFEST)),
        )?;
        let size: u64 = m.blobs.iter().map(|b| b.size).sum();
        println!(
            "{step:>12}  {:>5}  {:>10}  {:<24}{}",
            m.blobs.len(),
            human(size),
            meta.last_modified.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            if Some(step) == latest { "  latest" } else { "" }
        );
    }
    Ok(())
}

fn inspect(t: &Target) -> Result<()> {
    let l = locate(t)?;
    let step = l.step_or_latest()?;
    let m = l.rt.block_on(l.store.read_manifest(step))?;
    println!("run:    {}", m.run);
    println!("step:   {}", m.step);
    if m.blobs
        .iter()
        .any(|b| b.name == ddpm_worker::checkpoints::STATE_BLOB)
    {
        // Only state.json is fetched (and verified); a bad blob elsewhere is for `verify`.
        match l.rt.block_on(
            l.store
                .load_blob(step, ddpm_worker::checkpoints::STATE_BLOB),
        ) {
            Ok(b) => {
                let s: serde_json::Value = serde_json::from_slice(&b)?;
                println!(
                    "data:   epoch {} position {} (world size {})",
                    s["epoch"], s["position"], s["world_size"]
                );
            }
            Err(e) => println!("data:   unreadable: {e}"),
        }
    }
    let total: u64 = m.blobs.iter().map(|b| b.size).sum();
    println!("blobs:  {} ({} in all)", m.blobs.len(), human(total));
    for b in &m.blobs {
        println!(
            "  {:<24} {:>10}  sha256 {}",
            b.name,
            human(b.size),
            b.sha256
        );
    }
    if m.blobs.iter().any(|b| b.name == "ema.safetensors") {
        match parameter_count(&l, step, "ema.safetensors") {
            Ok(n) => println!("parameters: {n}"),
            Err(e) => println!("parameters: unreadable ema.safetensors header: {e:#}"),
        }
    }
    let c = &m.config;
    println!(
        "config: data {} at {}x{}x{}; model ch {} ch_mult {} res blocks {} attn {}; T {} {}; \
         predicts {} ({} variance, {} loss); batch {} lr {}",
        c["data"]["source"],
        c["data"]["channels"],
        c["data"]["resolution"],
        c["data"]["resolution"],
        c["model"]["ch"],
        c["model"]["ch_mult"],
        c["model"]["num_res_blocks"],
        c["model"]["attn_resolutions"],
        c["diffusion"]["num_timesteps"],
        c["diffusion"]["schedule"],
        c["diffusion"]["model_mean_type"],
        c["diffusion"]["model_var_type"],
        c["diffusion"]["loss_type"],
        c["train"]["batch_size"],
        c["train"]["lr"],
    );
    Ok(())
}

fn verify(t: &Target) -> Result<()> {
    let l = locate(t)?;
    let steps = match l.step {
        Some(s) => vec![s],
        None => l.rt.block_on(l.store.committed_steps())?,
    };
    anyhow::ensure!(
        !steps.is_empty(),
        "run {:?} has no committed checkpoint",
        l.store.run()
    );
    let mut bad = Vec::new();
    let pb = super::progress(steps.len() as u64, "verify");
    for step in &steps {
        match l.rt.block_on(l.store.load(*step)) {
            Ok((m, _)) => pb.suspend(|| println!("step-{step}: ok ({} blobs)", m.blobs.len())),
            Err(e) => {
                pb.suspend(|| println!("step-{step}: FAILED: {e}"));
                bad.push(*step);
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    if !bad.is_empty() {
        bail!(
            "{} of {} checkpoints failed verification: steps {bad:?}",
            bad.len(),
            steps.len()
        );
    }
    Ok(())
}

fn export(a: &ExportArgs) -> Result<()> {
    let l = locate(&a.target)?;
    let step = l.step_or_latest()?;
    let m = l.rt.block_on(l.store.read_manifest(step))?;
    // Only the EMA weights are fetched, and verified against the manifest.
    let ema = l.rt.block_on(l.store.load_blob(step, "ema.safetensors"))?;
    let ema = &ema;
    let cfg: Config = serde_json::from_value(m.config.clone())
        .with_context(|| format!("step-{step}: the manifest's config"))?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    match a.format {
        ExportFormat::Safetensors => {
            let path = a.out.join("ema.safetensors");
            std::fs::write(&path, ema).with_context(|| format!("writing {}", path.display()))?;
            let cfg_path = a.out.join("config.toml");
            std::fs::write(&cfg_path, cfg.to_toml())
                .with_context(|| format!("writing {}", cfg_path.display()))?;
        }
        ExportFormat::Diffusers => {
            let ucfg = UNetConfig::from_config(&cfg);
            let vs = nn::VarStore::new(Device::Cpu);
            UNet::new(&vs.root(), &ucfg)?;
            let st = safetensors::SafeTensors::deserialize(ema)
                .map_err(|e| anyhow::anyhow!("step-{step}: ema.safetensors: {e:?}"))?;
            let mut tensors = Vec::with_capacity(st.len());
            for (name, view) in st.tensors() {
                let t = Tensor::try_from(view)
                    .with_context(|| format!("ema.safetensors: tensor `{name}`"))?;
                tensors.push((name, t));
            }
            weights::load_into(&vs, ucfg.levels(), tensors, "ema.safetensors")?;
            let json = weights::diffusers_config(&ucfg)?;
            std::fs::write(
                a.out.join("config.json"),
                serde_json::to_string_pretty(&json)? + "\n",
            )?;
            weights::save(
                &vs,
                ucfg.levels(),
                &a.out.join("diffusion_pytorch_model.safetensors"),
                WeightsFormat::Diffusers,
            )?;
        }
    }
    println!(
        "exported the EMA weights of {}/step-{step} as {:?} to {}",
        m.run,
        a.format,
        a.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_root_run_and_step() {
        assert_eq!(
            split_url("file:///data/ckpt/cifar10/step-800").unwrap(),
            ("file:///data/ckpt".into(), "cifar10".into(), Some(800))
        );
        assert_eq!(
            split_url("s3://bucket/ckpt/church").unwrap(),
            ("s3://bucket/ckpt".into(), "church".into(), None)
        );
        assert_eq!(
            split_url("s3://bucket/church/").unwrap(),
            ("s3://bucket".into(), "church".into(), None)
        );
        assert!(split_url("s3://bucket").is_err());
        assert!(split_url("s3://bucket/step-5").is_err());
    }
}
