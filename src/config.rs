//! Configuration: the `[[server]]` tables (one per Asterisk server), read from TOML.
//!
//! Owns: the raw serde structs (`deny_unknown_fields`, so a typo is an error, not a silently
//! ignored key), their validation into [`ServerConfig`], and [`Secret`].
//!
//! Other sections of the file (sinks, spool, …) belong to their modules and are added to the
//! raw root struct by them; until then an unknown top-level table is refused like any typo.
//!
//! Must never: log or print a secret ([`Secret`]'s `Debug` prints `[redacted]`), or stop at the
//! first problem: validation collects every problem, each with the path of the offending key
//! (`server[1].tls.ca_file`), and reports them together.
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

pub use crate::secret::Secret;

/// How the client proves who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Auth {
    /// `Action: Challenge` then `Key: md5(challenge + secret)`: the secret never crosses the wire.
    #[default]
    Md5,
    /// `Secret: <secret>` in the Login action. Use only over TLS or loopback.
    Plain,
}

/// TLS settings of one server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM file with the CA certificate(s) the server's certificate must chain to. Required
    /// unless `insecure_skip_verify` is set (no built-in root store: AMI servers use private CAs).
    pub ca_file: Option<PathBuf>,
    /// The name to verify the certificate against (and send as SNI); defaults to `host`.
    pub server_name: String,
    /// Accept any certificate. Encrypts but does not authenticate the server.
    pub insecure_skip_verify: bool,
}

/// One AMI event filter pushed down with `Action: Filter` / `Operation: Add` after login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    /// `Filter: <POSIX extended regex>`, searched in the whole event text; `!` excludes.
    Legacy(String),
    /// `MatchCriteria: <criteria>` (Asterisk 22) with an optional `Filter: <pattern>`.
    Advanced {
        criteria: String,
        pattern: Option<String>,
    },
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Filter::Legacy(p) => write!(f, "Filter: {p}"),
            Filter::Advanced {
                criteria,
                pattern: None,
            } => write!(f, "MatchCriteria: {criteria}"),
            Filter::Advanced {
                criteria,
                pattern: Some(p),
            } => write!(f, "MatchCriteria: {criteria} Filter: {p}"),
        }
    }
}

/// A validated server entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    pub id: String,
    pub host: String,
    pub port: u16,
    pub username: String,
    pub secret: Secret,
    pub auth: Auth,
    /// `None`: plain TCP.
    pub tls: Option<TlsConfig>,
    /// The Login `Events:` mask (`on`, `off`, a class list such as `call,system`, or a number).
    pub events: String,
    pub filters: Vec<Filter>,
    /// A `Ping` is sent this often.
    pub keepalive_interval: Duration,
    /// A `Ping` unanswered this long, or no byte at all for `interval + timeout`, means the
    /// connection is dead.
    pub keepalive_timeout: Duration,
    /// Reconnect delays grow from `backoff_min` to `backoff_max` (exponential, full jitter).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// The delay after an authentication failure: retrying quickly would not help and can lock
    /// the account or flood Asterisk's security log.
    pub auth_failure_backoff: Duration,
    /// The banner, login and filter push-down must complete within this.
    pub login_timeout: Duration,
    /// Actions the control consumer may send to this server (ASCII case ignored).
    /// `"read-only"` stands for [`crate::control::READ_ONLY_ACTIONS`], the default.
    pub allow_actions: Vec<String>,
}

impl ServerConfig {
    /// `host:port`.
    pub fn address(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// A configuration with the defaults, for tests and examples.
    pub fn new(id: &str, host: &str, port: u16, username: &str, secret: Secret) -> Self {
        ServerConfig {
            id: id.to_owned(),
            host: host.to_owned(),
            port,
            username: username.to_owned(),
            secret,
            auth: Auth::Md5,
            tls: None,
            events: "on".to_owned(),
            filters: Vec::new(),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            auth_failure_backoff: Duration::from_secs(300),
            login_timeout: Duration::from_secs(10),
            allow_actions: vec![crate::control::rules::READ_ONLY_ALIAS.to_owned()],
        }
    }
}

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
/// message_timeout = "30s"
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

pub use crate::control::journal::{JournalConfig, JournalFsync};

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
    pub nats: crate::sink::nats::NatsConnection,
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
}

/// One problem found in the configuration, with the path of the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
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
    #[error("invalid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("{} problem(s) in the configuration:\n{}", .0.len(), list(.0))]
    Invalid(Vec<Problem>),
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
#[serde(deny_unknown_fields)]
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

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShard {
    index: Option<u32>,
    count: Option<u32>,
    #[serde(default)]
    index_from_hostname: bool,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    transport: Option<String>,
    kafka: Option<RawControlKafka>,
    jetstream: Option<RawControlJetStream>,
    nats_servers: Option<Vec<String>>,
    subject: Option<String>,
    queue_group: Option<String>,
    result_subject: Option<String>,
    max_in_flight: Option<usize>,
    default_timeout: Option<String>,
    max_timeout: Option<String>,
    dedupe_window: Option<String>,
    dedupe_capacity: Option<usize>,
    dedupe_max_bytes: Option<RawSize>,
    journal: Option<PathBuf>,
    journal_fsync: Option<String>,
    rate: Option<f64>,
    burst: Option<u32>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControlJetStream {
    stream: Option<String>,
    durable: Option<String>,
    create_stream: Option<bool>,
    max_age: Option<String>,
    ack_wait: Option<String>,
    max_ack_pending: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControlKafka {
    brokers: Option<String>,
    request_topic: Option<String>,
    result_topic: Option<String>,
    group: Option<String>,
    message_timeout: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
    ready_min_connected: Option<f64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    id: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    username: Option<String>,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    secret_env: Option<String>,
    auth: Option<String>,
    tls: Option<RawTls>,
    events: Option<String>,
    #[serde(default)]
    filters: Vec<RawFilter>,
    keepalive_interval: Option<String>,
    keepalive_timeout: Option<String>,
    backoff_min: Option<String>,
    backoff_max: Option<String>,
    auth_failure_backoff: Option<String>,
    login_timeout: Option<String>,
    allow_actions: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    #[serde(default)]
    enabled: bool,
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
    #[serde(default)]
    insecure_skip_verify: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawFilter {
    Legacy(String),
    Advanced(RawAdvancedFilter),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdvancedFilter {
    criteria: String,
    pattern: Option<String>,
}

/// Where a secret comes from; the environment is read through this so tests need not set
/// process-wide variables.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;

    /// `AMIBUS__SECTION__KEY=value` variables that override keys of the file (see
    /// [`apply_overrides`]); none by default.
    fn overrides(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn overrides(&self) -> Vec<(String, String)> {
        std::env::vars()
            .filter(|(k, _)| k.starts_with(OVERRIDE_PREFIX))
            .collect()
    }
}

/// Environment variables with this prefix override configuration keys.
pub const OVERRIDE_PREFIX: &str = "AMIBUS__";

/// Apply `AMIBUS__SECTION__KEY=value` overrides to the parsed file: `AMIBUS__SPOOL__DIR=/data`
/// sets `spool.dir`, `AMIBUS__SERVER__0__HOST=pbx1` the host of the first `[[server]]`,
/// `AMIBUS__SINK__KAFKA__BROKERS=k:9092` `sink.kafka.brokers`. Segments are matched in lower
/// case. The value is read as a TOML value when it is one (`5038`, `true`, `["a", "b"]`) and
/// as a string otherwise (`1GiB`, `/data`). Tables on the way are created; an override that
/// would index into a value that is not a table or array is a problem named after the variable.
pub fn apply_overrides(
    root: &mut toml::Table,
    overrides: &[(String, String)],
    problems: &mut Vec<Problem>,
) {
    let mut sorted: Vec<&(String, String)> = overrides.iter().collect();
    sorted.sort();
    for (name, raw) in sorted {
        let Some(path) = name.strip_prefix(OVERRIDE_PREFIX) else {
            continue;
        };
        let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        if segments.iter().any(String::is_empty) {
            problems.push(Problem {
                path: name.clone(),
                message: "an override names keys as AMIBUS__SECTION__KEY".into(),
            });
            continue;
        }
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        if let Err(message) = set_path(root, &segments, value) {
            problems.push(Problem {
                path: name.clone(),
                message,
            });
        }
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty key".into());
    };
    let mut node = table
        .entry(parents.first().cloned().unwrap_or_else(|| last.clone()))
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if parents.is_empty() {
        *node = value;
        return Ok(());
    }
    for seg in parents[1..].iter().chain(std::iter::once(last)) {
        let is_last = std::ptr::eq(seg, last);
        node = match node {
            toml::Value::Table(t) => {
                if is_last {
                    t.insert(seg.clone(), value);
                    return Ok(());
                }
                t.entry(seg.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            }
            toml::Value::Array(a) => {
                let i: usize = seg
                    .parse()
                    .map_err(|_| format!("{seg:?} is not an index into the array"))?;
                let len = a.len();
                let slot = a
                    .get_mut(i)
                    .ok_or_else(|| format!("index {i} is past the {len} entries"))?;
                if is_last {
                    *slot = value;
                    return Ok(());
                }
                slot
            }
            _ => {
                return Err(format!(
                    "cannot set {seg:?} inside a value that is not a table"
                ));
            }
        };
    }
    Ok(())
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
        let raw: RawConfig = toml::Value::Table(root).try_into()?;
        let mut problems = Vec::new();
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
                    });
                }
                servers.push(s);
            }
        }
        let spool = validate_spool(raw.spool, &mut problems);
        let sink = validate_sink(raw.sink, env, &mut problems);
        let pipeline = validate_pipeline(raw.pipeline, &mut problems);
        let sim = raw.sim.map(|r| validate_sim(r, &mut problems));
        let metrics = validate_metrics(raw.metrics, &mut problems);
        let shard = validate_shard(raw.shard, env, &mut problems);
        let control = raw
            .control
            .map(|r| validate_control(r, &sink, &spool, shard, &mut problems));
        if configured_servers == 0 && sim.is_none() {
            problems.push(Problem {
                path: "server".into(),
                message: "no [[server]] configured (and no [sim]): nothing to read".into(),
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
            Err(ConfigError::Invalid(problems))
        }
    }
}

struct Checker<'a> {
    path: &'a str,
    problems: &'a mut Vec<Problem>,
    ok: bool,
}

impl Checker<'_> {
    fn bad(&mut self, key: &str, message: impl Into<String>) {
        self.ok = false;
        self.problems.push(Problem {
            path: format!("{}.{key}", self.path),
            message: message.into(),
        });
    }

    fn required(&mut self, key: &str, v: Option<String>) -> String {
        match v {
            Some(v) if !v.is_empty() => {
                self.no_line_breaks(key, &v);
                v
            }
            _ => {
                self.bad(key, "required");
                String::new()
            }
        }
    }

    fn no_line_breaks(&mut self, key: &str, v: &str) {
        if v.contains(['\r', '\n']) {
            self.bad(key, "must not contain CR or LF");
        }
    }

    fn duration(&mut self, key: &str, v: Option<String>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match parse_duration(&s) {
                Some(d) if !d.is_zero() => d,
                Some(_) => {
                    self.bad(key, "must be greater than zero");
                    default
                }
                None => {
                    self.bad(
                        key,
                        format!("{s:?} is not a duration (a number followed by ms, s, m or h)"),
                    );
                    default
                }
            },
        }
    }
}

fn validate_server(
    path: &str,
    raw: RawServer,
    env: &dyn Env,
    problems: &mut Vec<Problem>,
) -> Option<ServerConfig> {
    let mut c = Checker {
        path,
        problems,
        ok: true,
    };
    let id = c.required("id", raw.id);
    if !id.is_empty()
        && !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        c.bad(
            "id",
            "may hold only ASCII letters, digits, '_' and '-' (it is part of ActionIDs and bus subjects)",
        );
    }
    let host = c.required("host", raw.host);
    let username = c.required("username", raw.username);
    let secret = match (raw.secret, raw.secret_file, raw.secret_env) {
        (Some(s), None, None) => Some(s),
        (None, Some(file), None) => match std::fs::read_to_string(&file) {
            // A trailing newline from `echo secret > file` is not part of the secret.
            Ok(s) => Some(s.trim_end_matches(['\r', '\n']).to_owned()),
            Err(e) => {
                c.bad(
                    "secret_file",
                    format!("cannot read {}: {e}", file.display()),
                );
                None
            }
        },
        (None, None, Some(var)) => match env.var(&var) {
            Some(s) => Some(s),
            None => {
                c.bad(
                    "secret_env",
                    format!("environment variable {var} is not set"),
                );
                None
            }
        },
        (None, None, None) => {
            c.bad(
                "secret",
                "one of secret, secret_file or secret_env is required",
            );
            None
        }
        _ => {
            c.bad(
                "secret",
                "give only one of secret, secret_file or secret_env",
            );
            None
        }
    };
    if let Some(s) = &secret {
        if s.is_empty() {
            c.bad("secret", "is empty");
        }
        // Never echo the secret itself in the message.
        if s.contains(['\r', '\n']) {
            c.bad("secret", "must not contain CR or LF");
        }
    }
    let auth = match raw.auth.as_deref() {
        None | Some("md5") => Auth::Md5,
        Some("plain") => Auth::Plain,
        Some(other) => {
            c.bad("auth", format!("{other:?} is not md5 or plain"));
            Auth::Md5
        }
    };
    let tls = match raw.tls {
        Some(t) if t.enabled => {
            if t.ca_file.is_none() && !t.insecure_skip_verify {
                c.bad(
                    "tls.ca_file",
                    "required when TLS is enabled (or set insecure_skip_verify = true explicitly)",
                );
            }
            if let Some(f) = &t.ca_file {
                if let Err(e) = std::fs::metadata(f) {
                    c.bad("tls.ca_file", format!("cannot read {}: {e}", f.display()));
                }
            }
            Some(TlsConfig {
                ca_file: t.ca_file,
                server_name: t.server_name.unwrap_or_else(|| host.clone()),
                insecure_skip_verify: t.insecure_skip_verify,
            })
        }
        _ => None,
    };
    let port = match raw.port {
        Some(0) => {
            c.bad("port", "must not be 0");
            0
        }
        Some(p) => p,
        None if tls.is_some() => 5039,
        None => 5038,
    };
    let events = raw.events.unwrap_or_else(|| "on".to_owned());
    if events.is_empty() {
        c.bad("events", "is empty (use \"off\" for no events)");
    }
    c.no_line_breaks("events", &events);
    let mut filters = Vec::new();
    for (j, f) in raw.filters.into_iter().enumerate() {
        let key = format!("filters[{j}]");
        match f {
            RawFilter::Legacy(p) => {
                if p.is_empty() || p == "!" {
                    c.bad(&key, "an empty legacy filter matches nothing useful");
                }
                c.no_line_breaks(&key, &p);
                filters.push(Filter::Legacy(p));
            }
            RawFilter::Advanced(a) => {
                c.no_line_breaks(&format!("{key}.criteria"), &a.criteria);
                if let Some(p) = &a.pattern {
                    c.no_line_breaks(&format!("{key}.pattern"), p);
                }
                if let Err(e) = check_criteria(&a.criteria, a.pattern.as_deref()) {
                    c.bad(&format!("{key}.criteria"), e);
                }
                filters.push(Filter::Advanced {
                    criteria: a.criteria,
                    pattern: a.pattern.filter(|p| !p.is_empty()),
                });
            }
        }
    }
    let d = ServerConfig::new("", "", 0, "", Secret::new(""));
    let keepalive_interval = c.duration(
        "keepalive_interval",
        raw.keepalive_interval,
        d.keepalive_interval,
    );
    let keepalive_timeout = c.duration(
        "keepalive_timeout",
        raw.keepalive_timeout,
        d.keepalive_timeout,
    );
    let backoff_min = c.duration("backoff_min", raw.backoff_min, d.backoff_min);
    let backoff_max = c.duration("backoff_max", raw.backoff_max, d.backoff_max);
    if backoff_min > backoff_max {
        c.bad("backoff_min", "is larger than backoff_max");
    }
    let auth_failure_backoff = c.duration(
        "auth_failure_backoff",
        raw.auth_failure_backoff,
        d.auth_failure_backoff,
    );
    let login_timeout = c.duration("login_timeout", raw.login_timeout, d.login_timeout);
    let allow_actions = raw.allow_actions.unwrap_or(d.allow_actions);
    for (j, a) in allow_actions.iter().enumerate() {
        let key = format!("allow_actions[{j}]");
        if a.is_empty() || a.contains([':', ' ', '\r', '\n']) {
            c.bad(&key, format!("{a:?} is not an action name"));
        } else if crate::control::rules::is_never_allowed(a) {
            c.bad(
                &key,
                format!("{a} would change amibus's own AMI session and cannot be allowed"),
            );
        }
    }
    if !c.ok {
        return None;
    }
    Some(ServerConfig {
        id,
        host,
        port,
        username,
        secret: Secret::new(secret.unwrap_or_default()),
        auth,
        tls,
        events,
        filters,
        keepalive_interval,
        keepalive_timeout,
        backoff_min,
        backoff_max,
        auth_failure_backoff,
        login_timeout,
        allow_actions,
    })
}

/// Check an Asterisk 22 `MatchCriteria` the way `manager_add_filter()` will: `action()`,
/// `name()`, `header()` and `method()`, comma-separated, each at most once; a non-empty pattern
/// needs a method other than `none`, and `method(none)` (the default) needs no pattern.
fn check_criteria(criteria: &str, pattern: Option<&str>) -> Result<(), String> {
    let mut seen = HashSet::new();
    let mut method = "none";
    for part in criteria.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((word, rest)) = part.split_once('(') else {
            return Err(format!("{part:?} is not word(value)"));
        };
        let Some(value) = rest.strip_suffix(')') else {
            return Err(format!("{part:?} is missing its ')'"));
        };
        if !seen.insert(word) {
            return Err(format!("{word}() is given twice"));
        }
        match word {
            "action" if value == "include" || value == "exclude" => {}
            "action" => return Err(format!("action({value}) is not include or exclude")),
            "name" | "header" if !value.is_empty() => {}
            "name" | "header" => return Err(format!("{word}() is empty")),
            "method" => match value {
                "regex" | "exact" | "starts_with" | "ends_with" | "contains" | "none" => {
                    method = value
                }
                _ => {
                    return Err(format!(
                        "method({value}) is not regex, exact, starts_with, ends_with, contains or none"
                    ));
                }
            },
            _ => return Err(format!("unknown criterion {word}()")),
        }
    }
    if seen.is_empty() {
        return Err("is empty".to_owned());
    }
    let has_pattern = pattern.is_some_and(|p| !p.is_empty());
    match (method, has_pattern) {
        ("none", true) => Err("a pattern needs an explicit method(...) other than none".to_owned()),
        ("none", false) => Ok(()),
        (_, false) => Err(format!("method({method}) needs a pattern")),
        (_, true) => Ok(()),
    }
}

/// `250ms`, `20s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// [spool], [sink], [pipeline], [sim]

pub use crate::app::pipeline::PayloadFormat;
pub use crate::sink::file::{FileSinkConfig, Framing};
pub use crate::sink::kafka::KafkaSinkConfig;
pub use crate::sink::nats::{
    NatsAuth, NatsMode, NatsSinkConfig, NatsTls, StreamSpec, StreamStorage,
};
pub use crate::spool::{Fsync, SpoolConfig, WhenFull};

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
    /// At shutdown, how long to keep delivering what the spool holds before leaving the rest
    /// for the next start.
    pub drain_timeout: Duration,
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

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpool {
    dir: Option<PathBuf>,
    segment_bytes: Option<RawSize>,
    max_bytes: Option<RawSize>,
    fsync: Option<String>,
    when_full: Option<String>,
    max_in_flight: Option<u64>,
    memory_bytes: Option<RawSize>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    kind: Option<String>,
    file: Option<RawFileSink>,
    nats: Option<RawNatsSink>,
    kafka: Option<RawKafkaSink>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafkaSink {
    brokers: Option<String>,
    topic: Option<String>,
    compression: Option<String>,
    linger: Option<String>,
    batch_bytes: Option<RawSize>,
    message_timeout: Option<String>,
    create_topics: Option<RawKafkaTopics>,
    tls: Option<RawKafkaTls>,
    sasl: Option<RawKafkaSasl>,
    #[serde(default)]
    properties: std::collections::BTreeMap<String, String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafkaTopics {
    partitions: Option<i32>,
    replication: Option<i32>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafkaTls {
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafkaSasl {
    mechanism: Option<String>,
    username: Option<String>,
    password_env: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNatsSink {
    servers: Option<Vec<String>>,
    subject: Option<String>,
    mode: Option<String>,
    name: Option<String>,
    token_env: Option<String>,
    user: Option<String>,
    password_env: Option<String>,
    credentials_file: Option<PathBuf>,
    nkey_seed_env: Option<String>,
    tls: Option<RawNatsTls>,
    stream: Option<RawNatsStream>,
    ack_timeout: Option<String>,
    max_in_flight: Option<usize>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNatsTls {
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    #[serde(default)]
    require: bool,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNatsStream {
    name: Option<String>,
    subjects: Option<Vec<String>>,
    storage: Option<String>,
    max_bytes: Option<RawSize>,
    max_age: Option<String>,
    duplicate_window: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileSink {
    path: Option<String>,
    rotate_bytes: Option<RawSize>,
    keep: Option<u32>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    format: Option<String>,
    handoff_queue: Option<usize>,
    handoff_wait: Option<String>,
    workers: Option<usize>,
    drain_timeout: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSim {
    servers: Option<usize>,
    rate: Option<u64>,
    count: Option<u64>,
    seed: Option<u64>,
    exit_when_done: Option<bool>,
}

/// `4096`, `64KiB`, `64MiB`, `1GiB` (also `KB`/`MB`/`GB` as powers of 1000).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mul)
}

fn size(path: &str, v: Option<RawSize>, default: u64, problems: &mut Vec<Problem>) -> u64 {
    match v {
        None => default,
        Some(RawSize::Bytes(n)) if n > 0 => n,
        Some(RawSize::Text(t)) => match parse_size(&t) {
            Some(n) if n > 0 => n,
            _ => {
                problems.push(Problem {
                    path: path.into(),
                    message: format!("{t:?} is not a size (e.g. 4096, 64MiB, 1GiB)"),
                });
                default
            }
        },
        Some(RawSize::Bytes(_)) => {
            problems.push(Problem {
                path: path.into(),
                message: "must be greater than zero".into(),
            });
            default
        }
    }
}

/// Set `target` from an optional count that must not be zero.
fn set_positive<T: Copy + PartialEq + Default>(
    path: &str,
    v: Option<T>,
    target: &mut T,
    problems: &mut Vec<Problem>,
) {
    match v {
        Some(n) if n == T::default() => problem(problems, path, "must be greater than zero"),
        Some(n) => *target = n,
        None => {}
    }
}

fn problem(problems: &mut Vec<Problem>, path: &str, message: impl Into<String>) {
    problems.push(Problem {
        path: path.into(),
        message: message.into(),
    });
}

fn validate_spool(raw: RawSpool, problems: &mut Vec<Problem>) -> SpoolConfig {
    let mut cfg = SpoolConfig::new(raw.dir.unwrap_or_else(|| PathBuf::from("amibus-spool")));
    cfg.segment_bytes = size(
        "spool.segment_bytes",
        raw.segment_bytes,
        cfg.segment_bytes,
        problems,
    );
    cfg.max_bytes = size("spool.max_bytes", raw.max_bytes, cfg.max_bytes, problems);
    if cfg.segment_bytes > cfg.max_bytes {
        problem(
            problems,
            "spool.segment_bytes",
            "must not be larger than spool.max_bytes",
        );
    }
    if let Some(f) = raw.fsync {
        cfg.fsync = match f.as_str() {
            "never" => Fsync::Never,
            "always" => Fsync::Always,
            other => match parse_duration(other) {
                Some(d) if !d.is_zero() => Fsync::Interval(d),
                _ => {
                    problem(
                        problems,
                        "spool.fsync",
                        format!("{f:?}: use \"never\", \"always\" or an interval such as \"1s\""),
                    );
                    cfg.fsync
                }
            },
        };
    }
    if let Some(w) = raw.when_full {
        cfg.when_full = match w.as_str() {
            "drop_oldest" => WhenFull::DropOldest,
            "drop_newest" => WhenFull::DropNewest,
            _ => {
                problem(
                    problems,
                    "spool.when_full",
                    format!("{w:?}: use \"drop_oldest\" or \"drop_newest\""),
                );
                cfg.when_full
            }
        };
    }
    set_positive(
        "spool.max_in_flight",
        raw.max_in_flight,
        &mut cfg.max_in_flight,
        problems,
    );
    cfg.memory_bytes = size(
        "spool.memory_bytes",
        raw.memory_bytes,
        cfg.memory_bytes,
        problems,
    );
    cfg
}

fn validate_sink(raw: RawSink, env: &dyn Env, problems: &mut Vec<Problem>) -> SinkConfig {
    let kind = raw.kind.unwrap_or_else(|| "file".into());
    match kind.as_str() {
        "file" => {
            let f = raw.file.unwrap_or_default();
            SinkConfig::File(FileSinkConfig {
                path: f.path.unwrap_or_else(|| "-".into()),
                framing: Framing::Lines,
                rotate_bytes: match f.rotate_bytes {
                    None | Some(RawSize::Bytes(0)) => 0,
                    Some(r) => size("sink.file.rotate_bytes", Some(r), 0, problems),
                },
                keep: f.keep.unwrap_or(5),
            })
        }
        "kafka" => SinkConfig::Kafka(Box::new(validate_kafka(
            raw.kafka.unwrap_or_default(),
            env,
            problems,
        ))),
        "nats" => SinkConfig::Nats(Box::new(validate_nats(
            raw.nats.unwrap_or_default(),
            env,
            problems,
        ))),
        other => {
            problem(
                problems,
                "sink.kind",
                format!("{other:?}: use \"file\", \"kafka\" or \"nats\""),
            );
            SinkConfig::File(FileSinkConfig {
                path: "-".into(),
                framing: Framing::Lines,
                rotate_bytes: 0,
                keep: 0,
            })
        }
    }
}

fn env_secret(
    path: &str,
    var: Option<String>,
    env: &dyn Env,
    problems: &mut Vec<Problem>,
) -> Option<Secret> {
    let var = var?;
    match env.var(&var) {
        Some(v) => Some(Secret::new(v)),
        None => {
            problem(
                problems,
                path,
                format!("environment variable {var} is not set"),
            );
            None
        }
    }
}

fn opt_duration(
    path: &str,
    v: Option<String>,
    default: Duration,
    problems: &mut Vec<Problem>,
) -> Duration {
    match v {
        None => default,
        Some(s) => match parse_duration(&s) {
            Some(d) if !d.is_zero() => d,
            _ => {
                problem(
                    problems,
                    path,
                    format!("{s:?} is not a duration (e.g. 500ms, 5s, 2m)"),
                );
                default
            }
        },
    }
}

fn validate_kafka(
    raw: RawKafkaSink,
    env: &dyn Env,
    problems: &mut Vec<Problem>,
) -> KafkaSinkConfig {
    use crate::sink::kafka::{NewTopics, Sasl, Tls};
    let brokers = raw.brokers.unwrap_or_else(|| {
        problem(
            problems,
            "sink.kafka.brokers",
            "required (host:port[,host:port...])",
        );
        String::new()
    });
    let mut cfg = KafkaSinkConfig::new(brokers);
    if let Some(topic) = raw.topic {
        cfg.topic = topic;
    }
    if let Some(c) = raw.compression {
        match c.parse() {
            Ok(c) => cfg.compression = c,
            Err(e) => problem(problems, "sink.kafka.compression", e),
        }
    }
    cfg.linger = match raw.linger {
        None => cfg.linger,
        Some(s) => parse_duration(&s).unwrap_or_else(|| {
            problem(
                problems,
                "sink.kafka.linger",
                format!("{s:?} is not a duration"),
            );
            cfg.linger
        }),
    };
    if let Some(b) = raw.batch_bytes {
        cfg.batch_bytes =
            size("sink.kafka.batch_bytes", Some(b), 1, problems).min(u64::from(u32::MAX)) as u32;
    }
    cfg.message_timeout = opt_duration(
        "sink.kafka.message_timeout",
        raw.message_timeout,
        cfg.message_timeout,
        problems,
    );
    if let Some(t) = raw.create_topics {
        let mut topics = NewTopics::default();
        if let Some(p) = t.partitions {
            topics.partitions = p;
        }
        if let Some(r) = t.replication {
            topics.replication = r;
        }
        cfg.create_topics = Some(topics);
    }
    if let Some(t) = raw.tls {
        cfg.connection.tls = Some(Tls {
            ca_file: t.ca_file,
            cert_file: t.cert_file,
            key_file: t.key_file,
        });
    }
    if let Some(sasl) = raw.sasl {
        let mechanism = match sasl.mechanism.as_deref().unwrap_or("PLAIN").parse() {
            Ok(m) => m,
            Err(e) => {
                problem(problems, "sink.kafka.sasl.mechanism", e);
                Default::default()
            }
        };
        let username = sasl.username.unwrap_or_else(|| {
            problem(
                problems,
                "sink.kafka.sasl.username",
                "required with [sink.kafka.sasl]",
            );
            String::new()
        });
        let password = match sasl.password_env {
            Some(var) => env_secret("sink.kafka.sasl.password_env", Some(var), env, problems)
                .unwrap_or_default(),
            None => {
                problem(
                    problems,
                    "sink.kafka.sasl.password_env",
                    "required with [sink.kafka.sasl]",
                );
                Secret::default()
            }
        };
        cfg.connection.sasl = Some(Sasl {
            mechanism,
            username,
            password,
        });
    }
    cfg.properties = raw.properties;
    if let Err(e) = cfg.client_config() {
        for p in e.problems {
            problem(problems, "sink.kafka", p);
        }
    }
    cfg
}

fn validate_nats(raw: RawNatsSink, env: &dyn Env, problems: &mut Vec<Problem>) -> NatsSinkConfig {
    let mut cfg = NatsSinkConfig::default();
    if let Some(servers) = raw.servers {
        if servers.is_empty() {
            problem(
                problems,
                "sink.nats.servers",
                "must list at least one server URL",
            );
        } else {
            cfg.connection.servers = servers;
        }
    }
    if let Some(subject) = raw.subject {
        cfg.subject = subject;
    }
    cfg.mode = match raw.mode.as_deref() {
        None | Some("jetstream") => NatsMode::JetStream,
        Some("core") => NatsMode::Core,
        Some(other) => {
            problem(
                problems,
                "sink.nats.mode",
                format!(
                    "{other:?}: use \"jetstream\" (PubAck, at-least-once) or \"core\" (at-most-once)"
                ),
            );
            NatsMode::JetStream
        }
    };
    if raw.name.is_some() {
        cfg.connection.name = raw.name;
    }
    let token = env_secret("sink.nats.token_env", raw.token_env, env, problems);
    let password = env_secret("sink.nats.password_env", raw.password_env, env, problems);
    let seed = env_secret("sink.nats.nkey_seed_env", raw.nkey_seed_env, env, problems);
    let chosen = [
        token.is_some(),
        raw.user.is_some(),
        raw.credentials_file.is_some(),
        seed.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if chosen > 1 {
        problem(
            problems,
            "sink.nats",
            "choose one of token_env, user + password_env, credentials_file, nkey_seed_env",
        );
    }
    cfg.connection.auth = match (token, raw.user, password, raw.credentials_file, seed) {
        (Some(t), ..) => NatsAuth::Token(t),
        (_, Some(user), Some(password), ..) => NatsAuth::UserPassword { user, password },
        (_, Some(_), None, ..) => {
            problem(problems, "sink.nats.password_env", "required with user");
            NatsAuth::None
        }
        (_, _, _, Some(file), _) => NatsAuth::CredentialsFile(file),
        (_, _, _, _, Some(seed)) => NatsAuth::NkeySeed(seed),
        _ => NatsAuth::None,
    };
    if let Some(tls) = raw.tls {
        if tls.client_cert.is_some() != tls.client_key.is_some() {
            problem(
                problems,
                "sink.nats.tls",
                "client_cert and client_key go together",
            );
        }
        cfg.connection.tls = NatsTls {
            ca_file: tls.ca_file,
            client_cert: tls.client_cert,
            client_key: tls.client_key,
            require: tls.require,
        };
    }
    if let Some(st) = raw.stream {
        let mut spec = StreamSpec::new(st.name.unwrap_or_else(|| "AMI".into()));
        spec.subjects = st.subjects.unwrap_or_default();
        spec.storage = match st.storage.as_deref() {
            None | Some("file") => StreamStorage::File,
            Some("memory") => StreamStorage::Memory,
            Some(other) => {
                problem(
                    problems,
                    "sink.nats.stream.storage",
                    format!("{other:?}: use \"file\" or \"memory\""),
                );
                StreamStorage::File
            }
        };
        spec.max_bytes = st
            .max_bytes
            .map(|m| size("sink.nats.stream.max_bytes", Some(m), 0, problems));
        spec.max_age = st.max_age.map(|a| {
            opt_duration(
                "sink.nats.stream.max_age",
                Some(a),
                Duration::ZERO,
                problems,
            )
        });
        spec.duplicate_window = opt_duration(
            "sink.nats.stream.duplicate_window",
            st.duplicate_window,
            spec.duplicate_window,
            problems,
        );
        if cfg.mode == NatsMode::Core {
            problem(
                problems,
                "sink.nats.stream",
                "a stream needs mode = \"jetstream\"",
            );
        }
        cfg.stream = Some(spec);
    }
    cfg.ack_timeout = opt_duration(
        "sink.nats.ack_timeout",
        raw.ack_timeout,
        cfg.ack_timeout,
        problems,
    );
    set_positive(
        "sink.nats.max_in_flight",
        raw.max_in_flight,
        &mut cfg.max_in_flight,
        problems,
    );
    cfg
}

fn validate_pipeline(raw: RawPipeline, problems: &mut Vec<Problem>) -> PipelineConfig {
    let format = match raw.format.as_deref() {
        None | Some("proto") => PayloadFormat::Proto,
        Some("json") => PayloadFormat::Json,
        Some(other) => {
            problem(
                problems,
                "pipeline.format",
                format!("{other:?}: use \"proto\" or \"json\""),
            );
            PayloadFormat::Proto
        }
    };
    let mut handoff_queue = 65_536;
    set_positive(
        "pipeline.handoff_queue",
        raw.handoff_queue,
        &mut handoff_queue,
        problems,
    );
    let handoff_wait = match raw.handoff_wait {
        None => DEFAULT_HANDOFF_WAIT,
        Some(s) => match parse_duration(&s) {
            Some(d) if d < Duration::from_millis(100) => d,
            Some(_) => {
                problem(
                    problems,
                    "pipeline.handoff_wait",
                    format!(
                        "{s:?}: must be under 100ms, Asterisk's default writetimeout, after \
                         which it drops a session that does not read"
                    ),
                );
                DEFAULT_HANDOFF_WAIT
            }
            None => {
                problem(
                    problems,
                    "pipeline.handoff_wait",
                    format!("{s:?} is not a duration"),
                );
                DEFAULT_HANDOFF_WAIT
            }
        },
    };
    let mut workers = default_workers();
    set_positive("pipeline.workers", raw.workers, &mut workers, problems);
    let drain_timeout = match raw.drain_timeout {
        None => Duration::from_secs(10),
        Some(s) => parse_duration(&s).unwrap_or_else(|| {
            problem(
                problems,
                "pipeline.drain_timeout",
                format!("{s:?} is not a duration"),
            );
            Duration::from_secs(10)
        }),
    };
    PipelineConfig {
        format,
        handoff_queue,
        handoff_wait,
        workers,
        drain_timeout,
    }
}

/// See [`PipelineConfig::handoff_wait`].
pub const DEFAULT_HANDOFF_WAIT: Duration = Duration::from_millis(20);

/// One pipeline per core, at most 8 (one pipeline keeps up with well over 100k records/s).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// `[shard]`, with `AMIBUS_SHARD_INDEX` / `AMIBUS_SHARD_COUNT` from the environment taking
/// precedence (a StatefulSet sets them per pod), or the index read from the host name's
/// ordinal (`amibus-2` → 2) with `index_from_hostname = true`.
fn validate_shard(
    raw: RawShard,
    env: &dyn Env,
    problems: &mut Vec<Problem>,
) -> crate::shard::Shard {
    let from_env = |name: &str, problems: &mut Vec<Problem>| {
        env.var(name).and_then(|v| match v.trim().parse::<u32>() {
            Ok(n) => Some(n),
            Err(_) => {
                problem(problems, "shard", format!("{name}={v:?} is not a number"));
                None
            }
        })
    };
    let count = from_env("AMIBUS_SHARD_COUNT", problems)
        .or(raw.count)
        .unwrap_or(1);
    let index = match from_env("AMIBUS_SHARD_INDEX", problems) {
        Some(i) => i,
        None if raw.index_from_hostname => {
            let host = env.var("HOSTNAME").unwrap_or_default();
            crate::shard::ordinal_from_hostname(&host).unwrap_or_else(|| {
                problem(
                    problems,
                    "shard.index_from_hostname",
                    format!("host name {host:?} does not end in -<number>"),
                );
                0
            })
        }
        None => raw.index.unwrap_or(0),
    };
    if count == 0 {
        problem(problems, "shard.count", "must be at least 1");
    } else if index >= count {
        problem(
            problems,
            "shard.index",
            format!("{index} is not below shard.count {count}"),
        );
    }
    crate::shard::Shard {
        index: index.min(count.saturating_sub(1)),
        count: count.max(1),
    }
}

fn validate_metrics(raw: RawMetrics, problems: &mut Vec<Problem>) -> MetricsConfig {
    let listen = raw.listen.and_then(|l| match l.parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            problem(
                problems,
                "metrics.listen",
                format!("{l:?} is not an address such as 0.0.0.0:9898"),
            );
            None
        }
    });
    let share = raw.ready_min_connected.unwrap_or(0.5);
    if !(0.0..=1.0).contains(&share) {
        problem(
            problems,
            "metrics.ready_min_connected",
            "must be between 0 and 1",
        );
    }
    MetricsConfig {
        listen,
        ready_min_connected: share.clamp(0.0, 1.0),
    }
}

fn validate_sim(raw: RawSim, problems: &mut Vec<Problem>) -> DemoSim {
    let servers = raw.servers.unwrap_or(2);
    if servers == 0 || servers > 10_000 {
        problem(problems, "sim.servers", "must be between 1 and 10000");
    }
    DemoSim {
        servers: servers.clamp(1, 10_000),
        rate: raw.rate.unwrap_or(1000),
        count: raw.count,
        seed: raw.seed.unwrap_or(1),
        exit_when_done: raw.exit_when_done.unwrap_or(false),
    }
}

fn validate_control(
    mut raw: RawControl,
    sink: &SinkConfig,
    spool: &SpoolConfig,
    shard: crate::shard::Shard,
    problems: &mut Vec<Problem>,
) -> ControlSection {
    let mut consumer = crate::control::ControlConfig::default();
    let transport = match raw.transport.as_deref() {
        None | Some("nats") => {
            if raw.kafka.is_some() {
                problem(
                    problems,
                    "control.kafka",
                    "only used with control.transport = \"kafka\"",
                );
            }
            let n = validate_control_nats(&mut raw, sink, shard, problems);
            // A durable consumer per shard sees every request subject.
            consumer.answer_not_owned = n.jetstream.is_none();
            ControlTransport::Nats(n)
        }
        Some("kafka") => {
            for (key, set) in [
                ("jetstream", raw.jetstream.is_some()),
                ("nats_servers", raw.nats_servers.is_some()),
                ("subject", raw.subject.is_some()),
                ("queue_group", raw.queue_group.is_some()),
                ("result_subject", raw.result_subject.is_some()),
            ] {
                if set {
                    problem(
                        problems,
                        &format!("control.{key}"),
                        "only used with control.transport = \"nats\"; see [control.kafka]",
                    );
                }
            }
            // Every replica must see every request: one consumer group per shard.
            consumer.answer_not_owned = false;
            ControlTransport::Kafka(validate_control_kafka(
                raw.kafka.take().unwrap_or_default(),
                sink,
                shard,
                problems,
            ))
        }
        Some(other) => {
            problem(
                problems,
                "control.transport",
                format!("{other:?} is not a transport (\"nats\" or \"kafka\")"),
            );
            ControlTransport::Nats(validate_control_nats(&mut raw, sink, shard, problems))
        }
    };
    set_positive(
        "control.max_in_flight",
        raw.max_in_flight,
        &mut consumer.max_in_flight,
        problems,
    );
    consumer.default_timeout = opt_duration(
        "control.default_timeout",
        raw.default_timeout,
        consumer.default_timeout,
        problems,
    );
    consumer.max_timeout = opt_duration(
        "control.max_timeout",
        raw.max_timeout,
        consumer.max_timeout,
        problems,
    );
    if consumer.default_timeout > consumer.max_timeout {
        problem(
            problems,
            "control.default_timeout",
            "is larger than control.max_timeout",
        );
    }
    consumer.dedupe_window = opt_duration(
        "control.dedupe_window",
        raw.dedupe_window,
        consumer.dedupe_window,
        problems,
    );
    set_positive(
        "control.dedupe_capacity",
        raw.dedupe_capacity,
        &mut consumer.dedupe_capacity,
        problems,
    );
    consumer.dedupe_max_bytes = size(
        "control.dedupe_max_bytes",
        raw.dedupe_max_bytes,
        consumer.dedupe_max_bytes as u64,
        problems,
    ) as usize;
    match raw.rate {
        Some(r) if !(r.is_finite() && r >= 0.0) => problem(
            problems,
            "control.rate",
            "must be 0 (unlimited) or a positive number",
        ),
        Some(r) => consumer.rate = r,
        None => {}
    }
    set_positive("control.burst", raw.burst, &mut consumer.burst, problems);
    let mut transport = transport;
    if let ControlTransport::Nats(NatsControl {
        jetstream: Some(js),
        ..
    }) = &mut transport
    {
        // Defaults that follow the consumer's settings.
        if js.ack_wait.is_zero() {
            js.ack_wait = consumer.max_timeout + Duration::from_secs(30);
        } else if js.ack_wait <= consumer.max_timeout {
            problem(
                problems,
                "control.jetstream.ack_wait",
                "must be longer than control.max_timeout, or requests still running are \
                 delivered again",
            );
        }
        if js.max_ack_pending == 0 {
            js.max_ack_pending = i64::try_from(consumer.max_in_flight).unwrap_or(i64::MAX);
        }
    }
    let fsync = match raw.journal_fsync.as_deref() {
        None | Some("never") => JournalFsync::Never,
        Some("always") => JournalFsync::Always,
        Some(other) => {
            problem(
                problems,
                "control.journal_fsync",
                format!("{other:?}: use \"never\" or \"always\""),
            );
            JournalFsync::Never
        }
    };
    if raw
        .journal
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        problem(
            problems,
            "control.journal",
            "must be a file path (default: control-journal in spool.dir)",
        );
    }
    let journal = JournalConfig {
        path: raw
            .journal
            .unwrap_or_else(|| spool.dir.join("control-journal")),
        fsync,
        // Compacted past twice what the memory holds (and never below 1 MiB).
        max_bytes: (consumer.dedupe_max_bytes as u64)
            .saturating_mul(2)
            .max(1 << 20),
    };
    ControlSection {
        transport,
        consumer,
        journal,
    }
}

fn validate_control_nats(
    raw: &mut RawControl,
    sink: &SinkConfig,
    shard: crate::shard::Shard,
    problems: &mut Vec<Problem>,
) -> NatsControl {
    let nats = match (raw.nats_servers.take(), sink) {
        (Some(servers), _) if servers.is_empty() => {
            problem(
                problems,
                "control.nats_servers",
                "must list at least one server URL",
            );
            crate::sink::nats::NatsConnection::default()
        }
        (Some(servers), _) => crate::sink::nats::NatsConnection {
            servers,
            ..crate::sink::nats::NatsConnection::default()
        },
        (None, SinkConfig::Nats(n)) => n.connection.clone(),
        (None, _) => {
            problem(
                problems,
                "control.nats_servers",
                "required unless sink.kind = \"nats\" (whose connection is then used)",
            );
            crate::sink::nats::NatsConnection::default()
        }
    };
    let template = |path: &str, v: Option<String>, default: &str, problems: &mut Vec<Problem>| {
        let v = v.unwrap_or_else(|| default.to_owned());
        if v.is_empty() || v.contains([' ', '\t', '\r', '\n']) {
            problem(problems, path, format!("{v:?} is not a NATS subject"));
        }
        v
    };
    let subject = template(
        "control.subject",
        raw.subject.take(),
        "amibus.action.{server}",
        problems,
    );
    if !subject.contains("{server}") {
        problem(
            problems,
            "control.subject",
            "must contain {server}: each replica subscribes to the subjects of its own servers",
        );
    }
    let result_subject = template(
        "control.result_subject",
        raw.result_subject.take(),
        "amibus.result.{server}",
        problems,
    );
    let jetstream = raw.jetstream.take().map(|js| {
        if raw.queue_group.is_some() {
            problem(
                problems,
                "control.queue_group",
                "not used with [control.jetstream] (a durable consumer per shard instead)",
            );
        }
        let stream = js.stream.unwrap_or_else(|| "AMIBUS_ACTIONS".to_owned());
        if stream.is_empty()
            || !stream
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            problem(
                problems,
                "control.jetstream.stream",
                format!("{stream:?} is not a stream name ([A-Za-z0-9_-])"),
            );
        }
        let durable = js
            .durable
            .unwrap_or_else(|| "amibus-control-{shard}".to_owned());
        if shard.count > 1 && !durable.contains("{shard}") {
            problem(
                problems,
                "control.jetstream.durable",
                "must contain {shard} with more than one shard: each shard needs its own \
                 durable consumer to see every request",
            );
        }
        let durable = durable.replace("{shard}", &shard.index.to_string());
        if durable.is_empty()
            || !durable
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            problem(
                problems,
                "control.jetstream.durable",
                format!("{durable:?} is not a consumer name ([A-Za-z0-9_-])"),
            );
        }
        let ack_wait = match js.ack_wait {
            None => Duration::ZERO, // filled in from max_timeout
            Some(v) => opt_duration(
                "control.jetstream.ack_wait",
                Some(v),
                Duration::ZERO,
                problems,
            ),
        };
        let max_ack_pending = match js.max_ack_pending {
            Some(n) if n < 1 => {
                problem(
                    problems,
                    "control.jetstream.max_ack_pending",
                    "must be at least 1",
                );
                0
            }
            Some(n) => n,
            None => 0, // filled in from max_in_flight
        };
        crate::control::nats::JetStreamRequests {
            stream,
            durable,
            create_stream: js.create_stream.unwrap_or(true),
            max_age: opt_duration(
                "control.jetstream.max_age",
                js.max_age,
                Duration::from_secs(24 * 3600),
                problems,
            ),
            ack_wait,
            max_ack_pending,
        }
    });
    NatsControl {
        jetstream,
        nats,
        subject,
        queue_group: Some(
            raw.queue_group
                .take()
                .unwrap_or_else(|| "amibus-control".to_owned()),
        )
        .filter(|g| !g.is_empty()),
        result_subject,
    }
}

fn validate_control_kafka(
    raw: RawControlKafka,
    sink: &SinkConfig,
    shard: crate::shard::Shard,
    problems: &mut Vec<Problem>,
) -> crate::control::kafka::KafkaControlConfig {
    use crate::control::kafka::KafkaControlConfig;
    let mut cfg = match (raw.brokers, sink) {
        (Some(b), _) if b.trim().is_empty() => {
            problem(
                problems,
                "control.kafka.brokers",
                "must list at least one host:port",
            );
            KafkaControlConfig::new(b)
        }
        (Some(b), _) => KafkaControlConfig::new(b),
        (None, SinkConfig::Kafka(k)) => KafkaControlConfig {
            connection: k.connection.clone(),
            ..KafkaControlConfig::new("")
        },
        (None, _) => {
            problem(
                problems,
                "control.kafka.brokers",
                "required unless sink.kind = \"kafka\" (whose connection is then used)",
            );
            KafkaControlConfig::new("")
        }
    };
    let topic = |path: &str, v: Option<String>, default: String, problems: &mut Vec<Problem>| {
        let v = v.unwrap_or(default);
        let ok = !v.is_empty()
            && v.len() <= 249
            && v != "."
            && v != ".."
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            problem(
                problems,
                path,
                format!("{v:?} is not a Kafka topic name (1 to 249 of [A-Za-z0-9._-])"),
            );
        }
        v
    };
    cfg.request_topic = topic(
        "control.kafka.request_topic",
        raw.request_topic,
        cfg.request_topic,
        problems,
    );
    cfg.result_topic = topic(
        "control.kafka.result_topic",
        raw.result_topic,
        cfg.result_topic,
        problems,
    );
    if cfg.request_topic == cfg.result_topic {
        problem(
            problems,
            "control.kafka.result_topic",
            "must differ from control.kafka.request_topic (results would be read as requests)",
        );
    }
    let group = raw
        .group
        .unwrap_or_else(|| "amibus-control-{shard}".to_owned());
    if group.trim().is_empty() {
        problem(problems, "control.kafka.group", "must not be empty");
    } else if shard.count > 1 && !group.contains("{shard}") {
        problem(
            problems,
            "control.kafka.group",
            "must contain {shard} with more than one shard: every replica must read every \
             request, so each shard needs its own consumer group",
        );
    }
    cfg.group_id = group.replace("{shard}", &shard.index.to_string());
    cfg.message_timeout = opt_duration(
        "control.kafka.message_timeout",
        raw.message_timeout,
        cfg.message_timeout,
        problems,
    );
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeEnv;
    impl Env for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            (name == "PBX_SECRET").then(|| "from-env".to_owned())
        }
    }

    #[test]
    fn full_server_parses() {
        let cfg = Config::parse(
            r#"
            [[server]]
            id = "pbx-1"
            host = "pbx.example"
            username = "amibus"
            secret_env = "PBX_SECRET"
            auth = "plain"
            events = "call,system"
            filters = ["Event: Newchannel", { criteria = "action(exclude),name(RTCPSent)" },
                       { criteria = "name(Hangup),header(Cause),method(exact)", pattern = "16" }]
            keepalive_interval = "5s"
            keepalive_timeout = "2500ms"
            backoff_min = "1s"
            backoff_max = "1m"
            auth_failure_backoff = "1h"
            [server.tls]
            enabled = true
            insecure_skip_verify = true
            "#,
            &FakeEnv,
        )
        .unwrap();
        let s = &cfg.servers[0];
        assert_eq!(s.secret.expose(), "from-env");
        assert_eq!(s.port, 5039);
        assert_eq!(s.auth, Auth::Plain);
        assert_eq!(s.filters.len(), 3);
        assert_eq!(
            s.filters[2],
            Filter::Advanced {
                criteria: "name(Hangup),header(Cause),method(exact)".into(),
                pattern: Some("16".into())
            }
        );
        assert_eq!(s.keepalive_timeout, Duration::from_millis(2500));
        assert_eq!(s.backoff_max, Duration::from_secs(60));
        assert_eq!(s.tls.as_ref().unwrap().server_name, "pbx.example");
        assert!(!format!("{s:?}").contains("from-env"));
    }

    #[test]
    fn control_section_and_allow_lists() {
        let cfg = Config::parse(
            r#"
            [[server]]
            id = "pbx1"
            host = "h"
            username = "u"
            secret = "s"
            allow_actions = ["read-only", "Originate", "Hangup"]
            [[server]]
            id = "pbx2"
            host = "h"
            username = "u"
            secret = "s"
            [control]
            nats_servers = ["nats://10.0.0.1:4222"]
            max_timeout = "30s"
            rate = 0
            dedupe_max_bytes = "1MiB"
            "#,
            &FakeEnv,
        )
        .unwrap();
        assert_eq!(
            cfg.servers[0].allow_actions,
            ["read-only", "Originate", "Hangup"]
        );
        assert_eq!(cfg.servers[1].allow_actions, ["read-only"]);
        let c = cfg.control.unwrap();
        let ControlTransport::Nats(n) = &c.transport else {
            panic!("nats is the default transport")
        };
        assert_eq!(n.nats.servers, ["nats://10.0.0.1:4222"]);
        assert_eq!(n.subject, "amibus.action.{server}");
        assert_eq!(n.result_subject, "amibus.result.{server}");
        assert_eq!(n.queue_group.as_deref(), Some("amibus-control"));
        assert!(c.consumer.answer_not_owned);
        assert_eq!(c.consumer.max_timeout, Duration::from_secs(30));
        assert_eq!(c.consumer.rate, 0.0);
        assert_eq!(c.consumer.dedupe_max_bytes, 1 << 20);
        assert_eq!(
            c.journal,
            JournalConfig {
                path: PathBuf::from("amibus-spool/control-journal"),
                fsync: JournalFsync::Never,
                max_bytes: 2 << 20,
            },
            "in the spool directory by default, compacted past twice the memory"
        );

        let err = Config::parse(
            r#"
            [[server]]
            id = "pbx1"
            host = "h"
            username = "u"
            secret = "s"
            allow_actions = ["Ping", "Logoff", "Bad Name"]
            [control]
            subject = "amibus.action"
            rate = -1
            default_timeout = "2m"
            journal = ""
            journal_fsync = "sometimes"
            "#,
            &FakeEnv,
        )
        .unwrap_err();
        let paths: Vec<_> = err.problems().iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "server[0].allow_actions[1]",
                "server[0].allow_actions[2]",
                "control.nats_servers",
                "control.subject",
                "control.default_timeout",
                "control.rate",
                "control.journal_fsync",
                "control.journal",
            ]
        );
    }

    #[test]
    fn control_over_kafka() {
        let base = r#"
            [[server]]
            id = "pbx1"
            host = "h"
            username = "u"
            secret = "s"
            [sink]
            kind = "kafka"
            [sink.kafka]
            brokers = "k1:9092"
            [shard]
            index = 2
            count = 3
        "#;
        let cfg = Config::parse(
            &format!("{base}[control]\ntransport = \"kafka\"\nrate = 5\n"),
            &FakeEnv,
        )
        .unwrap();
        let c = cfg.control.unwrap();
        let ControlTransport::Kafka(k) = &c.transport else {
            panic!("kafka transport")
        };
        assert_eq!(k.connection.brokers, "k1:9092", "from [sink.kafka]");
        assert_eq!(k.request_topic, "amibus.actions");
        assert_eq!(k.result_topic, "amibus.results");
        assert_eq!(k.group_id, "amibus-control-2", "one group per shard");
        assert!(!c.consumer.answer_not_owned, "skip what another shard owns");
        assert_eq!(c.consumer.rate, 5.0);

        let err = Config::parse(
            &format!(
                "{base}[control]\ntransport = \"kafka\"\nsubject = \"a.{{server}}\"\n\
                 [control.kafka]\nbrokers = \" \"\nrequest_topic = \"a b\"\n\
                 result_topic = \"\"\ngroup = \"fixed\"\nmessage_timeout = \"soon\"\n"
            ),
            &FakeEnv,
        )
        .unwrap_err();
        let paths: Vec<_> = err.problems().iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "control.subject",
                "control.kafka.brokers",
                "control.kafka.request_topic",
                "control.kafka.result_topic",
                "control.kafka.group",
                "control.kafka.message_timeout",
            ]
        );
        let err = Config::parse(
            &format!("{base}[control]\ntransport = \"mqtt\"\n[control.kafka]\n"),
            &FakeEnv,
        )
        .unwrap_err();
        let paths: Vec<_> = err.problems().iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            ["control.transport", "control.nats_servers"],
            "{err}"
        );
    }

    #[test]
    fn control_over_jetstream() {
        let base = r#"
            [[server]]
            id = "pbx1"
            host = "h"
            username = "u"
            secret = "s"
            [shard]
            index = 1
            count = 2
            [control]
            nats_servers = ["nats://n:4222"]
            max_timeout = "20s"
        "#;
        let cfg = Config::parse(&format!("{base}[control.jetstream]\n"), &FakeEnv).unwrap();
        let c = cfg.control.unwrap();
        let ControlTransport::Nats(n) = &c.transport else {
            panic!("nats transport")
        };
        let js = n.jetstream.as_ref().expect("jetstream");
        assert_eq!(js.stream, "AMIBUS_ACTIONS");
        assert_eq!(js.durable, "amibus-control-1", "one durable per shard");
        assert!(js.create_stream);
        assert_eq!(js.max_age, Duration::from_secs(24 * 3600));
        assert_eq!(js.ack_wait, Duration::from_secs(50), "max_timeout + 30s");
        assert_eq!(js.max_ack_pending, 1024, "max_in_flight");
        assert!(
            !c.consumer.answer_not_owned,
            "every shard sees every request"
        );

        let err = Config::parse(
            &format!(
                "{base}queue_group = \"q\"\n[control.jetstream]\nstream = \"a.b\"\n\
                 durable = \"fixed\"\nack_wait = \"10s\"\nmax_ack_pending = 0\n"
            ),
            &FakeEnv,
        )
        .unwrap_err();
        let paths: Vec<_> = err.problems().iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "control.queue_group",
                "control.jetstream.stream",
                "control.jetstream.durable",
                "control.jetstream.max_ack_pending",
                "control.jetstream.ack_wait",
            ],
            "{err}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let err = Config::parse(
            r#"
            [[server]]
            id = "a.b"
            host = "h"
            username = "u"
            secret = "x"
            secret_env = "Y"
            auth = "sha1"
            keepalive_interval = "soon"
            backoff_min = "2m"
            backoff_max = "1m"
            filters = [{ criteria = "name(Hangup),header(Cause)", pattern = "16" }]
            [server.tls]
            enabled = true
            [[server]]
            id = "b"
            host = "h"
            username = "u"
            secret_env = "MISSING"
            "#,
            &FakeEnv,
        )
        .unwrap_err();
        let paths: Vec<_> = err.problems().iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "server[0].id",
                "server[0].secret",
                "server[0].auth",
                "server[0].tls.ca_file",
                "server[0].filters[0].criteria",
                "server[0].keepalive_interval",
                "server[0].backoff_min",
                "server[1].secret_env",
            ]
        );
        assert!(!err.is_retriable());
    }

    #[test]
    fn handoff_wait_stays_under_asterisks_writetimeout() {
        let server = "[[server]]\nid = \"a\"\nhost = \"h\"\nusername = \"u\"\nsecret = \"x\"\n";
        let parse = |wait: &str| {
            Config::parse(
                &format!("{server}[pipeline]\nhandoff_wait = \"{wait}\"\n"),
                &FakeEnv,
            )
        };
        assert_eq!(
            Config::parse(server, &FakeEnv)
                .expect("valid")
                .pipeline
                .handoff_wait,
            DEFAULT_HANDOFF_WAIT
        );
        for (wait, want) in [("0s", 0), ("50ms", 50), ("99ms", 99)] {
            let cfg = parse(wait).expect("valid");
            assert_eq!(cfg.pipeline.handoff_wait, Duration::from_millis(want));
        }
        for wait in ["100ms", "1s", "soon"] {
            let err = parse(wait).unwrap_err();
            assert_eq!(err.problems()[0].path, "pipeline.handoff_wait", "{wait}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::parse(
            "[[server]]\nid = \"a\"\nhost = \"h\"\nusername = \"u\"\nsecret = \"x\"\nsecert = \"y\"\n",
            &FakeEnv,
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Toml(_)), "{err}");
        assert!(err.to_string().contains("secert"));
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let one = "[[server]]\nid = \"a\"\nhost = \"h\"\nusername = \"u\"\nsecret = \"x\"\n";
        let err = Config::parse(&format!("{one}{one}"), &FakeEnv).unwrap_err();
        assert_eq!(err.problems()[0].path, "server[1].id");
    }

    #[test]
    fn criteria_rules() {
        assert!(check_criteria("action(include),name(Newchannel)", None).is_ok());
        assert!(check_criteria("name(Hangup),method(regex)", Some("x")).is_ok());
        assert!(check_criteria("name(Hangup)", Some("x")).is_err());
        assert!(check_criteria("name(Hangup),method(exact)", None).is_err());
        assert!(check_criteria("name(A),name(B)", None).is_err());
        assert!(check_criteria("colour(red)", None).is_err());
        assert!(check_criteria("", None).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("3m"), Some(Duration::from_secs(180)));
        assert_eq!(parse_duration("3"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("3 days"), None);
    }

    #[test]
    fn secret_is_redacted() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
    }

    struct MapEnv(&'static [(&'static str, &'static str)]);
    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    const ONE_SERVER: &str =
        "[[server]]\nid = \"a\"\nhost = \"h\"\nusername = \"u\"\nsecret = \"s\"\n";

    #[test]
    fn shard_comes_from_the_environment_or_the_host_name() {
        let cfg = Config::parse(
            &format!("{ONE_SERVER}[shard]\nindex = 0\ncount = 2\n"),
            &MapEnv(&[("AMIBUS_SHARD_INDEX", "2"), ("AMIBUS_SHARD_COUNT", "3")]),
        )
        .unwrap();
        assert_eq!(cfg.shard, crate::shard::Shard { index: 2, count: 3 });
        let cfg = Config::parse(
            &format!("{ONE_SERVER}[shard]\ncount = 4\nindex_from_hostname = true\n"),
            &MapEnv(&[("HOSTNAME", "amibus-3")]),
        )
        .unwrap();
        assert_eq!(cfg.shard, crate::shard::Shard { index: 3, count: 4 });
        let err = Config::parse(
            &format!("{ONE_SERVER}[shard]\nindex = 3\ncount = 3\n"),
            &MapEnv(&[]),
        )
        .unwrap_err();
        assert_eq!(err.problems()[0].path, "shard.index");
        // An empty index (an old cluster without the pod-index label) is refused, not guessed.
        let err = Config::parse(ONE_SERVER, &MapEnv(&[("AMIBUS_SHARD_INDEX", "")])).unwrap_err();
        assert!(err.to_string().contains("AMIBUS_SHARD_INDEX"), "{err}");
    }

    struct OverrideEnv(Vec<(String, String)>);
    impl Env for OverrideEnv {
        fn var(&self, _: &str) -> Option<String> {
            None
        }
        fn overrides(&self) -> Vec<(String, String)> {
            self.0.clone()
        }
    }

    #[test]
    fn environment_overrides_set_any_key() {
        let env = OverrideEnv(vec![
            ("AMIBUS__SPOOL__DIR".into(), "/data/spool".into()),
            ("AMIBUS__SPOOL__MAX_BYTES".into(), "2GiB".into()),
            ("AMIBUS__SERVER__0__PORT".into(), "5039".into()),
            ("AMIBUS__SINK__KIND".into(), "kafka".into()),
            (
                "AMIBUS__SINK__KAFKA__BROKERS".into(),
                "k1:9092,k2:9092".into(),
            ),
            ("AMIBUS__METRICS__LISTEN".into(), "0.0.0.0:9898".into()),
        ]);
        let cfg = Config::parse(ONE_SERVER, &env).unwrap();
        assert_eq!(cfg.spool.dir, std::path::PathBuf::from("/data/spool"));
        assert_eq!(cfg.spool.max_bytes, 2 << 30);
        assert_eq!(cfg.servers[0].port, 5039);
        assert!(
            matches!(&cfg.sink, SinkConfig::Kafka(k) if k.connection.brokers == "k1:9092,k2:9092")
        );
        assert!(cfg.metrics.listen.is_some());
        // A typo in an override is an error naming the key, like one in the file.
        let err = Config::parse(
            ONE_SERVER,
            &OverrideEnv(vec![("AMIBUS__SPOOL__DIRR".into(), "/x".into())]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("dirr"), "{err}");
        let err = Config::parse(
            ONE_SERVER,
            &OverrideEnv(vec![("AMIBUS__SERVER__7__HOST".into(), "h".into())]),
        )
        .unwrap_err();
        assert_eq!(err.problems()[0].path, "AMIBUS__SERVER__7__HOST");
    }
}
