//! The NATS sink (core NATS or JetStream): what publishing and "acknowledged" mean on NATS.
//! Connecting (servers, auth, TLS) and reading back live in [`crate::broker::nats`].
//!
//! Owns: one `async_nats` connection per sink, the subject each record goes to
//! (`<prefix>.<server>.<Event>` from a template, see [`expand_template`]), the NATS headers of a
//! message, and what "acknowledged" means in each mode:
//!
//! - [`NatsMode::JetStream`] (at-least-once): every record is published with a `Nats-Msg-Id`
//!   and its PubAck is awaited. Many PubAck futures are in flight at once (pipelined, bounded by
//!   [`NatsSinkConfig::max_in_flight`]); a record is confirmed only when its stream stored it.
//!   A record sent again after a failure carries the same `Nats-Msg-Id`, so the stream's
//!   duplicate window drops the resend.
//! - [`NatsMode::Core`] (**at-most-once**): a record is confirmed once the client has flushed
//!   it to the socket. Core NATS has no acknowledgement: a message flushed into a connection
//!   that breaks a moment later, or published while no subscriber listens, is gone, and the
//!   spool will not send it again. Use JetStream where loss matters.
//!
//! While the client is not connected, `send` refuses records ([`SinkError::Retriable`]) instead
//! of queueing them in the client, which would write them after the reconnect whatever became
//! of them in the spool meanwhile.
//!
//! Error mapping (what the driver does next):
//! - larger than the server's `max_payload` (from the server's INFO, checked by the client
//!   before anything is written), larger than the stream's `max_msg_size`, a sealed stream, an
//!   invalid subject or header, and "no stream captures this subject" → [`SinkError::Permanent`];
//! - disconnected, timed out, no responders while a stream for the subject exists (JetStream
//!   still starting), too many acks pending, any other server error → [`SinkError::Retriable`].
//!
//! Must never: confirm a JetStream record before its PubAck.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;
use async_nats::{Client, HeaderMap, HeaderName, HeaderValue, Subject};
use tokio::sync::{Notify, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{Delivery, Record, Sink, SinkError, expand_template, within};
use crate::broker::nats::{NatsConnection, NatsError, StreamSpec, connect, ensure_stream};
use crate::mix::fnv1a64;

/// Core NATS or JetStream; see the module docs for what each guarantees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NatsMode {
    /// Published and flushed: at-most-once.
    Core,
    /// PubAck per record: at-least-once, duplicates dropped within the stream's window.
    #[default]
    JetStream,
}

/// Configuration of a [`NatsSink`].
///
/// ```
/// use amibus::broker::nats::StreamSpec;
/// use amibus::sink::nats::{NatsMode, NatsSinkConfig};
/// let cfg = NatsSinkConfig {
///     mode: NatsMode::JetStream,
///     stream: Some(StreamSpec::new("AMI")),
///     ..NatsSinkConfig::default()
/// };
/// assert_eq!(cfg.subject, "ami.{server}.{event}");
/// assert_eq!(cfg.stream_subjects().unwrap(), vec!["ami.>".to_string()]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsSinkConfig {
    pub connection: NatsConnection,
    /// Subject template; `{name}` expands to the record header `name`, sanitized so it cannot
    /// add a subject level.
    pub subject: String,
    pub mode: NatsMode,
    /// JetStream only: create this stream at connect if it is missing.
    pub stream: Option<StreamSpec>,
    /// JetStream: how long to wait for a PubAck. Core: how long to wait for the flush.
    pub ack_timeout: Duration,
    /// How long `send` may wait for room in the client's queue (it is full while disconnected).
    pub publish_timeout: Duration,
    /// JetStream: the most PubAcks awaited at once; `send` waits for room beyond it.
    pub max_in_flight: usize,
    /// Core: the flusher waits this long after a publish before flushing, so that one flush
    /// covers a burst. Zero flushes as soon as the previous flush is done.
    pub flush_interval: Duration,
}

impl Default for NatsSinkConfig {
    fn default() -> Self {
        NatsSinkConfig {
            connection: NatsConnection::default(),
            subject: "ami.{server}.{event}".into(),
            mode: NatsMode::JetStream,
            stream: None,
            ack_timeout: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(10),
            max_in_flight: 5_000,
            flush_interval: Duration::from_millis(5),
        }
    }
}

impl NatsSinkConfig {
    /// The subjects a created stream captures: the spec's, or `<prefix>.>` from the template.
    ///
    /// # Errors
    /// The template starts with a `{…}` level, so no prefix can be derived; list the subjects.
    pub fn stream_subjects(&self) -> Result<Vec<String>, NatsError> {
        if let Some(spec) = &self.stream
            && !spec.subjects.is_empty()
        {
            return Ok(spec.subjects.clone());
        }
        if !self.subject.contains('{') {
            return Ok(vec![self.subject.clone()]);
        }
        let literal: Vec<&str> = self
            .subject
            .split('.')
            .take_while(|level| !level.contains('{'))
            .collect();
        if literal.is_empty() {
            return Err(NatsError::Config(format!(
                "subject template `{}` has no literal prefix; set the stream's subjects",
                self.subject
            )));
        }
        Ok(vec![format!("{}.>", literal.join("."))])
    }
}

/// See the module docs.
pub struct NatsSink {
    client: Client,
    subject: String,
    publish_timeout: Duration,
    ack_timeout: Duration,
    mode: Mode,
    header_cache: HeaderCache,
}

enum Mode {
    Core(CoreFlush),
    JetStream(jetstream::Context),
}

/// Core mode's bookkeeping: records are numbered as published; a background task flushes the
/// client and publishes the highest number each successful flush covered.
struct CoreFlush {
    published: u64,
    /// The highest number published, for the flusher.
    wanted: Arc<Wanted>,
    flushed: Arc<watch::Sender<u64>>,
    flushed_rx: watch::Receiver<u64>,
    /// Stops the flusher when the sink goes.
    _stop: DropGuard,
}

/// The flusher's wake-up: a number and a permit. Setting it costs one atomic store and one
/// compare-and-swap while the flusher is busy or a permit is already waiting (a `watch` took a
/// write lock and the waiters' mutex on every record).
#[derive(Default)]
struct Wanted {
    up_to: AtomicU64,
    wake: Notify,
}

impl Wanted {
    fn set(&self, n: u64) {
        self.up_to.store(n, Ordering::Release);
        self.wake.notify_one();
    }
}

impl NatsSink {
    /// Connect, and in JetStream mode create the configured stream if it is missing.
    ///
    /// # Errors
    /// See [`connect`]; the stream cannot be created or looked up; a stream was configured in
    /// core mode.
    pub async fn connect(cfg: NatsSinkConfig) -> Result<NatsSink, NatsError> {
        if cfg.mode == NatsMode::Core && cfg.stream.is_some() {
            return Err(NatsError::Config(
                "a stream is only created in jetstream mode".into(),
            ));
        }
        let client = connect(&cfg.connection).await?;
        let mode = match cfg.mode {
            NatsMode::Core => Mode::Core(CoreFlush::start(client.clone(), cfg.flush_interval)),
            NatsMode::JetStream => {
                let js = jetstream::ContextBuilder::new()
                    .timeout(cfg.ack_timeout)
                    .max_ack_inflight(cfg.max_in_flight.max(1))
                    .build(client.clone());
                if let Some(spec) = &cfg.stream {
                    ensure_stream(&js, spec, cfg.stream_subjects()?).await?;
                }
                Mode::JetStream(js)
            }
        };
        Ok(NatsSink {
            client,
            header_cache: HeaderCache::new(cfg.subject.clone()),
            subject: cfg.subject,
            publish_timeout: cfg.publish_timeout,
            ack_timeout: cfg.ack_timeout,
            mode,
        })
    }

    /// The underlying client (for a [`NatsSource`] on the same connection, or stats).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The subject a record is published to.
    pub fn subject_for(&self, record: &Record) -> String {
        expand_template(&self.subject, record)
    }
}

impl CoreFlush {
    fn start(client: Client, interval: Duration) -> CoreFlush {
        let wanted = Arc::new(Wanted::default());
        let (flushed, flushed_rx) = watch::channel(0u64);
        let flushed = Arc::new(flushed);
        let stop = CancellationToken::new();
        tokio::spawn(flusher(
            client,
            interval,
            wanted.clone(),
            flushed.clone(),
            stop.clone(),
        ));
        CoreFlush {
            published: 0,
            wanted,
            flushed,
            flushed_rx,
            _stop: stop.drop_guard(),
        }
    }
}

fn advance(flushed: &watch::Sender<u64>, to: u64) {
    flushed.send_if_modified(|f| {
        if to > *f {
            *f = to;
            true
        } else {
            false
        }
    });
}

/// Flush whenever something was published since the last flush; ends with the sink.
async fn flusher(
    client: Client,
    interval: Duration,
    wanted: Arc<Wanted>,
    flushed: Arc<watch::Sender<u64>>,
    stop: CancellationToken,
) {
    let mut retry = false;
    loop {
        if !retry {
            // A number set while the last flush ran left a permit: no publish goes unseen.
            tokio::select! {
                () = wanted.wake.notified() => {}
                () = stop.cancelled() => return,
            }
        }
        if !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        // Everything numbered up to `target` was queued in the client before the flush command.
        let target = wanted.up_to.load(Ordering::Acquire);
        match client.flush().await {
            Ok(()) => {
                advance(&flushed, target);
                retry = false;
            }
            Err(e) => {
                tracing::debug!(error = %e, "nats flush failed; retrying");
                retry = true;
                tokio::time::sleep(interval.max(Duration::from_millis(50))).await;
            }
        }
    }
}

/// The `Nats-Msg-Id` of a record; identical for every send of the same spooled record.
///
/// `server/epoch/seq` for a record of a connection's numbering (seq > 0): they identify an
/// event exactly. Otherwise (records amibus makes outside a connection's numbering carry
/// seq 0) the partition key and a 64-bit hash of the payload; the payload holds server, epoch,
/// seq and the receive time, so two different records never share it.
pub fn message_id(record: &Record) -> String {
    let m = &record.meta;
    if m.seq != 0 && !m.server.is_empty() {
        let mut n = itoa::Buffer::new();
        let mut id = String::with_capacity(m.server.len() + 2 + 2 * 20);
        id.push_str(&String::from_utf8_lossy(&m.server));
        id.push('/');
        id.push_str(n.format(m.epoch));
        id.push('/');
        id.push_str(n.format(m.seq));
        return id;
    }
    let hash = fnv1a64(&record.payload);
    if record.key.is_empty() {
        format!("{hash:016x}")
    } else {
        format!("{}/{hash:016x}", String::from_utf8_lossy(&record.key))
    }
}

/// Header values may not hold CR or LF (replaced by spaces); bytes that are not UTF-8 are
/// replaced. One allocation for the usual value.
fn header_value(v: &[u8]) -> HeaderValue {
    let mut s = match std::str::from_utf8(v) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(v).into_owned(),
    };
    if memchr::memchr2(b'\r', b'\n', s.as_bytes()).is_some() {
        s = s.replace(['\r', '\n'], " ");
    }
    HeaderValue::from(s)
}

/// The record's bus headers as NATS headers (each name once: no name is hashed twice), but
/// `seq` when `without_seq`; plus `Nats-Msg-Id` (JetStream only).
fn headers(record: &Record, with_id: bool, without_seq: bool) -> HeaderMap {
    let mut map = HeaderMap::new();
    record.meta.each_header(|name, value| {
        if !(without_seq && name == "seq") {
            map.insert(HeaderName::from_static(name), header_value(value));
        }
    });
    if with_id {
        map.insert(
            async_nats::header::NATS_MESSAGE_ID,
            header_value(message_id(record).as_bytes()),
        );
    }
    map
}

/// Header maps by everything but `seq`, which is the one header that changes with every
/// record of a connection: the same server, event, kind, class and epoch recur. A hit clones
/// the map (no name hashed, no table grown) and sets `seq` (and the message id); building one
/// hashed every name and grew the table twice, the largest cost of publishing to NATS.
/// The subject is kept next to the map: it is a function of the same metadata (unless the
/// template names `seq`), and expanding it allocated a string per record. Records with a
/// snapshot id or a gap range (a few per snapshot or loss) are not cached.
struct HeaderCache {
    templates: std::collections::HashMap<Vec<u8>, (HeaderMap, Subject)>,
    key: Vec<u8>,
    subject: String,
    /// The subject template names `seq`: expanded per record.
    subject_per_record: bool,
}

impl HeaderCache {
    /// Distinct (server, event, kind, class, epoch) values kept before starting over.
    const MAX_ENTRIES: usize = 4096;

    fn new(subject: String) -> Self {
        HeaderCache {
            templates: std::collections::HashMap::new(),
            key: Vec::with_capacity(128),
            subject_per_record: subject.contains("{seq}"),
            subject,
        }
    }

    /// The record's NATS headers (see [`headers`]) and the subject it is published to.
    fn headers(&mut self, record: &Record, with_id: bool) -> (HeaderMap, Subject) {
        let m = &record.meta;
        if m.snapshot.is_some() || m.gap.is_some() {
            return (
                headers(record, with_id, false),
                Subject::from(expand_template(&self.subject, record)),
            );
        }
        self.key.clear();
        // Length-prefixed, so no two different values make the same key.
        for part in [&m.server[..], &m.event[..], &m.class[..]] {
            self.key
                .extend_from_slice(&(part.len() as u32).to_le_bytes());
            self.key.extend_from_slice(part);
        }
        self.key.extend_from_slice(&(m.kind as i32).to_le_bytes());
        self.key.extend_from_slice(&m.epoch.to_le_bytes());
        let (mut map, subject) = match self.templates.get(&self.key[..]) {
            Some((template, subject)) => (template.clone(), subject.clone()),
            None => {
                // Every header but `seq`, and with the id, placeholders for both: a std map
                // reserves room before it looks for the key, so setting a value in a full
                // table (7 of 8 buckets) would grow it on every record.
                let mut template = headers(record, false, true);
                if with_id {
                    template.insert("seq", "");
                    template.insert(async_nats::header::NATS_MESSAGE_ID, "");
                }
                let subject = Subject::from(expand_template(&self.subject, record));
                if self.templates.len() >= Self::MAX_ENTRIES {
                    self.templates.clear();
                }
                self.templates
                    .insert(self.key.clone(), (template.clone(), subject.clone()));
                (template, subject)
            }
        };
        let subject = if self.subject_per_record {
            Subject::from(expand_template(&self.subject, record))
        } else {
            subject
        };
        map.insert(
            "seq",
            HeaderValue::from(itoa::Buffer::new().format(m.seq).to_owned()),
        );
        if with_id {
            map.insert(
                async_nats::header::NATS_MESSAGE_ID,
                header_value(message_id(record).as_bytes()),
            );
        }
        (map, subject)
    }
}

fn core_publish_error(e: async_nats::PublishError) -> SinkError {
    use async_nats::PublishErrorKind as K;
    match e.kind() {
        K::MaxPayloadExceeded | K::InvalidSubject => SinkError::Permanent(format!("nats: {e}")),
        K::Send => SinkError::Retriable(format!("nats: {e} (client closed)")),
    }
}

/// Classify a JetStream publish or PubAck failure. "No responders" comes back as
/// `StreamNotFound`; it means either that no stream captures the subject (permanent) or that
/// the stream's server is not answering yet (after a restart), so ask the server which.
async fn jetstream_error(
    js: &jetstream::Context,
    subject: &str,
    e: jetstream::context::PublishError,
) -> SinkError {
    use jetstream::context::GetStreamByNameErrorKind as G;
    use jetstream::context::PublishErrorKind as K;
    match e.kind() {
        K::MaxPayloadExceeded => SinkError::Permanent(format!("nats: {e}")),
        K::TimedOut | K::BrokenPipe | K::MaxAckPending => {
            SinkError::Retriable(format!("nats jetstream: {e}"))
        }
        K::WrongLastMessageId | K::WrongLastSequence => {
            SinkError::Permanent(format!("nats jetstream: {e}"))
        }
        K::StreamNotFound if js.client().connection_state() != State::Connected => {
            SinkError::Retriable(format!(
                "nats jetstream: no responders for `{subject}` (disconnected)"
            ))
        }
        K::StreamNotFound => match js.stream_by_subject(subject).await {
            Ok(name) => SinkError::Retriable(format!(
                "nats jetstream: no responders for `{subject}` although stream {name} captures it"
            )),
            Err(lookup) if lookup.kind() == G::NotFound => SinkError::Permanent(format!(
                "nats jetstream: no stream captures subject `{subject}`; create one or \
                 configure the sink to create it"
            )),
            Err(lookup) => SinkError::Retriable(format!(
                "nats jetstream: no responders for `{subject}` and the stream lookup failed: {lookup}"
            )),
        },
        K::Other => {
            let code = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<jetstream::Error>())
                .map(jetstream::Error::error_code);
            match code {
                Some(
                    jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                    | jetstream::ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM
                    | jetstream::ErrorCode::STREAM_SEALED,
                ) => SinkError::Permanent(format!("nats jetstream: {e}")),
                _ => SinkError::Retriable(format!("nats jetstream: {e}")),
            }
        }
    }
}

impl Sink for NatsSink {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn send(&mut self, record: &Record) -> Result<Delivery, SinkError> {
        // A client that is not connected queues what it is given and writes it after the
        // reconnect, long after the driver has given up on it: outside the spool's cap, and
        // possibly after the spool dropped the record and published a gap naming it. Refuse
        // instead; the driver rewinds and the spool stays the only source of resends.
        if self.client.connection_state() != State::Connected {
            return Err(SinkError::Retriable("nats: not connected".into()));
        }
        let queue_timeout = self.publish_timeout;
        let timed_out =
            || SinkError::Retriable(format!("nats: client queue full for {queue_timeout:?}"));
        match &mut self.mode {
            Mode::Core(core) => {
                let (headers, subject) = self.header_cache.headers(record, false);
                within(
                    queue_timeout,
                    self.client
                        .publish_with_headers(subject, headers, record.payload.clone()),
                )
                .await
                .map_err(|_| timed_out())?
                .map_err(core_publish_error)?;
                core.published += 1;
                let mine = core.published;
                core.wanted.set(mine);
                let mut flushed = core.flushed_rx.clone();
                let ack_timeout = self.ack_timeout;
                Ok(Box::pin(async move {
                    match within(ack_timeout, flushed.wait_for(|&f| f >= mine)).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(_)) => Err(SinkError::Retriable("nats: flusher stopped".into())),
                        Err(_) => Err(SinkError::Retriable(format!(
                            "nats: not flushed within {ack_timeout:?}"
                        ))),
                    }
                }))
            }
            Mode::JetStream(js) => {
                // Bytes inside: the clone kept for error reports is a reference count.
                let (headers, subject) = self.header_cache.headers(record, true);
                let published = within(
                    queue_timeout,
                    js.publish_with_headers(subject.clone(), headers, record.payload.clone()),
                )
                .await
                .map_err(|_| timed_out())?;
                let ack = match published {
                    Ok(ack) => ack,
                    Err(e) => return Err(jetstream_error(js, &subject, e).await),
                };
                let js = js.clone();
                Ok(Box::pin(async move {
                    match ack.await {
                        Ok(_) => Ok(()),
                        Err(e) => Err(jetstream_error(&js, &subject, e).await),
                    }
                }))
            }
        }
    }

    async fn flush(&mut self, deadline: Duration) -> Result<(), SinkError> {
        tokio::time::timeout(deadline, self.client.flush())
            .await
            .map_err(|_| SinkError::Retriable(format!("nats: flush took over {deadline:?}")))?
            .map_err(|e| SinkError::Retriable(format!("nats: flush failed: {e}")))?;
        if let Mode::Core(core) = &self.mode {
            advance(&core.flushed, core.published);
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "nats_tests.rs"]
mod tests;
