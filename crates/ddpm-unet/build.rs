//! Gives this crate's tests an rpath to libtorch (see ddpm-build) and records where libtorch
//! was at build time, so `--device cuda` can find libtorch_cuda.so next to libtorch_cpu.so.
fn main() {
    if let Some(lib) = ddpm_build::link_libtorch_rpath() {
        println!("cargo:rustc-env=DDPM_LIBTORCH_LIB={}", lib.display());
    }
}
