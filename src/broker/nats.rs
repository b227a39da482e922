//! NATS client setup and a reader, shared by the NATS sink, the action consumer, `amibus tail`,
//! `amibus action` and the tests.
//!
//! Owns: turning [`NatsConnection`] (servers, auth, TLS, timeouts) into a connected
//! `async_nats::Client`, creating a JetStream stream that is missing ([`ensure_stream`]), and
//! reading messages back ([`NatsReader`]) from a core subscription or a JetStream stream.
//!
//! Must never: log a secret (tokens, passwords, nkey seeds are [`Secret`]s whose `Debug` is
//! redacted; server URLs are logged with their user info removed).

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{Client, ConnectOptions, HeaderMap};
use bytes::Bytes;
use futures_util::StreamExt;

pub use crate::secret::Secret;
/// How the client proves who it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NatsAuth {
    #[default]
    None,
    Token(Secret),
    UserPassword {
        user: String,
        password: Secret,
    },
    /// A `.creds` file (user JWT + nkey seed), read at connect.
    CredentialsFile(PathBuf),
    /// An nkey seed (`SU...`).
    NkeySeed(Secret),
}

/// TLS settings. Without any, TLS is still used when the server requires it, verified against
/// the system's roots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// A PEM file of CA certificates to trust (in addition to the system's).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM), for servers that verify clients. Both or neither.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Refuse to talk to a server that does not offer TLS.
    pub require: bool,
    /// Start TLS before the server says anything, for servers configured with
    /// `handshake_first` (they send no plain-text `INFO`). Implies TLS on every server.
    pub handshake_first: bool,
}

/// Where and how to connect; shared by [`NatsSink`] and [`NatsReader`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsConnection {
    /// Server URLs (`nats://host:4222`, `tls://host:4222`); the client picks one and fails over.
    pub servers: Vec<String>,
    pub auth: NatsAuth,
    pub tls: NatsTls,
    /// Shown in the server's connection list (`nats server report connections`).
    pub name: Option<String>,
    pub connect_timeout: Duration,
    /// Bounds JetStream API requests (stream lookups and creation).
    pub request_timeout: Duration,
}

impl Default for NatsConnection {
    fn default() -> Self {
        NatsConnection {
            servers: vec!["nats://127.0.0.1:4222".into()],
            auth: NatsAuth::None,
            tls: NatsTls::default(),
            name: Some("amibus".into()),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamStorage {
    #[default]
    File,
    Memory,
}

/// A stream the sink creates at connect if it does not exist. An existing stream of that name
/// is used as it is (its configuration is not changed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSpec {
    pub name: String,
    /// Subjects the stream captures; empty means `<prefix>.>` where `<prefix>` is the literal
    /// part of the subject template before its first `{…}` level (`ami.{server}.{event}` →
    /// `ami.>`).
    pub subjects: Vec<String>,
    pub storage: StreamStorage,
    /// Oldest messages are discarded past this; `None` = unlimited.
    pub max_bytes: Option<u64>,
    /// Messages older than this are discarded; `None` = kept forever.
    pub max_age: Option<Duration>,
    /// How long the stream remembers a `Nats-Msg-Id` to drop a resend.
    pub duplicate_window: Duration,
}

impl StreamSpec {
    pub fn new(name: impl Into<String>) -> Self {
        StreamSpec {
            name: name.into(),
            subjects: Vec::new(),
            storage: StreamStorage::File,
            max_bytes: None,
            max_age: None,
            duplicate_window: Duration::from_secs(120),
        }
    }
}

/// Why connecting, creating a stream or reading failed.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("nats: invalid configuration: {0}")]
    Config(String),
    #[error("nats: cannot read credentials file {path}: {source}")]
    Credentials {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("nats: cannot connect to {servers}: {source}")]
    Connect {
        /// The server URLs with any user info removed.
        servers: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("nats: stream {name}: {reason}")]
    Stream { name: String, reason: String },
    #[error("nats: cannot subscribe to {subject}: {reason}")]
    Subscribe { subject: String, reason: String },
    #[error("nats: reading failed: {0}")]
    Read(String),
}

/// `nats://user:pass@host:4222` → `nats://***@host:4222`, for logs and errors.
fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let host_end = rest.find('/').unwrap_or(rest.len());
    match rest[..host_end].rfind('@') {
        Some(at) => format!("{scheme}***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

pub(crate) fn redact_servers(servers: &[String]) -> String {
    servers
        .iter()
        .map(|s| redact_url(s))
        .collect::<Vec<_>>()
        .join(",")
}

/// Connect with the given settings; the client reconnects by itself after that (forever, with
/// a backoff of up to 4 s), resubscribing and replaying what was queued meanwhile.
///
/// # Errors
/// No server reachable within the timeout, authentication refused, TLS failure, an
/// unreadable credentials file, or a client certificate without its key.
pub async fn connect(cfg: &NatsConnection) -> Result<Client, NatsError> {
    if cfg.servers.is_empty() {
        return Err(NatsError::Config("no servers given".into()));
    }
    let mut opts = match &cfg.auth {
        NatsAuth::None => ConnectOptions::new(),
        NatsAuth::Token(t) => ConnectOptions::with_token(t.expose().to_owned()),
        NatsAuth::UserPassword { user, password } => {
            ConnectOptions::with_user_and_password(user.clone(), password.expose().to_owned())
        }
        NatsAuth::CredentialsFile(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|source| NatsError::Credentials {
                path: path.clone(),
                source,
            })?,
        NatsAuth::NkeySeed(seed) => ConnectOptions::with_nkey(seed.expose().to_owned()),
    };
    if let Some(ca) = &cfg.tls.ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    match (&cfg.tls.client_cert, &cfg.tls.client_key) {
        (Some(cert), Some(key)) => opts = opts.add_client_certificate(cert.clone(), key.clone()),
        (None, None) => {}
        _ => {
            return Err(NatsError::Config(
                "tls client_cert and client_key go together".into(),
            ));
        }
    }
    if cfg.tls.require {
        opts = opts.require_tls(true);
    }
    if cfg.tls.handshake_first {
        opts = opts.tls_first();
    }
    if let Some(name) = &cfg.name {
        opts = opts.name(name);
    }
    let servers = redact_servers(&cfg.servers);
    let label = servers.clone();
    opts = opts
        .connection_timeout(cfg.connect_timeout)
        .request_timeout(Some(cfg.request_timeout))
        .event_callback(move |event| {
            let servers = label.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!(%servers, "nats connected");
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!(%servers, "nats disconnected; reconnecting");
                    }
                    other => tracing::warn!(%servers, event = %other, "nats event"),
                }
            }
        });
    let addrs: Vec<async_nats::ServerAddr> = cfg
        .servers
        .iter()
        .map(|s| {
            s.parse()
                .map_err(|e| NatsError::Config(format!("server address `{}`: {e}", redact_url(s))))
        })
        .collect::<Result<_, _>>()?;
    opts.connect(addrs)
        .await
        .map_err(|source| NatsError::Connect {
            servers,
            source: Box::new(source),
        })
}

/// Create the stream `spec` describes, capturing `subjects`, unless a stream of that name
/// exists (which is used as it is: its configuration is not changed).
///
/// # Errors
/// The stream cannot be looked up or created (JetStream disabled, a subject overlap, limits).
pub async fn ensure_stream(
    js: &jetstream::Context,
    spec: &StreamSpec,
    subjects: Vec<String>,
) -> Result<(), NatsError> {
    let config = stream::Config {
        name: spec.name.clone(),
        subjects,
        storage: match spec.storage {
            StreamStorage::File => stream::StorageType::File,
            StreamStorage::Memory => stream::StorageType::Memory,
        },
        max_bytes: spec
            .max_bytes
            .map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
        max_age: spec.max_age.unwrap_or(Duration::ZERO),
        duplicate_window: spec.duplicate_window,
        ..Default::default()
    };
    js.get_or_create_stream(config)
        .await
        .map(|_| ())
        .map_err(|e| NatsError::Stream {
            name: spec.name.clone(),
            reason: e.to_string(),
        })
}

/// Where a JetStream reader starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamStart {
    /// The oldest message the stream holds.
    #[default]
    First,
    /// The newest message of each subject, then everything after it.
    Last,
    /// Only messages stored after the reader starts.
    New,
    /// This stream sequence and after.
    Sequence(u64),
}

/// One message read by a [`NatsReader`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsMessage {
    pub subject: String,
    /// Every header value, names as sent (order across names is not preserved by NATS).
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
    /// The JetStream stream sequence; `None` for core NATS.
    pub stream_sequence: Option<u64>,
}

impl NatsMessage {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads messages from a core subscription or an ordered JetStream consumer.
pub struct NatsReader {
    inner: ReaderInner,
    /// JetStream: end after the message that leaves nothing pending (see
    /// [`NatsReader::stop_at_end`]).
    stop_at_end: bool,
    /// The last message read left nothing pending.
    at_end: bool,
}

enum ReaderInner {
    Core(async_nats::Subscriber),
    JetStream(Box<consumer::pull::Ordered>),
}

fn message_headers(map: Option<&HeaderMap>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(map) = map {
        for (name, values) in map.iter() {
            for v in values {
                out.push((name.to_string(), v.as_str().to_owned()));
            }
        }
    }
    out
}

impl NatsReader {
    /// Subscribe to a core NATS subject (wildcards allowed). Sees only what is published
    /// after the subscription reached the server.
    ///
    /// # Errors
    /// The subject is invalid or the client is closed.
    pub async fn subscribe(client: &Client, subject: &str) -> Result<NatsReader, NatsError> {
        let sub = client
            .subscribe(subject.to_owned())
            .await
            .map_err(|e| NatsError::Subscribe {
                subject: subject.into(),
                reason: e.to_string(),
            })?;
        // Make sure the SUB reached the server before the caller publishes.
        client.flush().await.map_err(|e| NatsError::Subscribe {
            subject: subject.into(),
            reason: e.to_string(),
        })?;
        Ok(NatsReader {
            inner: ReaderInner::Core(sub),
            stop_at_end: false,
            at_end: false,
        })
    }

    /// Read a JetStream stream through an ordered, ephemeral consumer (no acks, recreated by
    /// the client on a gap), optionally filtered by subject.
    ///
    /// # Errors
    /// The stream does not exist or the consumer cannot be created.
    pub async fn jetstream(
        client: &Client,
        stream: &str,
        filter: Option<&str>,
        start: StreamStart,
    ) -> Result<NatsReader, NatsError> {
        let err = |reason: String| NatsError::Stream {
            name: stream.into(),
            reason,
        };
        let js = jetstream::new(client.clone());
        let handle = js
            .get_stream(stream)
            .await
            .map_err(|e| err(e.to_string()))?;
        let deliver_policy = match start {
            StreamStart::First => consumer::DeliverPolicy::All,
            StreamStart::Last => consumer::DeliverPolicy::LastPerSubject,
            StreamStart::New => consumer::DeliverPolicy::New,
            StreamStart::Sequence(start_sequence) => {
                consumer::DeliverPolicy::ByStartSequence { start_sequence }
            }
        };
        let consumer = handle
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter.unwrap_or_default().to_owned(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| err(e.to_string()))?;
        let pending_at_start = consumer.cached_info().num_pending;
        let messages = consumer.messages().await.map_err(|e| err(e.to_string()))?;
        Ok(NatsReader {
            inner: ReaderInner::JetStream(Box::new(messages)),
            stop_at_end: false,
            at_end: pending_at_start == 0,
        })
    }

    /// JetStream: end ([`NatsReader::next`] gives `None`) at the end of the stream: after the
    /// message that leaves the consumer nothing pending, or at once if the stream (or the
    /// filter) holds nothing from the start position. Core NATS has no end; this changes
    /// nothing there.
    #[must_use]
    pub fn stop_at_end(mut self) -> NatsReader {
        self.stop_at_end = matches!(self.inner, ReaderInner::JetStream(_));
        self
    }

    /// The next message; `None` when the subscription ended.
    ///
    /// # Errors
    /// The ordered consumer failed beyond what the client repairs by itself.
    pub async fn next(&mut self) -> Option<Result<NatsMessage, NatsError>> {
        if self.stop_at_end && self.at_end {
            return None;
        }
        match &mut self.inner {
            ReaderInner::Core(sub) => sub.next().await.map(|m| {
                Ok(NatsMessage {
                    subject: m.subject.to_string(),
                    headers: message_headers(m.headers.as_ref()),
                    payload: m.payload,
                    stream_sequence: None,
                })
            }),
            ReaderInner::JetStream(messages) => Some(match messages.next().await? {
                Ok(m) => {
                    let info = m.info().ok();
                    let stream_sequence = info.as_ref().map(|i| i.stream_sequence);
                    self.at_end = info.is_some_and(|i| i.pending == 0);
                    let m = m.message;
                    Ok(NatsMessage {
                        subject: m.subject.to_string(),
                        headers: message_headers(m.headers.as_ref()),
                        payload: m.payload,
                        stream_sequence,
                    })
                }
                Err(e) => Err(NatsError::Read(e.to_string())),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_urls_are_redacted() {
        let auth = NatsAuth::UserPassword {
            user: "u".into(),
            password: Secret::new("hunter2"),
        };
        assert!(!format!("{auth:?}").contains("hunter2"));
        assert!(!format!("{:?}", NatsAuth::NkeySeed(Secret::new("SUAXYZ"))).contains("SUAXYZ"));
        assert_eq!(
            redact_url("nats://user:pw@host:4222"),
            "nats://***@host:4222"
        );
        assert_eq!(redact_url("tls://host:4222"), "tls://host:4222");
        assert_eq!(redact_url("tok@host"), "***@host");
    }
}
