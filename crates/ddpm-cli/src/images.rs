//! Image files in and out: sample grids, and images read for interpolation.

use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Converts `[N, C, H, W]` in [-1, 1] to uint8 `[N, C, H, W]` (round half to even, as PIL).
pub fn to_uint8(x: &Tensor) -> Tensor {
    ((x.to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .clamp(-1.0, 1.0)
        + 1.0)
        * 127.5)
        .round()
        .to_kind(Kind::Uint8)
}

/// Writes images `[N, C, H, W]` in [-1, 1] as one PNG grid with `cols` columns and a
/// 2-pixel border.
pub fn save_grid(x: &Tensor, cols: i64, path: &Path) -> Result<()> {
    let (n, c, h, w) = x.size4().context("expected [N, C, H, W] images")?;
    if n == 0 {
        bail!("no images to write to {}", path.display());
    }
    let cols = cols.clamp(1, n);
    let rows = (n + cols - 1) / cols;
    let pad = 2;
    let (gw, gh) = (cols * (w + pad) + pad, rows * (h + pad) + pad);
    let u8s = to_uint8(x);
    let data: Vec<u8> = Vec::try_from(u8s.permute([0, 2, 3, 1]).contiguous().flatten(0, -1))?;
    let mut grid = image::RgbImage::new(gw as u32, gh as u32);
    for i in 0..n {
        let (r, col) = (i / cols, i % cols);
        for y in 0..h {
            for xx in 0..w {
                let base = (((i * h + y) * w + xx) * c) as usize;
                let px = if c == 1 {
                    [data[base]; 3]
                } else {
                    [data[base], data[base + 1], data[base + 2]]
                };
                let gx = (pad + col * (w + pad) + xx) as u32;
                let gy = (pad + r * (h + pad) + y) as u32;
                grid.put_pixel(gx, gy, image::Rgb(px));
            }
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    grid.save(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Reads an image, centre-crops it to a square, resizes it to `resolution` with a
/// Lanczos-3 (antialiasing) filter, and returns `[1, channels, R, R]` in [-1, 1].
pub fn load_image(path: &Path, resolution: i64, channels: i64) -> Result<Tensor> {
    anyhow::ensure!(
        matches!(channels, 1 | 3),
        "data.channels = {channels}: expected 1 or 3"
    );
    let bytes = std::fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
    // The same decoding and preprocessing as the dataset pipeline.
    let img = ddpm_data::decode::decode(&bytes, &path.display().to_string())?;
    let chw = ddpm_data::decode::center_crop_resize(&img, resolution as u32, channels as u8)?;
    let t = Tensor::from_slice(&chw).view([1, channels, resolution, resolution]);
    Ok(t.to_kind(Kind::Float) / 127.5 - 1.0)
}

/// Reads a tensor file: `.npy`, or `.safetensors` with a single tensor (or one named `x_T`).
pub fn read_tensor(path: &Path) -> Result<Tensor> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    match ext {
        "npy" => Tensor::read_npy(path).with_context(|| format!("reading {}", path.display())),
        "safetensors" => {
            let mut all = Tensor::read_safetensors(path)
                .with_context(|| format!("reading {}", path.display()))?;
            if let Some(pos) = all.iter().position(|(n, _)| n == "x_T") {
                return Ok(all.swap_remove(pos).1);
            }
            match all.len() {
                1 => Ok(all.remove(0).1),
                n => bail!(
                    "{}: holds {n} tensors ({}); expected one, or one named `x_T`",
                    path.display(),
                    all.iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
        _ => bail!(
            "{}: expected a .npy or .safetensors tensor file",
            path.display()
        ),
    }
}
