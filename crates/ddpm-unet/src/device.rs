//! `--device` parsing and on-demand loading of libtorch's CUDA library.
//!
//! Binaries link only `libtorch_cpu` and `libc10`, so they run on machines without CUDA.
//! When a CUDA device is requested, `libtorch_cuda.so` is loaded with RTLD_NOW | RTLD_GLOBAL
//! before the first tensor is created, which registers the CUDA backend with libtorch.

use crate::{Result, UNetError};
use tch::Device;

/// Parses `cpu`, `cuda` or `cuda:K` and, for CUDA, makes sure libtorch's CUDA backend is
/// loaded and the device exists. The error names the missing library and how to fix it.
pub fn resolve(spec: &str) -> Result<Device> {
    let bad = |reason: String| UNetError::Device {
        device: spec.to_string(),
        reason,
    };
    let index = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        s => match s.strip_prefix("cuda:") {
            Some(k) => k
                .parse::<usize>()
                .map_err(|_| bad("expected `cpu`, `cuda` or `cuda:K` with K a GPU index".into()))?,
            None => return Err(bad("expected `cpu`, `cuda` or `cuda:K`".into())),
        },
    };
    load_cuda_backend().map_err(bad)?;
    let count = tch::Cuda::device_count();
    if count == 0 {
        return Err(bad("libtorch_cuda.so loaded but no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)".into()));
    }
    if index as i64 >= count {
        return Err(bad(format!(
            "GPU index {index} does not exist; this host has {count} visible GPU(s)"
        )));
    }
    Ok(Device::Cuda(index))
}

/// Loads `libtorch_cuda.so` once (searching the binary's rpath, then LD_LIBRARY_PATH).
pub fn load_cuda_backend() -> std::result::Result<(), String> {
    use std::sync::OnceLock;
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let flags = libc_flags();
            let mut errors = Vec::new();
            let mut candidates = vec![std::path::PathBuf::from("libtorch_cuda.so")];
            if let Some(dir) = option_env!("DDPM_LIBTORCH_LIB") {
                candidates.insert(0, std::path::Path::new(dir).join("libtorch_cuda.so"));
            }
            for c in &candidates {
                // SAFETY: loading libtorch's own CUDA library; its initialisers only register
                // the CUDA backend with the already-loaded libtorch_cpu.
                match unsafe { libloading::os::unix::Library::open(Some(c), flags) } {
                    Ok(lib) => {
                        std::mem::forget(lib);
                        return Ok(());
                    }
                    Err(e) => errors.push(format!("{}: {e}", c.display())),
                }
            }
            Err(format!(
                "cannot load libtorch_cuda.so ({}). Point LD_LIBRARY_PATH at the lib directory of a \
                 CUDA build of libtorch 2.11 (for a pip install: `python3 -c 'import torch, os; \
                 print(os.path.join(os.path.dirname(torch.__file__), \"lib\"))'`), together with \
                 the CUDA runtime libraries it needs",
                errors.join("; ")
            ))
        })
        .clone()
}

fn libc_flags() -> i32 {
    libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL
}
