//! What amibus needs to know of one Asterisk server: where it is, how to log in, what to ask
//! for, how to keep the session alive. Read and validated by `config` (the `[[server]]`
//! tables); used by the connection task, the login, the simulator and the action consumer.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::secret::Secret;

/// In an `allow_actions` list, this entry stands for every read-only action
/// ([`crate::control::READ_ONLY_ACTIONS`]); the default list.
pub const READ_ONLY_ALIAS: &str = "read-only";

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
    /// [`READ_ONLY_ALIAS`] stands for [`crate::control::READ_ONLY_ACTIONS`], the default.
    pub allow_actions: Vec<String>,
    /// State snapshots after every login and after gaps ([`crate::ami::snapshot`]).
    pub snapshot: crate::ami::snapshot::Settings,
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
            allow_actions: vec![READ_ONLY_ALIAS.to_owned()],
            snapshot: crate::ami::snapshot::Settings::default(),
        }
    }
}
