//! Compiles proto/ without a system `protoc` (protox is a pure-Rust compiler) and writes the
//! descriptor set next to the generated code so the server can offer reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "ratinghub/v1/rating.proto",
    "ratinghub/v1/ingest.proto",
    "ratinghub/v1/query.proto",
    "ratinghub/v1/admin.proto",
    "ratinghub/v1/sync.proto",
    "ratinghub/v1/rectification.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // sqlx::migrate! embeds the migrations at compile time.
    println!("cargo:rerun-if-changed=src/store/migrations");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("ratinghub_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // Deterministic encoding: the content hash behind idempotency relies on it.
        .btree_map(".")
        // Rater carries PII; its Debug is written by hand to redact it.
        .skip_debug([".ratinghub.v1.Rater"])
        // prost's codec with a guard against messages that decode to far more than they
        // weigh (src/codec.rs).
        .codec_path("crate::codec::GuardedCodec")
        .compile_fds(fds)?;
    Ok(())
}
