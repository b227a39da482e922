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

/// Random per process: the first part of every ActionID, so two amibus processes (or a
/// restarted one) logged in to the same Asterisk never mistake each other's
/// `OriginateResponse` for their own.
pub fn instance_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| format!("{:012x}", random_u64() & 0xffff_ffff_ffff))
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i64(now_ns());
    h.write_u32(std::process::id());
    h.finish()
}

/// SplitMix64, for backoff jitter.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        Rng(random_u64())
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi]`.
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_nanos().min(u128::from(u64::MAX)) as u64;
        if span == 0 {
            return lo;
        }
        lo + Duration::from_nanos(self.next() % span)
    }
}

/// The delay before attempt `attempt` (0-based): uniform between `min` and
/// `min(max, min · 2^attempt)` ("full jitter" above a floor, so a thousand connections dropped
/// together do not come back together).
pub fn backoff_delay(min: Duration, max: Duration, attempt: u32, rng_value: u64) -> Duration {
    let cap = min
        .saturating_mul(1u32 << attempt.min(20))
        .min(max)
        .max(min);
    let span = cap.saturating_sub(min).as_nanos().min(u128::from(u64::MAX)) as u64;
    if span == 0 {
        return min;
    }
    min + Duration::from_nanos(rng_value % span)
}

/// The downstream side: stamps records and never waits.
struct Out {
    server: Arc<str>,
    tx: handoff::Sender,
    epoch: u64,
    seq: u64,
    gaps: VecDeque<GapRange>,
    stats: Arc<Stats>,
}

#[derive(Clone, Copy, Debug)]
struct GapRange {
    epoch: u64,
    first: u64,
    last: u64,
}

/// The downstream queue's receiver is gone: nobody will read records any more.
#[derive(Debug)]
struct DownstreamClosed;

impl Out {
    fn start_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.seq = 0;
    }

    fn stamp(&mut self, received_at_ns: i64) -> Stamp {
        self.seq += 1;
        Stamp {
            server: self.server.clone(),
            epoch: self.epoch,
            seq: self.seq,
            received_at_ns,
        }
    }

    /// Hand a record on, or drop it and remember its seq. Never waits.
    fn emit(&mut self, record: Record, at: i64) -> Result<(), DownstreamClosed> {
        if !self.try_flush_gaps(at)? {
            self.seq += 1;
            self.dropped(self.seq);
            return Ok(());
        }
        let stamp = self.stamp(at);
        match self.tx.try_send(Stamped { stamp, record }) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(s)) => {
                self.dropped(s.stamp.seq);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(DownstreamClosed),
        }
    }

    fn dropped(&mut self, seq: u64) {
        inc(&self.stats.dropped_records);
        if let Some(g) = self.gaps.back_mut() {
            if g.epoch == self.epoch && g.last + 1 == seq {
                g.last = seq;
                return;
            }
        }
        if self.gaps.len() >= MAX_PENDING_GAPS {
            self.gaps.pop_front();
            inc(&self.stats.gaps_lost);
        }
        self.gaps.push_back(GapRange {
            epoch: self.epoch,
            first: seq,
            last: seq,
        });
    }

    fn gap_record(&mut self, g: GapRange, at: i64) -> Stamped {
        inc(&self.stats.gaps);
        Stamped {
            stamp: self.stamp(at),
            record: Record::Gap {
                epoch: g.epoch,
                first_seq: g.first,
                last_seq: g.last,
                reason: "downstream queue full".to_owned(),
            },
        }
    }

    /// Send pending gaps while there is room. `Ok(true)` when none is left.
    fn try_flush_gaps(&mut self, at: i64) -> Result<bool, DownstreamClosed> {
        while let Some(&g) = self.gaps.front() {
            // A clone, so the permit does not borrow `self` (only while gaps are pending).
            let tx = self.tx.clone();
            match tx.try_reserve() {
                Ok(permit) => {
                    self.gaps.pop_front();
                    let rec = self.gap_record(g, at);
                    permit.send(rec);
                }
                Err(mpsc::error::TrySendError::Full(())) => return Ok(false),
                Err(mpsc::error::TrySendError::Closed(())) => return Err(DownstreamClosed),
            }
        }
        Ok(true)
    }

    /// Use a slot obtained by waiting (see [`reserve`]) for the oldest pending gap.
    fn send_gap(&mut self, permit: mpsc::OwnedPermit<Stamped>) -> Result<(), DownstreamClosed> {
        let at = now_ns();
        if let Some(g) = self.gaps.pop_front() {
            let rec = self.gap_record(g, at);
            permit.send(rec);
        }
        self.try_flush_gaps(at).map(|_| ())
    }
}

/// Wait for room in the downstream queue (used only when gaps are pending; reading goes on
/// meanwhile because this is one branch of a `select!`).
async fn reserve(
    tx: Option<handoff::Sender>,
) -> Result<mpsc::OwnedPermit<Stamped>, DownstreamClosed> {
    match tx {
        Some(tx) => tx.reserve_owned().await.map_err(|_| DownstreamClosed),
        None => std::future::pending().await,
    }
}

/// How a hold ended.
enum HoldEnd {
    /// The queue made room.
    Room,
    /// `handoff_wait` passed.
    Deadline,
}

/// Wait for the end of the hold that lasts until `until` (one branch of the read loop's
/// `select!`; never ends if there is no hold). Wakes on the queue's room notification or the
/// deadline, nothing else.
async fn hold(tx: &handoff::Sender, until: Option<Instant>) -> Result<HoldEnd, DownstreamClosed> {
    let Some(until) = until else {
        return std::future::pending().await;
    };
    tokio::select! {
        biased;
        r = tx.room() => r.map(|()| HoldEnd::Room).map_err(|_| DownstreamClosed),
        _ = sleep_until(until) => Ok(HoldEnd::Deadline),
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
    cmd_rx: mpsc::Receiver<Command>,
    cmds_closed: bool,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
    opts: Options,
    last_epoch: u64,
    rng: Rng,
}

/// An action awaiting its reply.
struct Pending {
    /// Answers on every path: a reply, `TimedOut` at the deadline sweep, `ConnectionLost` when
    /// the session ends or the entry is dropped.
    reply: Accepted,
    await_event: Option<String>,
    deadline: Instant,
    response: Option<OwnedFrame>,
    list: bool,
    list_done: bool,
    events: Vec<OwnedFrame>,
    awaited: Option<OwnedFrame>,
    truncated: bool,
    /// Bytes of `events`, counted in [`Session::reply_bytes`].
    bytes: usize,
}

impl Pending {
    fn is_complete(&self) -> bool {
        self.response.is_some()
            && (!self.list || self.list_done)
            && (self.await_event.is_none() || self.awaited.is_some())
    }
}

/// ActionIDs of one session: `<instance>-<server>-<epoch>-<counter>`.
struct Ids {
    /// `<instance>-<server>-`: any ActionID of this process and server.
    ours: String,
    prefix: String,
    counter: u64,
}

impl Ids {
    fn new(server: &str, epoch: u64) -> Self {
        let ours = format!("{}-{server}-", instance_id());
        Ids {
            prefix: format!("{ours}{epoch}-"),
            ours,
            counter: 0,
        }
    }

    fn next(&mut self) -> String {
        self.counter += 1;
        format!("{}{}", self.prefix, self.counter)
    }
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

    async fn session<S>(&mut self, mut io: S, address: String) -> End
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let epoch = self.next_epoch();
        let mut ids = Ids::new(&self.cfg.id, epoch);
        let mut buf = BytesMut::with_capacity(4096);
        let mut codec = AmiCodec::new(self.opts.limits);
        let cfg = self.cfg.clone();
        let ok = {
            let mut next_id = || ids.next();
            let exchange = tokio::time::timeout(
                cfg.login_timeout,
                login(&mut io, &mut buf, &mut codec, &cfg, &mut next_id),
            );
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return End::Shutdown,
                r = exchange => match r {
                    Err(_) => return End::Login(LoginError::Timeout, epoch),
                    Ok(Err(e)) => return End::Login(e, epoch),
                    Ok(Ok(ok)) => ok,
                },
            }
        };
        let started = Instant::now();
        let at = now_ns();
        self.stats.epoch.store(epoch, Ordering::Relaxed);
        self.stats.connected.store(true, Ordering::Relaxed);
        self.stats.last_byte_ns.store(at, Ordering::Relaxed);
        self.out.start_epoch(epoch);
        info!(server = %self.cfg.id, %address, epoch, ami_version = %ok.ami_version, "AMI connected");
        let up = Record::ConnectionUp {
            ami_version: ok.ami_version,
            address,
        };
        if self.out.emit(up, at).is_err() {
            return End::DownstreamClosed;
        }
        let mut s = Session {
            ids,
            pending: HashMap::new(),
            reply_bytes: 0,
            ping: None,
            next_ping: started + self.cfg.keepalive_interval,
            last_byte: started,
            wbuf: BytesMut::new(),
            read_size: READ_MIN,
            gate: Gate::Open,
            snapshot: Snapshots::new(
                self.out.server.clone(),
                Arc::new(self.cfg.snapshot.clone()),
                self.stats.snapshot.clone(),
                epoch,
                self.stats.gaps.load(Ordering::Relaxed),
            ),
        };
        // Frames that came with the login responses, then bytes already buffered behind them.
        let mut result = Ok(());
        for item in ok.early {
            result = result.and_then(|()| self.dispatch(&mut s, item, at));
        }
        while result.is_ok() {
            match codec.decode(&mut buf) {
                Ok(Some(item)) => result = self.dispatch(&mut s, item, at),
                Ok(None) | Err(_) => break,
            }
        }
        let reason = match result {
            Err(DownstreamClosed) => None,
            Ok(()) => self.read_loop(io, &mut buf, &mut codec, &mut s).await,
        };
        // Everything still waiting was (or may have been) sent: its outcome is unknown.
        for (_, p) in s.pending.drain() {
            p.reply.unknown(Unknown::ConnectionLost);
        }
        self.stats.connected.store(false, Ordering::Relaxed);
        let Some(reason) = reason else {
            return End::DownstreamClosed;
        };
        if let Some(end) = s.snapshot.abort(&reason) {
            if self.out.emit(end, now_ns()).is_err() {
                return End::DownstreamClosed;
            }
        }
        let shutdown = reason == "shutdown";
        if self
            .out
            .emit(
                Record::ConnectionDown {
                    reason: reason.clone(),
                },
                now_ns(),
            )
            .is_err()
        {
            return End::DownstreamClosed;
        }
        if shutdown {
            info!(server = %self.cfg.id, epoch, "AMI connection closed for shutdown");
            return End::Shutdown;
        }
        End::Disconnected {
            reason,
            uptime: started.elapsed(),
        }
    }

    /// Read until the session ends; the reason for `ConnectionDown`, or `None` if downstream
    /// is gone.
    async fn read_loop<S>(
        &mut self,
        io: S,
        buf: &mut BytesMut,
        codec: &mut AmiCodec,
        s: &mut Session,
    ) -> Option<String>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut rd, mut wr) = tokio::io::split(io);
        let idle_limit = self.cfg.keepalive_interval + self.cfg.keepalive_timeout;
        loop {
            // A snapshot that is due starts (its actions go into the write buffer), one past
            // its deadline ends; never a wait.
            let gaps = self.stats.gaps.load(Ordering::Relaxed);
            while let Some(r) =
                s.snapshot
                    .due(Instant::now(), gaps, &mut || s.ids.next(), &mut s.wbuf)
            {
                if self.out.emit(r, now_ns()).is_err() {
                    return None;
                }
            }
            let mut wake = s.next_ping.min(s.last_byte + idle_limit);
            if let Some((_, deadline)) = &s.ping {
                wake = wake.min(*deadline);
            }
            if let Some(t) = s.snapshot.next_wake() {
                wake = wake.min(t);
            }
            let held = self.hold_until(s);
            if buf.capacity() - buf.len() < s.read_size / 4 {
                buf.reserve(s.read_size);
            }
            let room = buf.capacity() - buf.len();
            let gap_tx = (!self.out.gaps.is_empty()).then(|| self.out.tx.clone());
            let can_take = s.pending.len() < self.opts.max_in_flight && !self.cmds_closed;
            // Biased, with the read last: under a flood the socket is always readable, and a
            // read listed first would starve writes and the keepalive timer. The other branches
            // are ready only when they have work, so the read still runs on nearly every turn.
            // During a hold the read is off and `hold` is on in its place: everything else is
            // served as usual.
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    return self.logoff(&mut rd, &mut wr, buf, codec, s).await.then(|| "shutdown".to_owned());
                }
                r = write_some(&mut wr, &mut s.wbuf), if !s.wbuf.is_empty() => {
                    if let Err(e) = r {
                        return Some(format!("io error: {e}"));
                    }
                }
                permit = reserve(gap_tx) => match permit {
                    Ok(p) => if self.out.send_gap(p).is_err() { return None },
                    Err(DownstreamClosed) => return None,
                },
                cmd = self.cmd_rx.recv(), if can_take => match cmd {
                    Some(c) => self.take_command(s, c),
                    None => self.cmds_closed = true,
                },
                _ = sleep_until(wake) => {
                    let now = Instant::now();
                    if s.ping.as_ref().is_some_and(|(_, d)| now >= *d) || now >= s.last_byte + idle_limit {
                        return Some("keepalive timeout".to_owned());
                    }
                    if now >= s.next_ping {
                        if s.ping.is_none() {
                            let id = s.ids.next();
                            if Action::new("Ping").encode(Some(&id), &mut s.wbuf).is_ok() {
                                s.ping = Some((id, now + self.cfg.keepalive_timeout));
                            }
                        }
                        s.next_ping = now + self.cfg.keepalive_interval;
                    }
                    // Forget actions whose caller has given up; answer those whose deadline
                    // has passed `TimedOut` (they may have run; never "not sent").
                    let over: Vec<String> = s
                        .pending
                        .iter()
                        .filter(|(_, p)| p.reply.is_closed() || p.deadline <= now)
                        .map(|(id, _)| id.clone())
                        .collect();
                    for id in over {
                        if let Some(p) = s.pending.remove(&id) {
                            s.reply_bytes -= p.bytes;
                            p.reply.unknown(Unknown::TimedOut);
                        }
                    }
                }
                end = hold(&self.out.tx, held), if held.is_some() => match end {
                    Ok(HoldEnd::Room) => s.gate = Gate::Granted,
                    // Room that came with the deadline still counts as room.
                    Ok(HoldEnd::Deadline) if self.out.tx.has_room() => s.gate = Gate::Granted,
                    Ok(HoldEnd::Deadline) => {
                        inc(&self.stats.read_pause_timeouts);
                        s.gate = Gate::Shedding;
                    }
                    Err(DownstreamClosed) => return None,
                },
                r = rd.read_buf(buf), if held.is_none() => {
                    if s.gate == Gate::Granted {
                        s.gate = Gate::Open;
                    }
                    let n = match r {
                        Ok(0) => {
                            let at = now_ns();
                            while let Ok(Some(item)) = codec.decode_eof(buf) {
                                if self.dispatch(s, item, at).is_err() {
                                    return None;
                                }
                            }
                            return Some("eof".to_owned());
                        }
                        Ok(n) => n,
                        Err(e) => return Some(format!("io error: {e}")),
                    };
                    s.read_size = next_read_size(s.read_size, room, n);
                    let at = now_ns();
                    s.last_byte = Instant::now();
                    self.stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    self.stats.last_byte_ns.store(at, Ordering::Relaxed);
                    while let Ok(Some(item)) = codec.decode(buf) {
                        if self.dispatch(s, item, at).is_err() {
                            return None;
                        }
                        // One unit of the runtime's budget per frame, not per read: a read
                        // carries dozens of frames, and a flood on four sockets otherwise held
                        // the workers for milliseconds at a time while the sink driver, which
                        // spends a unit per record, waited its turn (it delivered ~20,000
                        // records/s while a burst was read, against ~160,000 after).
                        tokio::task::consume_budget().await;
                    }
                }
            }
        }
    }

    /// At the top of each turn of the read loop: the deadline of the hold in force, if any.
    /// A turn that finds less than the headroom free begins a hold (unless the connection is
    /// shedding or `handoff_wait` is zero); room in the queue ends a hold and shedding.
    fn hold_until(&mut self, s: &mut Session) -> Option<Instant> {
        if s.gate == Gate::Granted {
            return None;
        }
        if self.opts.handoff_wait.is_zero() || self.out.tx.has_room() {
            s.gate = Gate::Open;
            return None;
        }
        match s.gate {
            Gate::Held(until) => Some(until),
            Gate::Shedding | Gate::Granted => None,
            Gate::Open => {
                inc(&self.stats.read_pauses);
                let until = Instant::now() + self.opts.handoff_wait;
                s.gate = Gate::Held(until);
                Some(until)
            }
        }
    }

    /// Send `Logoff` and wait a little for `Goodbye`, handing on what arrives meanwhile.
    /// `false` if downstream is gone.
    async fn logoff<R, W>(
        &mut self,
        rd: &mut R,
        wr: &mut W,
        buf: &mut BytesMut,
        codec: &mut AmiCodec,
        s: &mut Session,
    ) -> bool
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let id = s.ids.next();
        if Action::new("Logoff")
            .encode(Some(&id), &mut s.wbuf)
            .is_err()
        {
            return true;
        }
        let deadline = Instant::now() + self.opts.logoff_timeout;
        loop {
            if buf.capacity() - buf.len() < 2048 {
                buf.reserve(8192);
            }
            tokio::select! {
                _ = sleep_until(deadline) => return true,
                r = write_some(wr, &mut s.wbuf), if !s.wbuf.is_empty() => {
                    if r.is_err() { return true; }
                }
                r = rd.read_buf(buf) => {
                    if !matches!(r, Ok(n) if n > 0) {
                        return true;
                    }
                    let at = now_ns();
                    while let Ok(Some(item)) = codec.decode(buf) {
                        if let Decoded::Frame(f) = &item {
                            if f.frame().get("ActionID") == Some(id.as_bytes()) {
                                return true;
                            }
                        }
                        if self.dispatch(s, item, at).is_err() {
                            return false;
                        }
                    }
                }
            }
        }
    }

    /// Accept a command (write it and remember it) or refuse it as not sent. Accepting and
    /// writing are one step: nothing between them can fail or wait.
    fn take_command(&mut self, s: &mut Session, c: Command) {
        if c.reply.is_closed() {
            return;
        }
        if Instant::now() >= c.deadline {
            c.reply.refuse(NotSent::Busy);
            return;
        }
        let id = s.ids.next();
        if let Err(e) = c.action.encode(Some(&id), &mut s.wbuf) {
            c.reply.refuse(NotSent::Invalid(e));
            return;
        }
        let reply = c.reply.accept();
        s.pending.insert(
            id,
            Pending {
                reply,
                await_event: c.await_event,
                deadline: c.deadline,
                response: None,
                list: false,
                list_done: false,
                events: Vec::new(),
                awaited: None,
                truncated: false,
                bytes: 0,
            },
        );
    }

    fn dispatch(
        &mut self,
        s: &mut Session,
        item: Decoded,
        at: i64,
    ) -> Result<(), DownstreamClosed> {
        match item {
            Decoded::Frame(f) => {
                inc(&self.stats.frames);
                let f = match s.snapshot.route(f) {
                    Routed::Pass(f) => f,
                    Routed::Emit(r) => return self.out.emit(r, at),
                    Routed::Consumed => return Ok(()),
                };
                match self.route(s, f) {
                    Some(f) => self.out.emit(Record::Frame(f), at),
                    None => Ok(()),
                }
            }
            Decoded::Error(e) => {
                inc(&self.stats.parse_errors);
                self.out.emit(Record::ParseError(e.into()), at)
            }
            Decoded::Truncated { bytes } => {
                inc(&self.stats.parse_errors);
                let rec = ParseErrorRecord {
                    reason: "truncated",
                    message: format!("the connection ended inside a frame; {bytes} bytes dropped"),
                };
                self.out.emit(Record::ParseError(rec), at)
            }
        }
    }

    /// Give a frame to the action waiting for it. Returns the frame if it goes downstream.
    fn route(&mut self, s: &mut Session, f: OwnedFrame) -> Option<OwnedFrame> {
        let view = f.frame();
        let Some(id) = view
            .get("ActionID")
            .and_then(|v| std::str::from_utf8(v).ok())
        else {
            return Some(f);
        };
        let is_response = view.header(0).is_some_and(|h| h.is("Response"));
        if is_response && s.ping.as_ref().is_some_and(|(p, _)| p == id) {
            s.ping = None;
            return None;
        }
        let Some(p) = s.pending.get_mut(id) else {
            // Ours but nobody waits (the caller timed out): a reply is dropped and counted; a
            // broadcast event (with `Privilege:`) still goes downstream.
            if id.starts_with(&s.ids.ours) && (is_response || view.get("Privilege").is_none()) {
                inc(&self.stats.late_replies);
                return None;
            }
            return Some(f);
        };
        let id = id.to_owned();
        let mut forward = None;
        if is_response {
            if p.response.is_some() {
                return Some(f);
            }
            p.list = view
                .get("EventList")
                .is_some_and(|v| v.eq_ignore_ascii_case(b"start"));
            let success = view
                .get("Response")
                .is_some_and(|v| v.eq_ignore_ascii_case(b"Success"));
            if !success {
                // A refused action sends no list and no event.
                p.list = false;
                p.await_event = None;
                p.awaited = None;
            }
            p.response = Some(f);
        } else if p.list && !p.list_done && p.response.is_some() {
            if view
                .get("EventList")
                .is_some_and(|v| v.eq_ignore_ascii_case(b"Complete"))
            {
                p.list_done = true;
                p.bytes += f.bytes().len();
                s.reply_bytes += f.bytes().len();
                p.events.push(f);
            } else if p.events.len() < self.opts.max_list_items
                && s.reply_bytes + f.bytes().len() <= self.opts.max_reply_bytes
            {
                p.bytes += f.bytes().len();
                s.reply_bytes += f.bytes().len();
                p.events.push(f);
            } else {
                p.truncated = true;
            }
        } else if p.awaited.is_none()
            && p.await_event.as_deref().is_some_and(|name| {
                view.get("Event")
                    .is_some_and(|e| e.eq_ignore_ascii_case(name.as_bytes()))
            })
        {
            // A broadcast event: the caller gets a copy, downstream gets it too.
            p.awaited = Some(f.clone());
            forward = Some(f);
        } else {
            return Some(f);
        }
        if p.is_complete() {
            if let Some(p) = s.pending.remove(&id) {
                s.reply_bytes -= p.bytes;
                if let Some(response) = p.response {
                    p.reply.reply(ActionReply {
                        response,
                        events: p.events,
                        awaited: p.awaited,
                        truncated: p.truncated,
                    });
                }
            }
        }
        forward
    }
}

async fn write_some<W: AsyncWrite + Unpin>(w: &mut W, buf: &mut BytesMut) -> std::io::Result<()> {
    if w.write_buf(buf).await? == 0 {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    if buf.is_empty() {
        w.flush().await?;
    }
    Ok(())
}

type Connector = (
    tokio_rustls::TlsConnector,
    tokio_rustls::rustls::pki_types::ServerName<'static>,
);

/// A TLS connector for `tls` using the `ring` provider.
fn tls_connector(tls: &TlsConfig) -> Result<Connector, String> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let config = if tls.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(insecure::NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let path = tls
            .ca_file
            .as_ref()
            .ok_or_else(|| "tls.ca_file is required".to_owned())?;
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("bad PEM in {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("bad CA certificate in {}: {e}", path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("no certificate in {}", path.display()));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    let name = ServerName::try_from(tls.server_name.clone())
        .map_err(|e| format!("bad TLS server name {:?}: {e}", tls.server_name))?;
    Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
}

mod insecure {
    //! `insecure_skip_verify`: accept any certificate, but still check the handshake
    //! signatures so the session keys belong to whoever holds that certificate.

    use std::sync::Arc;

    use tokio_rustls::rustls::client::danger::{
        HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
    };
    use tokio_rustls::rustls::crypto::{
        CryptoProvider, verify_tls12_signature, verify_tls13_signature,
    };
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use tokio_rustls::rustls::{DigitallySignedStruct, Error, SignatureScheme};

    #[derive(Debug)]
    pub struct NoVerify(pub Arc<CryptoProvider>);

    impl ServerCertVerifier for NoVerify {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_grow_under_a_flood_and_shrink_when_it_passes() {
        // Full reads double the room up to the cap.
        let mut size = READ_MIN;
        for _ in 0..10 {
            size = next_read_size(size, size, size);
        }
        assert_eq!(size, READ_MAX);
        // A read that did not fill the room but was not small keeps it.
        assert_eq!(next_read_size(READ_MAX, READ_MAX, READ_MAX / 2), READ_MAX);
        // Small reads halve it down to the floor, never below.
        for _ in 0..10 {
            size = next_read_size(size, size, 100);
        }
        assert_eq!(size, READ_MIN);
    }

    #[test]
    fn backoff_stays_within_floor_and_cap() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for attempt in 0..40 {
            for v in [0, 1, u64::MAX / 3, u64::MAX] {
                let d = backoff_delay(min, max, attempt, v);
                assert!(d >= min && d <= max, "{attempt} {v} {d:?}");
                let cap = min.saturating_mul(1 << attempt.min(20)).min(max);
                assert!(d <= cap);
            }
        }
        assert_eq!(backoff_delay(min, max, 0, 12345), min);
    }

    #[test]
    fn instance_id_is_stable_within_the_process() {
        assert_eq!(instance_id(), instance_id());
        assert_eq!(instance_id().len(), 12);
    }

    fn out(cap: usize) -> (Out, handoff::Receiver) {
        let (tx, rx) = handoff::channel(cap);
        (
            Out {
                server: Arc::from("s"),
                tx,
                epoch: 7,
                seq: 0,
                gaps: VecDeque::new(),
                stats: Arc::new(Stats::default()),
            },
            rx,
        )
    }

    fn rec() -> Record {
        Record::ConnectionDown { reason: "x".into() }
    }

    #[test]
    fn overflow_becomes_a_gap_when_room_returns() {
        let (mut o, mut rx) = out(2);
        for _ in 0..5 {
            o.emit(rec(), 0).unwrap();
        }
        // 1 and 2 fit; 3..=5 dropped.
        assert_eq!(rx.try_recv().unwrap().stamp.seq, 1);
        assert_eq!(rx.try_recv().unwrap().stamp.seq, 2);
        o.emit(rec(), 0).unwrap(); // the gap (seq 6) goes first, then this record (seq 7)
        let g = rx.try_recv().unwrap();
        assert_eq!(g.stamp.seq, 6);
        assert_eq!(
            g.record,
            Record::Gap {
                epoch: 7,
                first_seq: 3,
                last_seq: 5,
                reason: "downstream queue full".into()
            }
        );
        assert_eq!(rx.try_recv().unwrap().stamp.seq, 7);
        let st = o.stats.snapshot();
        assert_eq!((st.dropped_records, st.gaps), (3, 1));
    }

    #[test]
    fn a_gap_that_does_not_fit_grows() {
        let (mut o, mut rx) = out(1);
        o.emit(rec(), 0).unwrap(); // 1 delivered
        o.emit(rec(), 0).unwrap(); // 2 dropped
        assert_eq!(rx.try_recv().unwrap().stamp.seq, 1);
        o.emit(rec(), 0).unwrap(); // gap 2..=2 as seq 3 fills the queue, 4 dropped
        o.emit(rec(), 0).unwrap(); // 5 dropped: gap 4..=5
        assert_eq!(
            rx.try_recv().unwrap().record,
            Record::Gap {
                epoch: 7,
                first_seq: 2,
                last_seq: 2,
                reason: "downstream queue full".into()
            }
        );
        assert_eq!(o.gaps.len(), 1);
        assert_eq!((o.gaps[0].first, o.gaps[0].last), (4, 5));
    }
}
