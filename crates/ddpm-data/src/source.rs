//! In-memory image sets built from a `data.source` spec.

use crate::{idx, DataError, Result};
use ddpm_config::DataConfig;
use std::path::Path;
use tch::{Kind, Tensor};

/// A set of uint8 images `[N, C, H, W]` held in memory, already padded to the training size.
#[derive(Debug)]
pub struct ImageSet {
    images: Tensor,
}

impl ImageSet {
    /// Wraps a uint8 tensor `[N, C, H, W]`; `origin` names it in errors.
    pub fn from_uint8(images: Tensor, origin: &str) -> Result<Self> {
        if images.kind() != Kind::Uint8 || images.dim() != 4 || images.size()[0] == 0 {
            return Err(DataError::Format {
                path: origin.into(),
                reason: format!(
                    "expected a non-empty uint8 [N, C, H, W] tensor, got {:?} {:?}",
                    images.kind(),
                    images.size()
                ),
            });
        }
        Ok(Self { images })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.size()[0] as usize
    }

    /// Whether the set is empty (never true for a constructed set).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[C, H, W]` of each image.
    pub fn image_shape(&self) -> [i64; 3] {
        let s = self.images.size();
        [s[1], s[2], s[3]]
    }

    /// The images at `indices` as float32 in [-1, 1] (`x / 127.5 - 1`).
    pub fn batch(&self, indices: &[u32]) -> Tensor {
        let idx = Tensor::from_slice(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>());
        to_unit_range(&self.images.index_select(0, &idx))
    }

    /// The raw uint8 images.
    pub fn images(&self) -> &Tensor {
        &self.images
    }
}

/// uint8 pixels to float32 in [-1, 1].
pub fn to_unit_range(x: &Tensor) -> Tensor {
    x.to_kind(Kind::Float) / 127.5 - 1.0
}

/// The (kind, path) of `data.source` (`KIND:PATH`); the error names the source.
pub fn source_kind(cfg: &DataConfig) -> Result<(&str, &str)> {
    cfg.source.split_once(':').ok_or_else(|| DataError::Source {
        source_spec: cfg.source.clone(),
        reason: "expected KIND:PATH, e.g. idx:train-images-idx3-ubyte.gz or cifar10:DIR".into(),
    })
}

/// Opens the dataset named by `data.source` and checks it against `data.channels`,
/// `data.pad` and `data.resolution`.
pub fn open_source(cfg: &DataConfig) -> Result<ImageSet> {
    let src_err = |reason: String| DataError::Source {
        source_spec: cfg.source.clone(),
        reason,
    };
    let (kind, path) = source_kind(cfg)?;
    let images = match kind {
        "idx" => {
            let a = idx::read(Path::new(path))?;
            if a.dims.len() != 3 {
                return Err(DataError::Format {
                    path: path.into(),
                    reason: format!("expected an IDX image file (3 dimensions, magic 0x00000803), got dims {:?}", a.dims),
                });
            }
            let dims: Vec<i64> = a.dims.iter().map(|&d| d as i64).collect();
            Tensor::from_slice(&a.data).view([dims[0], 1, dims[1], dims[2]])
        }
        "cifar10" | "cifar10-test" => {
            let split = if kind == "cifar10" { crate::cifar10::Split::Train } else { crate::cifar10::Split::Test };
            let c = crate::cifar10::read(Path::new(path), split)?;
            let n = c.labels.len() as i64;
            Tensor::from_slice(&c.pixels).view([n, 3, 32, 32])
        }
        "lsun" | "folder" => {
            let done = std::sync::atomic::AtomicUsize::new(0);
            let report = |n: usize| {
                let d = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
                if d.is_multiple_of(10_000) {
                    tracing::info!(images = d, source = %cfg.source, "decoding");
                }
            };
            let p = if kind == "lsun" {
                crate::encoded::preprocess_all(
                    crate::encoded::lsun_items(Path::new(path))?.into_iter(),
                    cfg,
                    &report,
                )?
            } else {
                crate::encoded::preprocess_all(
                    crate::encoded::folder_items(Path::new(path))?,
                    cfg,
                    &report,
                )?
            };
            for (origin, reason) in p.skipped.iter().take(10) {
                tracing::warn!(%origin, %reason, "skipped an image that cannot be decoded (data.on_bad_sample = \"skip\")");
            }
            if !p.skipped.is_empty() {
                tracing::warn!(skipped = p.skipped.len(), kept = p.count, "images skipped");
            }
            let r = cfg.resolution;
            Tensor::from_slice(&p.pixels).view([p.count as i64, cfg.channels, r, r])
        }
        other => {
            return Err(src_err(format!(
                "dataset kind `{other}` is not readable by this version (supported: idx, cifar10, cifar10-test, lsun, folder)"
            )))
        }
    };
    let images = if cfg.pad > 0 {
        images.constant_pad_nd([cfg.pad, cfg.pad, cfg.pad, cfg.pad])
    } else {
        images
    };
    let [c, h, w] = {
        let s = images.size();
        [s[1], s[2], s[3]]
    };
    if c != cfg.channels {
        return Err(src_err(format!(
            "images have {c} channel(s) but data.channels = {}",
            cfg.channels
        )));
    }
    if h != cfg.resolution || w != cfg.resolution {
        return Err(src_err(format!(
            "images are {h}x{w} after data.pad = {} but data.resolution = {}",
            cfg.pad, cfg.resolution
        )));
    }
    ImageSet::from_uint8(images, path)
}
