//! Wiring: the subcommands of the `amibus` binary. The only module that knows all the others.

pub mod action;
pub mod decode;
pub mod run;
pub mod sim;
pub mod tail;

use std::path::PathBuf;

use anyhow::Context;

use crate::broker::nats::NatsAuth;
use crate::secret::Secret;

/// How a command-line client (`tail`, `action`) authenticates to NATS: at most one of a
/// credentials file and a token read from the environment (never from the command line, where
/// `ps` would show it).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NatsAuthArgs {
    /// A `.creds` file (user JWT and nkey seed).
    #[arg(long, conflicts_with = "token_env")]
    pub creds: Option<PathBuf>,
    /// The environment variable holding an auth token.
    #[arg(long)]
    pub token_env: Option<String>,
}

impl NatsAuthArgs {
    /// The auth these arguments name.
    ///
    /// # Errors
    /// `--token-env` names a variable that is not set.
    pub fn auth(&self) -> anyhow::Result<NatsAuth> {
        Ok(match (&self.creds, &self.token_env) {
            (Some(path), _) => NatsAuth::CredentialsFile(path.clone()),
            (None, Some(var)) => NatsAuth::Token(Secret::new(
                std::env::var(var)
                    .with_context(|| format!("environment variable {var} is not set"))?,
            )),
            (None, None) => NatsAuth::None,
        })
    }
}

/// How logs are written to standard error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per state change.
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Send `tracing` output to standard error. `RUST_LOG` sets the level (default `info`).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Human => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Arguments of `amibus check-config`.
#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// The configuration file to validate.
    pub file: PathBuf,
}

/// Validate a configuration file and say what is wrong, every problem at once.
///
/// # Errors
/// The file is missing, not TOML, or invalid.
pub fn check_config(args: CheckConfigArgs) -> anyhow::Result<()> {
    let cfg = crate::config::Config::load(&args.file)?;
    println!(
        "{}: valid ({} servers, sink {}, spool in {}, metrics on {})",
        args.file.display(),
        cfg.servers.len(),
        match cfg.sink {
            crate::config::SinkConfig::File(_) => "file",
            crate::config::SinkConfig::Nats(_) => "nats",
            crate::config::SinkConfig::Kafka(_) => "kafka",
        },
        cfg.spool.dir.display(),
        cfg.metrics
            .listen
            .map_or_else(|| "nothing".to_owned(), |a| a.to_string())
    );
    Ok(())
}
