//! The `amibus` command line. Each subcommand lives in `amibus::app`.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "amibus", version, about = "Asterisk AMI to Kafka/NATS bridge")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode a raw AMI recording into JSON lines or protobuf envelopes.
    Decode(amibus::app::decode::Args),
    /// Run simulated Asterisk servers speaking AMI (events, actions, faults).
    Sim(Box<amibus::app::sim::Args>),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Decode(args) => amibus::app::decode::run(args),
        Command::Sim(args) => amibus::app::sim::run(*args),
    }
}
