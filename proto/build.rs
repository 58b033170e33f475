//! Compiles the wire and manifest schemas. `protoc` comes from `protoc-bin-vendored` unless
//! `PROTOC` names another one, so a fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure()
        .bytes(".hashgrid.v1.Chunk.data")
        .compile_protos(
            &[
                "proto/hashgrid.proto",
                "proto/manifest.proto",
                "proto/peer.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
