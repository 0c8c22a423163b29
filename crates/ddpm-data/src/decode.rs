//! Decoding encoded images (PNG, JPEG, WebP), sniffed by their magic bytes, and the paper's
//! preprocessing: centre crop to a square, antialiased resize, channels-first uint8.

use crate::{DataError, Result};
use fast_image_resize::images::{CroppedImage, Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageFormat};

/// The encodings this crate decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// PNG (`89 50 4E 47`).
    Png,
    /// JPEG (`FF D8 FF`): older LSUN exports.
    Jpeg,
    /// WebP (`RIFF....WEBP`): current LSUN exports.
    Webp,
}

/// The encoding of `bytes` from its magic bytes, if it is one we decode.
pub fn sniff(bytes: &[u8]) -> Option<Encoding> {
    if bytes.starts_with(&[0x89, b'P', b'N', b'G']) {
        Some(Encoding::Png)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(Encoding::Jpeg)
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(Encoding::Webp)
    } else {
        None
    }
}

/// Decodes an encoded image; `origin` (file, LMDB key, shard and index) names it in errors.
pub fn decode(bytes: &[u8], origin: &str) -> Result<DynamicImage> {
    let bad = |reason: String| DataError::Decode {
        origin: origin.to_string(),
        reason,
    };
    let format = match sniff(bytes) {
        Some(Encoding::Png) => ImageFormat::Png,
        Some(Encoding::Jpeg) => ImageFormat::Jpeg,
        Some(Encoding::Webp) => ImageFormat::WebP,
        None => {
            let head: Vec<String> = bytes.iter().take(12).map(|b| format!("{b:02x}")).collect();
            return Err(bad(format!(
                "not a PNG, JPEG or WebP image ({} bytes, starting {})",
                bytes.len(),
                head.join(" ")
            )));
        }
    };
    if format == ImageFormat::WebP {
        return decode_webp(bytes).map_err(bad);
    }
    image::load_from_memory_with_format(bytes, format).map_err(|e| bad(format!("{format:?}: {e}")))
}

/// The largest WebP image decoded, in pixels (64 Mi: 8192x8192).
pub const MAX_WEBP_PIXELS: usize = 64 << 20;

/// WebP through libwebp, which decodes LSUN-like images about 2.6x faster than the pure-Rust
/// decoder (bench/RESULTS.md). Still images only; alpha is dropped, as PIL's `convert("RGB")`.
fn decode_webp(bytes: &[u8]) -> std::result::Result<DynamicImage, String> {
    let (mut w, mut h) = (0, 0);
    // SAFETY: libwebp reads at most `bytes.len()` bytes from `bytes` and writes two ints.
    let ok = unsafe { libwebp_sys::WebPGetInfo(bytes.as_ptr(), bytes.len(), &mut w, &mut h) };
    if ok == 0 || w <= 0 || h <= 0 {
        return Err("WebP: not a valid still-image WebP header".into());
    }
    let (w, h) = (w as usize, h as usize);
    // A hostile header can claim 16383x16383 (805 MB of RGB per decode, per thread); an
    // allocation failure would abort the process rather than fail the sample.
    if w * h > MAX_WEBP_PIXELS {
        return Err(format!(
            "WebP: {w}x{h} is over the limit of {} megapixels",
            MAX_WEBP_PIXELS >> 20
        ));
    }
    let mut rgb = vec![0u8; w * h * 3];
    // SAFETY: `rgb` holds `h` rows of `w * 3` bytes, the stride passed; libwebp writes only
    // inside the buffer it is given and returns null when the bitstream does not decode.
    let out = unsafe {
        libwebp_sys::WebPDecodeRGBInto(
            bytes.as_ptr(),
            bytes.len(),
            rgb.as_mut_ptr(),
            rgb.len(),
            (w * 3) as std::ffi::c_int,
        )
    };
    if out.is_null() {
        return Err(
            "WebP: the bitstream is truncated or corrupt, or animated (only still images are read)"
                .into(),
        );
    }
    let img = image::RgbImage::from_raw(w as u32, h as u32, rgb).expect("sized to w x h x 3");
    Ok(DynamicImage::ImageRgb8(img))
}

/// Centre-crops `img` to a square, resizes it to `resolution` with a Lanczos-3 filter (an
/// antialiasing convolution whose support widens with the downscale factor, as PIL's
/// `ANTIALIAS` that the LSUN export tools used), and returns `[channels, R, R]` uint8,
/// channels-first. `channels` is 3 (RGB) or 1 (luma).
pub fn center_crop_resize(img: &DynamicImage, resolution: u32, channels: u8) -> Result<Vec<u8>> {
    let (w, h) = (img.width(), img.height());
    let side = w.min(h);
    let (left, top) = ((w - side) / 2, (h - side) / 2);
    // Decoders give RGB8 (JPEG, WebP) or RGB8/RGBA8/L8 (PNG): convert only when needed.
    let converted;
    let (bytes, pixel, c) = match (channels, img) {
        (3, DynamicImage::ImageRgb8(rgb)) => (rgb.as_raw(), PixelType::U8x3, 3),
        (1, DynamicImage::ImageLuma8(l)) => (l.as_raw(), PixelType::U8, 1),
        (3, other) => {
            converted = other.to_rgb8().into_raw();
            (&converted, PixelType::U8x3, 3)
        }
        (1, other) => {
            converted = other.to_luma8().into_raw();
            (&converted, PixelType::U8, 1)
        }
        (c, _) => {
            return Err(DataError::Internal(format!(
                "{c} channels: expected 1 or 3"
            )))
        }
    };
    if side == resolution {
        // Lanczos-3 at scale 1 samples its kernel at integer offsets only, where it is 1 at 0
        // and 0 elsewhere: the resize is the identity, so only crop.
        return Ok(crop_to_chw(
            bytes,
            w as usize,
            c,
            left as usize,
            top as usize,
            side as usize,
        ));
    }
    let full = ImageRef::new(w, h, bytes, pixel)
        .map_err(|e| DataError::Internal(format!("image view: {e}")))?;
    // A cropped view, not a crop box: the filter clamps at the square's edges, so pixels
    // outside it never reach the result (as a crop followed by a resize).
    let square = CroppedImage::new(&full, left, top, side, side)
        .map_err(|e| DataError::Internal(format!("crop: {e}")))?;
    let mut dst = Image::new(resolution, resolution, pixel);
    let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    Resizer::new()
        .resize(&square, &mut dst, &opts)
        .map_err(|e| DataError::Internal(format!("resize: {e}")))?;
    let r = resolution as usize;
    Ok(crop_to_chw(dst.buffer(), r, c, 0, 0, r))
}

/// The `side`-square at (`left`, `top`) of an interleaved image `width` pixels wide with `c`
/// channels, as planar `[c, side, side]`.
fn crop_to_chw(
    hwc: &[u8],
    width: usize,
    c: usize,
    left: usize,
    top: usize,
    side: usize,
) -> Vec<u8> {
    let n = side * side;
    let mut chw = vec![0u8; c * n];
    for y in 0..side {
        let row = &hwc[((top + y) * width + left) * c..((top + y) * width + left + side) * c];
        if c == 1 {
            chw[y * side..(y + 1) * side].copy_from_slice(row);
            continue;
        }
        for (x, px) in row.chunks_exact(c).enumerate() {
            for (k, v) in px.iter().enumerate() {
                chw[k * n + y * side + x] = *v;
            }
        }
    }
    chw
}

/// Decodes `bytes` and preprocesses them ([`center_crop_resize`]) into `[channels, R, R]`
/// uint8. Every failure, a decoder panic on a hostile file included, is a
/// [`DataError::Decode`] naming `origin`.
pub fn decode_sample(bytes: &[u8], origin: &str, resolution: u32, channels: u8) -> Result<Vec<u8>> {
    std::panic::catch_unwind(|| {
        decode(bytes, origin).and_then(|img| center_crop_resize(&img, resolution, channels))
    })
    .unwrap_or_else(|_| Err(DataError::Internal("the decoder panicked".into())))
    .map_err(|e| match e {
        e @ DataError::Decode { .. } => e,
        other => DataError::Decode {
            origin: origin.to_string(),
            reason: other.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    fn encoded(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn test_image() -> RgbImage {
        RgbImage::from_fn(48, 32, |x, y| {
            Rgb([(x * 5) as u8, (y * 7) as u8, ((x + y) * 3) as u8])
        })
    }

    #[test]
    fn png_jpeg_and_webp_are_sniffed_and_decoded() {
        let img = test_image();
        for (format, enc) in [
            (ImageFormat::Png, Encoding::Png),
            (ImageFormat::Jpeg, Encoding::Jpeg),
            (ImageFormat::WebP, Encoding::Webp),
        ] {
            let bytes = encoded(&img, format);
            assert_eq!(sniff(&bytes), Some(enc), "{format:?}");
            let back = decode(&bytes, "x").unwrap();
            assert_eq!((back.width(), back.height()), (48, 32), "{format:?}");
        }
        // Lossless formats round-trip exactly.
        assert_eq!(
            decode(&encoded(&img, ImageFormat::Png), "x")
                .unwrap()
                .to_rgb8(),
            img
        );
        assert_eq!(
            decode(&encoded(&img, ImageFormat::WebP), "x")
                .unwrap()
                .to_rgb8(),
            img
        );
    }

    #[test]
    fn undecodable_bytes_name_their_origin() {
        let err = decode(b"GIF89a....", "lsun key 00ff")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lsun key 00ff") && err.contains("not a PNG, JPEG or WebP"),
            "{err}"
        );
        let mut png = encoded(&test_image(), ImageFormat::Png);
        png.truncate(png.len() / 2);
        let err = decode(&png, "shard 3 index 7").unwrap_err().to_string();
        assert!(
            err.contains("shard 3 index 7") && err.contains("Png"),
            "{err}"
        );
    }

    #[test]
    fn crop_is_centred_and_output_is_channels_first() {
        // 48x32: the centre 32x32 starts at x = 8. A constant-colour image stays constant.
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(48, 32, Rgb([10, 20, 30])));
        let out = center_crop_resize(&img, 16, 3).unwrap();
        assert_eq!(out.len(), 3 * 16 * 16);
        assert!(out[..256].iter().all(|&v| v == 10));
        assert!(out[256..512].iter().all(|&v| v == 20));
        assert!(out[512..].iter().all(|&v| v == 30));
        // Left and right 8 columns are cropped away: paint them and nothing changes.
        let mut painted = RgbImage::from_pixel(48, 32, Rgb([10, 20, 30]));
        for y in 0..32 {
            for x in (0..8).chain(40..48) {
                painted.put_pixel(x, y, Rgb([255, 0, 0]));
            }
        }
        let out2 = center_crop_resize(&DynamicImage::ImageRgb8(painted), 16, 3).unwrap();
        assert_eq!(out, out2);
        let grey = center_crop_resize(&img, 8, 1).unwrap();
        assert_eq!(grey.len(), 64);
    }

    #[test]
    fn downscaling_is_antialiased() {
        // A 1-pixel checkerboard averages to mid-grey when downscaled 8x; without
        // antialiasing (nearest sampling) it would stay black or white.
        let img = RgbImage::from_fn(128, 128, |x, y| {
            if (x + y) % 2 == 0 {
                Rgb([255, 255, 255])
            } else {
                Rgb([0, 0, 0])
            }
        });
        let out = center_crop_resize(&DynamicImage::ImageRgb8(img), 16, 3).unwrap();
        for &v in &out {
            assert!((100..=155).contains(&v), "{v}");
        }
    }

    #[test]
    fn a_crop_already_at_the_resolution_is_kept_exactly() {
        // LSUN's images are 256 on the short side: at 256x256 only the crop happens.
        let img = test_image(); // 48x32: centre crop x in 8..40
        let out = center_crop_resize(&DynamicImage::ImageRgb8(img.clone()), 32, 3).unwrap();
        for c in 0..3 {
            for y in 0..32u32 {
                for x in 0..32u32 {
                    let want = img.get_pixel(x + 8, y)[c];
                    assert_eq!(
                        out[c * 1024 + (y * 32 + x) as usize],
                        want,
                        "c {c} y {y} x {x}"
                    );
                }
            }
        }
        // The general path at scale 1 agrees: its Lanczos-3 weights are 1 at 0, 0 elsewhere.
        let square = DynamicImage::ImageRgb8(img)
            .crop_imm(8, 0, 32, 32)
            .to_rgb8();
        let mut dst = Image::new(32, 32, PixelType::U8x3);
        let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
        Resizer::new()
            .resize(&DynamicImage::ImageRgb8(square), &mut dst, &opts)
            .unwrap();
        assert_eq!(crop_to_chw(&dst.into_vec(), 32, 3, 0, 0, 32), out);
    }
}
