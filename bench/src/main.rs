//! `ddpm-bench`: timing of one DDPM training step and one ancestral sampling step of this
//! project's U-Net, for comparison with PyTorch eager + diffusers (`bench/reference_unet.py`,
//! which prints the same JSON fields; `bench/run_cpu.sh` alternates the two).
//!
//! Subcommands:
//!
//! * `train-step`: [`ddpm_trainer::Trainer::step`] on one fixed random batch: random flip,
//!   t ~ U{0..T-1}, noise, forward, eps-MSE loss, backward, global-norm clipping, Adam, EMA.
//! * `sample-step`: one step of Algorithm 2 with one network (what a sampler holds; no
//!   optimizer state): a forward pass in inference mode (no grad, no dropout) and [`ddpm_diffusion::GaussianDiffusion::p_sample`] (posterior
//!   mean with clipped x_0, fixed variance, fresh noise).
//! * `train-phases`: the same training step split into forward (+ loss), backward, and the
//!   update (clip + Adam + EMA on the flat buffers), to see where the time goes.
//! * `diffusers-config`: the diffusers `UNet2DModel` config.json equivalent to a config's
//!   U-Net ([`ddpm_unet::weights::diffusers_config`]); the reference script builds from it.
//!
//! Each run prints one JSON line on stdout; the peak resident set size is the process's
//! `VmHWM` from `/proc/self/status`.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use ddpm_config::Config;
use ddpm_diffusion::GaussianDiffusion;
use ddpm_trainer::Trainer;
use ddpm_unet::{parameter_count, UNet, UNetConfig};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

/// Micro-benchmarks of DDPM-RS (one JSON line per run on stdout).
#[derive(Parser, Debug)]
#[command(name = "ddpm-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Time full training steps (forward, backward, clipping, Adam, EMA).
    TrainStep(RunArgs),
    /// Time ancestral sampling steps (EMA forward in inference mode + posterior update).
    SampleStep(RunArgs),
    /// Time the phases of a training step: forward + loss, backward, update.
    TrainPhases(RunArgs),
    /// Print the diffusers UNet2DModel config.json equivalent to a config's U-Net.
    DiffusersConfig {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Configuration file (TOML), e.g. configs/cifar10.toml.
    #[arg(long)]
    config: PathBuf,
    /// Batch size (default: the config's train.batch_size).
    #[arg(long)]
    batch: Option<i64>,
    /// Intra-op threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    threads: i64,
    /// Untimed steps before measuring.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Seed of the fixed input batch.
    #[arg(long, default_value_t = 0)]
    seed: i64,
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let line = match cli.command {
        Command::TrainStep(a) => train_step(&a)?,
        Command::SampleStep(a) => sample_step(&a)?,
        Command::TrainPhases(a) => train_phases(&a)?,
        Command::DiffusersConfig { config } => {
            let cfg = load_config(&config)?;
            ddpm_unet::weights::diffusers_config(&UNetConfig::from_config(&cfg))?
        }
    };
    println!("{line}");
    Ok(())
}

fn load_config(path: &PathBuf) -> Result<Config> {
    Config::from_file(path).with_context(|| format!("loading {}", path.display()))
}

/// The config with the run's batch and thread overrides, threads applied, and the fixed input.
fn setup(a: &RunArgs) -> Result<(Config, Tensor)> {
    anyhow::ensure!(a.iters > 0, "--iters must be at least 1");
    let mut cfg = load_config(&a.config)?;
    if let Some(b) = a.batch {
        anyhow::ensure!(b > 0, "--batch must be positive");
        cfg.train.batch_size = b;
    }
    anyhow::ensure!(a.threads >= 0, "--threads must be >= 0");
    cfg.train.threads = a.threads;
    if a.threads > 0 {
        tch::set_num_threads(a.threads as i32);
    }
    tch::manual_seed(a.seed);
    let (b, c, r) = (cfg.train.batch_size, cfg.data.channels, cfg.data.resolution);
    let x = Tensor::rand([b, c, r, r], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    Ok((cfg, x))
}

/// Peak resident set size of this process in MiB (`VmHWM`), if readable.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// CPU time in clock ticks: (busy ticks of the whole machine from `/proc/stat`, ticks of
/// this process from `/proc/self/stat`). Zeros where unreadable.
fn cpu_ticks() -> (u64, u64) {
    let machine = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_string();
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal: everything but idle and iowait.
            (v.len() >= 8).then(|| v[0] + v[1] + v[2] + v[5] + v[6] + v[7])
        })
        .unwrap_or(0);
    let own = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name: state is field 3, utime 14, stime 15.
            let rest = &s[s.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    (machine, own)
}

/// Timed seconds of each iteration and the share of the machine's CPUs that other processes
/// used meanwhile (0: quiet machine; a sign of noisy numbers when well above 0).
struct Timing {
    times: Vec<f64>,
    other_cpu_frac: Option<f64>,
}

/// Runs `step` warmup + iters times and times the last `iters`.
fn time_steps(a: &RunArgs, mut step: impl FnMut() -> Result<()>) -> Result<Timing> {
    for _ in 0..a.warmup {
        step()?;
    }
    let mut times = Vec::with_capacity(a.iters);
    let (m0, o0) = cpu_ticks();
    let wall = Instant::now();
    for _ in 0..a.iters {
        let start = Instant::now();
        step()?;
        times.push(start.elapsed().as_secs_f64());
    }
    let wall = wall.elapsed().as_secs_f64();
    let (m1, o1) = cpu_ticks();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let other_cpu_frac = (m1 > 0).then(|| {
        let other = m1.saturating_sub(m0) as f64 - o1.saturating_sub(o0) as f64;
        (other / TICKS_PER_S / (wall * cpus)).max(0.0)
    });
    Ok(Timing {
        times,
        other_cpu_frac,
    })
}

/// Linux USER_HZ (clock ticks per second of /proc/stat), 100 on every mainstream platform.
const TICKS_PER_S: f64 = 100.0;

fn report(bench: &str, a: &RunArgs, cfg: &Config, params: i64, timing: &Timing) -> Value {
    let times = &timing.times;
    let b = cfg.train.batch_size;
    let med = median(times);
    json!({
        "impl": "ours",
        "bench": bench,
        "config": cfg.run.name,
        "batch": b,
        "threads": tch::get_num_threads(),
        "warmup": a.warmup,
        "iters": a.iters,
        "params": params,
        "median_s": med,
        "mean_s": mean(times),
        "min_s": times.iter().copied().fold(f64::INFINITY, f64::min),
        "images_per_s": b as f64 / med,
        "peak_rss_mib": peak_rss_mib(),
        "other_cpu_frac": timing.other_cpu_frac,
        "times_s": times,
    })
}

fn train_step(a: &RunArgs) -> Result<Value> {
    let (cfg, x0) = setup(a)?;
    let mut trainer = Trainer::new(&cfg, Device::Cpu)?;
    let params = parameter_count(trainer.model().0);
    let timing = time_steps(a, || {
        let stats = trainer.step(&x0)?;
        // Reading the loss synchronises (a no-op on CPU, kept for other devices).
        let loss = stats.loss.double_value(&[]);
        anyhow::ensure!(loss.is_finite(), "non-finite loss {loss}");
        Ok(())
    })?;
    Ok(report("train-step", a, &cfg, params, &timing))
}

fn sample_step(a: &RunArgs) -> Result<Value> {
    let (cfg, x_t) = setup(a)?;
    // What a sampler holds: one network (the EMA weights, here freshly initialised) and the
    // diffusion coefficients; no optimizer state.
    let vs = nn::VarStore::new(Device::Cpu);
    let net = UNet::new(&vs.root(), &UNetConfig::from_config(&cfg))?;
    let params = parameter_count(&vs);
    let diffusion = GaussianDiffusion::new(&cfg.diffusion, Device::Cpu)?;
    let b = cfg.train.batch_size;
    let t = diffusion.timesteps_like(diffusion.num_timesteps() / 2, b);
    let clip = cfg.sample.clip_denoised;
    let timing = time_steps(a, || {
        let _guard = tch::no_grad_guard();
        let out = net.forward_t(&x_t, &t, false);
        let noise = Tensor::randn_like(&x_t);
        let (x_prev, _x0) = diffusion.p_sample(&out, &x_t, &t, &noise, clip);
        let v = x_prev.double_value(&[0, 0, 0, 0]);
        anyhow::ensure!(v.is_finite(), "non-finite sample {v}");
        Ok(())
    })?;
    Ok(report("sample-step", a, &cfg, params, &timing))
}

/// Clipping, Adam and EMA exactly as `Trainer::step` does them on its flat buffers, on
/// buffers of the same length (the trainer's own update is private).
struct UpdateReplica {
    params: Tensor,
    grads: Tensor,
    ema: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: i32,
}

impl UpdateReplica {
    fn new(numel: i64) -> Self {
        let params = Tensor::randn([numel], (Kind::Float, Device::Cpu)) * 0.05;
        Self {
            grads: params.randn_like() * 1e-3,
            ema: params.copy(),
            exp_avg: params.zeros_like(),
            exp_avg_sq: params.zeros_like(),
            params,
            step: 0,
        }
    }

    fn run(&mut self, cfg: &Config) {
        let t = &cfg.train;
        let grad_norm = self.grads.norm();
        if t.grad_clip > 0.0 {
            let coef = (t.grad_clip / (&grad_norm + 1e-6)).clamp_max(1.0);
            let _ = self.grads.g_mul_(&coef);
        }
        let (b1, b2) = (t.adam_beta1, t.adam_beta2);
        self.step += 1;
        let n = self.step;
        tch::no_grad(|| {
            let g = &self.grads;
            let _ = self.exp_avg.lerp_(g, 1.0 - b1);
            let _ = self.exp_avg_sq.g_mul_scalar_(b2);
            let _ = self.exp_avg_sq.addcmul_(&(g * (1.0 - b2)), g);
            let bias1 = 1.0 - b1.powi(n);
            let bias2 = 1.0 - b2.powi(n);
            let denom = self.exp_avg_sq.sqrt() / bias2.sqrt() + t.adam_eps;
            let update = (&self.exp_avg / denom) * (t.lr / bias1);
            let _ = self.params.g_sub_(&update);
        });
        let _ = self.ema.lerp_(&self.params, 1.0 - t.ema_decay);
    }
}

fn train_phases(a: &RunArgs) -> Result<Value> {
    let (cfg, x0) = setup(a)?;
    let mut trainer = Trainer::new(&cfg, Device::Cpu)?;
    let params = parameter_count(trainer.model().0);
    let numel = trainer.flat().0.params.numel() as i64;
    let b = cfg.train.batch_size;
    let mut replica = UpdateReplica::new(numel);
    let (mut fwd, mut bwd, mut upd) = (vec![], vec![], vec![]);
    let mut i = 0;
    let timing = time_steps(a, || {
        // Forward + loss and backward with the trainer's own network (gradients land in its
        // flat buffer, which its next step zeroes), the update replica, then a full step
        // (the timed quantity of the run).
        let (_, net) = trainer.model();
        let diffusion = trainer.diffusion();
        let s0 = Instant::now();
        let flip = Tensor::rand([b], (Kind::Float, Device::Cpu))
            .lt(0.5)
            .view([b, 1, 1, 1]);
        let x = x0.flip([3]).where_self(&flip, &x0);
        let t = Tensor::randint(diffusion.num_timesteps(), [b], (Kind::Int64, Device::Cpu));
        let noise = Tensor::randn_like(&x);
        let loss = diffusion
            .training_losses(|x, t| net.forward_t(x, t, true), &x, &t, &noise)
            .mean(Kind::Float);
        let _ = loss.double_value(&[]);
        let s1 = Instant::now();
        loss.backward();
        let s2 = Instant::now();
        replica.run(&cfg);
        let _ = replica.params.double_value(&[0]);
        let s3 = Instant::now();
        if i >= a.warmup {
            fwd.push((s1 - s0).as_secs_f64());
            bwd.push((s2 - s1).as_secs_f64());
            upd.push((s3 - s2).as_secs_f64());
        }
        i += 1;
        let stats = trainer.step(&x0)?;
        let _ = stats.loss.double_value(&[]);
        Ok(())
    })?;
    // time_steps times the whole closure; the full step alone is the remainder.
    let full: Vec<f64> = (0..timing.times.len())
        .map(|k| timing.times[k] - fwd[k] - bwd[k] - upd[k])
        .collect();
    let timing = Timing {
        times: full,
        other_cpu_frac: timing.other_cpu_frac,
    };
    let mut v = report("train-phases", a, &cfg, params, &timing);
    v["phases_median_s"] = json!({
        "forward_loss": median(&fwd),
        "backward": median(&bwd),
        "update_clip_adam_ema": median(&upd),
        "full_step": median(&timing.times),
    });
    Ok(v)
}
