//! Publishing on a NATS connection of our own ([`crate::broker::nats_wire`]), for both modes
//! of the NATS sink.
//!
//! Owns: the write queue (`HPUB`s rendered straight into one buffer under a short lock), the
//! task that writes it and reads the server, reconnecting, and what "confirmed" means:
//!
//! - [`Confirm::Pong`] (core NATS): a record is confirmed when the server answers a `PING`
//!   written after it with its `PONG`. The server reads a connection in order, so by then it
//!   has read the record and routed it to whoever subscribed. Still at-most-once (nobody may
//!   be listening; core NATS keeps nothing), but a record written into a connection that dies
//!   before the server read it is failed and sent again from the spool. One `PING` is in flight
//!   at a time: a write while one is out asks for another when its `PONG` comes, so a busy
//!   stream costs one `PING` per round trip, not one per write.
//! - [`Confirm::PubAck`] (JetStream): every record carries a reply subject
//!   `<inbox>.<number>` and is confirmed by the stream's PubAck on it (failed by an API error
//!   or a "no responders" status); the inbox is subscribed first on every connection. At most
//!   `max_in_flight` PubAcks are awaited at once: `queue` waits for room beyond.
//!
//! While disconnected, `queue` refuses ([`SinkError::Retriable`]); the queue is emptied when
//! the connection breaks (under the same lock `queue` takes, so no record slips into a dead
//! connection's queue and out after the reconnect), and every record not confirmed by then is
//! failed (a JetStream record may have been stored all the same: its resend carries the same
//! `Nats-Msg-Id`).
//!
//! Must never: confirm a record before the server's `PONG` to a `PING` written after it, or
//! before its PubAck.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Buf;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::SinkError;
use crate::broker::nats_wire::{Conn, Dialer, ServerInfo, WireError, refusal};

/// `queue` waits for room past this many queued bytes (the writer is behind, or the server).
const MAX_QUEUED: usize = 8 << 20;
/// A `PING` when nothing was written for this long, so a dead peer is noticed.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// No `PONG` for this long: the connection is dead, whatever TCP says.
const STALE: Duration = Duration::from_secs(20);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A record's reply subject, JetStream only: the inbox prefix and the record's number.
pub type Reply<'a> = Option<(&'a str, u64)>;

/// What confirms a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confirm {
    /// Core NATS: the server's `PONG` to a later `PING`.
    Pong,
    /// JetStream: the record's PubAck, at most this many awaited at once.
    PubAck { max_in_flight: usize },
}

/// Why a record was not confirmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failed {
    /// Lost with its connection, refused, or the publisher stopped.
    Sink(SinkError),
    /// JetStream: nobody answered (no stream captures the subject, or it is not up yet).
    NoResponders,
    /// JetStream: the stream refused it.
    Api { err_code: u64, description: String },
}

impl Failed {
    /// As the driver sees it, without asking the server what "no responders" meant.
    pub fn into_sink(self) -> SinkError {
        match self {
            Failed::Sink(e) => e,
            Failed::NoResponders => SinkError::Retriable("nats: no responders".into()),
            Failed::Api {
                err_code,
                description,
            } => SinkError::Retriable(format!("nats: {description} (error {err_code})")),
        }
    }
}

/// The publisher: a handle to the queue and the task that drains it.
pub struct Publisher {
    shared: Arc<Shared>,
    _stop: DropGuard,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writer: bytes queued, a `PONG` owed, or a `PING` wanted.
    wake: Notify,
    /// Wakes senders waiting for room.
    room: Notify,
    /// Core: the last record the server confirmed. Only grows.
    confirmed: AtomicU64,
    /// The last record failed by a lost connection (`u64::MAX` once the publisher stopped).
    failed: AtomicU64,
    /// Outcomes waiting for a change.
    waiting: Mutex<Vec<Waker>>,
    /// JetStream only.
    acks: Option<Acks>,
}

struct Queue {
    bytes: Vec<u8>,
    connected: bool,
    max_payload: usize,
    /// Records numbered as queued, from 1.
    queued: u64,
}

/// JetStream's per-record outcomes, by record number.
struct Acks {
    /// `_INBOX.<random>.`: a record's reply subject is this and its number.
    inbox: String,
    max_in_flight: usize,
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    /// The number of `states[0]`.
    base: u64,
    states: VecDeque<Slot>,
    pending: usize,
}

enum Slot {
    Pending,
    Done(Result<(), Failed>),
    Taken,
}

impl Slots {
    fn resolve(&mut self, n: u64, outcome: Result<(), Failed>) -> bool {
        let Some(slot) = n
            .checked_sub(self.base)
            .and_then(|i| self.states.get_mut(i as usize))
        else {
            return false;
        };
        if !matches!(slot, Slot::Pending) {
            return false;
        }
        *slot = Slot::Done(outcome);
        self.pending -= 1;
        true
    }

    /// Mark `n` read without reading it; true if it was still awaited (room freed).
    fn abandon(&mut self, n: u64) -> bool {
        let Some(slot) = n
            .checked_sub(self.base)
            .and_then(|i| self.states.get_mut(i as usize))
        else {
            return false;
        };
        let was_pending = matches!(slot, Slot::Pending);
        if was_pending {
            self.pending -= 1;
        }
        *slot = Slot::Taken;
        self.pop_taken();
        was_pending
    }

    fn pop_taken(&mut self) {
        while matches!(self.states.front(), Some(Slot::Taken)) {
            self.states.pop_front();
            self.base += 1;
        }
    }

    fn take(&mut self, n: u64) -> Option<Result<(), Failed>> {
        let i = n.checked_sub(self.base)? as usize;
        let slot = self.states.get_mut(i)?;
        if !matches!(slot, Slot::Done(_)) {
            return None;
        }
        let Slot::Done(outcome) = std::mem::replace(slot, Slot::Taken) else {
            unreachable!("checked above");
        };
        self.pop_taken();
        Some(outcome)
    }
}

/// A random inbox prefix: the std hasher's random keys over the time and the process id.
fn inbox() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    let a = h.finish();
    h.write_u64(a);
    format!("_INBOX.{a:016x}{:016x}.", h.finish())
}

impl Publisher {
    /// Connect to the first server that answers (each tried once), then keep a connection in
    /// the background until the publisher is dropped.
    ///
    /// # Errors
    /// Every server failed: the last server's error.
    pub async fn start(dialer: Dialer, confirm: Confirm) -> Result<Publisher, WireError> {
        let mut last = WireError::Config("no servers given".into());
        let mut first = None;
        for i in 0..dialer.configured() {
            match dialer.dial(i).await {
                Ok(conn) => {
                    first = Some((i, conn));
                    break;
                }
                Err(e) => last = e,
            }
        }
        let Some((index, conn)) = first else {
            return Err(last);
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                bytes: Vec::with_capacity(256 << 10),
                connected: false,
                max_payload: conn.info.max_payload(),
                queued: 0,
            }),
            wake: Notify::new(),
            room: Notify::new(),
            confirmed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            waiting: Mutex::new(Vec::new()),
            acks: match confirm {
                Confirm::Pong => None,
                Confirm::PubAck { max_in_flight } => Some(Acks {
                    inbox: inbox(),
                    max_in_flight: max_in_flight.max(1),
                    slots: Mutex::new(Slots {
                        base: 1,
                        ..Slots::default()
                    }),
                }),
            },
        });
        // Exported from the start, so a dashboard's increase() sees the first one.
        for reason in WireError::KINDS {
            metrics::counter!("amibus_nats_disconnects_total", "reason" => reason).increment(0);
        }
        metrics::counter!("amibus_nats_refused_messages_total").increment(0);
        let stop = CancellationToken::new();
        shared.connected(&conn.info);
        tracing::info!(server = %conn.url, "nats connected");
        tokio::spawn(keep_connected(
            shared.clone(),
            dialer,
            index,
            conn,
            stop.clone(),
        ));
        Ok(Publisher {
            shared,
            _stop: stop.drop_guard(),
        })
    }

    /// Queue one message: `render(out, max_payload, reply)` writes it into the queue (`reply`:
    /// the inbox prefix and the record's number, JetStream only) and returns `Err` (nothing
    /// written) when it does not fit. Returns the record's number.
    ///
    /// # Errors
    /// Not connected, or no room within `wait` → retriable; whatever `render` says.
    pub async fn queue(
        &self,
        wait: Duration,
        mut render: impl FnMut(&mut Vec<u8>, usize, Reply<'_>) -> Result<(), SinkError>,
    ) -> Result<u64, SinkError> {
        let deadline = Instant::now() + wait;
        loop {
            let room = self.shared.room.notified();
            {
                let mut q = lock(&self.shared.queue);
                if !q.connected {
                    return Err(SinkError::Retriable("nats: not connected".into()));
                }
                let mut slots = self.shared.acks.as_ref().map(|a| (a, lock(&a.slots)));
                let acks_full = slots
                    .as_ref()
                    .is_some_and(|(a, s)| s.pending >= a.max_in_flight);
                if q.bytes.len() < MAX_QUEUED && !acks_full {
                    let was_empty = q.bytes.is_empty();
                    let max = q.max_payload;
                    let n = q.queued + 1;
                    render(
                        &mut q.bytes,
                        max,
                        slots.as_ref().map(|(a, _)| (a.inbox.as_str(), n)),
                    )?;
                    q.queued = n;
                    if let Some((_, s)) = slots.as_mut() {
                        s.states.push_back(Slot::Pending);
                        s.pending += 1;
                    }
                    drop(slots);
                    drop(q);
                    if was_empty {
                        self.shared.wake.notify_one();
                    }
                    return Ok(n);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, room).await.is_err() {
                return Err(SinkError::Retriable(format!(
                    "nats: no room in the queue for {wait:?}: the server is not keeping up"
                )));
            }
        }
    }

    /// The number of the last record queued.
    pub fn queued(&self) -> u64 {
        lock(&self.shared.queue).queued
    }

    /// Resolves when record `n` is confirmed (`Ok`) or failed.
    pub fn outcome(&self, n: u64) -> Outcome {
        Outcome {
            shared: self.shared.clone(),
            n,
        }
    }

    /// Resolves once every record queued so far has an outcome.
    pub async fn settled(&self) {
        let n = self.queued();
        std::future::poll_fn(|cx| {
            if self.shared.settled_through(n) {
                return Poll::Ready(());
            }
            self.shared.register(cx.waker());
            if self.shared.settled_through(n) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
}

/// The outcome of one record. Core: two atomic loads when it is already known (the usual
/// case: one `PONG` confirms every record written before its `PING`); JetStream: its slot.
/// A waker is registered only while it is pending.
pub struct Outcome {
    shared: Arc<Shared>,
    n: u64,
}

impl Future for Outcome {
    type Output = Result<(), Failed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(done) = self.shared.outcome_of(self.n) {
            return Poll::Ready(done);
        }
        self.shared.register(cx.waker());
        // Moved while registering: the wakers may have been taken before this one was added.
        match self.shared.outcome_of(self.n) {
            Some(done) => Poll::Ready(done),
            None => Poll::Pending,
        }
    }
}

/// An outcome dropped before it was read (the driver gave up on it at its deadline, or shut
/// down) gives its slot up, or the slots behind it would never be let go.
impl Drop for Outcome {
    fn drop(&mut self) {
        let Some(acks) = &self.shared.acks else {
            return;
        };
        let freed = lock(&acks.slots).abandon(self.n);
        if freed {
            self.shared.room.notify_waiters();
        }
    }
}

impl Shared {
    fn lost() -> Failed {
        Failed::Sink(SinkError::Retriable(
            "nats: the connection was lost before the record was confirmed".into(),
        ))
    }

    fn outcome_of(&self, n: u64) -> Option<Result<(), Failed>> {
        if let Some(acks) = &self.acks {
            if let Some(done) = lock(&acks.slots).take(n) {
                return Some(done);
            }
        } else if self.confirmed.load(Ordering::Acquire) >= n {
            return Some(Ok(()));
        }
        match self.failed.load(Ordering::Acquire) {
            u64::MAX => Some(Err(Failed::Sink(SinkError::Retriable(
                "nats: publisher stopped".into(),
            )))),
            // JetStream slots are failed in place when the connection goes.
            f if f >= n && self.acks.is_none() => Some(Err(Self::lost())),
            _ => None,
        }
    }

    fn settled_through(&self, n: u64) -> bool {
        if self.failed.load(Ordering::Acquire) == u64::MAX {
            return true;
        }
        match &self.acks {
            Some(acks) => lock(&acks.slots).pending == 0,
            None => {
                self.confirmed.load(Ordering::Acquire) >= n
                    || self.failed.load(Ordering::Acquire) >= n
            }
        }
    }

    fn register(&self, waker: &Waker) {
        let mut waiting = lock(&self.waiting);
        if !waiting.iter().any(|w| w.will_wake(waker)) {
            waiting.push(waker.clone());
        }
    }

    fn wake_outcomes(&self) {
        let waiting = std::mem::take(&mut *lock(&self.waiting));
        for w in waiting {
            w.wake();
        }
    }

    fn connected(&self, info: &ServerInfo) {
        let mut q = lock(&self.queue);
        q.connected = true;
        q.max_payload = info.max_payload();
    }

    /// The connection is gone: empty the queue and fail everything not confirmed.
    fn disconnected(&self) {
        let mut q = lock(&self.queue);
        q.connected = false;
        q.bytes.clear();
        let queued = q.queued;
        if let Some(acks) = &self.acks {
            let mut slots = lock(&acks.slots);
            let base = slots.base;
            for n in base..=queued {
                slots.resolve(n, Err(Self::lost()));
            }
        }
        drop(q);
        self.failed.fetch_max(queued, Ordering::AcqRel);
        self.wake_outcomes();
        self.room.notify_waiters();
    }

    /// Swap the queued bytes into `out` (which must be empty); the number of the last record
    /// in them.
    fn take(&self, out: &mut Vec<u8>) -> u64 {
        let mut q = lock(&self.queue);
        std::mem::swap(&mut q.bytes, out);
        let full = out.len() >= MAX_QUEUED;
        let n = q.queued;
        drop(q);
        if full {
            self.room.notify_waiters();
        }
        n
    }
}

/// Serve the connection; when it breaks, fail what it held and dial again (the next server
/// first, backing off up to 4 s once every server failed in a row).
async fn keep_connected(
    shared: Arc<Shared>,
    dialer: Dialer,
    mut index: usize,
    conn: Conn,
    stop: CancellationToken,
) {
    /// Fails every outcome still waiting when the task ends, however it ends.
    struct Stopped<'a>(&'a Shared);
    impl Drop for Stopped<'_> {
        fn drop(&mut self) {
            self.0.disconnected();
            self.0.failed.store(u64::MAX, Ordering::Release);
            self.0.wake_outcomes();
        }
    }
    let _stopped = Stopped(&shared);
    let mut conn = Some(conn);
    let mut failures = 0u32;
    loop {
        let c = match conn.take() {
            Some(c) => c,
            None => {
                index += 1;
                let dialed = tokio::select! {
                    r = dialer.dial(index) => r,
                    () = stop.cancelled() => return,
                };
                match dialed {
                    Ok(c) => {
                        failures = 0;
                        shared.connected(&c.info);
                        tracing::info!(server = %c.url, "nats connected");
                        c
                    }
                    Err(e) => {
                        failures += 1;
                        let known = dialer.count();
                        tracing::debug!(server = %dialer.url(index), error = %e, "nats connect failed");
                        if failures as usize % known == 0 {
                            let rounds = failures / known as u32;
                            let pause = Duration::from_millis(100 << rounds.min(5))
                                .min(Duration::from_secs(4));
                            tracing::warn!(error = %e, retry_in = ?pause, "nats unreachable");
                            tokio::select! {
                                () = tokio::time::sleep(pause) => {}
                                () = stop.cancelled() => return,
                            }
                        }
                        continue;
                    }
                }
            }
        };
        let url = c.url.clone();
        let why = tokio::select! {
            e = serve(&shared, &dialer, c) => e,
            () = stop.cancelled() => return,
        };
        shared.disconnected();
        metrics::counter!("amibus_nats_disconnects_total", "reason" => why.kind()).increment(1);
        tracing::warn!(server = %url, error = %why, "nats disconnected; reconnecting");
    }
}

/// What the reader tells the writer.
#[derive(Default)]
struct Session {
    /// `PING`s written and not answered: the last record each covers, and when it was sent.
    pings: Mutex<VecDeque<(u64, Instant)>>,
    pongs_owed: AtomicU32,
    /// Core: records were written while a `PING` was out; send another when it is answered.
    ping_wanted: AtomicBool,
}

/// Write the queue and read the server until the connection fails; the error says why.
async fn serve(shared: &Shared, dialer: &Dialer, conn: Conn) -> WireError {
    let Conn { io, read, info, .. } = conn;
    let (mut rd, mut wr) = tokio::io::split(io);
    let session = Session::default();
    // A PubAck or a stray message is small; the server's max payload bounds any message.
    let max_message = info.max_payload() + (64 << 10);
    let reading = async {
        let mut buf = read;
        loop {
            let mut changed = false;
            while let Some(end) = memchr::memmem::find(&buf, b"\r\n") {
                let line = &buf[..end];
                if line.starts_with(b"MSG ") || line.starts_with(b"HMSG ") {
                    let msg = MsgLine::parse(line)?;
                    let need = end + 2 + msg.total + 2;
                    if msg.total > max_message {
                        return Err(WireError::Protocol(format!(
                            "a message of {} bytes",
                            msg.total
                        )));
                    }
                    if buf.len() < need {
                        break;
                    }
                    let body = &buf[end + 2..end + 2 + msg.total];
                    changed |= on_message(shared, &msg, line, body);
                    buf.advance(need);
                } else {
                    changed |= on_line(shared, dialer, &session, line)?;
                    buf.advance(end + 2);
                }
            }
            if changed {
                // Once per read, not per PubAck: a read carries many.
                shared.wake_outcomes();
                shared.room.notify_waiters();
            }
            if buf.len() > max_message + 1024 {
                return Err(WireError::Protocol(
                    "a line longer than the max payload".into(),
                ));
            }
            buf.reserve(4096);
            if rd.read_buf(&mut buf).await? == 0 {
                return Err(WireError::Closed);
            }
        }
    };
    let writing = async {
        if let Some(acks) = &shared.acks {
            // The first write: every record of this connection is queued behind it.
            wr.write_all(format!("SUB {}* 1\r\n", acks.inbox).as_bytes())
                .await?;
        }
        let core = shared.acks.is_none();
        let mut out = Vec::with_capacity(256 << 10);
        let mut written = 0u64;
        let mut last_write = Instant::now();
        loop {
            let woken = shared.wake.notified();
            let upto = shared.take(&mut out);
            let had_data = !out.is_empty();
            if had_data {
                written = upto;
            }
            for _ in 0..session.pongs_owed.swap(0, Ordering::AcqRel) {
                out.extend_from_slice(b"PONG\r\n");
            }
            {
                let mut pings = lock(&session.pings);
                let now = Instant::now();
                if let Some((_, sent)) = pings.front()
                    && now.duration_since(*sent) > STALE
                {
                    return Err(WireError::Protocol(format!("no PONG in {STALE:?}")));
                }
                let wanted = core && (had_data || session.ping_wanted.load(Ordering::Acquire));
                let idle = now.duration_since(last_write) >= KEEPALIVE;
                if pings.is_empty() && (wanted || idle) {
                    out.extend_from_slice(b"PING\r\n");
                    pings.push_back((written, now));
                    session.ping_wanted.store(false, Ordering::Release);
                } else if core && had_data {
                    session.ping_wanted.store(true, Ordering::Release);
                }
            }
            if out.is_empty() {
                let _ = tokio::time::timeout(KEEPALIVE, woken).await;
                continue;
            }
            wr.write_all(&out).await?;
            wr.flush().await?;
            out.clear();
            last_write = Instant::now();
        }
    };
    match tokio::try_join!(reading, writing) {
        Err(e) => e,
        Ok(((), ())) => WireError::Closed,
    }
}

/// `MSG <subject> <sid> [reply] <bytes>` or `HMSG <subject> <sid> [reply] <header bytes>
/// <total bytes>`.
struct MsgLine {
    header_len: usize,
    total: usize,
}

impl MsgLine {
    fn parse(line: &[u8]) -> Result<MsgLine, WireError> {
        let bad = || {
            WireError::Protocol(format!(
                "bad message line `{}`",
                String::from_utf8_lossy(&line[..line.len().min(120)])
            ))
        };
        let text = std::str::from_utf8(line).map_err(|_| bad())?;
        let mut parts = text.split_ascii_whitespace().rev();
        let number = |s: Option<&str>| s.and_then(|s| s.parse::<usize>().ok()).ok_or_else(bad);
        if line.starts_with(b"HMSG ") {
            let total = number(parts.next())?;
            let header_len = number(parts.next())?;
            if header_len > total {
                return Err(bad());
            }
            Ok(MsgLine { header_len, total })
        } else {
            Ok(MsgLine {
                header_len: 0,
                total: number(parts.next())?,
            })
        }
    }
}

/// The API error of a PubAck that is not a success.
#[derive(Deserialize)]
struct PubAckReply {
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// A message on the inbox: the PubAck (or status) of the record its subject numbers. True if
/// an outcome changed.
fn on_message(shared: &Shared, msg: &MsgLine, line: &[u8], body: &[u8]) -> bool {
    let Some(acks) = &shared.acks else {
        return false;
    };
    // The subject is the second word; its last level is the record's number.
    let subject = line.split(|&b| b == b' ').nth(1).unwrap_or_default();
    let Some(n) = subject
        .strip_prefix(acks.inbox.as_bytes())
        .and_then(|n| std::str::from_utf8(n).ok())
        .and_then(|n| n.parse::<u64>().ok())
    else {
        tracing::debug!("nats: a message on no inbox of ours; ignored");
        return false;
    };
    let (headers, payload) = body.split_at(msg.header_len);
    let outcome = if headers.starts_with(b"NATS/1.0 503") {
        Err(Failed::NoResponders)
    } else if headers.starts_with(b"NATS/1.0 ") && headers.len() > 12 {
        let status = headers[9..]
            .split(|&b| b == b'\r')
            .next()
            .unwrap_or_default();
        Err(Failed::Sink(SinkError::Retriable(format!(
            "nats jetstream: status {}",
            String::from_utf8_lossy(status)
        ))))
    } else if memchr::memmem::find(payload, b"\"error\"").is_none()
        && memchr::memmem::find(payload, b"\"seq\"").is_some()
    {
        Ok(())
    } else {
        match serde_json::from_slice::<PubAckReply>(payload) {
            Ok(PubAckReply { error: Some(e) }) => Err(Failed::Api {
                err_code: e.err_code,
                description: e.description,
            }),
            _ => Err(Failed::Sink(SinkError::Retriable(format!(
                "nats jetstream: a PubAck that cannot be read: `{}`",
                String::from_utf8_lossy(&payload[..payload.len().min(120)])
            )))),
        }
    };
    lock(&acks.slots).resolve(n, outcome)
}

/// One line from the server that is not a message. True if an outcome changed.
fn on_line(
    shared: &Shared,
    dialer: &Dialer,
    session: &Session,
    line: &[u8],
) -> Result<bool, WireError> {
    match line {
        b"PING" => {
            session.pongs_owed.fetch_add(1, Ordering::AcqRel);
            shared.wake.notify_one();
        }
        b"PONG" => {
            let answered = lock(&session.pings).pop_front();
            let Some((upto, _)) = answered else {
                return Err(WireError::Protocol("a PONG nobody asked for".into()));
            };
            if session.ping_wanted.load(Ordering::Acquire) {
                shared.wake.notify_one();
            }
            if shared.acks.is_none() {
                return Ok(shared.confirmed.fetch_max(upto, Ordering::AcqRel) < upto);
            }
        }
        b"+OK" => {}
        l if l.starts_with(b"INFO ") => {
            let info = ServerInfo::parse(&l[5..])?;
            lock(&shared.queue).max_payload = info.max_payload();
            dialer.learn(&info);
        }
        l if l.starts_with(b"-ERR") => {
            // Permission errors leave the connection open (the message is dropped: core
            // NATS's at-most-once; a JetStream record then times out and is sent again);
            // every other -ERR is followed by the server closing it.
            let e = refusal(l);
            if e.to_string().contains("Permissions Violation") {
                metrics::counter!("amibus_nats_refused_messages_total").increment(1);
                tracing::warn!(error = %e, "nats dropped a message");
            } else {
                return Err(e);
            }
        }
        l => {
            return Err(WireError::Protocol(format!(
                "unexpected `{}`",
                String::from_utf8_lossy(&l[..l.len().min(80)])
            )));
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::nats::NatsConnection;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};

    /// A scripted server: INFO, then the client's CONNECT and PING answered with PONG.
    async fn accept(listener: &TcpListener) -> BufReader<TcpStream> {
        let (sock, _) = listener.accept().await.unwrap();
        let mut sock = BufReader::new(sock);
        sock.get_mut()
            .write_all(b"INFO {\"server_id\":\"fake\",\"headers\":true,\"max_payload\":1000}\r\n")
            .await
            .unwrap();
        assert!(line(&mut sock).await.starts_with("CONNECT {"));
        assert_eq!(line(&mut sock).await, "PING");
        sock.get_mut().write_all(b"PONG\r\n").await.unwrap();
        sock
    }

    async fn line(sock: &mut BufReader<TcpStream>) -> String {
        let mut l = String::new();
        sock.read_line(&mut l).await.unwrap();
        l.trim_end().to_owned()
    }

    /// A publisher connected to a scripted server, and the server's side.
    async fn started(confirm: Confirm) -> (TcpListener, Publisher, BufReader<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("nats://{}", listener.local_addr().unwrap());
        let dialer = Dialer::new(&NatsConnection {
            servers: vec![url],
            ..NatsConnection::default()
        })
        .unwrap();
        let (publisher, sock) = tokio::join!(Publisher::start(dialer, confirm), accept(&listener));
        (listener, publisher.unwrap(), sock)
    }

    fn hpub(
        text: &str,
    ) -> impl FnMut(&mut Vec<u8>, usize, Reply<'_>) -> Result<(), SinkError> + '_ {
        move |out, max, _| {
            assert_eq!(max, 1000, "the server's max_payload");
            out.extend_from_slice(format!("PUB s {}\r\n{text}\r\n", text.len()).as_bytes());
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_record_is_confirmed_by_the_pong_after_it_and_failed_without_one() {
        let (listener, publisher, mut sock) = started(Confirm::Pong).await;

        // Written and flushed, but the server never answers its PING: failed, not confirmed.
        let n = publisher
            .queue(Duration::from_secs(5), hpub("one"))
            .await
            .unwrap();
        assert_eq!(
            (line(&mut sock).await, line(&mut sock).await),
            ("PUB s 3".into(), "one".into())
        );
        assert_eq!(line(&mut sock).await, "PING");
        drop(sock);
        assert!(
            publisher.outcome(n).await.is_err(),
            "confirmed without a PONG"
        );

        // The reconnect: the server's own PING is answered, an -ERR about permissions does
        // not end the connection, and the PONG confirms what was written before its PING.
        let mut sock = accept(&listener).await;
        sock.get_mut()
            .write_all(b"PING\r\n-ERR 'Permissions Violation for Publish to \"x\"'\r\n")
            .await
            .unwrap();
        assert_eq!(line(&mut sock).await, "PONG");
        let n = loop {
            // Refused until the client has seen the handshake through.
            match publisher.queue(Duration::from_secs(5), hpub("two")).await {
                Ok(n) => break n,
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        assert_eq!(
            (line(&mut sock).await, line(&mut sock).await),
            ("PUB s 3".into(), "two".into())
        );
        assert_eq!(line(&mut sock).await, "PING");
        let outcome = publisher.outcome(n);
        sock.get_mut().write_all(b"PONG\r\n").await.unwrap();
        outcome.await.expect("confirmed by the PONG");
    }

    #[tokio::test]
    async fn pubacks_settle_their_own_record_in_any_order() {
        let (_listener, publisher, mut sock) = started(Confirm::PubAck { max_in_flight: 3 }).await;
        let sub = line(&mut sock).await;
        let inbox = sub
            .strip_prefix("SUB ")
            .and_then(|s| s.strip_suffix("* 1"))
            .expect("the inbox is subscribed first")
            .to_owned();
        let reply = |out: &mut Vec<u8>, _: usize, reply: Reply<'_>| {
            let (inbox, n) = reply.expect("a reply subject");
            out.extend_from_slice(format!("PUB s {inbox}{n} 1\r\nx\r\n").as_bytes());
            Ok(())
        };
        let mut numbers = Vec::new();
        for _ in 0..3 {
            numbers.push(
                publisher
                    .queue(Duration::from_secs(5), reply)
                    .await
                    .unwrap(),
            );
            assert_eq!(
                line(&mut sock).await,
                format!("PUB s {inbox}{} 1", numbers.len())
            );
            assert_eq!(line(&mut sock).await, "x");
        }
        // Three awaited: a fourth waits for room, here in vain.
        let full = publisher.queue(Duration::from_millis(50), reply).await;
        assert!(full.is_err_and(|e| e.is_retriable()));

        let ok = "{\"stream\":\"S\",\"seq\":1}";
        let too_big = "{\"error\":{\"code\":400,\"err_code\":10054,\"description\":\"message size exceeds maximum allowed\"}}";
        let acks = format!(
            "MSG {inbox}2 1 {}\r\n{ok}\r\nHMSG {inbox}1 1 16 16\r\nNATS/1.0 503\r\n\r\n\r\n\
             MSG {inbox}3 1 {}\r\n{too_big}\r\nMSG _INBOX.other.1 1 2\r\n{{}}\r\n",
            ok.len(),
            too_big.len()
        );
        sock.get_mut().write_all(acks.as_bytes()).await.unwrap();
        assert_eq!(publisher.outcome(2).await, Ok(()));
        assert_eq!(publisher.outcome(1).await, Err(Failed::NoResponders));
        assert_eq!(
            publisher.outcome(3).await,
            Err(Failed::Api {
                err_code: 10054,
                description: "message size exceeds maximum allowed".into()
            })
        );

        // An outcome dropped unread (the driver gave up at its deadline) lets its slot go,
        // or every slot behind it would be kept for good.
        let dropped = publisher
            .queue(Duration::from_secs(5), reply)
            .await
            .unwrap();
        let _ = (line(&mut sock).await, line(&mut sock).await);
        drop(publisher.outcome(dropped));
        assert_eq!(
            lock(&publisher.shared.acks.as_ref().unwrap().slots)
                .states
                .len(),
            0
        );

        // Room again; then the connection goes before its PubAck: failed.
        let n = publisher
            .queue(Duration::from_secs(5), reply)
            .await
            .unwrap();
        assert_eq!(line(&mut sock).await, format!("PUB s {inbox}5 1"));
        drop(sock);
        assert!(matches!(
            publisher.outcome(n).await,
            Err(Failed::Sink(SinkError::Retriable(_)))
        ));
    }

    #[test]
    fn losses_and_refusals_are_counted() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // A current-thread runtime: the publisher's task runs on this thread, under the
        // recorder set for it.
        metrics::with_local_recorder(&recorder, || {
            rt.block_on(async {
                let (listener, publisher, mut sock) = started(Confirm::Pong).await;
                sock.get_mut()
                    .write_all(b"-ERR 'Permissions Violation for Publish to \"x\"'\r\nPING\r\n")
                    .await
                    .unwrap();
                assert_eq!(
                    line(&mut sock).await,
                    "PONG",
                    "still connected after the -ERR"
                );
                drop(sock);
                // Garbage from the server ends the connection as a protocol error; the
                // publisher connects again.
                let mut again = accept(&listener).await;
                again.get_mut().write_all(b"HELLO THERE\r\n").await.unwrap();
                let _third = accept(&listener).await;
                drop(publisher);
            })
        });
        let text = handle.render();
        assert!(
            text.contains("amibus_nats_refused_messages_total 1"),
            "{text}"
        );
        assert!(
            text.contains("amibus_nats_disconnects_total{reason=\"closed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("amibus_nats_disconnects_total{reason=\"protocol\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_server_that_stops_reading_makes_queue_refuse_not_grow() {
        let (_listener, publisher, sock) = started(Confirm::Pong).await;
        // The server reads nothing more: the socket buffers fill, then the queue's 8 MiB.
        let big = vec![b'x'; 1 << 20];
        let mut refused = None;
        for _ in 0..64 {
            let put = |out: &mut Vec<u8>, _: usize, _: Reply<'_>| {
                out.extend_from_slice(&big);
                Ok(())
            };
            if let Err(e) = publisher.queue(Duration::from_millis(200), put).await {
                refused = Some(e);
                break;
            }
        }
        let e = refused.expect("64 MiB queued into a server that reads nothing");
        assert!(e.is_retriable(), "{e:?}");
        assert!(lock(&publisher.shared.queue).bytes.len() <= MAX_QUEUED + (1 << 20));
        drop(sock);
    }
}
