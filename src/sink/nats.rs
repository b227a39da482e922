//! The NATS sink (core NATS or JetStream): what publishing and "acknowledged" mean on NATS.
//! Connecting (servers, auth, TLS) and reading back live in [`crate::broker::nats`].
//!
//! Owns: one connection per sink (async-nats for JetStream, our own for core NATS), the subject each record goes to
//! (`<prefix>.<server>.<Event>` from a template, see [`expand_template`]), the NATS headers of a
//! message, and what "acknowledged" means in each mode:
//!
//! - [`NatsMode::JetStream`] (at-least-once): every record is published with a `Nats-Msg-Id`
//!   and its PubAck is awaited. Many PubAck futures are in flight at once (pipelined, bounded by
//!   [`NatsSinkConfig::max_in_flight`]); a record is confirmed only when its stream stored it.
//!   A record sent again after a failure carries the same `Nats-Msg-Id`, so the stream's
//!   duplicate window drops the resend.
//! - [`NatsMode::Core`] (**at-most-once**): published on a connection of amibus's own
//!   ([`super::nats_core`]); a record is confirmed once the server has answered a `PING`
//!   written after it, so the server read it. Core NATS keeps nothing: a message published
//!   while no subscriber listens is gone, and the spool will not send it again. Use
//!   JetStream where loss matters.
//!
//! While the client is not connected, `send` refuses records ([`SinkError::Retriable`]) instead
//! of queueing them in the client, which would write them after the reconnect whatever became
//! of them in the spool meanwhile. (Core mode checks and queues under one lock; the
//! async-nats client of JetStream mode checks, then queues.)
//!
//! Error mapping (what the driver does next):
//! - larger than the server's `max_payload` (from the server's INFO, checked by the client
//!   before anything is written), larger than the stream's `max_msg_size`, a sealed stream, an
//!   invalid subject or header, and "no stream captures this subject" → [`SinkError::Permanent`];
//! - disconnected, timed out, no responders while a stream for the subject exists (JetStream
//!   still starting), too many acks pending, any other server error → [`SinkError::Retriable`].
//!
//! Must never: confirm a JetStream record before its PubAck.

use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;
use async_nats::{Client, HeaderMap, HeaderName, HeaderValue, Subject};

use super::nats_core::Publisher;
use super::{Delivery, Record, Sink, SinkError, expand_template, within};
use crate::broker::nats::{NatsConnection, NatsError, StreamSpec, connect, ensure_stream};
use crate::broker::nats_wire::{Dialer, WireError};
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
    /// JetStream: how long to wait for a PubAck. Core: how long to wait for the server's
    /// confirmation (its `PONG`).
    pub ack_timeout: Duration,
    /// How long `send` may wait for room in the client's queue (it is full while disconnected).
    pub publish_timeout: Duration,
    /// JetStream: the most PubAcks awaited at once; `send` waits for room beyond it.
    pub max_in_flight: usize,
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
    publish_timeout: Duration,
    ack_timeout: Duration,
    mode: Mode,
}

enum Mode {
    /// Our own connection: `HPUB`s rendered into its queue, confirmed by `PONG`s.
    Core {
        publisher: Publisher,
        headers: WireHeaders,
    },
    JetStream {
        client: Client,
        js: Box<jetstream::Context>,
        headers: HeaderCache,
    },
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
        let mode = match cfg.mode {
            NatsMode::Core => {
                if cfg.subject.contains(|c: char| c.is_ascii_whitespace()) {
                    return Err(NatsError::Config(format!(
                        "subject template `{}` contains whitespace",
                        cfg.subject
                    )));
                }
                let servers = crate::broker::nats::redact_servers(&cfg.connection.servers);
                let dialer = Dialer::new(&cfg.connection).map_err(|e| match e {
                    WireError::Config(why) => NatsError::Config(why),
                    e => NatsError::Connect {
                        servers: servers.clone(),
                        source: Box::new(e),
                    },
                })?;
                let publisher = Publisher::start(dialer)
                    .await
                    .map_err(|e| NatsError::Connect {
                        servers,
                        source: Box::new(e),
                    })?;
                Mode::Core {
                    publisher,
                    headers: WireHeaders::new(cfg.subject.clone()),
                }
            }
            NatsMode::JetStream => {
                let client = connect(&cfg.connection).await?;
                let js = jetstream::ContextBuilder::new()
                    .timeout(cfg.ack_timeout)
                    .max_ack_inflight(cfg.max_in_flight.max(1))
                    .build(client.clone());
                if let Some(spec) = &cfg.stream {
                    ensure_stream(&js, spec, cfg.stream_subjects()?).await?;
                }
                Mode::JetStream {
                    client,
                    js: Box::new(js),
                    headers: HeaderCache::new(cfg.subject.clone()),
                }
            }
        };
        Ok(NatsSink {
            publish_timeout: cfg.publish_timeout,
            ack_timeout: cfg.ack_timeout,
            mode,
        })
    }

    /// The underlying async-nats client in JetStream mode (to read the stream back in tests,
    /// or stats); core mode publishes on a connection of its own.
    pub fn client(&self) -> Option<&Client> {
        match &self.mode {
            Mode::JetStream { client, .. } => Some(client),
            Mode::Core { .. } => None,
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
        if !cache_key(m, &mut self.key) {
            return (
                headers(record, with_id, false),
                Subject::from(expand_template(&self.subject, record)),
            );
        }
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

/// The key of the header caches: everything of a record's metadata but `seq` (length-prefixed,
/// so no two different values make the same key). `false` for records that are not cached:
/// those with a snapshot id or a gap range (a few per snapshot or loss).
fn cache_key(m: &crate::spool::Meta, key: &mut Vec<u8>) -> bool {
    if m.snapshot.is_some() || m.gap.is_some() {
        return false;
    }
    key.clear();
    for part in [&m.server[..], &m.event[..], &m.class[..]] {
        key.extend_from_slice(&(part.len() as u32).to_le_bytes());
        key.extend_from_slice(part);
    }
    key.extend_from_slice(&(m.kind as i32).to_le_bytes());
    key.extend_from_slice(&m.epoch.to_le_bytes());
    true
}

/// Core mode's header cache: per key (see [`cache_key`]) the subject and the header block as
/// it goes on the wire (`NATS/1.0` and every header but `seq`), so a record costs one copy of
/// the block and its `seq` line.
struct WireHeaders {
    templates: std::collections::HashMap<Vec<u8>, (String, Vec<u8>)>,
    key: Vec<u8>,
    subject: String,
    subject_per_record: bool,
    /// For records that are not cached.
    scratch: (String, Vec<u8>),
}

impl WireHeaders {
    fn new(subject: String) -> Self {
        WireHeaders {
            templates: std::collections::HashMap::new(),
            key: Vec::with_capacity(128),
            subject_per_record: subject.contains("{seq}"),
            subject,
            scratch: Default::default(),
        }
    }

    /// The subject, the header block, and the `seq` still to be added to it (`None`: the
    /// block has every header).
    fn lookup(&mut self, record: &Record) -> (&str, &[u8], Option<u64>) {
        if !cache_key(&record.meta, &mut self.key) || self.subject_per_record {
            self.scratch = (
                expand_template(&self.subject, record),
                wire_block(record, false),
            );
            return (&self.scratch.0, &self.scratch.1, None);
        }
        if !self.templates.contains_key(&self.key) {
            if self.templates.len() >= HeaderCache::MAX_ENTRIES {
                self.templates.clear();
            }
            let entry = (
                expand_template(&self.subject, record),
                wire_block(record, true),
            );
            self.templates.insert(self.key.clone(), entry);
        }
        let (subject, block) = &self.templates[&self.key];
        (subject, block, Some(record.meta.seq))
    }
}

/// `NATS/1.0\r\n` and the record's headers as `name: value\r\n` (values as
/// [`header_value`] makes them), without `seq` when `without_seq`; no closing empty line.
fn wire_block(record: &Record, without_seq: bool) -> Vec<u8> {
    let mut out = b"NATS/1.0\r\n".to_vec();
    record.meta.each_header(|name, value| {
        if !(without_seq && name == "seq") {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(header_value(value).as_str().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    });
    out
}

/// Append `HPUB <subject> <header bytes> <total bytes>`, the header block (with `seq: <seq>`
/// when given), the empty line and the payload.
///
/// # Errors
/// Headers and payload together exceed the server's `max_payload` (nothing is written).
fn render_hpub(
    out: &mut Vec<u8>,
    subject: &str,
    block: &[u8],
    seq: Option<u64>,
    payload: &[u8],
    max_payload: usize,
) -> Result<(), SinkError> {
    let (mut n, mut s) = (itoa::Buffer::new(), itoa::Buffer::new());
    let seq = seq.map(|v| s.format(v));
    let seq_len = seq.map_or(0, |v| b"seq: \r\n".len() + v.len());
    let header_len = block.len() + seq_len + 2;
    let total = header_len + payload.len();
    if total > max_payload {
        return Err(SinkError::Permanent(format!(
            "nats: a message of {total} bytes exceeds the server's max payload ({max_payload} bytes)"
        )));
    }
    out.reserve(subject.len() + 32 + total);
    out.extend_from_slice(b"HPUB ");
    out.extend_from_slice(subject.as_bytes());
    out.push(b' ');
    out.extend_from_slice(n.format(header_len).as_bytes());
    out.push(b' ');
    out.extend_from_slice(n.format(total).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(block);
    if let Some(seq) = seq {
        out.extend_from_slice(b"seq: ");
        out.extend_from_slice(seq.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
    Ok(())
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
        let queue_timeout = self.publish_timeout;
        match &mut self.mode {
            Mode::Core { publisher, headers } => {
                let (subject, block, seq) = headers.lookup(record);
                let n = publisher
                    .queue(queue_timeout, |out, max| {
                        render_hpub(out, subject, block, seq, &record.payload, max)
                    })
                    .await?;
                // No timer here: the driver fails it `ack_deadline` after the hand-off.
                Ok(Box::pin(publisher.outcome(n)))
            }
            Mode::JetStream {
                client,
                js,
                headers,
            } => {
                // A client that is not connected queues what it is given and writes it after
                // the reconnect, long after the driver has given up on it: outside the spool's
                // cap, and possibly after the spool dropped the record and published a gap
                // naming it. Refuse instead; the driver rewinds and the spool stays the only
                // source of resends.
                if client.connection_state() != State::Connected {
                    return Err(SinkError::Retriable("nats: not connected".into()));
                }
                // Bytes inside: the clone kept for error reports is a reference count.
                let (headers, subject) = headers.headers(record, true);
                let published = within(
                    queue_timeout,
                    js.publish_with_headers(subject.clone(), headers, record.payload.clone()),
                )
                .await
                .map_err(|_| {
                    SinkError::Retriable(format!("nats: client queue full for {queue_timeout:?}"))
                })?;
                let ack = match published {
                    Ok(ack) => ack,
                    Err(e) => return Err(jetstream_error(js, &subject, e).await),
                };
                let js = js.as_ref().clone();
                Ok(Box::pin(async move {
                    match ack.await {
                        Ok(_) => Ok(()),
                        Err(e) => Err(jetstream_error(&js, &subject, e).await),
                    }
                }))
            }
        }
    }

    /// The driver times every delivery from its hand-off: the core outcome has no timer of
    /// its own, and the JetStream client's starts only when its future is first polled.
    fn ack_deadline(&self) -> Option<Duration> {
        Some(self.ack_timeout)
    }

    async fn flush(&mut self, deadline: Duration) -> Result<(), SinkError> {
        match &self.mode {
            Mode::Core { publisher, .. } => {
                let n = publisher.queued();
                tokio::time::timeout(deadline, publisher.outcome(n))
                    .await
                    .map_err(|_| {
                        SinkError::Retriable(format!("nats: flush took over {deadline:?}"))
                    })?
            }
            Mode::JetStream { client, .. } => tokio::time::timeout(deadline, client.flush())
                .await
                .map_err(|_| SinkError::Retriable(format!("nats: flush took over {deadline:?}")))?
                .map_err(|e| SinkError::Retriable(format!("nats: flush failed: {e}"))),
        }
    }
}

#[cfg(test)]
#[path = "nats_tests.rs"]
mod tests;
