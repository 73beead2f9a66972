//! Generates the protobuf messages from the same `protos/` the Python side uses, with a vendored
//! protoc (no system protoc needed), plus the encoded descriptor set that reflection serves.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../protos");
    let protos = protos.canonicalize().unwrap_or(protos);
    let files = ["grpc_service.proto", "model_config.proto", "admin.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={}", protos.join(file).display());
    }
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .bytes(".")
        .file_descriptor_set_path(out.join("descriptor.bin"))
        .compile_protos(&files.map(|f| protos.join(f)), &[protos])?;
    Ok(())
}
