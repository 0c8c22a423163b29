//! Adds an rpath to libtorch for this crate's tests and records where libtorch was at build
//! time, so `--device cuda` can find libtorch_cuda.so next to the linked libtorch_cpu.so.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(dir) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&dir).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        println!("cargo:rustc-env=DDPM_LIBTORCH_LIB={}", lib.display());
    }
}
