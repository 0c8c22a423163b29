//! Value checks that the type system does not express. Each failure names its key.

use crate::{Config, LossKind, VarType};

type Check = Result<(), (String, String)>;

fn fail(key: &str, reason: impl Into<String>) -> Check {
    Err((key.to_string(), reason.into()))
}

fn finite_in(key: &str, v: f64, lo: f64, hi: f64, lo_open: bool) -> Check {
    let ok = v.is_finite() && if lo_open { v > lo } else { v >= lo } && v <= hi;
    if ok {
        Ok(())
    } else {
        let l = if lo_open { "(" } else { "[" };
        fail(key, format!("expected a number in {l}{lo}, {hi}], got {v}"))
    }
}

impl Config {
    /// Checks every value; on failure returns `(dotted key, what was expected)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let name = &self.run.name;
        if name.is_empty()
            || name == "."
            || name == ".."
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return fail(
                "run.name",
                format!(
                    "expected a non-empty name of letters, digits, '-', '_', '.', got {name:?}"
                ),
            );
        }

        let d = &self.data;
        if !d.source.is_empty() && !d.source.contains(':') {
            return fail(
                "data.source",
                format!(
                    "expected KIND:PATH (e.g. idx:FILE, cifar10:DIR), got {:?}",
                    d.source
                ),
            );
        }
        if !matches!(d.channels, 1 | 3) {
            return fail(
                "data.channels",
                format!("expected 1 or 3, got {}", d.channels),
            );
        }
        if d.pad < 0 || d.pad > 64 {
            return fail("data.pad", format!("expected 0..=64, got {}", d.pad));
        }
        if !(0.0..=1.0).contains(&d.max_bad_fraction) {
            return fail(
                "data.max_bad_fraction",
                format!("expected 0..=1, got {}", d.max_bad_fraction),
            );
        }
        if d.prefetch_batches < 1 {
            return fail(
                "data.prefetch_batches",
                format!("expected >= 1, got {}", d.prefetch_batches),
            );
        }
        if d.shuffle_window_shards < 1 {
            return fail(
                "data.shuffle_window_shards",
                format!("expected >= 1, got {}", d.shuffle_window_shards),
            );
        }
        if d.cache_shards < d.shuffle_window_shards {
            return fail(
                "data.cache_shards",
                format!(
                    "expected >= data.shuffle_window_shards = {} (a window is read at once), got {}",
                    d.shuffle_window_shards, d.cache_shards
                ),
            );
        }
        if d.workers < 0 {
            return fail("data.workers", format!("expected >= 0, got {}", d.workers));
        }

        let m = &self.model;
        if m.ch <= 0 || m.ch % 32 != 0 {
            return fail(
                "model.ch",
                format!(
                    "expected a positive multiple of 32 (GroupNorm uses 32 groups), got {}",
                    m.ch
                ),
            );
        }
        if m.ch_mult.is_empty() || m.ch_mult.iter().any(|&c| c <= 0) {
            return fail(
                "model.ch_mult",
                format!(
                    "expected a non-empty list of positive integers, got {:?}",
                    m.ch_mult
                ),
            );
        }
        if m.num_res_blocks < 1 {
            return fail(
                "model.num_res_blocks",
                format!("expected >= 1, got {}", m.num_res_blocks),
            );
        }
        finite_in("model.dropout", m.dropout, 0.0, 0.99, false)?;
        let levels = m.ch_mult.len() as u32;
        let factor = 1i64 << (levels - 1);
        if d.resolution < 4 || d.resolution % factor != 0 {
            return fail(
                "data.resolution",
                format!(
                    "expected a resolution >= 4 divisible by 2^(len(model.ch_mult)-1) = {factor}, got {}",
                    d.resolution
                ),
            );
        }
        let level_res: Vec<i64> = (0..levels).map(|i| d.resolution >> i).collect();
        if let Some(r) = m.attn_resolutions.iter().find(|r| !level_res.contains(r)) {
            return fail(
                "model.attn_resolutions",
                format!("{r} is not one of the U-Net's resolutions {level_res:?}"),
            );
        }

        let f = &self.diffusion;
        if f.num_timesteps < 2 || f.num_timesteps > 100_000 {
            return fail(
                "diffusion.num_timesteps",
                format!("expected 2..=100000, got {}", f.num_timesteps),
            );
        }
        finite_in("diffusion.beta_start", f.beta_start, 0.0, 1.0, true)?;
        finite_in("diffusion.beta_end", f.beta_end, 0.0, 1.0, true)?;
        if f.beta_end >= 1.0 || f.beta_start > f.beta_end {
            return fail(
                "diffusion.beta_end",
                format!(
                    "expected beta_start <= beta_end < 1, got {} and {}",
                    f.beta_start, f.beta_end
                ),
            );
        }
        if f.model_var_type == VarType::Learned && f.loss_type == LossKind::Mse {
            return fail(
                "diffusion.loss_type",
                "a learned variance is only trained by the variational bound: use loss_type = \"kl\" or a fixed model_var_type",
            );
        }

        let t = &self.train;
        if t.batch_size < 1 {
            return fail(
                "train.batch_size",
                format!("expected >= 1, got {}", t.batch_size),
            );
        }
        finite_in("train.lr", t.lr, 0.0, 1.0, true)?;
        finite_in("train.adam_beta1", t.adam_beta1, 0.0, 1.0, false)?;
        finite_in("train.adam_beta2", t.adam_beta2, 0.0, 1.0, false)?;
        finite_in("train.adam_eps", t.adam_eps, 0.0, 1.0, true)?;
        if t.adam_beta1 >= 1.0 {
            return fail(
                "train.adam_beta1",
                format!("expected a value < 1, got {}", t.adam_beta1),
            );
        }
        if t.adam_beta2 >= 1.0 {
            return fail(
                "train.adam_beta2",
                format!("expected a value < 1, got {}", t.adam_beta2),
            );
        }
        if t.warmup_steps < 0 {
            return fail(
                "train.warmup_steps",
                format!("expected >= 0, got {}", t.warmup_steps),
            );
        }
        finite_in("train.grad_clip", t.grad_clip, 0.0, 1e9, false)?;
        finite_in("train.ema_decay", t.ema_decay, 0.0, 1.0, false)?;
        if t.ema_decay >= 1.0 {
            return fail("train.ema_decay", "expected a decay < 1");
        }
        if t.total_steps < 1 {
            return fail(
                "train.total_steps",
                format!("expected >= 1, got {}", t.total_steps),
            );
        }
        if t.log_every < 1 {
            return fail(
                "train.log_every",
                format!("expected >= 1, got {}", t.log_every),
            );
        }
        if t.snapshot_every < 0 {
            return fail(
                "train.snapshot_every",
                format!("expected >= 0, got {}", t.snapshot_every),
            );
        }
        if t.threads < 0 {
            return fail("train.threads", format!("expected >= 0, got {}", t.threads));
        }

        let c = &self.checkpoint;
        if c.every_steps < 0 {
            return fail(
                "checkpoint.every_steps",
                format!("expected >= 0, got {}", c.every_steps),
            );
        }
        if c.keep_last < 2 {
            return fail(
                "checkpoint.keep_last",
                format!(
                    "expected >= 2, got {} (the newest checkpoint must survive a failed upload of the next)",
                    c.keep_last
                ),
            );
        }
        if !c.url.is_empty() && !c.url.contains("://") {
            return fail(
                "checkpoint.url",
                format!("expected a URL such as file:///abs/dir, got {:?}", c.url),
            );
        }

        let s = &self.sample;
        if s.steps < 1 || s.steps > f.num_timesteps {
            return fail(
                "sample.steps",
                format!(
                    "expected 1..=diffusion.num_timesteps ({}), got {}",
                    f.num_timesteps, s.steps
                ),
            );
        }
        finite_in("sample.eta", s.eta, 0.0, 1e3, false)?;
        if s.batch_size < 1 {
            return fail(
                "sample.batch_size",
                format!("expected >= 1, got {}", s.batch_size),
            );
        }
        Ok(())
    }
}
