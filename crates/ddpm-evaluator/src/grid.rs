//! A square-ish grid of uint8 images as PNG bytes.

use crate::Result;
use tch::{Kind, Tensor};

/// PNG bytes of `[N, 3, H, W]` uint8 images in a grid of `ceil(sqrt(N))` columns (empty
/// cells black).
pub fn grid_png(images: &Tensor) -> Result<Vec<u8>> {
    let s = images.size();
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    let cols = (n as f64).sqrt().ceil() as i64;
    let rows = (n + cols - 1) / cols;
    let pad = Tensor::zeros([rows * cols - n, c, h, w], (Kind::Uint8, images.device()));
    let all = Tensor::cat(&[images.to_kind(Kind::Uint8), pad], 0);
    let hwc = all
        .view([rows, cols, c, h, w])
        .permute([0, 3, 1, 4, 2])
        .contiguous()
        .view([rows * h, cols * w, c]);
    let bytes: Vec<u8> = hwc.view([-1]).try_into()?;
    let img = image::RgbImage::from_raw((cols * w) as u32, (rows * h) as u32, bytes)
        .expect("buffer sized from the tensor");
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)
        .expect("PNG encoding into memory does not fail");
    Ok(png.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_images_make_a_three_by_two_grid() {
        let x = Tensor::arange(5, (Kind::Uint8, tch::Device::Cpu))
            .view([5, 1, 1, 1])
            .repeat([1, 3, 2, 4]);
        let png = grid_png(&x).unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (12, 4));
        assert_eq!(img.get_pixel(4, 0).0, [1, 1, 1]);
        assert_eq!(img.get_pixel(4, 2).0, [4, 4, 4]);
        assert_eq!(img.get_pixel(8, 2).0, [0, 0, 0]);
    }
}
