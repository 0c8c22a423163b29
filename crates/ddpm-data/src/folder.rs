//! Image folders (CelebA-HQ, users' own data): every PNG, JPEG and WebP file under a
//! directory, recursively, in sorted path order (so sample indices are stable).

use crate::{DataError, Result};
use std::path::{Path, PathBuf};

/// File extensions read from folders (case-insensitive).
pub const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// The image files under `dir`, sorted by path.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(DataError::Format {
            path: dir.display().to_string(),
            reason: "expected a directory of images".into(),
        });
    }
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(dir).follow_links(true) {
        let entry = entry.map_err(|e| DataError::Format {
            path: e
                .path()
                .map_or_else(|| dir.display().to_string(), |p| p.display().to_string()),
            reason: format!("cannot list: {e}"),
        })?;
        let is_image = entry.file_type().is_file()
            && entry
                .path()
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
        if is_image {
            files.push(entry.into_path());
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(DataError::Format {
            path: dir.display().to_string(),
            reason: format!("no images ({}) under it", EXTENSIONS.join(", ")),
        });
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_found_recursively_and_sorted() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("b/c")).unwrap();
        for f in ["b/c/2.PNG", "a.jpg", "b/1.webp", "notes.txt", "b/c/x.jpeg"] {
            std::fs::write(d.path().join(f), b"").unwrap();
        }
        let names: Vec<String> = list_images(d.path())
            .unwrap()
            .iter()
            .map(|p| p.strip_prefix(d.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["a.jpg", "b/1.webp", "b/c/2.PNG", "b/c/x.jpeg"]);
        let empty = tempfile::tempdir().unwrap();
        let err = list_images(empty.path()).unwrap_err().to_string();
        assert!(err.contains("no images"), "{err}");
        let err = list_images(&d.path().join("a.jpg"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.jpg") && err.contains("directory"), "{err}");
    }
}
