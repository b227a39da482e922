//! Kafka client settings and a reader, shared by the Kafka sink, the action consumer,
//! `amibus tail` and the tests.
//!
//! Owns: where the brokers are and how to reach them ([`KafkaConnection`]: TLS, SASL) as
//! librdkafka properties, which error codes are about a record itself
//! ([`is_record_error`]), librdkafka's log lines in `tracing` ([`TracingContext`]), and
//! [`KafkaReader`], a group consumer that reads messages back.
//!
//! Must never: log a password (it is a [`Secret`], redacted in `Debug`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::Bytes;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;

pub use crate::secret::Secret;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SaslMechanism {
    #[default]
    Plain,
    ScramSha256,
    ScramSha512,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

impl std::str::FromStr for SaslMechanism {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "PLAIN" => Ok(SaslMechanism::Plain),
            "SCRAM-SHA-256" => Ok(SaslMechanism::ScramSha256),
            "SCRAM-SHA-512" => Ok(SaslMechanism::ScramSha512),
            _ => Err(format!(
                "unknown SASL mechanism {s:?} (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)"
            )),
        }
    }
}

/// SASL authentication. The password is a [`Secret`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaSasl {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: Secret,
}

/// Where the brokers are and how to reach them; shared by the sink and the source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaConnection {
    /// `host:port[,host:port...]`
    pub brokers: String,
    pub tls: Option<KafkaTls>,
    pub sasl: Option<KafkaSasl>,
}

impl KafkaConnection {
    /// Set the connection properties on `cc`; problems are added to `problems`.
    pub fn apply(&self, cc: &mut ClientConfig, problems: &mut Vec<String>) {
        if self.brokers.trim().is_empty() {
            problems.push("kafka.brokers: at least one host:port is needed".to_string());
        }
        cc.set("bootstrap.servers", &self.brokers);
        let protocol = match (&self.tls, &self.sasl) {
            (None, None) => "plaintext",
            (Some(_), None) => "ssl",
            (None, Some(_)) => "sasl_plaintext",
            (Some(_), Some(_)) => "sasl_ssl",
        };
        cc.set("security.protocol", protocol);
        if let Some(tls) = &self.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                problems.push(
                    "kafka.tls: a client certificate needs both cert_file and key_file".to_string(),
                );
            }
            for (key, path) in [
                ("ssl.ca.location", &tls.ca_file),
                ("ssl.certificate.location", &tls.cert_file),
                ("ssl.key.location", &tls.key_file),
            ] {
                if let Some(path) = path {
                    cc.set(key, path.to_string_lossy());
                }
            }
        }
        if let Some(sasl) = &self.sasl {
            if sasl.username.is_empty() {
                problems.push("kafka.sasl.username: must not be empty".to_string());
            }
            cc.set("sasl.mechanism", sasl.mechanism.as_str())
                .set("sasl.username", &sasl.username)
                .set("sasl.password", sasl.password.expose());
        }
    }
}

/// Kafka settings that cannot work; lists every problem found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid Kafka configuration: {}", .problems.join("; "))]
pub struct KafkaConfigError {
    pub problems: Vec<String>,
}

impl KafkaConfigError {
    /// librdkafka refused a property at client creation.
    pub fn client(e: KafkaError) -> Self {
        KafkaConfigError {
            problems: vec![match e {
                KafkaError::ClientConfig(_, desc, key, _) => {
                    format!("kafka.properties.\"{key}\": {desc}")
                }
                other => other.to_string(),
            }],
        }
    }
}

/// Whether an error code says something is wrong with the record itself (or its topic name),
/// so sending it again cannot help.
pub fn is_record_error(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::MessageBatchTooLarge
            | C::InvalidTopic
            | C::InvalidRecord
            | C::InvalidTimestamp
            | C::PolicyViolation
            | C::KeySerialization
            | C::ValueSerialization
    )
}

/// Forwards librdkafka's log lines and client errors to `tracing`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TracingContext;

impl ClientContext for TracingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(facility = fac, "librdkafka: {log_message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "librdkafka: {log_message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(facility = fac, "librdkafka: {log_message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(facility = fac, "librdkafka: {log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Broker-down and similar transient states are reported here too; the delivery
        // reports carry the consequences, so this stays at warn.
        tracing::warn!(error = %error, "kafka client: {reason}");
    }
}

impl ConsumerContext for TracingContext {}

/// Settings of a [`KafkaReader`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaReaderConfig {
    pub connection: KafkaConnection,
    pub topics: Vec<String>,
    /// The consumer group; a new group starts at the earliest offset.
    pub group_id: String,
    /// Any other librdkafka consumer property.
    pub properties: BTreeMap<String, String>,
}

impl KafkaReaderConfig {
    pub fn new(brokers: impl Into<String>, group_id: impl Into<String>) -> Self {
        KafkaReaderConfig {
            connection: KafkaConnection {
                brokers: brokers.into(),
                tls: None,
                sasl: None,
            },
            topics: Vec::new(),
            group_id: group_id.into(),
            properties: BTreeMap::new(),
        }
    }
}

/// One record read back, with where it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Empty when the message has none.
    pub key: Bytes,
    /// Every header in the order sent; a header without a value has an empty one.
    pub headers: Vec<(String, Bytes)>,
    pub payload: Bytes,
}

impl KafkaMessage {
    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

/// Why reading failed.
#[derive(Debug, thiserror::Error)]
#[error("kafka read: {0}")]
pub struct KafkaReadError(#[from] KafkaError);

/// Reads records from Kafka topics as a group member, from the earliest offset for a new
/// group; offsets are committed automatically. For `amibus tail` and tests.
pub struct KafkaReader {
    consumer: StreamConsumer<TracingContext>,
}

impl KafkaReader {
    /// Create the consumer and subscribe.
    ///
    /// # Errors
    /// Invalid settings, no topics, or librdkafka rejects a property.
    pub fn new(cfg: &KafkaReaderConfig) -> Result<KafkaReader, KafkaConfigError> {
        let mut problems = Vec::new();
        if cfg.topics.is_empty() {
            problems.push("kafka.topics: at least one topic is needed".to_string());
        }
        if cfg.group_id.is_empty() {
            problems.push("kafka.group_id: must not be empty".to_string());
        }
        let mut cc = ClientConfig::new();
        cfg.connection.apply(&mut cc, &mut problems);
        if !problems.is_empty() {
            return Err(KafkaConfigError { problems });
        }
        cc.set("group.id", &cfg.group_id)
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false");
        for (k, v) in &cfg.properties {
            cc.set(k, v);
        }
        let consumer: StreamConsumer<TracingContext> = cc
            .create_with_context(TracingContext)
            .map_err(KafkaConfigError::client)?;
        let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(KafkaConfigError::client)?;
        Ok(KafkaReader { consumer })
    }

    /// The next record.
    ///
    /// # Errors
    /// A consume error reported by librdkafka (the consumer stays usable).
    pub async fn recv(&self) -> Result<KafkaMessage, KafkaReadError> {
        let m = self.consumer.recv().await?;
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            Bytes::copy_from_slice(h.value.unwrap_or_default()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(KafkaMessage {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(Bytes::copy_from_slice).unwrap_or_default(),
            headers,
            payload: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
        })
    }
}
