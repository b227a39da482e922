//! The Kafka sink. Client settings (brokers, TLS, SASL) and reading back live in
//! [`crate::broker::kafka`].
//!
//! Owns: the librdkafka producer (idempotent, `acks=all`, always), topic names from the
//! record headers, the mapping of Kafka errors onto [`SinkError`], and creating missing topics
//! on request.
//!
//! "Sent" means acknowledged: the [`Delivery`] of a record resolves `Ok` only when its
//! delivery report says the partition leader and its in-sync replicas have it (`acks=all`).
//! librdkafka retries transient failures itself (idempotently, so without reordering or
//! duplicates inside one producer session) until `message.timeout.ms`; only what it gives up
//! on reaches the driver, which then rewinds the spool.
//!
//! Error mapping: what is wrong with *this record* (too large, invalid topic name, rejected by
//! the broker's record validation or policy) is [`SinkError::Permanent`], so the driver drops
//! it and goes on. Everything else (timeouts, broker down, leader elections, full queues,
//! unknown topics, and misconfiguration that affects every record, authorization included) is
//! [`SinkError::Retriable`]: the records stay in the spool until the cause is fixed, which
//! loses nothing. An ACL that does not let amibus write a topic is such a misconfiguration:
//! it refuses every record, and treating it as permanent acknowledged the whole spool away.
//!
//! Topics: a record goes to `expand_template(topic, record)`. With `create_topics`, the sink
//! creates each topic the first time it sends to it (an existing topic is left as it is);
//! otherwise topics must exist (records for a missing one are retried, not dropped).
//!
//! Must never: weaken `acks`/idempotence, log a password, or block the runtime (flushing runs
//! on a blocking thread; a full local queue is waited on asynchronously).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

use super::{Delivery, Record, Sink, SinkError, expand_template};
use crate::broker::kafka::{KafkaConfigError, KafkaConnection, TracingContext, is_record_error};
use crate::spool;

/// Producer properties the sink always sets, with the only values it accepts for them.
const ENFORCED: &[(&str, &[&str])] = &[
    ("acks", &["all", "-1"]),
    ("request.required.acks", &["all", "-1"]),
    ("enable.idempotence", &["true"]),
];

/// Properties that have a typed setting; the pass-through map may not set them too.
const TYPED: &[(&str, &str)] = &[
    ("bootstrap.servers", "brokers"),
    ("metadata.broker.list", "brokers"),
    ("compression.type", "compression"),
    ("compression.codec", "compression"),
    ("linger.ms", "linger"),
    ("queue.buffering.max.ms", "linger"),
    ("batch.size", "batch_bytes"),
    ("message.timeout.ms", "message_timeout"),
    ("delivery.timeout.ms", "message_timeout"),
    ("security.protocol", "tls / sasl"),
    ("ssl.ca.location", "tls.ca_file"),
    ("ssl.certificate.location", "tls.cert_file"),
    ("ssl.key.location", "tls.key_file"),
    ("sasl.mechanism", "sasl.mechanism"),
    ("sasl.mechanisms", "sasl.mechanism"),
    ("sasl.username", "sasl.username"),
    ("sasl.password", "sasl.password"),
];

/// How long `send` sleeps before retrying when librdkafka's local queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);

/// Batch compression. lz4 is the default: cheap on CPU, and AMI text compresses well.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    #[default]
    Lz4,
    Zstd,
}

impl Compression {
    /// The librdkafka name (`compression.type`).
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Compression::None),
            "gzip" => Ok(Compression::Gzip),
            "snappy" => Ok(Compression::Snappy),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            other => Err(format!(
                "unknown compression {other:?} (none, gzip, snappy, lz4, zstd)"
            )),
        }
    }
}

/// How the sink creates a topic it has not seen yet (see [`KafkaSinkConfig::create_topics`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewTopics {
    /// Partitions of a created topic. Explicit, because some Kafka-protocol brokers (tansu)
    /// do not understand -1 ("broker default") and would create a topic with no partitions.
    pub partitions: i32,
    /// Replication factor; -1 means the broker's default.
    pub replication: i32,
    /// Topic-level configs (`retention.ms`, `max.message.bytes`, ...).
    pub configs: BTreeMap<String, String>,
}

impl Default for NewTopics {
    fn default() -> Self {
        NewTopics {
            partitions: 6,
            replication: -1,
            configs: BTreeMap::new(),
        }
    }
}

/// Settings of the [`KafkaSink`]. `acks=all` and `enable.idempotence=true` are not settings:
/// they are always on.
///
/// ```
/// use amibus::sink::kafka::{Compression, KafkaSinkConfig};
/// let cfg = KafkaSinkConfig {
///     topic: "ami.{server}.{class}".into(),
///     compression: Compression::Zstd,
///     ..KafkaSinkConfig::new("kafka-1:9092,kafka-2:9092")
/// };
/// assert!(cfg.client_config().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaSinkConfig {
    pub connection: KafkaConnection,
    /// The topic of a record, with `{server}`, `{event}`, `{class}` (any header) placeholders.
    pub topic: String,
    pub compression: Compression,
    /// `linger.ms`: how long a batch waits for more records.
    pub linger: Duration,
    /// `batch.size` in bytes.
    pub batch_bytes: u32,
    /// `message.timeout.ms`: how long librdkafka retries a record before reporting it failed
    /// (the driver then rewinds and sends it again).
    pub message_timeout: Duration,
    /// Create a topic on first use when it does not exist yet. Off by default: production
    /// clusters usually manage topics, and `auto.create.topics.enable` on the broker is
    /// another way.
    pub create_topics: Option<NewTopics>,
    /// Any other librdkafka producer property, passed through as is.
    pub properties: BTreeMap<String, String>,
}

impl KafkaSinkConfig {
    /// Defaults for everything but the brokers.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaSinkConfig {
            connection: KafkaConnection {
                brokers: brokers.into(),
                tls: None,
                sasl: None,
            },
            topic: "ami.events".into(),
            compression: Compression::Lz4,
            linger: Duration::from_millis(5),
            batch_bytes: 1 << 20,
            message_timeout: Duration::from_secs(30),
            create_topics: None,
            properties: BTreeMap::new(),
        }
    }

    /// The librdkafka configuration, after checking every setting.
    ///
    /// # Errors
    /// Every problem found, each with the name of its setting: no brokers, an empty topic,
    /// a pass-through property that would weaken `acks`/idempotence or duplicate a typed
    /// setting, incomplete TLS or SASL settings.
    pub fn client_config(&self) -> Result<ClientConfig, KafkaConfigError> {
        let mut problems = Vec::new();
        if self.topic.trim().is_empty() {
            problems.push("kafka.topic: must not be empty".to_string());
        }
        if self.batch_bytes == 0 {
            problems.push("kafka.batch_bytes: must be at least 1".to_string());
        }
        if self.message_timeout.is_zero() {
            problems.push(
                "kafka.message_timeout: 0 would retry forever and never report a failure"
                    .to_string(),
            );
        }
        if let Some(t) = &self.create_topics {
            if t.partitions < 1 || t.replication == 0 || t.replication < -1 {
                problems.push(format!(
                    "kafka.create_topics: partitions must be at least 1 (got {}) and \
                     replication -1 (broker default) or at least 1 (got {})",
                    t.partitions, t.replication
                ));
            }
        }
        for (key, value) in &self.properties {
            if let Some((_, allowed)) = ENFORCED.iter().find(|(k, _)| k == key) {
                if !allowed.contains(&value.as_str()) {
                    problems.push(format!(
                        "kafka.properties.\"{key}\": amibus always produces with acks=all and \
                         enable.idempotence=true (\"sent\" means the broker acknowledged it); \
                         remove this property"
                    ));
                }
            } else if let Some((_, typed)) = TYPED.iter().find(|(k, _)| k == key) {
                problems.push(format!(
                    "kafka.properties.\"{key}\": use the `{typed}` setting instead"
                ));
            }
        }
        let mut cc = ClientConfig::new();
        self.connection.apply(&mut cc, &mut problems);
        if !problems.is_empty() {
            return Err(KafkaConfigError { problems });
        }
        cc.set("acks", "all")
            .set("enable.idempotence", "true")
            .set("compression.type", self.compression.as_str())
            .set("linger.ms", self.linger.as_millis().to_string())
            .set("batch.size", self.batch_bytes.to_string())
            .set(
                "message.timeout.ms",
                self.message_timeout.as_millis().max(1).to_string(),
            );
        for (key, value) in &self.properties {
            cc.set(key, value);
        }
        Ok(cc)
    }
}

/// Whether a Kafka error is about the record itself (permanent) or about the moment
/// (retriable). See the module docs.
pub fn classify(e: &KafkaError) -> SinkError {
    if e.rdkafka_error_code().is_some_and(is_record_error) {
        SinkError::Permanent(e.to_string())
    } else {
        SinkError::Retriable(e.to_string())
    }
}

/// See the module docs.
pub struct KafkaSink {
    cfg: KafkaSinkConfig,
    client_config: ClientConfig,
    producer: FutureProducer<TracingContext>,
    admin: Option<AdminClient<TracingContext>>,
    /// Topics known to exist (only tracked with `create_topics`).
    created: HashSet<String>,
    /// The topic when the template has no placeholder, so no per-record expansion.
    fixed_topic: Option<String>,
}

impl KafkaSink {
    /// Check the settings and create the producer (it connects in the background).
    ///
    /// # Errors
    /// The settings are invalid, or librdkafka rejects a property.
    pub fn new(cfg: KafkaSinkConfig) -> Result<KafkaSink, KafkaConfigError> {
        let client_config = cfg.client_config()?;
        let producer = client_config
            .create_with_context(TracingContext)
            .map_err(KafkaConfigError::client)?;
        let admin = match &cfg.create_topics {
            Some(_) => Some(admin_client(&cfg.connection, &cfg.properties)?),
            None => None,
        };
        let fixed_topic = (!cfg.topic.contains('{')).then(|| cfg.topic.clone());
        Ok(KafkaSink {
            cfg,
            client_config,
            producer,
            admin,
            created: HashSet::new(),
            fixed_topic,
        })
    }

    /// The settings this sink runs with.
    pub fn config(&self) -> &KafkaSinkConfig {
        &self.cfg
    }

    /// Records handed to librdkafka and not yet reported on.
    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }

    /// Create `topic` if it does not exist yet (only with `create_topics`).
    async fn ensure_topic(&mut self, topic: &str) -> Result<(), SinkError> {
        let (Some(admin), Some(spec)) = (&self.admin, &self.cfg.create_topics) else {
            return Ok(());
        };
        if self.created.contains(topic) {
            return Ok(());
        }
        let mut new = NewTopic::new(
            topic,
            spec.partitions,
            TopicReplication::Fixed(spec.replication),
        );
        for (k, v) in &spec.configs {
            new = new.set(k, v);
        }
        let opts = AdminOptions::new().operation_timeout(Some(self.cfg.message_timeout));
        let results = admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| SinkError::Retriable(format!("creating topic {topic}: {e}")))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    // InvalidTopic and the like are about this record's topic name.
                    let why = format!("creating topic {name}: {code}");
                    return Err(if is_record_error(code) {
                        SinkError::Permanent(why)
                    } else {
                        SinkError::Retriable(why)
                    });
                }
            }
        }
        tracing::info!(topic, "kafka topic ready");
        self.created.insert(topic.to_owned());
        Ok(())
    }

    /// An idempotent producer that hit a fatal error (fenced, sequence gap) accepts nothing
    /// more; replace it. Its unreported records fail and are resent by the driver.
    fn replace_if_fatal(&mut self) -> Result<(), SinkError> {
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            tracing::error!(%code, reason, "kafka producer failed fatally; starting a new one");
            self.producer = self
                .client_config
                .create_with_context(TracingContext)
                .map_err(|e| SinkError::Retriable(format!("recreating the producer: {e}")))?;
        }
        Ok(())
    }
}

fn admin_client(
    connection: &KafkaConnection,
    properties: &BTreeMap<String, String>,
) -> Result<AdminClient<TracingContext>, KafkaConfigError> {
    let mut cc = ClientConfig::new();
    let mut problems = Vec::new();
    connection.apply(&mut cc, &mut problems);
    if !problems.is_empty() {
        return Err(KafkaConfigError { problems });
    }
    // Connection-level pass-through properties (ssl.*, sasl.*, socket.*) apply to the admin
    // client too; producer-only ones would be warned about by librdkafka, so leave them out.
    for (k, v) in properties {
        if k.starts_with("ssl.")
            || k.starts_with("sasl.")
            || k.starts_with("socket.")
            || k == "client.id"
            || k == "broker.address.family"
        {
            cc.set(k, v);
        }
    }
    cc.create_with_context(TracingContext)
        .map_err(KafkaConfigError::client)
}

/// The record's bus headers (rdkafka copies each value).
fn owned_headers(record: &Record) -> OwnedHeaders {
    let mut headers = Some(OwnedHeaders::new_with_capacity(spool::HEADER_NAMES.len()));
    record.meta.each_header(|key, value| {
        headers = headers.take().map(|h| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        });
    });
    headers.unwrap_or_default()
}

impl Sink for KafkaSink {
    fn name(&self) -> &'static str {
        "kafka"
    }

    async fn send(&mut self, record: &Record) -> Result<Delivery, SinkError> {
        self.replace_if_fatal()?;
        let topic = match &self.fixed_topic {
            Some(t) => t.clone(),
            None => expand_template(&self.cfg.topic, record),
        };
        self.ensure_topic(&topic).await?;
        let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic)
            .payload(record.payload.as_ref())
            .headers(owned_headers(record));
        if !record.key.is_empty() {
            fr = fr.key(record.key.as_ref());
        }
        let delivery = loop {
            match self.producer.send_result(fr) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The local queue is bounded (queue.buffering.max.*); wait for room.
                    fr = back;
                    tokio::time::sleep(QUEUE_FULL_WAIT).await;
                }
                Err((e, _)) => return Err(classify(&e)),
            }
        };
        Ok(Box::pin(async move {
            match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(classify(&e)),
                Err(_canceled) => Err(SinkError::Retriable(
                    "kafka producer closed before the delivery report".into(),
                )),
            }
        }))
    }

    async fn flush(&mut self, deadline: Duration) -> Result<(), SinkError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(deadline))
            .await
            .map_err(|e| SinkError::Retriable(format!("flush task: {e}")))?
            .map_err(|e| SinkError::Retriable(format!("flush: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::kafka::{KafkaSasl, KafkaTls, Secret};

    #[test]
    fn acks_and_idempotence_cannot_be_weakened() {
        let mut cfg = KafkaSinkConfig::new("localhost:9092");
        cfg.properties.insert("acks".into(), "1".into());
        cfg.properties
            .insert("enable.idempotence".into(), "false".into());
        cfg.properties.insert("linger.ms".into(), "100".into());
        cfg.topic.clear();
        let err = cfg.client_config().expect_err("rejected");
        assert_eq!(err.problems.len(), 4, "{err}");
        let text = err.to_string();
        assert!(text.contains("kafka.properties.\"acks\""), "{text}");
        assert!(text.contains("kafka.properties.\"enable.idempotence\""));
        assert!(text.contains("use the `linger` setting"));
        assert!(text.contains("kafka.topic"));
    }

    #[test]
    fn restating_the_enforced_values_is_allowed() {
        let mut cfg = KafkaSinkConfig::new("localhost:9092");
        cfg.properties.insert("acks".into(), "all".into());
        cfg.properties
            .insert("enable.idempotence".into(), "true".into());
        cfg.properties.insert("client.id".into(), "amibus".into());
        let cc = cfg.client_config().expect("valid");
        assert_eq!(cc.get("acks"), Some("all"));
        assert_eq!(cc.get("enable.idempotence"), Some("true"));
        assert_eq!(cc.get("compression.type"), Some("lz4"));
        assert_eq!(cc.get("client.id"), Some("amibus"));
    }

    #[test]
    fn the_password_is_never_printed() {
        let mut cfg = KafkaSinkConfig::new("localhost:9092");
        cfg.connection.sasl = Some(KafkaSasl {
            mechanism: "scram-sha-512".parse().expect("mechanism"),
            username: "amibus".into(),
            password: Secret::new("hunter2"),
        });
        cfg.connection.tls = Some(KafkaTls::default());
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("[redacted]"));
        let cc = cfg.client_config().expect("valid");
        assert_eq!(cc.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(cc.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(cc.get("sasl.password"), Some("hunter2"));
    }

    #[test]
    fn librdkafka_rejects_unknown_properties_at_creation() {
        let mut cfg = KafkaSinkConfig::new("localhost:9092");
        cfg.properties.insert("no.such.property".into(), "1".into());
        let err = KafkaSink::new(cfg).err().expect("rejected");
        assert!(
            err.to_string().contains("no.such.property"),
            "{}",
            err.problems.join(";")
        );
    }

    #[test]
    fn errors_about_the_record_are_permanent() {
        use RDKafkaErrorCode as C;
        for code in [
            C::MessageSizeTooLarge,
            C::InvalidTopic,
            C::MessageBatchTooLarge,
        ] {
            assert!(!classify(&KafkaError::MessageProduction(code)).is_retriable());
        }
        for code in [
            C::MessageTimedOut,
            C::BrokerTransportFailure,
            C::AllBrokersDown,
            C::LeaderNotAvailable,
            C::NotLeaderForPartition,
            C::RequestTimedOut,
            C::QueueFull,
            C::UnknownTopicOrPartition,
            C::NotEnoughReplicas,
            // An ACL mistake refuses every record: they wait in the spool until it is fixed.
            C::TopicAuthorizationFailed,
            C::ClusterAuthorizationFailed,
        ] {
            assert!(classify(&KafkaError::MessageProduction(code)).is_retriable());
        }
    }

    #[test]
    fn compression_names() {
        for c in ["none", "gzip", "snappy", "lz4", "zstd"] {
            assert_eq!(c.parse::<Compression>().expect("known").as_str(), c);
        }
        assert!("brotli".parse::<Compression>().is_err());
    }
}
