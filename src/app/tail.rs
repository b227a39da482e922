//! `amibus tail`: read records back from the bus and print them as JSON lines.
//!
//! Owns: choosing a reader (today NATS core or JetStream; Kafka plugs in as one more
//! [`SourceArgs`] variant and one arm in [`Reader::next`]), filtering by server id and event
//! name, and turning each payload into one line on standard output.
//!
//! Filtering looks at the bus headers amibus puts on every record (`server`, `event`) before
//! anything is decoded, so skipping a record costs a header comparison. Only a message without
//! those headers is decoded to be filtered.
//!
//! Payloads: an `amibus.v1.Envelope` is printed with [`json::write_json_line`]; a JSON object
//! (the pipeline's `json` format) is printed as it is; anything else is counted as undecodable
//! and reported on standard error, never a reason to stop. `--raw` skips decoding and prints
//! each message's subject, headers and payload as they are on the bus.
//!
//! Must never: stop on a message it cannot read, or block the reader on a slow terminal for
//! longer than one write (output is flushed whenever the reader has nothing ready).

use std::io::{self, Write};

use anyhow::Context;
use base64::Engine;
use bytes::Bytes;
use futures_util::FutureExt;

use crate::broker::kafka::{KafkaReader, KafkaReaderConfig};
use crate::broker::nats::{self, NatsConnection, NatsReader, StreamStart};
use crate::model::{json, pb};

/// Arguments of `amibus tail`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub source: SourceArgs,
}

/// Where to read from.
#[derive(Debug, clap::Subcommand)]
pub enum SourceArgs {
    /// A NATS subject (core NATS: only what is published from now on) or a JetStream stream.
    Nats(NatsArgs),
    /// A Kafka topic, from the earliest offset (a fresh consumer group unless `--group`).
    Kafka(KafkaArgs),
}

/// Arguments of `amibus tail kafka`.
#[derive(Debug, clap::Args)]
pub struct KafkaArgs {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    #[arg(long, required = true)]
    pub brokers: String,
    /// The topic to read (default `ami.events`).
    #[arg(long, default_value = "ami.events")]
    pub topic: String,
    /// The consumer group; default: a new one per run, so reading starts at the earliest
    /// offset and commits nothing anyone else relies on.
    #[arg(long)]
    pub group: Option<String>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// Arguments of `amibus tail nats`.
#[derive(Debug, clap::Args)]
pub struct NatsArgs {
    /// NATS server URLs (comma-separated or repeated), e.g. `nats://127.0.0.1:4222`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub servers: Vec<String>,
    /// The subject to read (wildcards allowed). Core NATS: default `ami.>`. JetStream: a
    /// filter on the stream's subjects; default: the whole stream.
    #[arg(long)]
    pub subject: Option<String>,
    /// Read this JetStream stream (an ordered, ephemeral consumer; nothing is acknowledged or
    /// removed) instead of subscribing to core NATS.
    #[arg(long)]
    pub stream: Option<String>,
    /// JetStream: where to start. `first`: the oldest message held; `last`: the newest of each
    /// subject; `new`: only what is stored from now on; a number: that stream sequence.
    #[arg(long, requires = "stream", value_parser = parse_start)]
    pub from: Option<StreamStart>,
    /// JetStream: keep waiting for new messages at the end of the stream instead of exiting
    /// (always the case with `--from new`).
    #[arg(long, requires = "stream")]
    pub follow: bool,
    #[command(flatten)]
    pub auth: super::NatsAuthArgs,
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// Filters and output options shared by every source.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FilterArgs {
    /// Only records of this server id (repeat for several).
    #[arg(long = "server", value_name = "ID")]
    pub server: Vec<String>,
    /// Only records with this event name, case-insensitive (repeat for several). Synthetic
    /// records are named by their kind: `connection_up`, `connection_down`, `gap`.
    #[arg(long = "event", value_name = "NAME")]
    pub event: Vec<String>,
    /// Stop after printing this many records.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Print each message as it is on the bus (subject, headers, payload) without decoding.
    #[arg(long)]
    pub raw: bool,
}

fn parse_start(s: &str) -> Result<StreamStart, String> {
    match s {
        "first" => Ok(StreamStart::First),
        "last" => Ok(StreamStart::Last),
        "new" => Ok(StreamStart::New),
        n => n
            .parse::<u64>()
            .map(StreamStart::Sequence)
            .map_err(|_| format!("{s:?}: use first, last, new or a stream sequence")),
    }
}

/// One message as any source yields it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    /// The NATS subject or Kafka topic.
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

impl Message {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl From<nats::NatsMessage> for Message {
    fn from(m: nats::NatsMessage) -> Self {
        Message {
            subject: m.subject,
            headers: m.headers,
            payload: m.payload,
        }
    }
}

/// The reader behind `tail`.
pub enum Reader {
    Nats(NatsReader),
    Kafka(KafkaReader),
}

impl Reader {
    /// The next message; `None` when the source ended. Cancel-safe: dropping the future before
    /// it resolves loses no message.
    ///
    /// # Errors
    /// The reader failed beyond what its client repairs by itself.
    pub async fn next(&mut self) -> Option<anyhow::Result<Message>> {
        match self {
            Reader::Nats(s) => s
                .next()
                .await
                .map(|r| r.map(Message::from).map_err(Into::into)),
            Reader::Kafka(k) => Some(k.recv().await.map_err(Into::into).map(|m| {
                Message {
                    subject: m.topic,
                    headers: m
                        .headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v).into_owned()))
                        .collect(),
                    payload: m.payload,
                }
            })),
        }
    }
}

/// What became of one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Printed,
    FilteredOut,
    /// Not an envelope and not JSON; the reason says what was wrong.
    Undecodable(String),
}

/// Counters of one tail run, printed on standard error at exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TailStats {
    pub read: u64,
    pub printed: u64,
    pub filtered_out: u64,
    pub undecodable: u64,
}

impl std::fmt::Display for TailStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "amibus tail: {} read, {} printed, {} filtered out, {} undecodable",
            self.read, self.printed, self.filtered_out, self.undecodable
        )
    }
}

/// Filters and formats messages; pure (no I/O), so every case is unit-tested.
#[derive(Debug, Default)]
pub struct Printer {
    filter: FilterArgs,
    pub stats: TailStats,
}

/// A decoded payload.
enum Decoded {
    Envelope(Box<pb::Envelope>),
    /// A JSON object; `server` and `name` are read only when a filter needs them.
    Json(serde_json::Value),
}

impl Decoded {
    fn server(&self) -> &str {
        match self {
            Decoded::Envelope(e) => &e.server,
            Decoded::Json(v) => v["server"].as_str().unwrap_or_default(),
        }
    }

    /// The name the `event` header would carry: the event name, else the kind.
    fn event(&self) -> &str {
        match self {
            Decoded::Envelope(e) if e.name.is_empty() => json::kind_name(e.kind()),
            Decoded::Envelope(e) => &e.name,
            Decoded::Json(v) => v["name"]
                .as_str()
                .filter(|n| !n.is_empty())
                .or_else(|| v["kind"].as_str())
                .unwrap_or_default(),
        }
    }
}

fn decode(payload: &[u8]) -> Result<Decoded, String> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'{')
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload)
    {
        return Ok(Decoded::Json(v));
    }
    if payload.is_empty() {
        return Err("empty payload".into());
    }
    let env = crate::pipeline::decode_payload(payload)
        .map_err(|e| format!("not an amibus envelope or JSON: {e}"))?;
    // Protobuf decodes many short byte strings into a message of defaults; every envelope
    // amibus writes has a server and a kind.
    if env.server.is_empty() || env.kind() == pb::Kind::Unspecified {
        return Err("not an amibus envelope (no server or kind)".into());
    }
    Ok(Decoded::Envelope(Box::new(env)))
}

impl Printer {
    pub fn new(filter: FilterArgs) -> Self {
        Printer {
            filter,
            stats: TailStats::default(),
        }
    }

    /// Whether the limit is reached.
    pub fn done(&self) -> bool {
        self.filter.limit.is_some_and(|l| self.stats.printed >= l)
    }

    fn server_ok(&self, server: &str) -> bool {
        self.filter.server.is_empty() || self.filter.server.iter().any(|s| s == server)
    }

    fn event_ok(&self, event: &str) -> bool {
        self.filter.event.is_empty()
            || self
                .filter
                .event
                .iter()
                .any(|e| e.eq_ignore_ascii_case(event))
    }

    /// Filter `msg` and append its line to `out` if it passes.
    pub fn handle(&mut self, msg: &Message, out: &mut Vec<u8>) -> Outcome {
        self.stats.read += 1;
        let outcome = self.outcome(msg, out);
        match &outcome {
            Outcome::Printed => self.stats.printed += 1,
            Outcome::FilteredOut => self.stats.filtered_out += 1,
            Outcome::Undecodable(_) => self.stats.undecodable += 1,
        }
        outcome
    }

    fn outcome(&self, msg: &Message, out: &mut Vec<u8>) -> Outcome {
        // The cheap path: the bus headers decide.
        let by_header = |name: &str, ok: &dyn Fn(&str) -> bool| msg.header(name).map(ok);
        let server = by_header("server", &|s| self.server_ok(s));
        let event = by_header("event", &|e| self.event_ok(e));
        if server == Some(false) || event == Some(false) {
            return Outcome::FilteredOut;
        }
        let needs_decoded_filter = (server.is_none() && !self.filter.server.is_empty())
            || (event.is_none() && !self.filter.event.is_empty());
        let passes = |d: &Decoded| self.server_ok(d.server()) && self.event_ok(d.event());
        if self.filter.raw {
            // Raw output needs no decoding; only a filter the headers could not answer does.
            if needs_decoded_filter && !decode(&msg.payload).is_ok_and(|d| passes(&d)) {
                return Outcome::FilteredOut;
            }
            write_raw(msg, out);
            return Outcome::Printed;
        }
        let decoded = match decode(&msg.payload) {
            Ok(d) => d,
            Err(why) => return Outcome::Undecodable(why),
        };
        if needs_decoded_filter && !passes(&decoded) {
            return Outcome::FilteredOut;
        }
        match decoded {
            Decoded::Envelope(env) => json::write_json_line(&env, out),
            Decoded::Json(_) => {
                // As it is on the bus, one line.
                let text = msg.payload.trim_ascii_end();
                if text.contains(&b'\n') {
                    let v: serde_json::Value =
                        serde_json::from_slice(text).unwrap_or(serde_json::Value::Null);
                    let _ = serde_json::to_writer(&mut *out, &v);
                } else {
                    out.extend_from_slice(text);
                }
                out.push(b'\n');
            }
        }
        Outcome::Printed
    }
}

/// `{"subject":..,"headers":[[k,v],..],"payload":"text"|{"b64":".."}}` and a newline.
fn write_raw(msg: &Message, out: &mut Vec<u8>) {
    let payload = match std::str::from_utf8(&msg.payload) {
        Ok(s) => serde_json::Value::String(s.to_owned()),
        Err(_) => serde_json::json!({
            "b64": base64::engine::general_purpose::STANDARD.encode(&msg.payload)
        }),
    };
    let line = serde_json::json!({
        "subject": msg.subject,
        "headers": msg.headers,
        "payload": payload,
    });
    let _ = serde_json::to_writer(&mut *out, &line);
    out.push(b'\n');
}

/// Undecodable messages are logged one by one up to this many, then every 1000th.
const LOG_FIRST: u64 = 10;

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async move {
        // Installed before anything is read, so SIGINT or SIGTERM at any point ends the loop
        // and the summary is printed, instead of killing the process.
        let mut stop = Stop::install()?;
        let (mut source, filter) = open(args).await?;
        let mut printer = Printer::new(filter);
        let result = tail(
            &mut source,
            &mut printer,
            &mut io::stdout().lock(),
            &mut stop,
        )
        .await;
        eprintln!("{}", printer.stats);
        result
    })
}

async fn open(args: Args) -> anyhow::Result<(Reader, FilterArgs)> {
    match args.source {
        SourceArgs::Nats(a) => {
            let auth = a.auth.auth()?;
            let conn = NatsConnection {
                servers: a.servers.clone(),
                auth,
                name: Some("amibus-tail".into()),
                ..NatsConnection::default()
            };
            let client = nats::connect(&conn).await?;
            let source = match &a.stream {
                Some(stream) => {
                    let start = a.from.unwrap_or_default();
                    let mut s =
                        NatsReader::jetstream(&client, stream, a.subject.as_deref(), start).await?;
                    if !a.follow && start != StreamStart::New {
                        s = s.stop_at_end();
                    }
                    eprintln!("amibus tail: reading stream {stream} from {start:?}");
                    s
                }
                None => {
                    let subject = a.subject.as_deref().unwrap_or("ami.>");
                    let s = NatsReader::subscribe(&client, subject).await?;
                    eprintln!("amibus tail: subscribed to {subject}");
                    s
                }
            };
            Ok((Reader::Nats(source), a.filter))
        }
        SourceArgs::Kafka(a) => {
            let group = a.group.clone().unwrap_or_else(|| {
                format!(
                    "amibus-tail-{}-{}",
                    std::process::id(),
                    crate::ami::record::now_ns()
                )
            });
            let mut cfg = KafkaReaderConfig::new(a.brokers.clone(), group);
            cfg.topics = vec![a.topic.clone()];
            let source = KafkaReader::new(&cfg)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", a.topic))?;
            eprintln!(
                "amibus tail: reading topic {} from the earliest offset",
                a.topic
            );
            Ok((Reader::Kafka(source), a.filter))
        }
    }
}

/// SIGINT (Ctrl-C) and SIGTERM, which end a tail like the end of the source.
pub struct Stop {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Stop {
    /// Take over SIGINT and SIGTERM from now on.
    ///
    /// # Errors
    /// A handler cannot be installed.
    pub fn install() -> anyhow::Result<Stop> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Stop {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    /// Whether a signal arrived; never waits.
    fn try_stopped(&mut self) -> bool {
        self.interrupt.recv().now_or_never().is_some()
            || self.terminate.recv().now_or_never().is_some()
    }

    async fn stopped(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// Read until the limit, the end of the source, SIGINT or SIGTERM, or a closed standard
/// output.
///
/// # Errors
/// The source failed, or standard output failed other than by being closed.
pub async fn tail(
    source: &mut Reader,
    printer: &mut Printer,
    out: &mut impl Write,
    stop: &mut Stop,
) -> anyhow::Result<()> {
    let mut buf = Vec::with_capacity(64 << 10);
    while !printer.done() {
        if stop.try_stopped() {
            break;
        }
        // Take what is ready without waiting; flush before waiting.
        let next = match source.next().now_or_never() {
            Some(next) => next,
            None => {
                if !write_out(out, &mut buf)? {
                    return Ok(());
                }
                tokio::select! {
                    next = source.next() => next,
                    () = stop.stopped() => break,
                }
            }
        };
        let Some(next) = next else { break };
        let msg = next?;
        if let Outcome::Undecodable(why) = printer.handle(&msg, &mut buf) {
            let n = printer.stats.undecodable;
            if n <= LOG_FIRST || n.is_multiple_of(1000) {
                tracing::warn!(subject = %msg.subject, bytes = msg.payload.len(), count = n, "undecodable payload skipped: {why}");
            }
        }
        if buf.len() >= 64 << 10 && !write_out(out, &mut buf)? {
            return Ok(());
        }
    }
    write_out(out, &mut buf)?;
    Ok(())
}

/// Write and flush `buf`; false when standard output is closed (`| head`).
fn write_out(out: &mut impl Write, buf: &mut Vec<u8>) -> anyhow::Result<bool> {
    let r = out.write_all(buf).and_then(|()| out.flush());
    buf.clear();
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("cannot write standard output"),
    }
}

#[cfg(test)]
#[path = "tail_tests.rs"]
mod tests;
