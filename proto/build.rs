//! Compiles the .proto files with protox (pure Rust, no system protoc) and generates the prost
//! messages and tonic services.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] =
    &["common.proto", "nvlog_mirror.proto", "admin.proto", "data.proto", "disk.proto", "mediator.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("proto");
    println!("cargo:rerun-if-changed={}", proto_dir.display());
    let files: Vec<PathBuf> = PROTOS.iter().map(|name| proto_dir.join(name)).collect();
    let descriptors = protox::compile(&files, [&proto_dir])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // compile_fds does not write the descriptor set; reflection needs it, so write it here.
    std::fs::write(out_dir.join("mc_descriptor.bin"), descriptors.encode_to_vec())?;
    // Disk data as `Bytes`: one copy less per request on the remote plex path.
    tonic_prost_build::configure()
        .bytes(".mc.v1.DiskReadReply.data")
        .bytes(".mc.v1.DiskWriteRequest.data")
        .bytes(".mc.v1.DiskExtent.data")
        .compile_fds(descriptors)?;
    Ok(())
}
