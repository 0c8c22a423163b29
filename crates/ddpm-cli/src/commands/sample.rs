//! `ddpm sample`, `ddpm progressive` and `ddpm interpolate`.

use super::{device, load_config, progress};
use crate::images::{load_image, read_tensor, save_grid};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use ddpm_config::{Config, SamplerKind};
use ddpm_diffusion::GaussianDiffusion;
use ddpm_trainer::load_model;
use ddpm_unet::UNet;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// Sampler choice on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SamplerArg {
    /// Ancestral sampling (Algorithm 2), T steps.
    Ddpm,
    /// DDIM with --steps and --eta.
    Ddim,
}

/// Model and output options shared by the sampling commands.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// Config file (TOML) describing the model.
    #[arg(long)]
    pub config: PathBuf,
    /// Weights file (safetensors, our names or diffusers UNet2DModel names), e.g. the
    /// ema.safetensors written by `ddpm train`.
    #[arg(long)]
    pub weights: PathBuf,
    /// Device: cpu, cuda or cuda:K.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Seed for the initial noise and every step's noise.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `ddpm sample`.
#[derive(Args, Debug)]
pub struct SampleArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sampler (default: the config's sample.sampler).
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerArg>,
    /// DDIM steps S (default: sample.steps). Ancestral sampling always takes T steps.
    #[arg(long)]
    pub steps: Option<i64>,
    /// DDIM eta (default: sample.eta).
    #[arg(long)]
    pub eta: Option<f64>,
    /// Number of images.
    #[arg(long, default_value_t = 16)]
    pub n: i64,
    /// Images per batch (default: sample.batch_size).
    #[arg(long)]
    pub batch_size: Option<i64>,
    /// Start from this x_T instead of seeded noise: .npy or .safetensors, shape [N, C, H, W].
    #[arg(long)]
    pub init_noise: Option<PathBuf>,
    /// Also save the samples (float, [-1, 1]) as safetensors under the key `samples`.
    #[arg(long)]
    pub save_tensor: Option<PathBuf>,
}

/// What to sample.
#[derive(Debug, Clone)]
pub struct SamplingPlan {
    /// Number of images.
    pub n: i64,
    /// Images per batch.
    pub batch_size: i64,
    /// Ancestral or DDIM.
    pub sampler: SamplerKind,
    /// DDIM steps.
    pub steps: i64,
    /// DDIM eta.
    pub eta: f64,
    /// Clip predicted x_0.
    pub clip: bool,
    /// [C, H, W].
    pub shape: [i64; 3],
}

/// Samples `plan.n` images in batches (x_T from `init` when given, else standard normal).
pub fn generate(
    d: &GaussianDiffusion,
    net: &UNet,
    plan: &SamplingPlan,
    init: Option<Tensor>,
    dev: Device,
) -> Result<Tensor> {
    let [c, h, w] = plan.shape;
    let per_batch = match plan.sampler {
        SamplerKind::Ddpm => d.num_timesteps(),
        SamplerKind::Ddim => plan.steps,
    };
    let batches = (plan.n + plan.batch_size - 1) / plan.batch_size;
    let pb = progress((batches * per_batch) as u64, "sample");
    let mut out = Vec::new();
    let mut noise = |s: &[i64]| Tensor::randn(s, (Kind::Float, dev));
    let mut model = |x: &Tensor, t: &Tensor| net.forward_t(x, t, false);
    for b in 0..batches {
        let start = b * plan.batch_size;
        let len = plan.batch_size.min(plan.n - start);
        let x_last = match &init {
            Some(x) => x.narrow(0, start, len).to_device(dev).to_kind(Kind::Float),
            None => Tensor::randn([len, c, h, w], (Kind::Float, dev)),
        };
        let mut tick = |_: i64, _: &Tensor, _: &Tensor| pb.inc(1);
        let x = match plan.sampler {
            SamplerKind::Ddpm => {
                d.sample_ancestral(&mut model, x_last, plan.clip, &mut noise, &mut tick)?
            }
            SamplerKind::Ddim => d.sample_ddim(
                &mut model, x_last, plan.steps, plan.eta, plan.clip, &mut noise, &mut tick,
            )?,
        };
        out.push(x.to_device(Device::Cpu));
    }
    pb.finish_and_clear();
    Ok(Tensor::cat(&out, 0))
}

fn open(m: &ModelArgs) -> Result<(Config, Device, UNet, GaussianDiffusion)> {
    let cfg = load_config(&m.config)?;
    let dev = device(&m.device)?;
    let (_vs, net, format) = load_model(&cfg, &m.weights, dev)?;
    tracing::info!(weights = %m.weights.display(), ?format, "loaded");
    let d = GaussianDiffusion::new(&cfg.diffusion, dev)?;
    tch::manual_seed(m.seed);
    Ok((cfg, dev, net, d))
}

/// Writes a grid of `n` ancestral samples (Algorithm 2, all T steps, seeded with `seed`) of
/// `net` to `png`: the closing picture of `ddpm train --sample-n` (`ddpm launch --sample-n`
/// runs `ddpm sample` with the same settings in a child process).
pub fn write_ancestral_grid(
    d: &GaussianDiffusion,
    net: &UNet,
    cfg: &Config,
    n: i64,
    seed: u64,
    dev: Device,
    png: &std::path::Path,
) -> Result<()> {
    tch::manual_seed(seed as i64);
    let plan = SamplingPlan {
        n,
        batch_size: cfg.sample.batch_size,
        sampler: SamplerKind::Ddpm,
        steps: cfg.diffusion.num_timesteps,
        eta: 0.0,
        clip: cfg.sample.clip_denoised,
        shape: [cfg.data.channels, cfg.data.resolution, cfg.data.resolution],
    };
    let x = generate(d, net, &plan, None, dev)?;
    crate::images::save_grid(&x, grid_cols(n), png)?;
    tracing::info!(path = %png.display(), "wrote sample grid");
    Ok(())
}

/// Columns of a roughly square grid of `n` images.
pub fn grid_cols(n: i64) -> i64 {
    (n as f64).sqrt().ceil() as i64
}

fn sampler_of(arg: Option<SamplerArg>, cfg: &Config) -> SamplerKind {
    match arg {
        Some(SamplerArg::Ddpm) => SamplerKind::Ddpm,
        Some(SamplerArg::Ddim) => SamplerKind::Ddim,
        None => cfg.sample.sampler,
    }
}

/// Runs `ddpm sample`.
pub fn run_sample(a: SampleArgs) -> Result<()> {
    anyhow::ensure!(a.n >= 1, "--n: expected >= 1, got {}", a.n);
    if let Some(b) = a.batch_size {
        anyhow::ensure!(b >= 1, "--batch-size: expected >= 1, got {b}");
    }
    if let Some(eta) = a.eta {
        anyhow::ensure!(
            eta.is_finite() && eta >= 0.0,
            "--eta: expected a number >= 0, got {eta}"
        );
    }
    let (cfg, dev, net, d) = open(&a.model)?;
    let shape = [cfg.data.channels, cfg.data.resolution, cfg.data.resolution];
    let steps = a.steps.unwrap_or(cfg.sample.steps);
    if sampler_of(a.sampler, &cfg) == SamplerKind::Ddim {
        anyhow::ensure!(
            (1..=d.num_timesteps()).contains(&steps),
            "--steps: DDIM steps must be in 1..={}, got {steps}",
            d.num_timesteps()
        );
    }
    let init = match &a.init_noise {
        Some(p) => Some(read_init_noise(p, a.n, shape)?),
        None => None,
    };
    let sampler = sampler_of(a.sampler, &cfg);
    let plan = SamplingPlan {
        n: a.n,
        batch_size: a.batch_size.unwrap_or(cfg.sample.batch_size),
        sampler,
        steps,
        eta: a.eta.unwrap_or(cfg.sample.eta),
        clip: cfg.sample.clip_denoised,
        shape,
    };
    let x = generate(&d, &net, &plan, init, dev)?;
    save_grid(&x, grid_cols(a.n), &a.model.out)?;
    tracing::info!(path = %a.model.out.display(), n = a.n, ?sampler, "wrote sample grid");
    if let Some(p) = &a.save_tensor {
        Tensor::write_safetensors(&[("samples", &x)], p)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Arguments of `ddpm progressive`.
#[derive(Args, Debug)]
pub struct ProgressiveArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Number of samples (one row each).
    #[arg(long, default_value_t = 4)]
    pub n: i64,
    /// Number of predicted-x_0 frames per row, evenly spaced from t = T-1 to t = 0.
    #[arg(long, default_value_t = 10)]
    pub frames: i64,
    /// Start from this x_T instead of seeded noise: .npy or .safetensors, shape [N, C, H, W].
    #[arg(long)]
    pub init_noise: Option<PathBuf>,
}

/// Reads `--init-noise`: at least `n` initial x_T of the model's image shape.
fn read_init_noise(path: &std::path::Path, n: i64, shape: [i64; 3]) -> Result<Tensor> {
    let x = read_tensor(path)?;
    let s = x.size();
    if s.len() != 4 || s[1..] != shape {
        bail!(
            "--init-noise {}: shape {s:?}, expected [N, {}, {}, {}]",
            path.display(),
            shape[0],
            shape[1],
            shape[2]
        );
    }
    if s[0] < n {
        bail!(
            "--init-noise {}: holds {} x_T, but --n is {n}",
            path.display(),
            s[0]
        );
    }
    Ok(x.narrow(0, 0, n).to_kind(Kind::Float))
}

/// Runs `ddpm progressive`.
pub fn run_progressive(a: ProgressiveArgs) -> Result<()> {
    anyhow::ensure!(a.n >= 1, "--n: expected >= 1, got {}", a.n);
    let (cfg, dev, net, d) = open(&a.model)?;
    anyhow::ensure!(
        (2..=d.num_timesteps()).contains(&a.frames),
        "--frames: expected 2..={} (one frame per recorded step), got {}",
        d.num_timesteps(),
        a.frames
    );
    let t_max = d.num_timesteps() - 1;
    let record: Vec<i64> = (0..a.frames)
        .map(|i| t_max - i * t_max / (a.frames - 1))
        .collect();
    let shape = [cfg.data.channels, cfg.data.resolution, cfg.data.resolution];
    let x_last = match &a.init_noise {
        Some(p) => read_init_noise(p, a.n, shape)?.to_device(dev),
        None => Tensor::randn([a.n, shape[0], shape[1], shape[2]], (Kind::Float, dev)),
    };
    let pb = progress(d.num_timesteps() as u64, "progressive");
    let mut model = |x: &Tensor, t: &Tensor| net.forward_t(x, t, false);
    let mut noise = |s: &[i64]| Tensor::randn(s, (Kind::Float, dev));
    let (_, kept) = d.sample_progressive(
        &mut model,
        x_last,
        &record,
        cfg.sample.clip_denoised,
        &mut noise,
        &mut |_| pb.inc(1),
    )?;
    pb.finish_and_clear();
    // Row i = sample i, column j = frame j.
    let frames = Tensor::stack(
        &kept
            .iter()
            .map(|(_, x)| x.to_device(Device::Cpu))
            .collect::<Vec<_>>(),
        1,
    );
    let s = frames.size();
    save_grid(
        &frames.reshape([s[0] * s[1], s[2], s[3], s[4]]),
        a.frames,
        &a.model.out,
    )?;
    tracing::info!(path = %a.model.out.display(), steps = ?record, "wrote progressive grid");
    Ok(())
}

/// Arguments of `ddpm interpolate`.
#[derive(Args, Debug)]
pub struct InterpolateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// First image (png or jpg; centre-cropped and resized to data.resolution).
    #[arg(long)]
    pub a: PathBuf,
    /// Second image.
    #[arg(long)]
    pub b: PathBuf,
    /// Diffusion step to encode to (1..=T); the paper uses 500.
    #[arg(long, default_value_t = 500)]
    pub t: i64,
    /// Number of mixing weights lambda, evenly spaced in [0, 1].
    #[arg(long, default_value_t = 11)]
    pub lambdas: i64,
}

/// Runs `ddpm interpolate`.
pub fn run_interpolate(a: InterpolateArgs) -> Result<()> {
    let (cfg, dev, net, d) = open(&a.model)?;
    anyhow::ensure!(
        a.lambdas >= 2,
        "--lambdas: expected >= 2, got {}",
        a.lambdas
    );
    let (r, c) = (cfg.data.resolution, cfg.data.channels);
    let xa = load_image(&a.a, r, c)?.to_device(dev);
    let xb = load_image(&a.b, r, c)?.to_device(dev);
    let lambdas: Vec<f64> = (0..a.lambdas)
        .map(|i| i as f64 / (a.lambdas - 1) as f64)
        .collect();
    let pb = progress(a.t.max(0) as u64, "interpolate");
    let mut model = |x: &Tensor, t: &Tensor| net.forward_t(x, t, false);
    let mut noise = |s: &[i64]| Tensor::randn(s, (Kind::Float, dev));
    let x = d
        .interpolate(
            &mut model,
            &xa,
            &xb,
            a.t,
            &lambdas,
            cfg.sample.clip_denoised,
            &mut noise,
            &mut |_| pb.inc(1),
        )
        .context("interpolating (--t must be in 1..=T)")?;
    pb.finish_and_clear();
    // Source images at both ends of the row.
    let row = Tensor::cat(
        &[
            xa.to_device(Device::Cpu),
            x.to_device(Device::Cpu),
            xb.to_device(Device::Cpu),
        ],
        0,
    );
    save_grid(&row, a.lambdas + 2, &a.model.out)?;
    tracing::info!(path = %a.model.out.display(), t = a.t, "wrote interpolation row (a, lambdas..., b)");
    Ok(())
}
