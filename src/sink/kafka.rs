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
//! Delivery reports: a record is numbered when it is handed over (the number is librdkafka's
//! per-message opaque, so nothing is allocated for it), and the report, which arrives on the
//! producer's polling thread, resolves that number's slot ([`super::slots`]); the record's
//! [`Delivery`] reads it. The driver polls only the oldest delivery, so a report wakes it only
//! when it is for the number it waits on.
//!
//! Must never: weaken `acks`/idempotence, log a password, or block the runtime (flushing runs
//! on a blocking thread; a full local queue is waited on asynchronously).

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;

use super::slots::Slots;
use super::{Delivery, Record, Sink, SinkError, expand_template};
use crate::broker::kafka::{KafkaConfigError, KafkaConnection, TracingContext, is_record_error};
use crate::spool;

// A record's number travels as librdkafka's `void *` opaque.
const _: () = assert!(
    usize::BITS >= u64::BITS,
    "record numbers must fit a pointer"
);

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
        if let Some(t) = &self.create_topics
            && (t.partitions < 1 || t.replication == 0 || t.replication < -1)
        {
            problems.push(format!(
                "kafka.create_topics: partitions must be at least 1 (got {}) and \
                     replication -1 (broker default) or at least 1 (got {})",
                t.partitions, t.replication
            ));
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

/// The outcomes of the records handed to librdkafka, shared with its delivery reports.
#[derive(Default)]
struct Reports {
    slots: Slots<Result<(), SinkError>>,
    /// The delivery waiting for its number's report (the driver polls only the oldest).
    waiting: Vec<(u64, Waker)>,
}

fn lock(reports: &Mutex<Reports>) -> MutexGuard<'_, Reports> {
    // Nothing that holds the lock can leave the slots half-changed.
    reports.lock().unwrap_or_else(|p| p.into_inner())
}

/// Resolve record `n` and wake whoever waits for it.
fn report(reports: &Mutex<Reports>, n: u64, outcome: Result<(), SinkError>) {
    let woken = {
        let mut r = lock(reports);
        if !r.slots.resolve(n, outcome) {
            return;
        }
        r.waiting
            .iter()
            .position(|(m, _)| *m == n)
            .map(|i| r.waiting.swap_remove(i).1)
    };
    if let Some(w) = woken {
        w.wake();
    }
}

/// The producer's context: librdkafka's log in `tracing`, delivery reports into [`Reports`].
struct ReportingContext {
    reports: Arc<Mutex<Reports>>,
}

impl ClientContext for ReportingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        TracingContext.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        TracingContext.error(error, reason);
    }
}

impl ProducerContext for ReportingContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, n: usize) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(classify(e)),
        };
        report(&self.reports, n as u64, outcome);
    }
}

type KafkaProducer = ThreadedProducer<ReportingContext>;

/// One record's [`Delivery`]: its slot's outcome once the report came.
struct Reported {
    reports: Arc<Mutex<Reports>>,
    n: u64,
    /// The outcome was read (or the number let go): nothing to give up on drop.
    done: bool,
}

impl Future for Reported {
    type Output = Result<(), SinkError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut r = lock(&self.reports);
        if let Some(outcome) = r.slots.take(self.n) {
            drop(r);
            self.done = true;
            return Poll::Ready(outcome);
        }
        let n = self.n;
        match r.waiting.iter_mut().find(|(m, _)| *m == n) {
            Some((_, w)) if w.will_wake(cx.waker()) => {}
            Some((_, w)) => w.clone_from(cx.waker()),
            None => r.waiting.push((n, cx.waker().clone())),
        }
        Poll::Pending
    }
}

/// A delivery dropped unread (the driver gave up on it, or shut down, or the hand-off was
/// cancelled) lets its number go, or every slot behind it would be kept.
impl Drop for Reported {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut r = lock(&self.reports);
        r.slots.abandon(self.n);
        let n = self.n;
        r.waiting.retain(|(m, _)| *m != n);
    }
}

/// See the module docs.
pub struct KafkaSink {
    cfg: KafkaSinkConfig,
    client_config: ClientConfig,
    producer: KafkaProducer,
    reports: Arc<Mutex<Reports>>,
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
        let reports = Arc::new(Mutex::new(Reports::default()));
        let producer = producer(&client_config, &reports).map_err(KafkaConfigError::client)?;
        let admin = match &cfg.create_topics {
            Some(_) => Some(admin_client(&cfg.connection, &cfg.properties)?),
            None => None,
        };
        let fixed_topic = (!cfg.topic.contains('{')).then(|| cfg.topic.clone());
        Ok(KafkaSink {
            cfg,
            client_config,
            producer,
            reports,
            admin,
            created: HashSet::new(),
            fixed_topic,
        })
    }

    /// The settings this sink runs with.
    pub fn config(&self) -> &KafkaSinkConfig {
        &self.cfg
    }

    /// Put the producer in the fatal state an idempotent producer enters when the broker
    /// fences it or its sequence numbers break (librdkafka's `rd_kafka_test_fatal_error`),
    /// for fault tests: the next `send` must replace it, and every record the old one held
    /// must still get an outcome.
    #[doc(hidden)]
    #[allow(unsafe_code)]
    pub fn inject_fatal_error(&self, reason: &str) {
        let reason = std::ffi::CString::new(reason).unwrap_or_default();
        // SAFETY: the client pointer is valid while `self.producer` lives; librdkafka copies
        // the reason.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                self.producer.client().native_ptr(),
                rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            );
        }
    }

    /// Records handed to librdkafka and not yet reported on.
    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }

    /// Create `topic` if it does not exist yet (only with `create_topics`).
    async fn ensure_topic(
        admin: Option<&AdminClient<TracingContext>>,
        cfg: &KafkaSinkConfig,
        created: &mut HashSet<String>,
        topic: &str,
    ) -> Result<(), SinkError> {
        let (Some(admin), Some(spec)) = (admin, &cfg.create_topics) else {
            return Ok(());
        };
        if created.contains(topic) {
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
        let opts = AdminOptions::new().operation_timeout(Some(cfg.message_timeout));
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
        created.insert(topic.to_owned());
        Ok(())
    }

    /// An idempotent producer that hit a fatal error (fenced, sequence gap) accepts nothing
    /// more; replace it. Its unreported records fail and are resent by the driver.
    fn replace_if_fatal(&mut self) -> Result<(), SinkError> {
        let Some((code, reason)) = self.producer.client().fatal_error() else {
            return Ok(());
        };
        tracing::error!(%code, reason, "kafka producer failed fatally; starting a new one");
        let new = producer(&self.client_config, &self.reports)
            .map_err(|e| SinkError::Retriable(format!("recreating the producer: {e}")))?;
        let old = std::mem::replace(&mut self.producer, new);
        let end = lock(&self.reports).slots.next();
        let reports = self.reports.clone();
        // Dropping a producer purges its queue (reporting each record failed) and waits for
        // its polling thread: off the runtime. Whatever it did not report fails then.
        tokio::task::spawn_blocking(move || {
            drop(old);
            let mut r = lock(&reports);
            r.slots.resolve_pending(end, || {
                Err(SinkError::Retriable(format!(
                    "kafka producer failed fatally ({code}: {reason}); no report"
                )))
            });
            let waiting: Vec<_> = r.waiting.drain(..).map(|(_, w)| w).collect();
            drop(r);
            waiting.into_iter().for_each(Waker::wake);
        });
        Ok(())
    }
}

fn producer(
    client_config: &ClientConfig,
    reports: &Arc<Mutex<Reports>>,
) -> rdkafka::error::KafkaResult<KafkaProducer> {
    client_config.create_with_context(ReportingContext {
        reports: reports.clone(),
    })
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
        let expanded;
        let topic = match self.fixed_topic.as_deref() {
            Some(t) => t,
            None => {
                expanded = expand_template(&self.cfg.topic, record);
                &expanded
            }
        };
        Self::ensure_topic(self.admin.as_ref(), &self.cfg, &mut self.created, topic).await?;
        // Numbered before the hand-off: the report can come before `send` returns. Dropped
        // unsent (an error, or this future cancelled while waiting for room), it lets the
        // number go.
        let delivery = Reported {
            n: lock(&self.reports).slots.push(),
            reports: self.reports.clone(),
            done: false,
        };
        let mut br = BaseRecord::with_opaque_to(topic, delivery.n as usize)
            .payload(record.payload.as_ref())
            .headers(owned_headers(record));
        if !record.key.is_empty() {
            br = br.key(record.key.as_ref());
        }
        loop {
            match self.producer.send(br) {
                Ok(()) => return Ok(Box::pin(delivery)),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The local queue is bounded (queue.buffering.max.*); wait for room.
                    br = back;
                    tokio::time::sleep(QUEUE_FULL_WAIT).await;
                }
                Err((e, _)) => return Err(classify(&e)),
            }
        }
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

    /// Counts its wake-ups.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_report_wakes_only_the_delivery_waiting_for_it_and_a_dropped_one_lets_go() {
        let reports = Arc::new(Mutex::new(Reports::default()));
        let reported = |n| Reported {
            reports: reports.clone(),
            n,
            done: false,
        };
        let (a, b, c) = {
            let mut r = lock(&reports);
            (r.slots.push(), r.slots.push(), r.slots.push())
        };
        let count = Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let woken = || count.0.load(std::sync::atomic::Ordering::SeqCst);

        // The oldest is awaited; a report for a later record does not wake it.
        let mut first = Box::pin(reported(a));
        assert!(first.as_mut().poll(&mut cx).is_pending());
        report(&reports, b, Err(SinkError::Permanent("too large".into())));
        assert_eq!(woken(), 0);
        report(&reports, a, Ok(()));
        assert_eq!(woken(), 1);
        assert_eq!(first.as_mut().poll(&mut cx), Poll::Ready(Ok(())));
        // Reported before it was polled: ready at once, with its own outcome.
        let mut second = Box::pin(reported(b));
        assert_eq!(
            second.as_mut().poll(&mut cx),
            Poll::Ready(Err(SinkError::Permanent("too large".into())))
        );
        // Dropped unread: its number goes, and a late report for it changes nothing.
        let mut third = Box::pin(reported(c));
        assert!(third.as_mut().poll(&mut cx).is_pending());
        drop(third);
        report(&reports, c, Ok(()));
        let r = lock(&reports);
        assert_eq!(
            (r.slots.pending(), r.slots.held(), r.waiting.len()),
            (0, 0, 0)
        );
        assert_eq!(woken(), 1);
    }

    #[test]
    fn compression_names() {
        for c in ["none", "gzip", "snappy", "lz4", "zstd"] {
            assert_eq!(c.parse::<Compression>().expect("known").as_str(), c);
        }
        assert!("brotli".parse::<Compression>().is_err());
    }
}
