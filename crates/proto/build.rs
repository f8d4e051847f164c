//! Compiles `proto/**/*.proto` with protox (pure Rust: no protoc needed) and generates prost
//! messages and tonic client and server stubs.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/cairn/worker/v1/worker_api.proto",
        "proto/google/devtools/build/v1/publish_build_event.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
