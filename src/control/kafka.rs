//! The Kafka transport of the action consumer: a consumer group on the request topic as the
//! [`RequestSource`], an idempotent `acks=all` producer to the result topic as the [`Publisher`].
//!
//! Owns: the consumer (its group, rebalances, offset commits), the per-partition offset
//! [`Offsets`] that turns out-of-order acknowledgements into in-order commits, and where
//! results go: the request's `reply_to` when it names an existing topic, else the result
//! topic, keyed by request id either way, with the headers `amibus-server` and
//! `amibus-request-id`. A `reply_to` that is not a topic name or names no existing topic is a
//! permanent publish failure (counted; the request is settled so its partition moves on).
//!
//! Where a new group starts ([`GroupStart`], `[control.kafka] start`) is a choice: `latest` (the
//! default) reads only requests published from the group's first start on, so adding a shard
//! (a new group) does not run old, still unexpired requests on it; `earliest` reads whatever
//! the topic still holds (requests published before the very first start are answered, those
//! past their deadline with `expired`). A group that has committed offsets resumes from them
//! either way.
//!
//! Commits: a message's offset counts as done when its result was published (the consumer
//! calls [`Incoming::ack`]). Results finish out of order; the committed offset of a partition
//! is the lowest offset received and not yet done (or one past the highest done), so a commit
//! never passes a request whose result is not published. A background task commits whenever
//! that floor moves (coalescing bursts); [`RequestSource::close`] commits the final floors. What was
//! not committed is read again after a restart: a request whose result was published but not
//! yet committed when amibus crashed can run again (the idempotency memory is per process).
//!
//! Replicas: every replica reads every partition under its own group (one group per shard,
//! see DESIGN.md) and acts only on requests for servers it owns, skipping the rest silently
//! (`answer_not_owned = false`). Two instances of one shard share the partitions; a
//! rebalance commits the floors of revoked partitions first, and results still in flight for
//! them are not committed (the new owner reads them again).
//!
//! Must never: commit an offset past a request whose result was not published (a permanent
//! publish failure counts as settled: see [`PublishError::Permanent`]), stall a partition on
//! a bad payload, or publish with less than `acks=all`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaRespErr;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::stats::ControlStats;
use super::transport::{Incoming, PublishError, Publisher, RequestSource};
use crate::broker::kafka::{KafkaConfigError, KafkaConnection, TracingContext, is_record_error};
use crate::model::pb::ActionResult;

/// How long a reply topic lookup may take before the publish is retried later.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// The pause after a failed read or commit before trying again.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Where a consumer group without committed offsets starts reading requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GroupStart {
    /// Only requests published from now on (the default: a new shard's group must not run
    /// old requests).
    #[default]
    Latest,
    /// Everything the topic still holds.
    Earliest,
}

impl GroupStart {
    /// The librdkafka `auto.offset.reset` value.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupStart::Latest => "latest",
            GroupStart::Earliest => "earliest",
        }
    }
}

/// Settings of the Kafka transport; see `[control.kafka]` in the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaControlConfig {
    pub connection: KafkaConnection,
    /// Where requests are read from.
    pub request_topic: String,
    /// Where results go when a request names no existing reply topic.
    pub result_topic: String,
    /// The consumer group (one per shard: every replica must see every request).
    pub group_id: String,
    /// Where a group without committed offsets starts.
    pub start: GroupStart,
    /// How long the producer retries a result before reporting it failed.
    pub message_timeout: Duration,
    /// The group's `session.timeout.ms`: how long the broker waits for a member that stopped
    /// answering (a crashed amibus) before its partitions are assigned again, so also how
    /// long a replica restarted after a crash may wait for them. Within the broker's
    /// `group.min.session.timeout.ms`..`group.max.session.timeout.ms` (Kafka: 6 s..30 min).
    pub session_timeout: Duration,
}

impl KafkaControlConfig {
    /// Defaults for everything but the brokers.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaControlConfig {
            connection: KafkaConnection {
                brokers: brokers.into(),
                tls: None,
                sasl: None,
            },
            request_topic: "amibus.actions".into(),
            result_topic: "amibus.results".into(),
            group_id: "amibus-control-0".into(),
            start: GroupStart::Latest,
            message_timeout: Duration::from_secs(30),
            session_timeout: Duration::from_secs(45),
        }
    }

    fn base(&self) -> Result<ClientConfig, KafkaConfigError> {
        let mut cc = ClientConfig::new();
        let mut problems = Vec::new();
        self.connection.apply(&mut cc, &mut problems);
        if !problems.is_empty() {
            return Err(KafkaConfigError { problems });
        }
        Ok(cc)
    }
}

/// Per-partition bookkeeping of offsets received and done; see the module docs.
#[derive(Debug, Default)]
pub struct Offsets {
    parts: HashMap<(String, i32), Part>,
}

#[derive(Debug, Default)]
struct Part {
    /// Received and not yet done.
    outstanding: BTreeSet<i64>,
    /// One past the highest offset received.
    next: i64,
    /// The last offset committed (or handed out to commit), if any.
    committed: Option<i64>,
}

impl Part {
    fn floor(&self) -> i64 {
        self.outstanding.first().copied().unwrap_or(self.next)
    }
}

impl Offsets {
    /// A message at `offset` was handed to the consumer.
    pub fn received(&mut self, topic: &str, partition: i32, offset: i64) {
        let part = self.parts.entry((topic.to_owned(), partition)).or_default();
        part.outstanding.insert(offset);
        part.next = part.next.max(offset + 1);
    }

    /// The result for `offset` was published. Returns whether the partition's commit floor
    /// moved past what was committed. An offset never received (its partition was revoked
    /// meanwhile) changes nothing.
    pub fn done(&mut self, topic: &str, partition: i32, offset: i64) -> bool {
        let Some(part) = self.parts.get_mut(&(topic.to_owned(), partition)) else {
            return false;
        };
        if !part.outstanding.remove(&offset) {
            return false;
        }
        part.committed.is_none_or(|c| part.floor() > c)
    }

    /// The offsets to commit now: `(topic, partition, next offset to read)` for every
    /// partition whose floor is past its last commit.
    pub fn pending(&self) -> Vec<(String, i32, i64)> {
        let mut v: Vec<_> = self
            .parts
            .iter()
            .filter(|(_, p)| p.committed.is_none_or(|c| p.floor() > c))
            .map(|((t, n), p)| (t.clone(), *n, p.floor()))
            .collect();
        v.sort();
        v
    }

    /// `list` (from [`Offsets::pending`]) was committed.
    pub fn committed(&mut self, list: &[(String, i32, i64)]) {
        for (t, n, o) in list {
            if let Some(p) = self.parts.get_mut(&(t.clone(), *n)) {
                p.committed = Some(p.committed.map_or(*o, |c| c.max(*o)));
            }
        }
    }

    /// Forget a partition (revoked, or newly assigned: offsets start over).
    pub fn forget(&mut self, topic: &str, partition: i32) {
        self.parts.remove(&(topic.to_owned(), partition));
    }
}

fn lock(m: &Mutex<Offsets>) -> std::sync::MutexGuard<'_, Offsets> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn tpl(list: &[(String, i32, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (t, n, o) in list {
        // Only fails for an invalid offset, which a floor from received offsets never is.
        let _ = tpl.add_partition_offset(t, *n, Offset::Offset(*o));
    }
    tpl
}

/// The consumer's context: logs through `tracing`, commits a revoked partition's floor
/// before letting it go.
pub struct ControlContext {
    offsets: Arc<Mutex<Offsets>>,
    stats: Arc<ControlStats>,
    start: GroupStart,
}

impl ControlContext {
    /// `latest`: a partition assigned for the first time to this group (no committed offset)
    /// gets its high watermark committed before it is read, so "latest" is fixed at the
    /// group's first assignment and a crash before the first result cannot skip the requests
    /// published while amibus was down (librdkafka's reset would jump to the new end).
    fn pin_start(&self, consumer: &BaseConsumer<Self>, parts: &TopicPartitionList) {
        if self.start != GroupStart::Latest {
            return;
        }
        let committed = match consumer.committed_offsets(parts.clone(), METADATA_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "control: reading committed offsets failed; new partitions start at the end");
                return;
            }
        };
        let mut pin = Vec::new();
        for e in committed.elements() {
            if matches!(e.offset(), Offset::Offset(_)) {
                continue;
            }
            match consumer.fetch_watermarks(e.topic(), e.partition(), METADATA_TIMEOUT) {
                Ok((_, high)) => pin.push((e.topic().to_owned(), e.partition(), high)),
                Err(err) => {
                    tracing::warn!(error = %err, partition = e.partition(), "control: reading a partition's end failed; it starts at the end");
                }
            }
        }
        if !pin.is_empty() {
            if let Err(e) = consumer.commit(&tpl(&pin), CommitMode::Sync) {
                self.stats.ack_failure();
                tracing::warn!(error = %e, "control: pinning the start of new partitions failed");
            } else {
                tracing::info!(
                    partitions = pin.len(),
                    "control: new partitions start at their current end (start = \"latest\")"
                );
            }
        }
    }
}

impl ClientContext for ControlContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        TracingContext.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        TracingContext.error(error, reason);
    }
}

impl ConsumerContext for ControlContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(parts) => {
                let revoked: HashSet<(String, i32)> = parts
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                let list: Vec<_> = lock(&self.offsets)
                    .pending()
                    .into_iter()
                    .filter(|(t, n, _)| revoked.contains(&(t.clone(), *n)))
                    .collect();
                if !list.is_empty()
                    && let Err(e) = consumer.commit(&tpl(&list), CommitMode::Sync)
                {
                    self.stats.ack_failure();
                    tracing::warn!(error = %e, "control: committing revoked partitions failed; their requests may be read again");
                }
                let mut offsets = lock(&self.offsets);
                for (t, n) in revoked {
                    offsets.forget(&t, n);
                }
                tracing::info!(partitions = parts.count(), "control: partitions revoked");
            }
            Rebalance::Assign(parts) => {
                self.pin_start(consumer, parts);
                let mut offsets = lock(&self.offsets);
                for e in parts.elements() {
                    offsets.forget(e.topic(), e.partition());
                }
                tracing::info!(partitions = parts.count(), "control: partitions assigned");
            }
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "control: consumer group rebalance failed");
            }
        }
    }
}

type ControlConsumer = StreamConsumer<ControlContext>;

/// Requests from a Kafka consumer group; see the module docs.
pub struct KafkaRequestSource {
    /// Taken by `drop`, which leaves the group on a blocking thread.
    consumer: Option<Arc<ControlConsumer>>,
    offsets: Arc<Mutex<Offsets>>,
    wake: Arc<Notify>,
    stats: Arc<ControlStats>,
    committer: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl KafkaRequestSource {
    /// Join the group and subscribe to the request topic; a new group starts where
    /// [`KafkaControlConfig::start`] says. `stats` counts read and commit failures.
    ///
    /// # Errors
    /// Invalid settings, or librdkafka refuses a property.
    pub fn new(
        cfg: &KafkaControlConfig,
        stats: Arc<ControlStats>,
    ) -> Result<KafkaRequestSource, KafkaConfigError> {
        let mut problems = Vec::new();
        if cfg.request_topic.trim().is_empty() {
            problems.push("control.kafka.request_topic: must not be empty".to_owned());
        }
        if cfg.group_id.trim().is_empty() {
            problems.push("control.kafka.group: must not be empty".to_owned());
        }
        if !problems.is_empty() {
            return Err(KafkaConfigError { problems });
        }
        let mut cc = cfg.base()?;
        cc.set("group.id", &cfg.group_id)
            .set("auto.offset.reset", cfg.start.as_str())
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set(
                "session.timeout.ms",
                cfg.session_timeout.as_millis().max(1).to_string(),
            );
        let offsets = Arc::new(Mutex::new(Offsets::default()));
        let consumer: ControlConsumer = cc
            .create_with_context(ControlContext {
                start: cfg.start,
                offsets: offsets.clone(),
                stats: stats.clone(),
            })
            .map_err(|e| KafkaConfigError {
                problems: vec![e.to_string()],
            })?;
        consumer
            .subscribe(&[cfg.request_topic.as_str()])
            .map_err(|e| KafkaConfigError {
                problems: vec![format!("control.kafka.request_topic: {e}")],
            })?;
        let consumer = Arc::new(consumer);
        let wake = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let task = tokio::spawn(commit_loop(
            consumer.clone(),
            offsets.clone(),
            wake.clone(),
            stats.clone(),
            stop.clone(),
        ));
        Ok(KafkaRequestSource {
            consumer: Some(consumer),
            offsets,
            wake,
            stats,
            committer: Some((stop, task)),
        })
    }
}

/// Commit the floors that moved; `false` when the commit failed.
async fn commit_now(
    consumer: &Arc<ControlConsumer>,
    offsets: &Arc<Mutex<Offsets>>,
    stats: &ControlStats,
) -> bool {
    let list = lock(offsets).pending();
    if list.is_empty() {
        return true;
    }
    let c = consumer.clone();
    let tpl = tpl(&list);
    let result = tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync)).await;
    match result {
        Ok(Ok(())) => {
            lock(offsets).committed(&list);
            true
        }
        Ok(Err(e)) => {
            stats.ack_failure();
            tracing::warn!(error = %e, "control: offset commit failed; retrying");
            false
        }
        Err(e) => {
            stats.ack_failure();
            tracing::warn!(error = %e, "control: offset commit task failed; retrying");
            false
        }
    }
}

async fn commit_loop(
    consumer: Arc<ControlConsumer>,
    offsets: Arc<Mutex<Offsets>>,
    wake: Arc<Notify>,
    stats: Arc<ControlStats>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = wake.notified() => {}
        }
        if !commit_now(&consumer, &offsets, &stats).await {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RETRY_PAUSE) => wake.notify_one(),
            }
        }
    }
}

impl RequestSource for KafkaRequestSource {
    async fn next(&mut self) -> Option<Incoming> {
        loop {
            let consumer = self.consumer.clone()?;
            let m = match consumer.recv().await {
                Ok(m) => m,
                Err(e) => {
                    self.stats.receive_error();
                    tracing::warn!(error = %e, "control: reading requests from Kafka failed; retrying");
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            };
            let (topic, partition, offset) = (m.topic().to_owned(), m.partition(), m.offset());
            let payload = m.payload().map(Bytes::copy_from_slice).unwrap_or_default();
            let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
            lock(&self.offsets).received(&topic, partition, offset);
            let offsets = self.offsets.clone();
            let wake = self.wake.clone();
            let ack = Box::new(move || {
                if lock(&offsets).done(&topic, partition, offset) {
                    wake.notify_one();
                }
            });
            return Some(Incoming {
                payload,
                reply: None,
                ack: Some(ack),
                key,
            });
        }
    }

    async fn close(&mut self) {
        if let Some((stop, task)) = self.committer.take() {
            stop.cancel();
            let _ = task.await;
        }
        let Some(consumer) = self.consumer.clone() else {
            return;
        };
        for _ in 0..3 {
            if commit_now(&consumer, &self.offsets, &self.stats).await {
                return;
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        tracing::warn!(
            "control: the final offset commit failed; requests after the last commit will be read again"
        );
    }
}

impl Drop for KafkaRequestSource {
    fn drop(&mut self) {
        if let Some((stop, _)) = &self.committer {
            stop.cancel();
        }
        // Dropping the consumer leaves the group: it commits the revoked partitions' floors
        // and waits for the coordinator, which can take long with the broker down. Not on a
        // runtime thread (a runtime waits for its blocking tasks when it shuts down).
        if let Some(consumer) = self.consumer.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn_blocking(move || drop(consumer));
                }
                Err(_) => drop(consumer),
            }
        }
    }
}

/// Results to Kafka, keyed by request id; see the module docs.
pub struct KafkaResultPublisher {
    producer: FutureProducer<TracingContext>,
    result_topic: String,
    /// Reply topics seen to exist.
    known: Arc<Mutex<HashSet<String>>>,
    /// Never a reply topic: results there would be read as requests.
    request_topic: String,
}

impl KafkaResultPublisher {
    /// An idempotent producer with `acks=all`.
    ///
    /// # Errors
    /// Invalid settings, or librdkafka refuses a property.
    pub fn new(cfg: &KafkaControlConfig) -> Result<KafkaResultPublisher, KafkaConfigError> {
        if cfg.result_topic.trim().is_empty() {
            return Err(KafkaConfigError {
                problems: vec!["control.kafka.result_topic: must not be empty".to_owned()],
            });
        }
        let mut cc = cfg.base()?;
        cc.set("acks", "all")
            .set("enable.idempotence", "true")
            .set(
                "message.timeout.ms",
                cfg.message_timeout.as_millis().max(1).to_string(),
            )
            .set("linger.ms", "1");
        let producer = cc
            .create_with_context(TracingContext)
            .map_err(|e| KafkaConfigError {
                problems: vec![e.to_string()],
            })?;
        Ok(KafkaResultPublisher {
            producer,
            known: Arc::new(Mutex::new(HashSet::from([cfg.result_topic.clone()]))),
            result_topic: cfg.result_topic.clone(),
            request_topic: cfg.request_topic.clone(),
        })
    }

    /// Whether `topic` exists; a missing or invalid one is permanent (a client named it).
    async fn check_topic(&self, topic: &str) -> Result<(), PublishError> {
        if self
            .known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(topic)
        {
            return Ok(());
        }
        if topic == self.request_topic {
            return Err(PublishError::Permanent(format!(
                "reply_to {topic:?} is the request topic"
            )));
        }
        if !is_topic_name(topic) {
            return Err(PublishError::Permanent(format!(
                "reply_to {topic:?} is not a Kafka topic name"
            )));
        }
        let producer = self.producer.clone();
        let name = topic.to_owned();
        let md = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&name), METADATA_TIMEOUT)
        })
        .await
        .map_err(|e| PublishError::Retriable(format!("topic lookup task: {e}")))?
        .map_err(|e| PublishError::Retriable(format!("looking up topic {topic}: {e}")))?;
        let found = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| (t.error(), t.partitions().len()));
        match found {
            Some((None, n)) if n > 0 => {
                self.known
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(topic.to_owned());
                Ok(())
            }
            Some((Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART), _))
            | Some((None, _))
            | None => Err(PublishError::Permanent(format!(
                "reply_to topic {topic} does not exist"
            ))),
            Some((Some(e), _)) => Err(PublishError::Retriable(format!(
                "looking up topic {topic}: {e:?}"
            ))),
        }
    }
}

/// Kafka's rule for topic names: 1 to 249 of `[A-Za-z0-9._-]`, not `.` or `..`.
fn is_topic_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 249
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Publisher for KafkaResultPublisher {
    async fn publish(&self, to: Option<&str>, result: &ActionResult) -> Result<(), PublishError> {
        let topic = match to {
            Some(t) => {
                self.check_topic(t).await?;
                t.to_owned()
            }
            None => self.result_topic.clone(),
        };
        let payload = result.encode_to_vec();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "amibus-server",
                value: Some(result.server.as_bytes()),
            })
            .insert(Header {
                key: "amibus-request-id",
                value: Some(result.request_id.as_bytes()),
            });
        let record = FutureRecord::to(&topic)
            .key(result.request_id.as_bytes())
            .payload(&payload)
            .headers(headers);
        match self.producer.send(record, Duration::from_secs(5)).await {
            Ok(_) => Ok(()),
            Err((e, _)) if e.rdkafka_error_code().is_some_and(is_record_error) => {
                Err(PublishError::Permanent(e.to_string()))
            }
            Err((e, _)) => Err(PublishError::Retriable(e.to_string())),
        }
    }
}

#[cfg(test)]
#[path = "kafka_tests.rs"]
mod tests;
