//! One optimisation step: Algorithm 1 + clipping + Adam (PyTorch semantics) + EMA.

use crate::flat::{alias_into, FlatParams};
use crate::{Result, TrainError};
use ddpm_config::Config;
use ddpm_diffusion::GaussianDiffusion;
use ddpm_unet::{UNet, UNetConfig};
use tch::{nn, Device, Kind, Tensor};

/// Elements per slice of the CPU optimizer update (1 MiB of float32).
pub const CPU_UPDATE_SLICE: i64 = 1 << 18;

/// What one step produced. Tensors stay on the device so that a step does not synchronise;
/// read them only when logging.
#[derive(Debug)]
pub struct StepStats {
    /// The step just completed (1-based count of updates).
    pub step: i64,
    /// Mean loss of the batch.
    pub loss: Tensor,
    /// Global gradient norm before clipping.
    pub grad_norm: Tensor,
    /// Learning rate used.
    pub lr: f64,
}

/// Model, EMA model, Adam state and step counter of one training run.
#[derive(Debug)]
pub struct Trainer {
    config: Config,
    device: Device,
    diffusion: GaussianDiffusion,
    vs: nn::VarStore,
    net: UNet,
    ema_vs: nn::VarStore,
    ema_net: UNet,
    flat: FlatParams,
    ema: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: i64,
}

impl Trainer {
    /// Builds the model (initialised from `run.seed`), its EMA copy and zeroed Adam state.
    ///
    /// Randomness comes from libtorch's process-global generator, reseeded at every step
    /// (see [`Trainer::step_seed`]); run one trainer per process.
    pub fn new(config: &Config, device: Device) -> Result<Self> {
        if config.train.threads > 0 {
            tch::set_num_threads(config.train.threads as i32);
        }
        tch::manual_seed(config.run.seed as i64);
        let unet_cfg = UNetConfig::from_config(config);
        let vs = nn::VarStore::new(device);
        let net = UNet::new(&vs.root(), &unet_cfg)?;
        let flat = FlatParams::new(&vs)?;
        let mut ema_vs = nn::VarStore::new(device);
        let ema_net = UNet::new(&ema_vs.root(), &unet_cfg)?;
        ema_vs.freeze();
        let ema = flat.params.copy();
        alias_into(&ema_vs, &ema, &flat.slots)?;
        let exp_avg = flat.params.zeros_like();
        let exp_avg_sq = flat.params.zeros_like();
        let diffusion = GaussianDiffusion::new(&config.diffusion, device)?;
        Ok(Self {
            config: config.clone(),
            device,
            diffusion,
            vs,
            net,
            ema_vs,
            ema_net,
            flat,
            ema,
            exp_avg,
            exp_avg_sq,
            step: 0,
        })
    }

    /// The learning rate of update number `step` (0-based): linear warmup to `train.lr`.
    pub fn lr_at(&self, step: i64) -> f64 {
        let t = &self.config.train;
        if t.warmup_steps > 0 {
            t.lr * ((step + 1) as f64 / t.warmup_steps as f64).min(1.0)
        } else {
            t.lr
        }
    }

    /// One step on a batch `x0` of images in [-1, 1] `[B, C, H, W]` (on any device), already
    /// augmented: the loader flips samples (`data.random_flip`), keyed by their place in the
    /// epoch, so that a sample's flip does not depend on the world size. The same as
    /// [`Trainer::compute_gradients`] of the whole batch, then [`Trainer::apply_update`].
    pub fn step(&mut self, x0: &Tensor) -> Result<StepStats> {
        let b = x0.size().first().copied().unwrap_or(0).max(0) as u64;
        let loss = self.compute_gradients(x0, 0, b)?;
        Ok(self.apply_update(loss))
    }

    /// The first half of a data-parallel step: the loss of `x0` and its gradients in the flat
    /// gradient buffer (zeroed first; nothing is updated yet). `x0` is rows
    /// `first_example..first_example + B` of the step's global batch of `global_batch`
    /// examples. The timesteps and noise of the whole global batch are drawn from one
    /// generator seeded by (run seed, step) and this rank takes its rows, so W ranks draw
    /// exactly what one process with the whole batch draws, in one kernel each. The loss is
    /// the mean over `x0`: with equal batches on every rank, average the gradients over the
    /// ranks (all-reduce) and call [`Trainer::apply_update`].
    pub fn compute_gradients(
        &mut self,
        x0: &Tensor,
        first_example: u64,
        global_batch: u64,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let s = x0.size();
        let want = [cfg.data.channels, cfg.data.resolution, cfg.data.resolution];
        if s.len() != 4 || s[1..] != want {
            return Err(TrainError::Batch(format!(
                "expected [B, {}, {}, {}], got {s:?}",
                want[0], want[1], want[2]
            )));
        }
        let b = s[0];
        if b == 0 {
            return Err(TrainError::Batch(
                "an empty batch (no samples to train on)".into(),
            ));
        }
        if first_example + b as u64 > global_batch {
            return Err(TrainError::Batch(format!(
                "rows {first_example}..{} of a global batch of {global_batch}",
                first_example + b as u64
            )));
        }
        let x0 = x0.to_device(self.device).to_kind(Kind::Float);
        tch::manual_seed(self.step_seed(self.step));
        let g = global_batch as i64;
        let t = Tensor::randint(
            self.diffusion.num_timesteps(),
            [g],
            (Kind::Int64, self.device),
        );
        let noise = Tensor::randn([g, s[1], s[2], s[3]], (Kind::Float, self.device));
        let (first, rows) = (first_example as i64, b);
        let (t, noise) = (t.narrow(0, first, rows), noise.narrow(0, first, rows));
        // Dropout draws next from the same generator: deterministic, but not shared between
        // world sizes (exact data-parallel equivalence needs model.dropout = 0).
        let net = &self.net;
        let losses =
            self.diffusion
                .training_losses(|x, t| net.forward_t(x, t, true), &x0, &t, &noise);
        let loss = losses.mean(Kind::Float);
        self.flat.zero_grad();
        loss.backward();
        Ok(loss.detach())
    }

    /// The second half of a step, on gradients already averaged over the ranks: global-norm
    /// clipping, Adam, EMA, and the step counter. `loss` is what
    /// [`Trainer::compute_gradients`] returned (reported, not used).
    pub fn apply_update(&mut self, loss: Tensor) -> StepStats {
        let cfg = &self.config;
        let grads = &mut self.flat.grads;
        let grad_norm = grads.norm();
        if cfg.train.grad_clip > 0.0 {
            let coef = (cfg.train.grad_clip / (&grad_norm + 1e-6)).clamp_max(1.0);
            let _ = grads.g_mul_(&coef);
        }
        let ema_weight = 1.0 - cfg.train.ema_decay;
        let lr = self.lr_at(self.step);
        self.adam_update(lr);
        let _ = self.ema.lerp_(&self.flat.params, ema_weight);
        self.step += 1;
        StepStats {
            step: self.step,
            loss,
            grad_norm,
            lr,
        }
    }

    /// The flat gradient buffer (a shallow handle: write into it in place, e.g. with the
    /// ranks' average, between [`Trainer::compute_gradients`] and
    /// [`Trainer::apply_update`]).
    pub fn gradients(&self) -> Tensor {
        self.flat.grads.shallow_clone()
    }

    /// torch.optim.Adam (no weight decay, no amsgrad) on the flat buffers.
    ///
    /// On CPU the update walks the buffers in slices of [`CPU_UPDATE_SLICE`] elements: the
    /// temporaries of a slice stay in cache and are recycled by the allocator, where
    /// whole-buffer temporaries (136 MiB each for the CIFAR-10 model) would each be a fresh
    /// mapping to fault in. On CUDA one kernel per op over the whole buffer is cheapest.
    fn adam_update(&mut self, lr: f64) {
        let t = &self.config.train;
        let (b1, b2, eps) = (t.adam_beta1, t.adam_beta2, t.adam_eps);
        let n = (self.step + 1) as i32;
        let bias2_sqrt = (1.0 - b2.powi(n)).sqrt();
        let step_size = lr / (1.0 - b1.powi(n));
        let numel = self.flat.params.numel() as i64;
        let slice = if self.device.is_cuda() {
            numel
        } else {
            CPU_UPDATE_SLICE
        };
        tch::no_grad(|| {
            let mut start = 0;
            while start < numel {
                let len = slice.min(numel - start);
                let g = self.flat.grads.narrow(0, start, len);
                let mut m = self.exp_avg.narrow(0, start, len);
                let mut v = self.exp_avg_sq.narrow(0, start, len);
                let mut p = self.flat.params.narrow(0, start, len);
                let _ = m.lerp_(&g, 1.0 - b1);
                let _ = v.g_mul_scalar_(b2);
                let _ = v.addcmul_(&(&g * (1.0 - b2)), &g);
                let denom = v.sqrt() / bias2_sqrt + eps;
                let _ = p.g_sub_(&((&m / denom) * step_size));
                start += len;
            }
        });
    }

    /// The libtorch seed of update number `step` (0-based). Each step reseeds the generator
    /// from (run seed, step), so the timesteps, noise and dropout of a step depend only on
    /// those two numbers: resuming at step k needs no generator state, only k.
    pub fn step_seed(&self, step: i64) -> i64 {
        // SplitMix64 finaliser over (seed, step): well-mixed, cheap, stable across versions.
        let mut z = self.config.run.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 1) as i64
    }

    /// Adam's first and second moments (flat, same layout as the parameters).
    pub fn adam_moments(&self) -> (&Tensor, &Tensor) {
        (&self.exp_avg, &self.exp_avg_sq)
    }

    /// Sets the number of completed updates (when restoring a checkpoint).
    pub(crate) fn set_global_step(&mut self, step: i64) {
        self.step = step;
    }

    /// Updates completed so far.
    pub fn global_step(&self) -> i64 {
        self.step
    }

    /// The configuration this trainer runs.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The diffusion process.
    pub fn diffusion(&self) -> &GaussianDiffusion {
        &self.diffusion
    }

    /// The trained network and its variables.
    pub fn model(&self) -> (&nn::VarStore, &UNet) {
        (&self.vs, &self.net)
    }

    /// The EMA network (the one to sample from) and its variables.
    pub fn ema_model(&self) -> (&nn::VarStore, &UNet) {
        (&self.ema_vs, &self.ema_net)
    }

    /// The flat parameter, gradient and EMA buffers.
    pub fn flat(&self) -> (&FlatParams, &Tensor) {
        (&self.flat, &self.ema)
    }

    /// Device the model lives on.
    pub fn device(&self) -> Device {
        self.device
    }
}
