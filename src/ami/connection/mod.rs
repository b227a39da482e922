//! One task per Asterisk server: connect, log in, read frames at line rate, hand them on.
//!
//! Owns: the server's socket (TCP or TLS), the session's read buffer and decoder, the stamp of
//! every record (server, epoch, seq, receive time), the hand-off to the downstream queue, the
//! ActionID → waiting caller table, keepalive, reconnect with backoff, and [`Stats`].
//!
//! Must never:
//! - wait on the consumer for long. Asterisk drops a session whose socket stays unwritable for
//!   100 ms, so records go downstream with `try_send`; when the queue is full the record is
//!   dropped, its seq is remembered, and a [`Record::Gap`] naming the dropped range is sent as
//!   soon as the queue has room again, while reading goes on. Pending gaps are bounded
//!   ([`MAX_PENDING_GAPS`]; past it the oldest is forgotten and counted in `gaps_lost`).
//!   Before that point, while the queue is nearly full (less than its
//!   [headroom](super::handoff::Sender::headroom) free), a read is *held* for at most
//!   [`Options::handoff_wait`] (20 ms, under 100 ms by validation): a burst the pipelines take
//!   a moment to absorb then waits in the socket buffers (megabytes, which fill long before
//!   Asterisk's writes block) instead of being dropped. A hold that runs out switches the
//!   connection to *shedding*, reading on and dropping until the queue has room again, so a
//!   stalled pipeline can never hold the socket unread for longer than one wait.
//! - stop serving the session during a hold. The hold is a branch of the read loop's `select!`
//!   that replaces the read: shutdown (Logoff), writes, gap records, new actions and the
//!   keepalive timer are served as usual. It wakes on the queue's room notification (sent by
//!   the pipeline when it takes records) or on its deadline, never on a polling timer.
//! - wait on a write: actions are written from a buffer polled next to the read, so a stalled
//!   write never stops the read.
//! - re-send an action: one in flight when the session ends is answered
//!   [`ActionError::OutcomeUnknown`].
//! - log the secret, or log per frame: one log line per state change.
//!
//! # Epochs and sequence numbers
//! Each login attempt takes `epoch = max(previous_epoch + 1, unix time in ms)`, so epochs grow
//! across process restarts too and `(server, epoch, seq)` names one record for good. `seq` starts
//! at 1 with `ConnectionUp` and counts every record of the epoch: frames, synthetic records, and
//! records that were dropped (those reappear as the range of a later `Gap`). The epoch of a
//! failed login is burnt; only a refusal that needs a human (an authentication failure, a
//! filter the server rejects) produces a record in it: one
//! `ConnectionDown { reason: "auth failure: …" }` (or `"filter rejected: …"`) per streak.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::action::Action;
use super::codec::{AmiCodec, Decoded};
use super::frame::OwnedFrame;
use super::handle::{Accepted, ActionReply, Command, Handle, NotSent, Unknown};
use super::handoff;
use super::login::{LoginError, login};
use super::parser::Limits;
use super::record::{ParseErrorRecord, Record, Stamp, Stamped, now_ns};
use super::server::{ServerConfig, TlsConfig};
use super::snapshot::{self, Routed, Snapshots};

mod actions;
mod backoff;
mod out;
mod session;
#[cfg(test)]
mod tests;
mod tls;

use actions::{Ids, Pending};
use backoff::Rng;
pub use backoff::{backoff_delay, instance_id};
use out::{DownstreamClosed, HoldEnd, Out, hold, reserve};
use tls::tls_connector;

/// The default of [`Options::max_reply_bytes`]: 64 MiB per connection.
pub const DEFAULT_MAX_REPLY_BYTES: usize = 64 << 20;

/// Gaps waiting for room in the downstream queue, at most.
pub const MAX_PENDING_GAPS: usize = 1024;

/// Tuning of a connection task; the defaults suit production.
#[derive(Clone, Debug)]
pub struct Options {
    /// Capacity of the handle → task command channel.
    pub command_queue: usize,
    /// Actions awaiting their reply, at most; further commands wait in the channel.
    pub max_in_flight: usize,
    /// List items kept per EventList reply; more are dropped and the reply marked `truncated`.
    pub max_list_items: usize,
    /// Bytes of list items held for all the replies in flight on this connection together
    /// (256 in flight × 100,000 items could otherwise pin gigabytes): an item that would pass
    /// it is dropped and its reply marked `truncated`; the completion event is always kept.
    pub max_reply_bytes: usize,
    pub limits: Limits,
    /// The last epoch used by a previous run, if known (epochs are also floored by the clock).
    pub previous_epoch: u64,
    /// How long to wait for `Response: Goodbye` after `Logoff` at shutdown.
    pub logoff_timeout: Duration,
    /// How long a read waits for room in a nearly full hand-off queue before it goes ahead
    /// (and what does not fit is dropped); zero: never wait.
    pub handoff_wait: Duration,
    /// Gap records made downstream (the pipelines', for what the spool lost), by server: a
    /// connection starts a gap snapshot when its server's count moves, as for its own gaps.
    pub downstream_gaps: Arc<DownstreamGaps>,
}

/// Gap records made downstream of the connections, counted per server: the pipelines report
/// here the gap records they publish for records the spool dropped, could not write or found
/// damaged, so that the server's connection rebuilds consumers' state with a snapshot after
/// such a loss too, not only after its own.
#[derive(Debug, Default)]
pub struct DownstreamGaps {
    by_server: std::sync::RwLock<HashMap<String, Arc<AtomicU64>>>,
}

impl DownstreamGaps {
    /// The counter of `server` (made on first use).
    pub fn counter(&self, server: &str) -> Arc<AtomicU64> {
        if let Some(c) = self
            .by_server
            .read()
            .ok()
            .and_then(|m| m.get(server).cloned())
        {
            return c;
        }
        match self.by_server.write() {
            Ok(mut m) => m.entry(server.to_owned()).or_default().clone(),
            // A panic elsewhere poisoned the map: count on a counter of its own.
            Err(_) => Arc::default(),
        }
    }

    /// A gap record for `server` was published downstream.
    pub fn note(&self, server: &str) {
        self.counter(server).fetch_add(1, Ordering::Relaxed);
    }
}

/// How long a read waits by default for room in a nearly full hand-off queue
/// ([`Options::handoff_wait`]; `pipeline.handoff_wait`).
pub const DEFAULT_HANDOFF_WAIT: Duration = Duration::from_millis(20);

impl Default for Options {
    fn default() -> Self {
        Options {
            command_queue: 64,
            max_in_flight: 256,
            max_list_items: 100_000,
            max_reply_bytes: DEFAULT_MAX_REPLY_BYTES,
            limits: Limits::default(),
            previous_epoch: 0,
            logoff_timeout: Duration::from_secs(1),
            handoff_wait: DEFAULT_HANDOFF_WAIT,
            downstream_gaps: Arc::default(),
        }
    }
}

/// Counters of one connection, updated by its task and readable from anywhere.
#[derive(Debug, Default)]
pub struct Stats {
    frames: AtomicU64,
    bytes: AtomicU64,
    parse_errors: AtomicU64,
    reconnects: AtomicU64,
    auth_failures: AtomicU64,
    dropped_records: AtomicU64,
    gaps: AtomicU64,
    gaps_lost: AtomicU64,
    read_pauses: AtomicU64,
    read_pause_timeouts: AtomicU64,
    late_replies: AtomicU64,
    last_byte_ns: AtomicI64,
    connected: AtomicBool,
    epoch: AtomicU64,
    snapshot: Arc<snapshot::Counters>,
}

/// A copy of [`Stats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Frames decoded (events, responses, list items).
    pub frames: u64,
    /// Bytes read from the socket.
    pub bytes: u64,
    /// Parse errors (oversized frames skipped, truncated input).
    pub parse_errors: u64,
    /// Connection attempts after the first.
    pub reconnects: u64,
    pub auth_failures: u64,
    /// Records dropped because the downstream queue was full.
    pub dropped_records: u64,
    /// `Gap` records sent.
    pub gaps: u64,
    /// Gap ranges forgotten because more than [`MAX_PENDING_GAPS`] were waiting.
    pub gaps_lost: u64,
    /// Reads held back for room in a nearly full hand-off queue.
    pub read_pauses: u64,
    /// Of those, the ones that waited the whole `handoff_wait` and read on (dropping what did
    /// not fit).
    pub read_pause_timeouts: u64,
    /// Replies to actions whose caller had given up; discarded.
    pub late_replies: u64,
    /// When the last byte arrived (ns since the Unix epoch; 0 = never).
    pub last_byte_ns: i64,
    pub connected: bool,
    /// The current (or last) epoch.
    pub epoch: u64,
    /// State snapshots ([`super::snapshot`]).
    pub snapshot: snapshot::CountersSnapshot,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            frames: r(&self.frames),
            bytes: r(&self.bytes),
            parse_errors: r(&self.parse_errors),
            reconnects: r(&self.reconnects),
            auth_failures: r(&self.auth_failures),
            dropped_records: r(&self.dropped_records),
            gaps: r(&self.gaps),
            gaps_lost: r(&self.gaps_lost),
            read_pauses: r(&self.read_pauses),
            read_pause_timeouts: r(&self.read_pause_timeouts),
            late_replies: r(&self.late_replies),
            last_byte_ns: self.last_byte_ns.load(Ordering::Relaxed),
            connected: self.connected.load(Ordering::Relaxed),
            epoch: r(&self.epoch),
            snapshot: self.snapshot.snapshot(),
        }
    }
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// A running connection task.
#[derive(Debug)]
pub struct Connection {
    pub handle: Handle,
    pub stats: Arc<Stats>,
    /// Ends after `shutdown` is cancelled (after a Logoff) or when the downstream queue closes.
    pub task: JoinHandle<()>,
}

impl Connection {
    /// Start the task for one server. Records go to `downstream` (shared by many connections
    /// or not); the task stops when `shutdown` is cancelled.
    pub fn spawn(
        cfg: Arc<ServerConfig>,
        downstream: handoff::Sender,
        shutdown: CancellationToken,
        opts: Options,
    ) -> Connection {
        let server: Arc<str> = Arc::from(cfg.id.as_str());
        let (cmd_tx, cmd_rx) = mpsc::channel(opts.command_queue.max(1));
        let stats = Arc::new(Stats::default());
        let task = Task {
            out: Out {
                server: server.clone(),
                tx: downstream,
                epoch: 0,
                seq: 0,
                gaps: VecDeque::new(),
                stats: stats.clone(),
            },
            last_epoch: opts.previous_epoch,
            downstream_gaps: opts.downstream_gaps.counter(&cfg.id),
            cfg,
            cmd_rx,
            cmds_closed: false,
            shutdown,
            stats: stats.clone(),
            opts,
            rng: Rng::new(),
        };
        Connection {
            handle: Handle::new(server, cmd_tx),
            stats,
            task: tokio::spawn(task.run()),
        }
    }
}

/// How one connection attempt ended.
enum End {
    Shutdown,
    DownstreamClosed,
    /// TCP or TLS connect failed.
    Connect(String),
    /// TLS settings unusable (CA file unreadable, bad server name).
    Config(String),
    Login(LoginError, u64),
    Disconnected {
        reason: String,
        uptime: Duration,
    },
}

struct Task {
    cfg: Arc<ServerConfig>,
    out: Out,
    /// This server's count in [`Options::downstream_gaps`].
    downstream_gaps: Arc<AtomicU64>,
    cmd_rx: mpsc::Receiver<Command>,
    cmds_closed: bool,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
    opts: Options,
    last_epoch: u64,
    rng: Rng,
}

/// The state of one logged-in session.
struct Session {
    ids: Ids,
    pending: HashMap<String, Pending>,
    /// Bytes of list items held by `pending`, at most [`Options::max_reply_bytes`].
    reply_bytes: usize,
    /// The outstanding keepalive Ping and when it must be answered by.
    ping: Option<(String, Instant)>,
    next_ping: Instant,
    last_byte: Instant,
    wbuf: BytesMut,
    /// How much room the next read gets: doubled while reads fill it (a flood), halved while
    /// they come back small, between [`READ_MIN`] and [`READ_MAX`].
    read_size: usize,
    /// Whether the next read may go ahead, given the room in the hand-off queue.
    gate: Gate,
    /// State snapshots: started at the top of a read-loop turn, their frames routed first.
    snapshot: Snapshots,
}

/// Whether the next read may go ahead, given the room in the hand-off queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    /// Reads go ahead while the queue has its headroom free; a turn that finds less begins a
    /// hold (counted in `read_pauses`).
    Open,
    /// The read is held until the queue has room or until this deadline (`handoff_wait` after
    /// the hold began); the other branches of the read loop run meanwhile.
    Held(Instant),
    /// The queue made room during a hold: the read held back goes ahead, even if a neighbour
    /// on the queue took the room back before this task ran (holding again would count a
    /// second pause and restart the wait, so a busy queue could keep the socket unread for
    /// longer than one `handoff_wait`).
    Granted,
    /// A hold ran out (counted in `read_pause_timeouts`): reads go on without waiting, and
    /// what does not fit is dropped, until the queue has room again.
    Shedding,
}

/// The read size of a quiet connection (and its buffer's growth step).
const READ_MIN: usize = 8 << 10;
/// The read size of a flooded one: fewer syscalls and buffers per event.
const READ_MAX: usize = 64 << 10;

/// The room for the next read, after a read of `n` bytes into `room`.
fn next_read_size(size: usize, room: usize, n: usize) -> usize {
    if n == room {
        (size * 2).min(READ_MAX)
    } else if n < size / 8 {
        (size / 2).max(READ_MIN)
    } else {
        size
    }
}

impl Task {
    async fn run(mut self) {
        let mut attempt: u32 = 0;
        let mut auth_streak = false;
        let mut config_streak = false;
        let mut first = true;
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            if !first {
                inc(&self.stats.reconnects);
            }
            first = false;
            let delay = match self.attempt().await {
                End::Shutdown => break,
                End::DownstreamClosed => {
                    warn!(server = %self.cfg.id, "downstream queue closed; stopping the connection");
                    break;
                }
                End::Connect(e) => {
                    if attempt == 0 {
                        warn!(server = %self.cfg.id, address = %self.cfg.address(), error = %e, "AMI connect failed; retrying with backoff");
                    }
                    self.next_backoff(&mut attempt)
                }
                End::Config(e) => {
                    if !config_streak {
                        error!(server = %self.cfg.id, error = %e, "AMI connection settings unusable");
                    }
                    config_streak = true;
                    self.long_backoff()
                }
                End::Login(e, epoch) if !e.is_retriable() => {
                    // Auth failure or a refused filter: retrying soon would not help. Reported
                    // once per streak (log line and ConnectionDown), counted every time.
                    let auth = e.is_auth_failure();
                    if auth {
                        inc(&self.stats.auth_failures);
                    }
                    let streak = if auth {
                        &mut auth_streak
                    } else {
                        &mut config_streak
                    };
                    if !*streak {
                        *streak = true;
                        if auth {
                            error!(server = %self.cfg.id, username = %self.cfg.username, error = %e, "AMI authentication failed; retrying on the long backoff");
                        } else {
                            error!(server = %self.cfg.id, error = %e, "AMI login refused; fix the configuration");
                        }
                        self.out.start_epoch(epoch);
                        let reason = format!("{}: {e}", e.reason());
                        if self
                            .out
                            .emit(Record::ConnectionDown { reason }, now_ns())
                            .is_err()
                        {
                            break;
                        }
                    }
                    self.long_backoff()
                }
                End::Login(e, _) => {
                    warn!(server = %self.cfg.id, error = %e, "AMI login failed");
                    self.next_backoff(&mut attempt)
                }
                End::Disconnected { reason, uptime } => {
                    auth_streak = false;
                    config_streak = false;
                    if uptime >= self.cfg.backoff_max {
                        attempt = 0;
                    }
                    warn!(server = %self.cfg.id, epoch = self.out.epoch, %reason, "AMI connection down");
                    self.next_backoff(&mut attempt)
                }
            };
            if !self.idle(delay).await {
                break;
            }
        }
        self.stats.connected.store(false, Ordering::Relaxed);
        info!(server = %self.cfg.id, "AMI connection task stopped");
    }

    fn next_backoff(&mut self, attempt: &mut u32) -> Duration {
        let d = backoff_delay(
            self.cfg.backoff_min,
            self.cfg.backoff_max,
            *attempt,
            self.rng.next(),
        );
        *attempt = attempt.saturating_add(1);
        d
    }

    /// The auth-failure backoff, ±25 % jitter.
    fn long_backoff(&mut self) -> Duration {
        let d = self.cfg.auth_failure_backoff;
        self.rng.between(d.mul_f64(0.75), d.mul_f64(1.25))
    }

    /// Wait between attempts: answer commands "not connected", flush gaps, watch shutdown.
    /// `false` on shutdown or when downstream is gone.
    async fn idle(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            let gap_tx = (!self.out.gaps.is_empty()).then(|| self.out.tx.clone());
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return false,
                permit = reserve(gap_tx) => match permit {
                    Ok(p) => if self.out.send_gap(p).is_err() { return false },
                    Err(DownstreamClosed) => return false,
                },
                cmd = self.cmd_rx.recv(), if !self.cmds_closed => match cmd {
                    Some(c) => c.reply.refuse(NotSent::NotConnected),
                    None => self.cmds_closed = true,
                },
                _ = sleep_until(until) => return true,
            }
        }
    }

    fn next_epoch(&mut self) -> u64 {
        let ms = u64::try_from(now_ns() / 1_000_000).unwrap_or(0);
        let epoch = ms.max(self.last_epoch + 1);
        self.last_epoch = epoch;
        epoch
    }

    async fn attempt(&mut self) -> End {
        let address = self.cfg.address();
        let tls = match &self.cfg.tls {
            None => None,
            Some(t) => match tls_connector(t) {
                Ok(c) => Some(c),
                Err(e) => return End::Config(e),
            },
        };
        let connect = tokio::time::timeout(self.cfg.login_timeout, TcpStream::connect(&address));
        let tcp = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return End::Shutdown,
            r = connect => match r {
                Err(_) => return End::Connect("connect timed out".to_owned()),
                Ok(Err(e)) => return End::Connect(e.to_string()),
                Ok(Ok(s)) => s,
            },
        };
        // Asterisk sets TCP_NODELAY too; our writes are whole actions.
        let _ = tcp.set_nodelay(true);
        match tls {
            None => self.session(tcp, address).await,
            Some((connector, name)) => {
                let handshake =
                    tokio::time::timeout(self.cfg.login_timeout, connector.connect(name, tcp));
                let stream = tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => return End::Shutdown,
                    r = handshake => match r {
                        Err(_) => return End::Connect("TLS handshake timed out".to_owned()),
                        Ok(Err(e)) => return End::Connect(format!("TLS handshake: {e}")),
                        Ok(Ok(s)) => s,
                    },
                };
                self.session(stream, address).await
            }
        }
    }
}
