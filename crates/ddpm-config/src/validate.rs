//! Value checks that the type system does not express. Each failure names its key.

use crate::{Config, LossKind, SamplerKind, VarType};

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

/// DDIM steps must lie in 1..=T.
fn ddim_steps(key: &str, steps: i64, num_timesteps: i64) -> Check {
    if steps < 1 || steps > num_timesteps {
        return fail(
            key,
            format!("expected 1..=diffusion.num_timesteps ({num_timesteps}), got {steps}"),
        );
    }
    Ok(())
}

fn at_least(key: &str, v: i64, min: i64) -> Check {
    if v < min {
        return fail(key, format!("expected >= {min}, got {v}"));
    }
    Ok(())
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
        at_least("data.prefetch_batches", d.prefetch_batches, 1)?;
        at_least("data.shuffle_window_shards", d.shuffle_window_shards, 1)?;
        if d.cache_shards < d.shuffle_window_shards {
            return fail(
                "data.cache_shards",
                format!(
                    "expected >= data.shuffle_window_shards = {} (a window is read at once), got {}",
                    d.shuffle_window_shards, d.cache_shards
                ),
            );
        }
        at_least("data.workers", d.workers, 0)?;

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
        at_least("model.num_res_blocks", m.num_res_blocks, 1)?;
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
        at_least("train.batch_size", t.batch_size, 1)?;
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
        at_least("train.warmup_steps", t.warmup_steps, 0)?;
        finite_in("train.grad_clip", t.grad_clip, 0.0, 1e9, false)?;
        finite_in("train.ema_decay", t.ema_decay, 0.0, 1.0, false)?;
        if t.ema_decay >= 1.0 {
            return fail("train.ema_decay", "expected a decay < 1");
        }
        at_least("train.total_steps", t.total_steps, 1)?;
        at_least("train.log_every", t.log_every, 1)?;
        at_least("train.snapshot_every", t.snapshot_every, 0)?;
        at_least("train.threads", t.threads, 0)?;
        at_least(
            "train.max_consecutive_nonfinite",
            t.max_consecutive_nonfinite,
            1,
        )?;

        let c = &self.checkpoint;
        at_least("checkpoint.every_steps", c.every_steps, 0)?;
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

        let dist = &self.distributed;
        at_least("distributed.world_size", dist.world_size, 1)?;
        if dist.world_size > t.batch_size {
            return fail(
                "distributed.world_size",
                format!(
                    "expected at most train.batch_size ({}) workers, got {}: every worker needs a sample of each global batch",
                    t.batch_size, dist.world_size
                ),
            );
        }
        if dist.listen.parse::<std::net::SocketAddr>().is_err() {
            return fail(
                "distributed.listen",
                format!(
                    "expected IP:PORT, e.g. 0.0.0.0:50051, got {:?}",
                    dist.listen
                ),
            );
        }
        at_least("distributed.bucket_mb", dist.bucket_mb, 1)?;
        at_least(
            "distributed.collective_timeout_secs",
            dist.collective_timeout_secs,
            1,
        )?;
        at_least("distributed.lease_secs", dist.lease_secs, 1)?;
        at_least("elastic.min_workers", self.elastic.min_workers, 0)?;
        at_least("elastic.max_workers", self.elastic.max_workers, 0)?;
        let (min, max) = self.elastic_bounds();
        let e = &self.elastic;
        // 0 means the world size, which `ddpm launch --workers` and `coordinator
        // --world-size` may still change: only explicit values are compared.
        if e.min_workers != 0 && e.max_workers != 0 && min > max {
            return fail(
                "elastic.min_workers",
                format!("expected at most elastic.max_workers ({max}), got {min}"),
            );
        }
        if max < dist.world_size {
            return fail(
                "elastic.max_workers",
                format!(
                    "expected at least distributed.world_size ({}), got {max}",
                    dist.world_size
                ),
            );
        }
        if max > self.train.batch_size {
            return fail(
                "elastic.max_workers",
                format!(
                    "expected at most train.batch_size ({}): every worker needs a row of the global batch, got {max}",
                    self.train.batch_size
                ),
            );
        }
        let grace = self.elastic.rendezvous_grace_secs;
        if !(grace.is_finite() && grace >= 0.0) {
            return fail(
                "elastic.rendezvous_grace_secs",
                format!("expected seconds >= 0, got {grace}"),
            );
        }

        let a = &self.auth;
        if !a.token_file.is_empty() && !a.token_env.is_empty() {
            return fail(
                "auth.token_env",
                "expected one of auth.token_file and auth.token_env, not both",
            );
        }
        let env_name = |v: &str| {
            v.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        if !a.token_env.is_empty() && !env_name(&a.token_env) {
            return fail(
                "auth.token_env",
                format!(
                    "expected the name of an environment variable (letters, digits, '_'), got {:?}; the token itself never goes into the config",
                    a.token_env
                ),
            );
        }
        let tls = &self.tls;
        for (key, a, b, a_name, b_name) in [
            (
                "tls.key_file",
                &tls.cert_file,
                &tls.key_file,
                "tls.cert_file",
                "tls.key_file",
            ),
            (
                "tls.client_key_file",
                &tls.client_cert_file,
                &tls.client_key_file,
                "tls.client_cert_file",
                "tls.client_key_file",
            ),
        ] {
            if a.is_empty() != b.is_empty() {
                return fail(
                    key,
                    format!("expected {a_name} and {b_name} together, or neither"),
                );
            }
        }
        if !tls.client_ca_file.is_empty() && tls.cert_file.is_empty() {
            return fail(
                "tls.client_ca_file",
                "client certificates (mutual TLS) need TLS: set tls.cert_file and tls.key_file too",
            );
        }

        let s = &self.sample;
        ddim_steps("sample.steps", s.steps, f.num_timesteps)?;
        finite_in("sample.eta", s.eta, 0.0, 1e3, false)?;
        at_least("sample.batch_size", s.batch_size, 1)?;

        let e = &self.eval;
        at_least("eval.every_steps", e.every_steps, 0)?;
        at_least("eval.num_samples", e.num_samples, 2)?;
        if e.sampler == SamplerKind::Ddim {
            ddim_steps("eval.steps", e.steps, f.num_timesteps)?;
        }
        finite_in("eval.eta", e.eta, 0.0, 1e3, false)?;
        at_least("eval.batch_size", e.batch_size, 1)?;
        at_least("eval.grid", e.grid, 0)?;
        at_least("eval.poll_secs", e.poll_secs, 1)?;
        Ok(())
    }
}
