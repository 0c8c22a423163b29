//! Feature statistics (mean and covariance) of an image set, accumulated batch by batch, and
//! their files: `.npz` with float64 `mu` [D] and `sigma` [D, D] (the format pytorch-fid and
//! TTUR publish, e.g. `fid_stats_cifar10_train.npz`) or `.safetensors` with the same names.

use crate::{EvalError, Result};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Mean and covariance (with the n-1 denominator, as `numpy.cov`) of feature vectors.
#[derive(Debug)]
pub struct FeatureStats {
    /// Mean, float64 `[D]`.
    pub mu: Tensor,
    /// Covariance, float64 `[D, D]`.
    pub sigma: Tensor,
}

impl FeatureStats {
    /// Checks shapes and finiteness; `origin` names the statistics in errors.
    pub fn new(mu: Tensor, sigma: Tensor, origin: &str) -> Result<Self> {
        let bad = |reason: String| EvalError::File {
            path: origin.to_string(),
            reason,
        };
        let d = match mu.size().as_slice() {
            [d] if *d > 0 => *d,
            other => return Err(bad(format!("mu must be a vector [D], got shape {other:?}"))),
        };
        if sigma.size() != [d, d] {
            return Err(bad(format!(
                "sigma must be [{d}, {d}] to match mu [{d}], got shape {:?}",
                sigma.size()
            )));
        }
        let mu = mu.to_kind(Kind::Double).to_device(Device::Cpu);
        let sigma = sigma.to_kind(Kind::Double).to_device(Device::Cpu);
        for (name, t) in [("mu", &mu), ("sigma", &sigma)] {
            if !bool::try_from(t.isfinite().all())? {
                return Err(bad(format!("{name} has NaN or infinite entries")));
            }
        }
        Ok(Self { mu, sigma })
    }

    /// Feature dimension D.
    pub fn dim(&self) -> i64 {
        self.mu.size()[0]
    }

    /// Reads `.npz` (keys `mu`, `sigma`, any float dtype, C or Fortran order) or
    /// `.safetensors`, chosen by the file's first bytes.
    pub fn read(path: &Path) -> Result<Self> {
        let origin = path.display().to_string();
        let bad = |reason: String| EvalError::File {
            path: origin.clone(),
            reason,
        };
        let mut magic = [0u8; 4];
        File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .map_err(|e| bad(format!("cannot read statistics: {e}")))?;
        let (mu, sigma) = if &magic == b"PK\x03\x04" {
            read_npz(path).map_err(bad)?
        } else {
            let named = Tensor::read_safetensors(path).map_err(|e| {
                bad(format!(
                    "neither an .npz (zip) nor a readable .safetensors file of statistics: {e}"
                ))
            })?;
            let get = |key: &str| {
                named
                    .iter()
                    .find(|(n, _)| n == key)
                    .map(|(_, t)| t.shallow_clone())
                    .ok_or_else(|| bad(format!("no tensor `{key}` (expected `mu` and `sigma`)")))
            };
            (get("mu")?, get("sigma")?)
        };
        Self::new(mu, sigma, &origin)
    }

    /// Writes `.npz` (uncompressed, float64, C order) unless `path` ends in `.safetensors`.
    /// The file is written next to its final name and renamed, so it is never half-written.
    pub fn write(&self, path: &Path) -> Result<()> {
        let origin = path.display().to_string();
        let bad = |reason: String| EvalError::File {
            path: origin.clone(),
            reason,
        };
        let tmp = path.with_extension(format!(
            "{}.partial",
            path.extension().and_then(|e| e.to_str()).unwrap_or("")
        ));
        if path.extension().is_some_and(|e| e == "safetensors") {
            Tensor::write_safetensors(&[("mu", &self.mu), ("sigma", &self.sigma)], &tmp)
                .map_err(|e| bad(e.to_string()))?;
        } else {
            write_npz(&tmp, &[("mu", &self.mu), ("sigma", &self.sigma)])
                .map_err(|e| bad(e.to_string()))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| bad(e.to_string()))
    }
}

fn read_npz(path: &Path) -> std::result::Result<(Tensor, Tensor), String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let mut npz = npyz::npz::NpzArchive::new(BufReader::new(file))
        .map_err(|e| format!("not a readable .npz: {e}"))?;
    let mut get = |key: &str| -> std::result::Result<Tensor, String> {
        let arr = npz
            .by_name(key)
            .map_err(|e| format!("array `{key}`: {e}"))?
            .ok_or_else(|| format!("no array `{key}` (expected `mu` and `sigma`)"))?;
        let shape: Vec<i64> = arr.shape().iter().map(|&d| d as i64).collect();
        let fortran = arr.order() == npyz::Order::Fortran;
        let dtype = match arr.dtype() {
            npyz::DType::Plain(type_str) => type_str.to_string(),
            other => other.descr(),
        };
        let values: Vec<f64> = match dtype.as_str() {
            "<f8" => arr.into_vec::<f64>(),
            "<f4" => arr
                .into_vec::<f32>()
                .map(|v| v.into_iter().map(f64::from).collect()),
            other => {
                return Err(format!(
                    "array `{key}` has dtype {other}, expected float64 or float32"
                ))
            }
        }
        .map_err(|e| format!("array `{key}`: {e}"))?;
        let t = Tensor::from_slice(&values);
        Ok(if fortran {
            let rev: Vec<i64> = shape.iter().rev().copied().collect();
            t.view(rev.as_slice())
                .permute((0..shape.len() as i64).rev().collect::<Vec<_>>())
        } else {
            t.view(shape.as_slice())
        })
    };
    Ok((get("mu")?, get("sigma")?))
}

fn write_npz(path: &Path, arrays: &[(&str, &Tensor)]) -> std::io::Result<()> {
    use npyz::WriterBuilder;
    let mut npz = npyz::npz::NpzWriter::new(BufWriter::new(File::create(path)?));
    for (name, t) in arrays {
        let t = t.to_kind(Kind::Double).contiguous();
        let values: Vec<f64> = t.view([-1]).try_into().map_err(std::io::Error::other)?;
        let shape: Vec<u64> = t.size().iter().map(|&d| d as u64).collect();
        let mut w = npz
            .array::<f64>(name, Default::default())?
            .default_dtype()
            .shape(&shape)
            .begin_nd()?;
        w.extend(values)?;
        w.finish()?;
    }
    npz.zip_writer()
        .finish()?
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
}

/// Accumulates the mean and covariance of feature batches in float64, without keeping the
/// features. Sums are taken around the first batch's mean, which keeps the covariance as
/// accurate as numpy's two-pass `cov` for features far from zero.
#[derive(Debug, Default)]
pub struct StatsAccumulator {
    shift: Option<Tensor>,
    sum: Option<Tensor>,
    outer: Option<Tensor>,
    n: i64,
}

impl StatsAccumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of feature vectors added.
    pub fn count(&self) -> i64 {
        self.n
    }

    /// Adds `[N, D]` features; `origin` names the batch in errors (NaN or infinite features,
    /// a dimension that differs from the earlier batches').
    pub fn add(&mut self, features: &Tensor, origin: &str) -> Result<()> {
        let f = features.to_kind(Kind::Double).to_device(Device::Cpu);
        if f.dim() != 2 || f.size()[0] == 0 {
            return Err(EvalError::Invalid(format!(
                "{origin}: features must be [N, D] with N > 0, got {:?}",
                f.size()
            )));
        }
        if !bool::try_from(f.isfinite().all())? {
            return Err(EvalError::Invalid(format!(
                "{origin}: the features have NaN or infinite values"
            )));
        }
        let shift = self
            .shift
            .get_or_insert_with(|| f.mean_dim(0, false, Kind::Double))
            .shallow_clone();
        if f.size()[1] != shift.size()[0] {
            return Err(EvalError::Invalid(format!(
                "{origin}: features of dimension {}, but earlier ones had {}",
                f.size()[1],
                shift.size()[0]
            )));
        }
        let y = f - &shift;
        let s = y.sum_dim_intlist(0, false, Kind::Double);
        let o = y.tr().matmul(&y);
        self.sum = Some(match self.sum.take() {
            Some(acc) => acc + s,
            None => s,
        });
        self.outer = Some(match self.outer.take() {
            Some(acc) => acc + o,
            None => o,
        });
        self.n += features.size()[0];
        Ok(())
    }

    /// The statistics; at least two feature vectors are needed for a covariance.
    pub fn finish(self, origin: &str) -> Result<FeatureStats> {
        let (Some(shift), Some(sum), Some(outer)) = (self.shift, self.sum, self.outer) else {
            return Err(EvalError::Invalid(format!(
                "{origin}: no images, statistics need at least 2"
            )));
        };
        if self.n < 2 {
            return Err(EvalError::Invalid(format!(
                "{origin}: {} image, statistics need at least 2",
                self.n
            )));
        }
        let n = self.n as f64;
        let mean_y = sum / n;
        let sigma = (outer - mean_y.outer(&mean_y) * n) / (n - 1.0);
        FeatureStats::new(mean_y + shift, sigma, origin)
    }
}

#[cfg(test)]
mod tests;
