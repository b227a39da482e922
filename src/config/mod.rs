//! Configuration: the whole TOML file (`[[server]]`, `[spool]`, `[sink]`, `[pipeline]`,
//! `[metrics]`, `[shard]`, `[control]`, `[sim]`) and the `AMIBUS__SECTION__KEY` environment
//! overrides, read into raw serde structs and validated into [`Config`].
//!
//! Owns: the raw structs, reading the tree into them ([`keys`]: every unknown key and every
//! value of the wrong type is a problem, a typo is never silently ignored), the validation of
//! every value, and [`Secret`].
//!
//! Must never: log or print a secret ([`Secret`]'s `Debug` prints `[redacted]`), or stop at the
//! first problem: every problem is collected, each with the path of the offending key
//! (`server[1].tls.ca_file`) and its line in the file, and they are reported together, once
//! each, in file order.
//!
//! ```toml
//! [[server]]
//! id = "pbx1"                 # [A-Za-z0-9_-], unique; used in ActionIDs and bus subjects
//! host = "10.0.0.5"
//! port = 5038                 # default 5038 (5039 with TLS)
//! username = "amibus"
//! secret_env = "PBX1_SECRET"  # or `secret = "..."` or `secret_file = "/run/secrets/pbx1"`
//! auth = "md5"                # default; or "plain"
//! events = "on"               # Login `Events:` mask; default "on"
//! filters = [
//!     "Event: Newchannel",                                  # legacy regex
//!     { criteria = "action(exclude),name(RTCPSent)" },      # advanced (Asterisk 22)
//!     { criteria = "name(Hangup),header(Cause),method(exact)", pattern = "16" },
//! ]
//! keepalive_interval = "20s"
//! keepalive_timeout = "10s"
//! backoff_min = "500ms"
//! backoff_max = "30s"
//! auth_failure_backoff = "5m"
//! snapshot = ["CoreShowChannels", "QueueStatus", "DeviceStateList", "BridgeList"]  # default; [] = off
//! snapshot_gap_interval = "30s"  # a gap starts a snapshot at most this often
//! snapshot_timeout = "30s"       # a snapshot not complete by then ends incomplete
//! [server.tls]
//! enabled = true
//! ca_file = "/etc/amibus/pbx-ca.pem"
//! server_name = "pbx1.example.net"
//! ```

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

mod control;
mod env;
mod keys;
mod sections;
mod server;
mod sink;
mod units;

use control::*;
use sections::*;
use server::*;
use sink::*;
use units::*;

pub use env::{Env, OVERRIDE_PREFIX, ProcessEnv, apply_overrides};
pub use sections::{SPOOL_FRAMES_AT_LEAST, default_workers};
pub use units::{parse_duration, parse_size};

use crate::ami::server::{Auth, Filter, ServerConfig, TlsConfig};
use crate::secret::Secret;

/// The validated configuration (the parts this module knows).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub servers: Vec<ServerConfig>,
    pub spool: SpoolConfig,
    pub sink: SinkConfig,
    pub pipeline: PipelineConfig,
    /// An in-process simulator to read from (the embedded demo), if configured.
    pub sim: Option<DemoSim>,
    pub metrics: MetricsConfig,
    /// Which servers this replica reads (all of them with one replica).
    pub shard: crate::shard::Shard,
    /// The action consumer, if a `[control]` section is present.
    pub control: Option<ControlSection>,
}

/// `[control]`: actions from the bus back to Asterisk.
///
/// ```toml
/// [control]
/// transport = "nats"                          # or "kafka" (then [control.kafka])
/// nats_servers = ["nats://127.0.0.1:4222"]  # default: the [sink.nats] connection
/// subject = "amibus.action.{server}"          # one subscription per server of this replica
/// queue_group = "amibus-control"
/// result_subject = "amibus.result.{server}"   # when a request has no reply address
/// max_in_flight = 1024
/// default_timeout = "10s"
/// max_timeout = "60s"
/// dedupe_window = "10m"
/// dedupe_capacity = 100000
/// dedupe_max_bytes = "64MiB"
/// max_reply_bytes = "64MiB"                  # list replies held per server connection
/// journal = "/var/lib/amibus/control-journal" # default: control-journal in spool.dir
/// journal_fsync = "never"                     # or "always"
/// rate = 50                                   # actions/s per server; 0 = unlimited
/// burst = 100
///
/// [control.kafka]                             # with transport = "kafka"
/// brokers = "kafka-0:9092"                    # default: the [sink.kafka] connection
/// request_topic = "amibus.actions"
/// result_topic = "amibus.results"             # when a request names no reply topic
/// group = "amibus-control-{shard}"            # one consumer group per shard
/// start = "latest"                            # where a new group starts: "latest" or "earliest"
/// message_timeout = "30s"
/// session_timeout = "45s"                     # a crashed replica's partitions wait this long
///
/// [control.jetstream]                         # optional with transport = "nats"
/// stream = "AMIBUS_ACTIONS"
/// durable = "amibus-control-{shard}"          # one durable pull consumer per shard
/// create_stream = true
/// max_age = "24h"                             # how long a created stream keeps a request
/// ack_wait = "90s"                            # default: max_timeout + 30s
/// max_ack_pending = 1024                      # default: max_in_flight
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ControlSection {
    pub transport: ControlTransport,
    pub consumer: crate::control::ControlConfig,
    /// The durable idempotency journal.
    pub journal: JournalConfig,
}

use crate::control::journal::{JournalConfig, JournalFsync};

/// Where action requests come from and results go.
#[derive(Clone, Debug, PartialEq)]
pub enum ControlTransport {
    Nats(NatsControl),
    Kafka(crate::control::kafka::KafkaControlConfig),
}

/// The NATS transport of `[control]`.
#[derive(Clone, Debug, PartialEq)]
pub struct NatsControl {
    /// Where to connect; from `[sink.nats]` unless `nats_servers` is given.
    pub nats: crate::broker::nats::NatsConnection,
    pub subject: String,
    pub queue_group: Option<String>,
    pub result_subject: String,
    /// Read requests from a JetStream stream instead of core subscriptions.
    pub jetstream: Option<crate::control::nats::JetStreamRequests>,
}

/// The HTTP endpoint for `/metrics`, `/healthz` and `/readyz`.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsConfig {
    /// Where to listen (`0.0.0.0:9898`); `None` serves nothing.
    pub listen: Option<std::net::SocketAddr>,
    /// `/readyz` answers 503 while fewer than this share (0 to 1) of the servers are connected.
    pub ready_min_connected: f64,
    /// `/healthz` fails once the sink driver has settled nothing (no acknowledgement, no
    /// failure, no resend) for this long while records wait in the spool: it is stuck, and a
    /// restart is the way out. A broker that is down is not a stall (deliveries fail and are
    /// retried): that is `/readyz`'s.
    pub stall_timeout: std::time::Duration,
}

/// See [`MetricsConfig::stall_timeout`].
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// One problem found in the configuration, with the path of the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
    /// The line of the key in the file, when the file has it (not for a value that is
    /// missing, or set by an environment override).
    pub line: Option<usize>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} (line {line}): {}", self.path, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not a source: its text is the whole message (with the line and a caret), and a source
    /// would have it printed twice in an error chain.
    #[error("invalid TOML: {0}")]
    Toml(toml::de::Error),
    #[error("{} problem(s) in the configuration:\n{}", .0.len(), list(.0))]
    Invalid(Vec<Problem>),
}

impl From<toml::de::Error> for ConfigError {
    fn from(e: toml::de::Error) -> Self {
        ConfigError::Toml(e)
    }
}

impl ConfigError {
    /// A configuration error does not go away by retrying; the file must be fixed.
    pub fn is_retriable(&self) -> bool {
        false
    }

    /// The problems found, if the file parsed.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(p) => p,
            _ => &[],
        }
    }
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Default, Deserialize)]
struct RawConfig {
    #[serde(default)]
    server: Vec<RawServer>,
    #[serde(default)]
    spool: RawSpool,
    #[serde(default)]
    sink: RawSink,
    #[serde(default)]
    pipeline: RawPipeline,
    sim: Option<RawSim>,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    shard: RawShard,
    control: Option<RawControl>,
}

impl Config {
    /// Read and validate a TOML file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] if the file cannot be read, [`ConfigError::Toml`] if it is not
    /// valid TOML for this schema, [`ConfigError::Invalid`] with every problem found otherwise.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, &ProcessEnv)
    }

    /// Parse and validate TOML text.
    ///
    /// ```
    /// use amibus::config::{Config, ProcessEnv};
    /// let cfg = Config::parse(r#"
    ///     [[server]]
    ///     id = "pbx1"
    ///     host = "127.0.0.1"
    ///     username = "amibus"
    ///     secret = "s3cret"
    /// "#, &ProcessEnv).unwrap();
    /// assert_eq!(cfg.servers[0].port, 5038);
    /// assert_eq!(format!("{:?}", cfg.servers[0].secret), "[redacted]");
    /// ```
    ///
    /// # Errors
    /// As [`Config::load`], without [`ConfigError::Read`].
    pub fn parse(text: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        let mut root: toml::Table = text.parse()?;
        let mut override_problems = Vec::new();
        apply_overrides(&mut root, &env.overrides(), &mut override_problems);
        if !override_problems.is_empty() {
            return Err(ConfigError::Invalid(override_problems));
        }
        let mut problems = Vec::new();
        let Some(raw) = keys::deserialize::<RawConfig>(root, &mut problems) else {
            return Err(ConfigError::Invalid(with_lines(problems, text, env)));
        };
        let mut servers = Vec::new();
        let mut ids = HashSet::new();
        let configured_servers = raw.server.len();
        for (i, raw) in raw.server.into_iter().enumerate() {
            let path = format!("server[{i}]");
            if let Some(s) = validate_server(&path, raw, env, &mut problems) {
                if !ids.insert(s.id.clone()) {
                    problems.push(Problem {
                        path: format!("{path}.id"),
                        message: format!("duplicate server id {:?}", s.id),
                        line: None,
                    });
                }
                servers.push(s);
            }
        }
        let spool = validate_spool(raw.spool, &mut problems);
        let mut sink = validate_sink(raw.sink, env, &mut problems);
        let pipeline = validate_pipeline(raw.pipeline, &mut problems);
        if let SinkConfig::File(f) = &mut sink {
            f.framing = Framing::for_format(pipeline.format);
        }
        if spool.max_bytes
            < pipeline
                .max_frame_bytes
                .saturating_mul(SPOOL_FRAMES_AT_LEAST)
        {
            problems.push(Problem {
                path: "spool.max_bytes".into(),
                message: format!(
                    "{} bytes cannot hold {SPOOL_FRAMES_AT_LEAST} frames of \
                     pipeline.max_frame_bytes ({} bytes): raise it, or lower \
                     pipeline.max_frame_bytes",
                    spool.max_bytes, pipeline.max_frame_bytes
                ),
                line: None,
            });
        }
        let sim = raw.sim.map(|r| validate_sim(r, &mut problems));
        let metrics = validate_metrics(raw.metrics, &mut problems);
        let shard = validate_shard(raw.shard, env, &mut problems);
        let control = raw
            .control
            .map(|r| validate_control(r, &sink, &spool, shard, env, &mut problems));
        if configured_servers == 0 && sim.is_none() {
            problems.push(Problem {
                path: "server".into(),
                message: "no [[server]] configured (and no [sim]): nothing to read".into(),
                line: None,
            });
        }
        if problems.is_empty() {
            Ok(Config {
                servers,
                spool,
                sink,
                pipeline,
                sim,
                metrics,
                shard,
                control,
            })
        } else {
            Err(ConfigError::Invalid(with_lines(problems, text, env)))
        }
    }
}

/// Each problem with the line of its key (or of the nearest table around it that the file
/// has), except where an environment override set the value.
fn with_lines(mut problems: Vec<Problem>, text: &str, env: &dyn Env) -> Vec<Problem> {
    let overridden: Vec<String> = env
        .overrides()
        .iter()
        .filter_map(|(name, _)| name.strip_prefix(OVERRIDE_PREFIX))
        .map(|path| {
            let segs: Vec<keys::Seg> = path
                .split("__")
                .map(|s| match s.parse() {
                    Ok(i) => keys::Seg::Index(i),
                    Err(_) => keys::Seg::Key(s.to_ascii_lowercase()),
                })
                .collect();
            keys::render(&segs)
        })
        .collect();
    let lines = keys::Lines::new(text);
    for p in &mut problems {
        if overridden.iter().any(|o| p.path.starts_with(o.as_str())) {
            continue;
        }
        let mut path = p.path.as_str();
        p.line = loop {
            if let Some(line) = lines.line(path) {
                break Some(line);
            }
            match path.rfind(['.', '[']) {
                Some(i) => path = &path[..i],
                None => break None,
            }
        };
    }
    // In file order; what has no line (overrides, whole-file problems) last.
    problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    problems
}

// ---------------------------------------------------------------------------------------------
// [spool], [sink], [pipeline], [sim]

use crate::broker::nats::{NatsAuth, NatsConnection, NatsTls, StreamSpec, StreamStorage};
use crate::model::PayloadFormat;
use crate::sink::file::{FileSinkConfig, Framing};
use crate::sink::kafka::KafkaSinkConfig;
use crate::sink::nats::{NatsMode, NatsSinkConfig};
use crate::spool::{Fsync, SpoolConfig, WhenFull};

/// Where records go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkConfig {
    File(FileSinkConfig),
    Nats(Box<NatsSinkConfig>),
    Kafka(Box<KafkaSinkConfig>),
}

/// How records are encoded and handed from the connections to the spool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineConfig {
    pub format: PayloadFormat,
    /// Records waiting between the connections and the spool, at most. When it is full the
    /// connections drop records and report the range as a `gap`.
    pub handoff_queue: usize,
    /// How long a connection holds its next read while the queue is nearly full, letting the
    /// socket buffer the burst instead of dropping it; after that it reads on and drops until
    /// there is room again. Kept well under Asterisk's `writetimeout` (100 ms by default).
    pub handoff_wait: Duration,
    /// Pipeline tasks that normalize, encode and append to the spool in parallel. Each server
    /// is read into one of them, so a server's (and so a call's) records stay in order.
    pub workers: usize,
    /// Threads of the runtime every task runs on (connections, pipelines, the sink, the
    /// client libraries' tasks); `None`: tokio's default, one per core (or
    /// `TOKIO_WORKER_THREADS`). Fewer threads mean fewer cross-thread wake-ups, which is most
    /// of the CPU per event at moderate rates (see README "amibus beside a bare client"), at
    /// the price of peak throughput.
    pub threads: Option<usize>,
    /// At shutdown, how long to keep delivering what the spool holds before leaving the rest
    /// for the next start.
    pub drain_timeout: Duration,
    /// The largest AMI frame read whole (8 MiB by default); a larger one is skipped to the
    /// next frame boundary and published as a `parse_error` record. The spool's cap must hold
    /// at least two of them (an envelope is larger than its frame).
    pub max_frame_bytes: u64,
}

/// The embedded demo: an in-process simulator whose servers are read like configured ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DemoSim {
    pub servers: usize,
    /// Events per second per server (0 = as fast as possible).
    pub rate: u64,
    /// Events per server; with `exit_when_done` amibus stops once they are all delivered.
    pub count: Option<u64>,
    pub seed: u64,
    pub exit_when_done: bool,
}

#[cfg(test)]
mod tests;
