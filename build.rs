//! Generates the `amibus.v1` protobuf types with `protox` (a protobuf compiler in Rust), so a
//! fresh machine builds without a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(
        ["amibus/v1/envelope.proto", "amibus/v1/action.proto"],
        ["proto"],
    )?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
