//! The `amibus` command line. Each subcommand lives in `amibus::app`.

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: the data path allocates and frees small buffers at
/// 100k+ records/s from several threads, and glibc spent ~18 % of amibus's CPU in
/// `malloc_consolidate`/`unlink_chunk` in the end-to-end benchmark. The crate's `override`
/// feature (Cargo.toml) also makes mimalloc the process's `malloc`, so librdkafka (C, a
/// buffer per message) stops paying glibc the same price: ~24 % of amibus's CPU on Kafka.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "amibus", version, about = "Asterisk AMI to Kafka/NATS bridge")]
struct Cli {
    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = amibus::app::LogFormat::Human)]
    log_format: amibus::app::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read every configured Asterisk and publish its events (the main job). Without --config,
    /// runs the embedded demo: a simulator with two servers, as JSON lines on standard output.
    Run(amibus::app::run::Args),
    /// Validate a configuration file without connecting to anything.
    CheckConfig(amibus::app::CheckConfigArgs),
    /// Decode a raw AMI recording into JSON lines or protobuf envelopes.
    Decode(amibus::app::decode::Args),
    /// Run the AMI simulator: a fake Asterisk farm for load tests.
    Sim(Box<amibus::app::sim::Args>),
    /// Read records back from the bus and print them as JSON lines, filtered by server and event.
    Tail(amibus::app::tail::Args),
    /// Send one action request over NATS or Kafka and print its result as JSON (exit 0: success,
    /// 2: another status, 1: no result).
    Action(Box<amibus::app::action::Args>),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    amibus::app::init_logging(cli.log_format);
    let ok = |r: anyhow::Result<()>| r.map(|()| std::process::ExitCode::SUCCESS);
    let result = match cli.command {
        Command::Run(args) => ok(amibus::app::run::run(args)),
        Command::CheckConfig(args) => ok(amibus::app::check_config(args)),
        Command::Decode(args) => ok(amibus::app::decode::run(args)),
        Command::Sim(args) => ok(amibus::app::sim::run(*args)),
        Command::Tail(args) => ok(amibus::app::tail::run(args)),
        Command::Action(args) => amibus::app::action::run(*args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // The error chain, not a backtrace: what went wrong and what it was doing.
            eprintln!("amibus: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
