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
//! A server that says it entered lame duck mode (an `INFO` with `ldm`: it is shutting down, a
//! cluster's rolling upgrade) is left before it closes the connection: nothing more is written
//! to it, and once everything written is confirmed (within 5 s) the connection moves to the
//! next server with the queue kept open and its records queued for the new connection, so the
//! move fails nothing and repeats nothing.
//!
//! Must never: confirm a record before the server's `PONG` to a `PING` written after it, or
//! before its PubAck.

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
use super::slots::Slots;
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
    slots: Mutex<Slots<Result<(), Failed>>>,
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
                    slots: Mutex::new(Slots::default()),
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
        // Read the clock only once there is a wait: the usual call finds room at once.
        let mut deadline = None;
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
                    .is_some_and(|(a, s)| s.pending() >= a.max_in_flight);
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
                        let slot = s.push();
                        debug_assert_eq!(slot, n, "a slot per queued record");
                    }
                    drop(slots);
                    drop(q);
                    if was_empty {
                        self.shared.wake.notify_one();
                    }
                    return Ok(n);
                }
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + wait);
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
            done: false,
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
    /// Read to the end: dropping it has nothing to give up.
    done: bool,
}

impl Future for Outcome {
    type Output = Result<(), Failed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(outcome) = self.shared.outcome_of(self.n) {
            self.done = true;
            return Poll::Ready(outcome);
        }
        self.shared.register(cx.waker());
        // Moved while registering: the wakers may have been taken before this one was added.
        match self.shared.outcome_of(self.n) {
            Some(outcome) => {
                self.done = true;
                Poll::Ready(outcome)
            }
            None => Poll::Pending,
        }
    }
}

/// An outcome dropped before it was read (the driver gave up on it at its deadline, or shut
/// down) gives its slot up, or the slots behind it would never be let go.
impl Drop for Outcome {
    fn drop(&mut self) {
        let Some(acks) = self.shared.acks.as_ref().filter(|_| !self.done) else {
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
            Some(acks) => lock(&acks.slots).pending() == 0,
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
            lock(&acks.slots).resolve_pending(u64::MAX, || Err(Self::lost()));
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

mod serve;
use serve::keep_connected;

#[cfg(test)]
mod tests;
