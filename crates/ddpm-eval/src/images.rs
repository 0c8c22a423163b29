//! Image folders as the FID tools read them: every file with an image extension under the
//! folder (recursively), decoded and converted to 8-bit RGB the way PIL's `convert('RGB')`
//! does (grayscale repeated to three channels, alpha dropped), at its own size.

use crate::{EvalError, Result};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Extensions read as images (case-insensitive), those of the reference tools.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "tif", "tiff", "png", "bmp", "webp"];

/// Every image file under `dir`, recursively, in sorted order.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let bad = |reason: String| EvalError::File {
        path: dir.display().to_string(),
        reason,
    };
    if !dir.is_dir() {
        return Err(bad("not a folder".into()));
    }
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| EvalError::File {
            path: d.display().to_string(),
            reason: format!("cannot list: {e}"),
        })?;
        for entry in entries {
            let path = entry
                .map_err(|e| EvalError::File {
                    path: d.display().to_string(),
                    reason: format!("cannot list: {e}"),
                })?
                .path();
            if path.is_dir() {
                stack.push(path);
            } else if is_image(&path) {
                out.push(path);
            }
        }
    }
    if out.is_empty() {
        return Err(bad(format!(
            "no images in the folder (extensions read: {})",
            IMAGE_EXTENSIONS.join(", ")
        )));
    }
    out.sort();
    Ok(out)
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Decodes one image to uint8 RGB `[3, H, W]`.
pub fn load_rgb(path: &Path) -> Result<Tensor> {
    let img = image::open(path).map_err(|e| EvalError::File {
        path: path.display().to_string(),
        reason: format!("cannot decode the image: {e}"),
    })?;
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    Ok(Tensor::from_slice(rgb.as_raw())
        .view([h as i64, w as i64, 3])
        .permute([2, 0, 1])
        .contiguous())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_listed_recursively_and_sorted_and_gray_becomes_rgb() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let gray = image::GrayImage::from_fn(5, 3, |x, y| image::Luma([(10 * x + y) as u8]));
        gray.save(dir.path().join("sub/b.PNG")).unwrap();
        image::RgbImage::new(2, 2)
            .save(dir.path().join("a.png"))
            .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        let files = list_images(dir.path()).unwrap();
        assert_eq!(
            files,
            vec![dir.path().join("a.png"), dir.path().join("sub/b.PNG")]
        );
        let t = load_rgb(&files[1]).unwrap();
        assert_eq!(t.size(), vec![3, 3, 5]);
        assert_eq!(t.int64_value(&[2, 1, 4]), 41);
        assert_eq!(t.int64_value(&[0, 1, 4]), 41);
    }

    #[test]
    fn an_empty_folder_and_a_broken_image_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = list_images(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no images"), "{err}");
        let broken = dir.path().join("broken.png");
        std::fs::write(&broken, b"not a png").unwrap();
        let err = load_rgb(&broken).unwrap_err().to_string();
        assert!(
            err.contains("broken.png") && err.contains("cannot decode"),
            "{err}"
        );
    }
}
