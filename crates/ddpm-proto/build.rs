//! Generates the tonic/prost code of proto/ddpm/v1 with the vendored protoc (no system
//! package needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let file = root.join("ddpm/v1/coordinator.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    // The vendored protoc, so no system package is needed (the build script is
    // single-threaded, so setting the environment is sound).
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&[file], &[root])?;
    Ok(())
}
