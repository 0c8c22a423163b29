//! Build-script helper shared by every crate that links libtorch.
//!
//! tch does not give downstream binaries an rpath, so each such crate's build.rs calls
//! [`link_libtorch_rpath`]: it adds `-Wl,-rpath,<LIBTORCH>/lib` (LIBTORCH comes from
//! `.cargo/config.toml`) to the crate's binaries, tests, examples and benches, so they run with
//! no environment.

/// Emits the rpath linker argument and returns the resolved libtorch lib directory.
pub fn link_libtorch_rpath() -> Option<std::path::PathBuf> {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let dir = std::env::var("LIBTORCH").ok()?;
    let lib = std::path::Path::new(&dir).join("lib");
    // The real directory, not a symlink to it, so the rpath survives moving the symlink.
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    Some(lib)
}
