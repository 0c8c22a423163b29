//! One evaluation: the EMA weights of a committed checkpoint, sampled and scored.

use crate::grid::grid_png;
use crate::{EvaluatorError, Result};
use ddpm_checkpoint::{open_url_with, resolve_root_url, CheckpointStore};
use ddpm_config::{Config, SamplerKind};
use ddpm_diffusion::GaussianDiffusion;
use ddpm_eval::images::{list_images, load_rgb};
use ddpm_eval::preprocess::samples_to_pixels;
use ddpm_eval::{
    frechet_distance, FeatureCollector, FeatureStats, FidInception, InceptionV3, IS_SPLITS,
};
use ddpm_trainer::state::EMA_BLOB;
use object_store::{ObjectStoreExt, PutPayload};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Folder of the results beside the run's checkpoints.
const EVAL_DIR: &str = "eval";

/// The result of one evaluation, as written to `eval/step-<N>.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalResult {
    /// The checkpoint's step.
    pub step: u64,
    /// FID against `eval.reference`.
    pub fid: f64,
    /// Inception Score `(mean, std)`, when `eval.is_weights` is set.
    pub inception_score: Option<(f64, f64)>,
    /// Samples scored.
    pub n: i64,
    /// Wall-clock seconds of sampling and scoring.
    pub seconds: f64,
}

/// Evaluates the checkpoints of one run.
pub struct Evaluator {
    cfg: Config,
    store: CheckpointStore,
    rt: tokio::runtime::Runtime,
    device: Device,
    fid: FidInception,
    classifier: Option<InceptionV3>,
    reference: FeatureStats,
    diffusion: GaussianDiffusion,
    stop: Arc<AtomicBool>,
}

fn config_err(key: &str, reason: impl Into<String>) -> EvaluatorError {
    EvaluatorError::Config {
        key: key.into(),
        reason: reason.into(),
    }
}

impl Evaluator {
    /// Opens the run's checkpoints, the Inception weights and the reference statistics
    /// (computing them when `eval.reference` is an image folder). `stop` ends an evaluation
    /// between two batches, writing nothing.
    pub fn open(cfg: Config, device: Device, stop: Arc<AtomicBool>) -> Result<Self> {
        let url = resolve_root_url(&cfg.checkpoint.url, Path::new(&cfg.run.out_dir))?;
        let (object_store, prefix) = open_url_with(&url, &cfg.checkpoint.options)?;
        let store = CheckpointStore::new(object_store, prefix, &cfg.run.name)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("evaluator-io")
            .enable_all()
            .build()
            .map_err(|e| config_err("runtime", e.to_string()))?;
        let inception = match cfg.eval.inception.as_str() {
            "" => std::env::var_os("DDPM_INCEPTION")
                .map(PathBuf::from)
                .ok_or_else(|| {
                    config_err(
                        "eval.inception",
                        format!(
                            "not set, nor DDPM_INCEPTION; the FID needs {}",
                            ddpm_eval::torchscript::WEIGHTS_HINT
                        ),
                    )
                })?,
            p => PathBuf::from(p),
        };
        let fid = FidInception::load(&inception, device)?;
        let reference = reference_stats(&cfg, &fid, &stop)?;
        if reference.dim() != ddpm_eval::torchscript::FEATURE_DIM {
            return Err(config_err(
                "eval.reference",
                format!(
                    "{}: statistics of dimension {}, expected {} (Inception pool3)",
                    cfg.eval.reference,
                    reference.dim(),
                    ddpm_eval::torchscript::FEATURE_DIM
                ),
            ));
        }
        let classifier = match cfg.eval.is_weights.as_str() {
            "" => None,
            p => {
                if cfg.eval.num_samples < IS_SPLITS {
                    return Err(config_err(
                        "eval.num_samples",
                        format!("the Inception Score (eval.is_weights is set) needs at least {IS_SPLITS} samples, got {}", cfg.eval.num_samples),
                    ));
                }
                Some(InceptionV3::load(Path::new(p), device)?)
            }
        };
        let diffusion = GaussianDiffusion::new(&cfg.diffusion, device)
            .map_err(|e| config_err("diffusion", e.to_string()))?;
        Ok(Self {
            cfg,
            store,
            rt,
            device,
            fid,
            classifier,
            reference,
            diffusion,
            stop,
        })
    }

    /// The committed checkpoints due for evaluation (a multiple of `eval.every_steps`, or
    /// the final one at `train.total_steps`; no result yet), oldest first.
    pub fn due(&self) -> Result<Vec<u64>> {
        let every = self.cfg.eval.every_steps.max(0) as u64;
        let committed = self.rt.block_on(self.store.committed_steps())?;
        let mut out = Vec::new();
        for step in committed {
            // The final checkpoint is always scored, whatever eval.every_steps.
            let last = step == self.cfg.train.total_steps as u64;
            if every > 0 && step % every != 0 && !last {
                continue;
            }
            let done = self.rt.block_on(
                self.store
                    .object_store()
                    .head(&self.result_key(step, "json")),
            );
            match done {
                Ok(_) => {}
                Err(object_store::Error::NotFound { .. }) => out.push(step),
                Err(e) => return Err(ddpm_checkpoint::CheckpointError::from(e).into()),
            }
        }
        Ok(out)
    }

    /// The newest committed step, if any.
    pub fn newest_committed(&self) -> Result<Option<u64>> {
        Ok(self
            .rt
            .block_on(self.store.committed_steps())?
            .last()
            .copied())
    }

    fn result_key(&self, step: u64, ext: &str) -> object_store::path::Path {
        self.store
            .run_object(EVAL_DIR, &format!("step-{step}.{ext}"))
    }

    /// The key of a step's result JSON, for operators and tests.
    pub fn result_location(&self, step: u64) -> String {
        self.result_key(step, "json").to_string()
    }

    /// Samples and scores the EMA weights of committed checkpoint `step`, then writes the
    /// grid PNG and, last, the JSON. `progress(done, total)` is called after every batch.
    pub fn evaluate(&self, step: u64, progress: &mut dyn FnMut(i64, i64)) -> Result<EvalResult> {
        let started = Instant::now();
        let e = &self.cfg.eval;
        let step_err = |reason: String| EvaluatorError::Step { step, reason };
        let ema = self.rt.block_on(self.store.load_blob(step, EMA_BLOB))?;
        let mut file = tempfile::Builder::new()
            .suffix(".safetensors")
            .tempfile()
            .map_err(|e| step_err(format!("staging the EMA weights: {e}")))?;
        std::io::Write::write_all(&mut file, &ema)
            .map_err(|e| step_err(format!("staging the EMA weights: {e}")))?;
        let (_vs, net, _) = ddpm_trainer::load_model(&self.cfg, file.path(), self.device)
            .map_err(|e| step_err(format!("loading {EMA_BLOB}: {e:#}")))?;
        tch::manual_seed(e.seed.wrapping_add(step as i64));
        let [c, r] = [self.cfg.data.channels, self.cfg.data.resolution];
        let mut collector =
            FeatureCollector::new(&self.fid, e.batch_size, &format!("samples of step {step}"));
        if let Some(c) = &self.classifier {
            collector = collector.with_classifier(c);
        }
        let mut grid: Vec<Tensor> = Vec::new();
        let mut grid_len = 0;
        let dump =
            (!e.dump_dir.is_empty()).then(|| Path::new(&e.dump_dir).join(format!("step-{step}")));
        if let Some(d) = &dump {
            std::fs::create_dir_all(d)
                .map_err(|err| step_err(format!("eval.dump_dir {}: {err}", d.display())))?;
        }
        let mut done = 0;
        while done < e.num_samples {
            if self.stop.load(Ordering::Relaxed) {
                return Err(EvaluatorError::Interrupted(step));
            }
            let len = e.batch_size.min(e.num_samples - done);
            let x = self
                .sample(&net, [len, c, r, r])
                .map_err(|err| step_err(format!("sampling: {err}")))?;
            let px = samples_to_pixels(&x.to_device(Device::Cpu));
            collector.push(&px)?;
            if grid_len < e.grid {
                let take = (e.grid - grid_len).min(len);
                grid.push(px.narrow(0, 0, take));
                grid_len += take;
            }
            if let Some(d) = &dump {
                write_pngs(&px, d, done).map_err(step_err)?;
            }
            done += len;
            progress(done, e.num_samples);
        }
        let got = collector.finish()?;
        let fid = frechet_distance(&self.reference, &got.stats)?;
        let result = EvalResult {
            step,
            fid,
            inception_score: got.inception_score,
            n: got.count,
            seconds: started.elapsed().as_secs_f64(),
        };
        if !grid.is_empty() {
            let png = grid_png(&Tensor::cat(&grid, 0))?;
            self.put(self.result_key(step, "png"), png)?;
        }
        let json = self.result_json(&result);
        self.put(
            self.result_key(step, "json"),
            serde_json::to_vec_pretty(&json).expect("JSON value"),
        )?;
        Ok(result)
    }

    fn sample(&self, net: &ddpm_unet::UNet, shape: [i64; 4]) -> ddpm_diffusion::Result<Tensor> {
        let e = &self.cfg.eval;
        let dev = self.device;
        let mut model = |x: &Tensor, t: &Tensor| net.forward_t(x, t, false);
        let mut noise = |s: &[i64]| Tensor::randn(s, (Kind::Float, dev));
        let mut tick = |_: i64, _: &Tensor, _: &Tensor| {};
        let x_last = Tensor::randn(shape, (Kind::Float, dev));
        let clip = self.cfg.sample.clip_denoised;
        tch::no_grad(|| match e.sampler {
            SamplerKind::Ddpm => self
                .diffusion
                .sample_ancestral(&mut model, x_last, clip, &mut noise, &mut tick),
            SamplerKind::Ddim => self.diffusion.sample_ddim(
                &mut model, x_last, e.steps, e.eta, clip, &mut noise, &mut tick,
            ),
        })
    }

    fn result_json(&self, r: &EvalResult) -> serde_json::Value {
        let e = &self.cfg.eval;
        let (sampler, steps) = match e.sampler {
            SamplerKind::Ddpm => ("ddpm", self.cfg.diffusion.num_timesteps),
            SamplerKind::Ddim => ("ddim", e.steps),
        };
        serde_json::json!({
            "step": r.step,
            "fid": r.fid,
            "is_mean": r.inception_score.map(|s| s.0),
            "is_std": r.inception_score.map(|s| s.1),
            "n": r.n,
            "sampler": sampler,
            "steps": steps,
            "eta": e.eta,
            "seconds": r.seconds,
            "reference": e.reference,
        })
    }

    fn put(&self, key: object_store::path::Path, bytes: Vec<u8>) -> Result<()> {
        self.rt
            .block_on(self.store.object_store().put(&key, PutPayload::from(bytes)))
            .map_err(ddpm_checkpoint::CheckpointError::from)?;
        Ok(())
    }
}

/// `eval.reference`: a statistics file, or an image folder whose statistics are computed.
fn reference_stats(cfg: &Config, fid: &FidInception, stop: &AtomicBool) -> Result<FeatureStats> {
    let r = &cfg.eval.reference;
    if r.is_empty() {
        return Err(config_err(
            "eval.reference",
            "not set: give the training data's statistics (`ddpm fid-stats --data ... --out ref.npz`) or an image folder",
        ));
    }
    let path = Path::new(r);
    if path.is_file() {
        return Ok(FeatureStats::read(path)?);
    }
    if !path.is_dir() {
        return Err(config_err(
            "eval.reference",
            format!("{r}: no such file or folder"),
        ));
    }
    let files = list_images(path)?;
    tracing::info!(folder = %r, images = files.len(), "computing the reference statistics");
    let mut collector = FeatureCollector::new(fid, cfg.eval.batch_size, r);
    for f in &files {
        if stop.load(Ordering::Relaxed) {
            return Err(config_err(
                "eval.reference",
                "stopped while computing the reference statistics",
            ));
        }
        collector.push(&load_rgb(f)?.unsqueeze(0))?;
    }
    Ok(collector.finish()?.stats)
}

/// Writes `[N, 3, H, W]` uint8 images as `<first + i>.png` into `dir`.
fn write_pngs(px: &Tensor, dir: &Path, first: i64) -> std::result::Result<(), String> {
    let s = px.size();
    for i in 0..s[0] {
        let hwc: Vec<u8> = px
            .get(i)
            .permute([1, 2, 0])
            .contiguous()
            .view([-1])
            .try_into()
            .map_err(|e| format!("{e}"))?;
        let img = image::RgbImage::from_raw(s[3] as u32, s[2] as u32, hwc)
            .expect("sized from the tensor");
        let path = dir.join(format!("{}.png", first + i));
        img.save(&path)
            .map_err(|e| format!("eval.dump_dir: writing {}: {e}", path.display()))?;
    }
    Ok(())
}
