//! `ddpm nll`: test-set negative log-likelihood in bits/dim.

use super::{device, progress};
use anyhow::{Context, Result};
use clap::Args;
use ddpm_diffusion::GaussianDiffusion;
use ddpm_trainer::load_model;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// Arguments of `ddpm nll`.
#[derive(Args, Debug)]
pub struct NllArgs {
    /// Config file (TOML) describing the model.
    #[arg(long)]
    pub config: PathBuf,
    /// Weights file (safetensors, either naming).
    #[arg(long)]
    pub weights: PathBuf,
    /// Dataset as KIND:PATH (default: the config's data.source).
    #[arg(long)]
    pub data: Option<String>,
    /// Number of images to evaluate (the first N of the dataset).
    #[arg(long, default_value_t = 64)]
    pub n: i64,
    /// Images per batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: i64,
    /// Device: cpu, cuda or cuda:K.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Seed for the forward-process noise.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `ddpm nll`.
pub fn run(a: NllArgs) -> Result<()> {
    let mut cfg = super::load_config(&a.config)?;
    if let Some(src) = &a.data {
        cfg.data.source = src.clone();
    }
    anyhow::ensure!(
        a.n >= 1 && a.batch_size >= 1,
        "--n and --batch-size must be >= 1"
    );
    let dev = device(&a.device)?;
    let data = super::dataset::load_all(&cfg.data)
        .with_context(|| format!("reading the evaluation data {:?}", cfg.data.source))?;
    let n = a.n.min(data.len() as i64);
    let (_vs, net, _) = load_model(&cfg, &a.weights, dev)?;
    let d = GaussianDiffusion::new(&cfg.diffusion, dev)?;
    tch::manual_seed(a.seed);
    let batches = (n + a.batch_size - 1) / a.batch_size;
    let pb = progress((batches * d.num_timesteps()) as u64, "nll");
    let mut totals = Vec::new();
    let mut priors = Vec::new();
    let mut decoders = Vec::new();
    for b in 0..batches {
        let start = b * a.batch_size;
        let len = a.batch_size.min(n - start);
        let idx: Vec<u32> = (start..start + len).map(|i| i as u32).collect();
        let x0 = data.batch(&idx).to_device(dev);
        let mut model = |x: &Tensor, t: &Tensor| net.forward_t(x, t, false);
        let mut noise = |s: &[i64]| Tensor::randn(s, (Kind::Float, dev));
        let terms = d.nll_bpd(&mut model, &x0, true, &mut noise, &mut |_| pb.inc(1));
        totals.push(terms.total_bpd.to_device(Device::Cpu));
        priors.push(terms.prior_bpd.to_device(Device::Cpu));
        decoders.push(terms.terms_bpd.select(1, 0).to_device(Device::Cpu));
    }
    pb.finish_and_clear();
    let total = Tensor::cat(&totals, 0).to_kind(Kind::Double);
    let mean = total.mean(Kind::Double).double_value(&[]);
    let stderr = if n > 1 {
        total.std(true).double_value(&[]) / (n as f64).sqrt()
    } else {
        f64::NAN
    };
    let prior = Tensor::cat(&priors, 0).mean(Kind::Double).double_value(&[]);
    let l0 = Tensor::cat(&decoders, 0)
        .mean(Kind::Double)
        .double_value(&[]);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"n": n, "bits_per_dim": mean, "stderr": stderr, "prior_bpd": prior, "decoder_l0_bpd": l0})
        );
    } else {
        println!("NLL over {n} images: {mean:.4} bits/dim (+- {stderr:.4} s.e.); prior term {prior:.2e}, L_0 {l0:.4}");
    }
    Ok(())
}
