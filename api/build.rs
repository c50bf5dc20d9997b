//! Generates the tonic/prost code for `proto/hostmesh/v1/hostmesh.proto` at
//! build time (never committed). Needs `protoc` (Debian: protobuf-compiler).

fn main() {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    let result = tonic_prost_build::configure()
        // Maps as BTreeMap: encoding is deterministic, so content hashes of
        // config entries are stable.
        .btree_map(".")
        // `bytes` fields as `Bytes`: config entry bodies are sliced out of
        // the received buffer, not copied into vectors.
        .bytes(".")
        // Small starting buffers per stream (see src/codec.rs).
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_protos(&["proto/hostmesh/v1/hostmesh.proto"], &["proto"]);
    if let Err(e) = result {
        eprintln!(
            "compiling proto/hostmesh/v1/hostmesh.proto failed: {e}\n\
             protoc is needed: `apt-get install protobuf-compiler` (or set PROTOC)"
        );
        std::process::exit(1);
    }
}
