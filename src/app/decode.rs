//! `amibus decode`: a raw AMI recording to JSON lines or protobuf envelopes.

/// Arguments of `amibus decode`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The recording to read, or `-` for standard input.
    pub input: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("not yet")
}
