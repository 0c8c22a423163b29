//! Gives this crate's binaries and tests an rpath to libtorch (see ddpm-build).
fn main() {
    ddpm_build::link_libtorch_rpath();
}
