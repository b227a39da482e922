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
//!   ([`super::nats_publisher`]); a record is confirmed once the server has answered a `PING`
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

use std::sync::Arc;

use async_nats::Client;
use async_nats::jetstream;
use futures_util::TryFutureExt as _;

use super::nats_publisher::{Confirm, Failed, Publisher};
use super::{Delivery, Record, Sink, SinkError, expand_template};
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
    /// Confirmed by `PONG`s.
    Core {
        publisher: Publisher,
        headers: WireHeaders,
    },
    /// Confirmed by PubAcks on the publisher's connection; the async-nats client creates the
    /// stream and looks streams up when nobody answers.
    JetStream {
        client: Client,
        js: Arc<jetstream::Context>,
        publisher: Publisher,
        headers: WireHeaders,
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
        if cfg.subject.contains(|c: char| c.is_ascii_whitespace()) {
            return Err(NatsError::Config(format!(
                "subject template `{}` contains whitespace",
                cfg.subject
            )));
        }
        let confirm = match cfg.mode {
            NatsMode::Core => Confirm::Pong,
            NatsMode::JetStream => Confirm::PubAck {
                max_in_flight: cfg.max_in_flight,
            },
        };
        let management = match cfg.mode {
            NatsMode::Core => None,
            NatsMode::JetStream => {
                let client = connect(&cfg.connection).await?;
                let js = jetstream::ContextBuilder::new()
                    .timeout(cfg.ack_timeout)
                    .build(client.clone());
                if let Some(spec) = &cfg.stream {
                    ensure_stream(&js, spec, cfg.stream_subjects()?).await?;
                }
                Some((client, js))
            }
        };
        let servers = crate::broker::nats::redact_servers(&cfg.connection.servers);
        let dialer = Dialer::new(&cfg.connection).map_err(|e| match e {
            WireError::Config(why) => NatsError::Config(why),
            e => NatsError::Connect {
                servers: servers.clone(),
                source: Box::new(e),
            },
        })?;
        let publisher =
            Publisher::start(dialer, confirm)
                .await
                .map_err(|e| NatsError::Connect {
                    servers,
                    source: Box::new(e),
                })?;
        let headers = WireHeaders::new(cfg.subject.clone());
        let mode = match management {
            None => Mode::Core { publisher, headers },
            Some((client, js)) => Mode::JetStream {
                client,
                js: Arc::new(js),
                publisher,
                headers,
            },
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
/// replaced.
fn header_value(v: &[u8]) -> std::borrow::Cow<'_, str> {
    let s = String::from_utf8_lossy(v);
    if memchr::memchr2(b'\r', b'\n', s.as_bytes()).is_some() {
        std::borrow::Cow::Owned(s.replace(['\r', '\n'], " "))
    } else {
        s
    }
}

/// The key of the header cache: everything of a record's metadata but `seq` (length-prefixed,
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

/// One cached shape: the subject, the header block without `seq` (and without the id), and
/// the id's line up to its `seq` (`Nats-Msg-Id: <server>/<epoch>/`).
struct Shape {
    subject: Arc<str>,
    block: Vec<u8>,
    id_prefix: Vec<u8>,
}

/// The header cache: per key (see [`cache_key`]) the subject and the header block as it goes
/// on the wire, so a record costs one copy of the block plus its `seq` (and id) lines. `seq`
/// is the one header that changes with every record of a connection: the same server, event,
/// kind, class and epoch recur. Expanding the subject allocated a string per record, building
/// an async-nats header map hashed every name: together the largest cost of publishing.
struct WireHeaders {
    /// Looked up per record: hashed with foldhash, not SipHash (the keys are our own).
    templates: foldhash::HashMap<Vec<u8>, Shape>,
    key: Vec<u8>,
    subject: String,
    /// The subject template names `seq`: expanded per record.
    subject_per_record: bool,
    /// What follows the block for this record: `seq` and the id, or nothing.
    suffix: Vec<u8>,
    /// For records that are not cached.
    scratch: (Arc<str>, Vec<u8>),
}

impl WireHeaders {
    /// Distinct (server, event, kind, class, epoch) values kept before starting over.
    const MAX_ENTRIES: usize = 4096;

    fn new(subject: String) -> Self {
        WireHeaders {
            templates: foldhash::HashMap::default(),
            key: Vec::with_capacity(128),
            subject_per_record: subject.contains("{seq}"),
            subject,
            suffix: Vec::with_capacity(96),
            scratch: (Arc::from(""), Vec::new()),
        }
    }

    /// The subject, the header block and what follows it for this record (together: every
    /// header, and `Nats-Msg-Id` when `with_id`).
    fn lookup(&mut self, record: &Record, with_id: bool) -> (&Arc<str>, &[u8], &[u8]) {
        let m = &record.meta;
        self.suffix.clear();
        let exact_id = m.seq != 0 && !m.server.is_empty();
        if !cache_key(m, &mut self.key) || self.subject_per_record || (with_id && !exact_id) {
            let mut block = wire_block(record, false);
            if with_id {
                push_header(&mut block, "Nats-Msg-Id", message_id(record).as_bytes());
            }
            self.scratch = (Arc::from(expand_template(&self.subject, record)), block);
            return (&self.scratch.0, &self.scratch.1, &[]);
        }
        if !self.templates.contains_key(&self.key) {
            if self.templates.len() >= Self::MAX_ENTRIES {
                self.templates.clear();
            }
            let mut id_prefix = b"Nats-Msg-Id: ".to_vec();
            id_prefix.extend_from_slice(header_value(&m.server).as_bytes());
            id_prefix.push(b'/');
            id_prefix.extend_from_slice(itoa::Buffer::new().format(m.epoch).as_bytes());
            id_prefix.push(b'/');
            let shape = Shape {
                subject: Arc::from(expand_template(&self.subject, record)),
                block: wire_block(record, true),
                id_prefix,
            };
            self.templates.insert(self.key.clone(), shape);
        }
        let shape = &self.templates[&self.key];
        let mut n = itoa::Buffer::new();
        let seq = n.format(m.seq).as_bytes();
        self.suffix.extend_from_slice(b"seq: ");
        self.suffix.extend_from_slice(seq);
        self.suffix.extend_from_slice(b"\r\n");
        if with_id {
            self.suffix.extend_from_slice(&shape.id_prefix);
            self.suffix.extend_from_slice(seq);
            self.suffix.extend_from_slice(b"\r\n");
        }
        (&shape.subject, &shape.block, &self.suffix)
    }
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(header_value(value).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `NATS/1.0\r\n` and the record's bus headers as `name: value\r\n` (values as
/// [`header_value`] makes them), without `seq` when `without_seq`; no closing empty line.
fn wire_block(record: &Record, without_seq: bool) -> Vec<u8> {
    let mut out = b"NATS/1.0\r\n".to_vec();
    record.meta.each_header(|name, value| {
        if !(without_seq && name == "seq") {
            push_header(&mut out, name, value);
        }
    });
    out
}

/// Append `HPUB <subject> [<reply>] <header bytes> <total bytes>`, the header block and its
/// suffix, the empty line and the payload. `reply`: an inbox prefix and the record's number.
///
/// # Errors
/// Headers and payload together exceed the server's `max_payload` (nothing is written).
fn render_hpub(
    out: &mut Vec<u8>,
    subject: &str,
    reply: Option<(&str, u64)>,
    header: (&[u8], &[u8]),
    payload: &[u8],
    max_payload: usize,
) -> Result<(), SinkError> {
    let (block, suffix) = header;
    let header_len = block.len() + suffix.len() + 2;
    let total = header_len + payload.len();
    if total > max_payload {
        return Err(SinkError::Permanent(format!(
            "nats: a message of {total} bytes exceeds the server's max payload ({max_payload} bytes)"
        )));
    }
    let mut n = itoa::Buffer::new();
    out.reserve(subject.len() + 64 + total);
    out.extend_from_slice(b"HPUB ");
    out.extend_from_slice(subject.as_bytes());
    out.push(b' ');
    if let Some((inbox, number)) = reply {
        out.extend_from_slice(inbox.as_bytes());
        out.extend_from_slice(n.format(number).as_bytes());
        out.push(b' ');
    }
    out.extend_from_slice(n.format(header_len).as_bytes());
    out.push(b' ');
    out.extend_from_slice(n.format(total).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(block);
    out.extend_from_slice(suffix);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// What a JetStream record's failure means for the driver. "No responders" means either that
/// no stream captures the subject (permanent) or that the stream is not answering yet (after a
/// restart), so ask the server which.
async fn jetstream_failure(js: &jetstream::Context, subject: &str, failed: Failed) -> SinkError {
    use jetstream::ErrorCode as C;
    use jetstream::context::GetStreamByNameErrorKind as G;
    match failed {
        Failed::Sink(e) => e,
        Failed::Api {
            err_code,
            description,
        } => {
            let why = format!("nats jetstream: {description} (error {err_code})");
            match C(err_code) {
                C::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                | C::STREAM_HEADER_EXCEEDS_MAXIMUM
                | C::STREAM_SEALED
                | C::STREAM_WRONG_LAST_MESSAGE_ID
                | C::STREAM_WRONG_LAST_SEQUENCE => SinkError::Permanent(why),
                _ => SinkError::Retriable(why),
            }
        }
        Failed::NoResponders => match js.stream_by_subject(subject).await {
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
    }
}

impl Sink for NatsSink {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn send(&mut self, record: &Record) -> Result<Delivery, SinkError> {
        let wait = self.publish_timeout;
        match &mut self.mode {
            Mode::Core { publisher, headers } => {
                let (subject, block, suffix) = headers.lookup(record, false);
                let n = publisher
                    .queue(wait, |out, max, _| {
                        render_hpub(out, subject, None, (block, suffix), &record.payload, max)
                    })
                    .await?;
                // No timer here: the driver fails it `ack_deadline` after the hand-off.
                Ok(Box::pin(publisher.outcome(n).map_err(Failed::into_sink)))
            }
            Mode::JetStream {
                js,
                publisher,
                headers,
                ..
            } => {
                let (subject, block, suffix) = headers.lookup(record, true);
                let n = publisher
                    .queue(wait, |out, max, reply| {
                        render_hpub(out, subject, reply, (block, suffix), &record.payload, max)
                    })
                    .await?;
                let outcome = publisher.outcome(n);
                let (js, subject) = (js.clone(), subject.clone());
                Ok(Box::pin(async move {
                    match outcome.await {
                        Ok(()) => Ok(()),
                        Err(failed) => Err(jetstream_failure(&js, &subject, failed).await),
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

    /// Waits until every record handed over has an outcome (confirmed or failed).
    async fn flush(&mut self, deadline: Duration) -> Result<(), SinkError> {
        let publisher = match &self.mode {
            Mode::Core { publisher, .. } | Mode::JetStream { publisher, .. } => publisher,
        };
        tokio::time::timeout(deadline, publisher.settled())
            .await
            .map_err(|_| SinkError::Retriable(format!("nats: flush took over {deadline:?}")))
    }
}

#[cfg(test)]
#[path = "nats_tests.rs"]
mod tests;
