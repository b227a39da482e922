//! The action consumer: requests in from a [`Source`], results out through a [`Publisher`].
//!
//! Owns: the order of the checks, the in-flight limit, the per-server token buckets, the
//! idempotency memory ([`Dedupe`]), turning an AMI reply into an [`ActionResult`], and
//! [`ControlStats`].
//!
//! For each message, in the consumer task (no I/O, so one bad or slow request never holds up
//! the next beyond an in-flight permit):
//! 1. decode; required fields; header safety → `rejected` (`malformed`, `missing_field`,
//!    `invalid_header`). Where every replica sees every request (Kafka, JetStream:
//!    `answer_not_owned = false`), a request for a server this replica does not own is
//!    skipped silently (and acknowledged) before these checks, and a payload that does not
//!    decode is answered only by the owner of the message's routing key ([`Incoming::key`]),
//!    so exactly one replica answers anything;
//! 2. routing: a server this replica does not own → `rejected` (`not_owned`) (NATS core,
//!    where only misrouted requests arrive); owned but not configured → `rejected`
//!    (`unknown_server`);
//! 3. the server's allow-list → `rejected` (`not_allowed`);
//! 4. idempotency: a `(server, request_id)` in flight gets the same result when it is ready;
//!    one finished within the window gets that result again (`replayed`), never a second run;
//! 5. the deadline → `expired`, never sent;
//! 6. the server's token bucket → `rejected` (`rate_limited`);
//!
//! then a task sends the action once through the server's [`Handle`] and publishes the result
//! to every waiter, acknowledging each message (JetStream ack, Kafka offset) only after its
//! result was published.
//!
//! Must never: send an action twice. The handle never retries; a session lost after sending
//! answers `outcome_unknown`. Rejections that mean "nothing ran, try later" (`retriable`) are
//! not remembered, so a retry with the same id may run; every other result is. With a
//! [`Journal`] ([`Controller::with_journal`]) the memory survives a restart: a `Begin` is
//! written before the action is sent (if it cannot be, the request is rejected
//! `journal_unavailable`, retriable, and nothing is sent), and its result (`Done`, or `Forget`
//! when nothing ran) before any message of the request is acknowledged.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::dedupe::{Begin, Dedupe};
use super::journal::{self, Entry, Journal, JournalConfig};
use super::rate::TokenBucket;
use super::rules::{self, AllowList, RejectCode, Rejection};
use crate::ami::record::now_ns;
use crate::ami::{Action, ActionError, ActionReply, Handle, OwnedFrame, Request};
use crate::model::pb::{
    self, ActionRequest, ActionResult, ActionStatus, ActionTimings, ReplyFrame,
};

/// Called once the result for a message was published: acknowledge it to the transport.
pub type Ack = Box<dyn FnOnce() + Send>;

/// One message taken off the bus.
pub struct Incoming {
    /// The encoded `ActionRequest`.
    pub payload: Bytes,
    /// The transport's own reply address (the NATS reply subject of a request), which wins
    /// over the request's `reply_to`.
    pub reply: Option<String>,
    /// Run after the result was published (or could never be: see [`PublishError::Permanent`]).
    pub ack: Option<Ack>,
    /// The transport's routing key (a Kafka record key: by convention the target server id).
    /// Where every replica sees every request, it decides which one answers a payload that
    /// does not decode (the owner of this id, or of `""` without a key), so exactly one does.
    pub key: Option<String>,
}

/// Where requests come from (a NATS subscription, a Kafka consumer).
pub trait Source: Send {
    /// The next message; `None` when the source has ended.
    fn next(&mut self) -> impl Future<Output = Option<Incoming>> + Send;

    /// Called once, after the last result was published (or the drain gave up): settle what
    /// the acknowledgements left to do (commit the final Kafka offsets).
    fn close(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Why a result could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The bus may take it later.
    #[error("cannot publish the result now: {0}")]
    Retriable(String),
    /// It never will (bad subject or topic, too large). The message is acknowledged anyway:
    /// leaving it unacknowledged would stall the Kafka partition's offsets (or have JetStream
    /// redeliver it) for a result that can never be published, and would run the requests
    /// behind it again after a restart.
    #[error("cannot publish the result: {0}")]
    Permanent(String),
}

impl PublishError {
    pub fn is_retriable(&self) -> bool {
        matches!(self, PublishError::Retriable(_))
    }
}

/// Where results go.
pub trait Publisher: Send + Sync + 'static {
    /// Publish `result` to `to`, or, when `to` is `None`, to the configured result address
    /// for `result.server`.
    fn publish(
        &self,
        to: Option<&str>,
        result: &ActionResult,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
}

/// Tuning of the consumer; see `[control]` in the configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ControlConfig {
    /// Requests being checked, executed or published at once; the consumer waits for a free
    /// slot before taking the next message (back-pressure on the bus, never on AMI).
    pub max_in_flight: usize,
    /// The reply wait when a request gives no `timeout_ms`.
    pub default_timeout: Duration,
    /// The longest reply wait whatever a request asks.
    pub max_timeout: Duration,
    /// How long a finished result is replayed to a duplicate request id.
    pub dedupe_window: Duration,
    /// Finished results remembered, at most.
    pub dedupe_capacity: usize,
    /// Bytes of finished results remembered, at most.
    pub dedupe_max_bytes: usize,
    /// Actions per second per server; 0 = unlimited.
    pub rate: f64,
    pub burst: u32,
    /// Answer a request for a server another replica owns with `rejected: not_owned` (NATS,
    /// where only misrouted requests arrive), or skip it silently (Kafka, where every
    /// replica reads every request and only the owner may answer).
    pub answer_not_owned: bool,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            max_in_flight: 1024,
            default_timeout: Duration::from_secs(10),
            max_timeout: Duration::from_secs(60),
            dedupe_window: Duration::from_secs(600),
            dedupe_capacity: 100_000,
            dedupe_max_bytes: 64 << 20,
            rate: 50.0,
            burst: 100,
            answer_not_owned: true,
        }
    }
}

/// One server the consumer can act on.
#[derive(Clone, Debug)]
pub struct Target {
    pub handle: Handle,
    pub allow: AllowList,
}

/// The servers a running consumer acts on, shared with whoever reloads them (SIGHUP): the
/// whole map is replaced at once, and each request sees one version of it.
#[derive(Clone, Debug, Default)]
pub struct Targets {
    map: Arc<RwLock<Arc<HashMap<String, Target>>>>,
    stats: Option<Arc<ControlStats>>,
}

impl Targets {
    /// Replace the servers: requests taken from now on see `targets` (a removed server is
    /// answered `unknown_server`); requests already running finish on their handle.
    pub fn replace(&self, targets: HashMap<String, Target>) {
        if let Some(stats) = &self.stats {
            for id in targets.keys() {
                stats.add_server(id);
            }
        }
        *self.map.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(targets);
    }

    /// The current servers.
    pub fn current(&self) -> Arc<HashMap<String, Target>> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Whether this replica owns a server id (rendezvous hashing lives elsewhere).
pub type Owns = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The statuses in [`ActionStatus`] order, as metric labels.
pub const STATUS_LABELS: [&str; 7] = [
    "unspecified",
    "success",
    "error",
    "rejected",
    "expired",
    "timeout",
    "outcome_unknown",
];

/// The label for requests naming a server that is not configured (never the id itself: it
/// comes off the bus and would make the label unbounded).
pub const OTHER_SERVER: &str = "-";

/// Counters of the consumer; exported by `telemetry`.
#[derive(Debug)]
pub struct ControlStats {
    /// Rows by server; servers added by a reload get a row (rows are never removed, so
    /// counters stay monotonic).
    rows: RwLock<Rows>,
    rejected: [AtomicU64; RejectCode::ALL.len()],
    replayed: AtomicU64,
    skipped_not_owned: AtomicU64,
    publish_failures: AtomicU64,
    receive_errors: AtomicU64,
    ack_failures: AtomicU64,
    in_flight: AtomicU64,
    journal_loaded: AtomicU64,
    journal_restart_unknown: AtomicU64,
    journal_torn_bytes: AtomicU64,
    journal_write_failures: AtomicU64,
    journal_compactions: AtomicU64,
}

/// A copy of [`ControlStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControlSnapshot {
    /// (server or [`OTHER_SERVER`], status label, count), non-zero counts only.
    pub results: Vec<(String, &'static str, u64)>,
    /// (reject code, count), non-zero only.
    pub rejected: Vec<(&'static str, u64)>,
    /// Results published again for a duplicate request id.
    pub replayed: u64,
    /// Requests for servers another replica owns, skipped without an answer.
    pub skipped_not_owned: u64,
    /// Results that could not be published (their message is not acknowledged unless the
    /// failure was permanent).
    pub publish_failures: u64,
    /// Errors reading requests from the transport (the source retries).
    pub receive_errors: u64,
    /// Acknowledgements the transport refused (Kafka offset commits, JetStream acks): the
    /// request may be delivered again after a restart.
    pub ack_failures: u64,
    pub in_flight: u64,
    /// Requests read back from the journal at start (results and ones still running).
    pub journal_loaded: u64,
    /// Requests answered `outcome_unknown` because they were running when amibus stopped.
    pub journal_restart_unknown: u64,
    /// Bytes of a torn or corrupt journal tail cut off at start.
    pub journal_torn_bytes: u64,
    /// Journal entries that could not be written (a `Begin`: the action was not sent).
    pub journal_write_failures: u64,
    /// Times the journal was rewritten with its live entries to stay within its size.
    pub journal_compactions: u64,
}

impl ControlSnapshot {
    /// The count of `status` for `server`.
    pub fn count(&self, server: &str, status: &str) -> u64 {
        self.results
            .iter()
            .filter(|(s, st, _)| s == server && *st == status)
            .map(|(_, _, n)| n)
            .sum()
    }

    /// The total of `status` over all servers.
    pub fn total(&self, status: &str) -> u64 {
        self.results
            .iter()
            .filter(|(_, st, _)| *st == status)
            .map(|(_, _, n)| n)
            .sum()
    }

    pub fn rejected(&self, code: RejectCode) -> u64 {
        self.rejected
            .iter()
            .filter(|(c, _)| *c == code.as_str())
            .map(|(_, n)| n)
            .sum()
    }
}

#[derive(Debug, Default)]
struct Rows {
    index: HashMap<String, usize>,
    names: Vec<String>,
    results: Vec<[AtomicU64; 7]>,
}

impl Rows {
    fn add(&mut self, server: &str) {
        if !self.index.contains_key(server) {
            self.index.insert(server.to_owned(), self.names.len());
            self.names.push(server.to_owned());
            self.results.push(Default::default());
        }
    }
}

impl ControlStats {
    pub fn new<'a>(servers: impl IntoIterator<Item = &'a str>) -> Self {
        let mut rows = Rows {
            index: HashMap::new(),
            names: vec![OTHER_SERVER.to_owned()],
            results: vec![Default::default()],
        };
        for s in servers {
            rows.add(s);
        }
        ControlStats {
            rows: RwLock::new(rows),
            rejected: Default::default(),
            replayed: AtomicU64::new(0),
            skipped_not_owned: AtomicU64::new(0),
            publish_failures: AtomicU64::new(0),
            receive_errors: AtomicU64::new(0),
            ack_failures: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            journal_loaded: AtomicU64::new(0),
            journal_restart_unknown: AtomicU64::new(0),
            journal_torn_bytes: AtomicU64::new(0),
            journal_write_failures: AtomicU64::new(0),
            journal_compactions: AtomicU64::new(0),
        }
    }

    /// A source could not read a request (it retries); for transports.
    pub fn receive_error(&self) {
        self.receive_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A transport refused an acknowledgement (offset commit, JetStream ack); for transports.
    pub fn ack_failure(&self) {
        self.ack_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Give `server` its own row of result counters (a server added by a reload).
    pub fn add_server(&self, server: &str) {
        self.rows
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .add(server);
    }

    fn count(&self, result: &ActionResult) {
        let rows = self.rows.read().unwrap_or_else(PoisonError::into_inner);
        let i = rows.index.get(&result.server).copied().unwrap_or(0);
        let status = usize::try_from(result.status).unwrap_or(0).min(6);
        if let Some(row) = rows.results.get(i) {
            row[status].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn reject(&self, code: RejectCode) {
        self.rejected[code.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ControlSnapshot {
        let mut results = Vec::new();
        let rows = self.rows.read().unwrap_or_else(PoisonError::into_inner);
        for (name, row) in rows.names.iter().zip(&rows.results) {
            for (label, n) in STATUS_LABELS.iter().zip(row) {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    results.push((name.clone(), *label, n));
                }
            }
        }
        ControlSnapshot {
            results,
            rejected: RejectCode::ALL
                .iter()
                .map(|c| (c.as_str(), self.rejected[c.index()].load(Ordering::Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            replayed: self.replayed.load(Ordering::Relaxed),
            skipped_not_owned: self.skipped_not_owned.load(Ordering::Relaxed),
            publish_failures: self.publish_failures.load(Ordering::Relaxed),
            receive_errors: self.receive_errors.load(Ordering::Relaxed),
            ack_failures: self.ack_failures.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            journal_loaded: self.journal_loaded.load(Ordering::Relaxed),
            journal_restart_unknown: self.journal_restart_unknown.load(Ordering::Relaxed),
            journal_torn_bytes: self.journal_torn_bytes.load(Ordering::Relaxed),
            journal_write_failures: self.journal_write_failures.load(Ordering::Relaxed),
            journal_compactions: self.journal_compactions.load(Ordering::Relaxed),
        }
    }
}

/// Where one copy of a result goes.
struct Waiter {
    to: Option<String>,
    ack: Option<Ack>,
    received_ns: i64,
}

type Memory = Dedupe<ActionResult, Waiter>;

/// See the module docs.
pub struct Controller<P> {
    targets: Targets,
    owns: Owns,
    cfg: ControlConfig,
    publisher: Arc<P>,
    stats: Arc<ControlStats>,
    memory: Arc<Mutex<Memory>>,
    journal: Option<Arc<Mutex<Journal>>>,
    buckets: HashMap<String, TokenBucket>,
    permits: Arc<Semaphore>,
}

impl<P: Publisher> Controller<P> {
    pub fn new(
        targets: HashMap<String, Target>,
        owns: Owns,
        cfg: ControlConfig,
        publisher: P,
    ) -> Self {
        let stats = Arc::new(ControlStats::new(targets.keys().map(String::as_str)));
        let now = Instant::now();
        let buckets = targets
            .keys()
            .map(|s| (s.clone(), TokenBucket::new(cfg.rate, cfg.burst, now)))
            .collect();
        Controller {
            memory: Arc::new(Mutex::new(Dedupe::new(
                cfg.dedupe_window,
                cfg.dedupe_capacity,
                cfg.dedupe_max_bytes,
            ))),
            journal: None,
            permits: Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
            targets: Targets {
                map: Arc::new(RwLock::new(Arc::new(targets))),
                stats: Some(stats.clone()),
            },
            owns,
            cfg,
            publisher: Arc::new(publisher),
            stats,
            buckets,
        }
    }

    /// Make the idempotency memory durable: open the journal at `cfg.path`, put back every
    /// request it remembers within `dedupe_window` (a result is replayed to a duplicate; one
    /// that was running when amibus stopped is answered `outcome_unknown` and never sent
    /// again), and record each action sent from now on. Call it before [`Controller::run`].
    ///
    /// # Errors
    /// The journal cannot be read, created or rewritten.
    pub fn with_journal(mut self, cfg: &JournalConfig) -> std::io::Result<Self> {
        let (j, restored) = Journal::open(cfg, self.cfg.dedupe_window)?;
        let now = Instant::now();
        let now_ms = journal::unix_ms(std::time::SystemTime::now());
        {
            let mut memory = lock(&self.memory);
            for r in &restored {
                let age = Duration::from_millis(now_ms.saturating_sub(r.at_unix_ms));
                let at = now.checked_sub(age).unwrap_or(now);
                let bytes = r.result.encoded_len();
                memory.restore(
                    &r.server,
                    &r.request_id,
                    Arc::new(r.result.clone()),
                    bytes,
                    at,
                );
            }
        }
        let unknown = restored
            .iter()
            .filter(|r| journal::is_restart_unknown(&r.result))
            .count();
        tracing::info!(path = %cfg.path.display(), loaded = restored.len(), running = unknown, "control: idempotency journal read back");
        let stats = &self.stats;
        stats
            .journal_loaded
            .fetch_add(restored.len() as u64, Ordering::Relaxed);
        stats
            .journal_torn_bytes
            .fetch_add(j.torn_bytes(), Ordering::Relaxed);
        self.journal = Some(Arc::new(Mutex::new(j)));
        Ok(self)
    }

    /// The counters, for telemetry and tests.
    pub fn stats(&self) -> Arc<ControlStats> {
        self.stats.clone()
    }

    /// The handle that replaces the servers while the consumer runs.
    pub fn targets(&self) -> Targets {
        self.targets.clone()
    }

    /// Take requests from `source` until it ends or `shutdown` is cancelled, then wait (up to
    /// `max_timeout` and a little) for the requests in flight to be answered.
    pub async fn run<S: Source>(mut self, mut source: S, shutdown: CancellationToken) {
        loop {
            let permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                p = self.permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let msg = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                m = source.next() => match m {
                    Some(m) => m,
                    None => {
                        tracing::error!("control: the request source ended; no more actions are taken until amibus restarts");
                        break;
                    }
                },
            };
            self.accept(msg, permit);
        }
        let all = u32::try_from(self.cfg.max_in_flight.max(1)).unwrap_or(u32::MAX);
        let drain = self.cfg.max_timeout + Duration::from_secs(1);
        if tokio::time::timeout(drain, self.permits.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("control: requests still in flight at shutdown; their results are lost");
        }
        source.close().await;
    }

    /// Check one message and start its execution (or answer it) in a task holding `permit`.
    fn accept(&mut self, msg: Incoming, permit: OwnedSemaphorePermit) {
        let received_ns = now_ns();
        let Incoming {
            payload,
            reply,
            ack,
            key,
        } = msg;
        // Where every replica sees every request, only the owner of its server answers it,
        // even when it is malformed: the others skip it before any check.
        let answer_all = self.cfg.answer_not_owned;
        let req = match rules::parse_request(&payload) {
            Ok(r) => r,
            Err(rej) => {
                if !answer_all && !(self.owns)(key.as_deref().unwrap_or("")) {
                    return self.skip(ack);
                }
                let result = rejected(&ActionRequest::default(), received_ns, rej);
                return self.answer(result, reply, ack, permit);
            }
        };
        let owned = (self.owns)(&req.server);
        if !owned && !answer_all {
            return self.skip(ack);
        }
        let to = reply.or_else(|| (!req.reply_to.is_empty()).then(|| req.reply_to.clone()));
        let action = match rules::check_request(&req) {
            Ok(a) => a,
            Err(rej) => return self.answer(rejected(&req, received_ns, rej), to, ack, permit),
        };
        if !owned {
            let rej = Rejection::new(
                RejectCode::NotOwned,
                format!("server {} is served by another amibus replica", req.server),
            );
            return self.answer(rejected(&req, received_ns, rej), to, ack, permit);
        }
        let targets = self.targets.current();
        let Some(target) = targets.get(&req.server) else {
            let rej = Rejection::new(
                RejectCode::UnknownServer,
                format!("no server {} is configured", req.server),
            );
            return self.answer(rejected(&req, received_ns, rej), to, ack, permit);
        };
        if let Err(rej) = rules::check_allowed(&target.allow, &req.server, &req.action) {
            return self.answer(rejected(&req, received_ns, rej), to, ack, permit);
        }
        let waiter = Waiter {
            to,
            ack,
            received_ns,
        };
        let begin = lock(&self.memory).begin(&req.server, &req.request_id, waiter, Instant::now());
        match begin {
            Begin::Joined => return,
            Begin::Done(earlier, waiter) => {
                self.stats.replayed.fetch_add(1, Ordering::Relaxed);
                if journal::is_restart_unknown(&earlier) {
                    self.stats
                        .journal_restart_unknown
                        .fetch_add(1, Ordering::Relaxed);
                }
                let mut again = (*earlier).clone();
                again.replayed = true;
                if let Some(t) = again.timings.as_mut() {
                    t.received_ns = waiter.received_ns;
                }
                let publisher = self.publisher.clone();
                let stats = self.stats.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    deliver(
                        &*publisher,
                        &stats,
                        waiter.to.as_deref(),
                        &again,
                        waiter.ack,
                    )
                    .await;
                });
                return;
            }
            Begin::New => {}
        }
        let now = now_ns();
        let Some(timeout) =
            rules::effective_timeout(&req, now, self.cfg.default_timeout, self.cfg.max_timeout)
        else {
            let result = expired(
                &req,
                received_ns,
                "the deadline passed before the action was sent",
            );
            return self.finish_later(req, result, permit);
        };
        let bucket = self
            .buckets
            .entry(req.server.clone())
            .or_insert_with(|| TokenBucket::new(self.cfg.rate, self.cfg.burst, Instant::now()));
        if !bucket.try_take(Instant::now()) {
            let rej = Rejection::new(
                RejectCode::RateLimited,
                format!(
                    "server {} takes at most {} actions per second (burst {})",
                    req.server, self.cfg.rate, self.cfg.burst
                ),
            );
            return self.finish_later(req.clone(), rejected(&req, received_ns, rej), permit);
        }
        if let Some(j) = &self.journal {
            let begin = Entry::Begin {
                server: req.server.clone(),
                request_id: req.request_id.clone(),
                action: req.action.clone(),
                at_unix_ms: journal::unix_ms(std::time::SystemTime::now()),
            };
            if !write_journal(j, &self.stats, &begin) {
                // Sent unjournaled, it could run a second time after a restart.
                let rej = Rejection::new(
                    RejectCode::JournalUnavailable,
                    "the idempotency journal could not record the action, so it was not sent",
                );
                return self.finish_later(req.clone(), rejected(&req, received_ns, rej), permit);
            }
        }
        let handle = target.handle.clone();
        let await_event = rules::awaited_event(&action);
        let publisher = self.publisher.clone();
        let stats = self.stats.clone();
        let memory = self.memory.clone();
        let journal = self.journal.clone();
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let _permit = permit;
            let mut result = base(&req, received_ns);
            execute(
                &handle,
                action,
                await_event,
                timeout,
                req.deadline_ns,
                &mut result,
            )
            .await;
            stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            finish(
                &req,
                result,
                &memory,
                journal.as_deref(),
                &*publisher,
                &stats,
            )
            .await;
        });
    }

    /// Leave a request to the replica that owns its server: no answer, but acknowledged, so
    /// the transport moves on.
    fn skip(&self, ack: Option<Ack>) {
        self.stats.skipped_not_owned.fetch_add(1, Ordering::Relaxed);
        if let Some(ack) = ack {
            ack();
        }
    }

    /// Answer a request that never reached the idempotency memory.
    fn answer(
        &self,
        result: ActionResult,
        to: Option<String>,
        ack: Option<Ack>,
        permit: OwnedSemaphorePermit,
    ) {
        self.stats.count(&result);
        if result.status == ActionStatus::Rejected as i32 {
            if let Some(code) = RejectCode::ALL
                .iter()
                .find(|c| c.as_str() == result.reject_code)
            {
                self.stats.reject(*code);
            }
        }
        let publisher = self.publisher.clone();
        let stats = self.stats.clone();
        tokio::spawn(async move {
            let _permit = permit;
            deliver(&*publisher, &stats, to.as_deref(), &result, ack).await;
        });
    }

    /// Settle a request that is in the idempotency memory without running it.
    fn finish_later(&self, req: ActionRequest, result: ActionResult, permit: OwnedSemaphorePermit) {
        let publisher = self.publisher.clone();
        let stats = self.stats.clone();
        let memory = self.memory.clone();
        tokio::spawn(async move {
            let _permit = permit;
            finish(&req, result, &memory, None, &*publisher, &stats).await;
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Append `entry` to the journal (a write(2), an fsync if configured; a compaction now and
/// then); false, counted and logged, when it failed.
fn write_journal(journal: &Mutex<Journal>, stats: &ControlStats, entry: &Entry) -> bool {
    let mut j = lock(journal);
    let before = j.compactions();
    let written = j.append(entry);
    stats
        .journal_compactions
        .fetch_add(j.compactions() - before, Ordering::Relaxed);
    drop(j);
    match written {
        Ok(()) => true,
        Err(e) => {
            stats.journal_write_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "control: the idempotency journal could not be written");
            false
        }
    }
}

/// Remember the result (unless nothing ran and a retry may succeed) and publish it to every
/// waiter of the request. With `journal` (the request was journaled before it was sent), the
/// journal learns the result first (or that nothing ran), so it is there before any message
/// is acknowledged; if that write fails, the `Begin` stays, and after a restart the request
/// is answered `outcome_unknown` rather than run again.
async fn finish<P: Publisher>(
    req: &ActionRequest,
    mut result: ActionResult,
    memory: &Mutex<Memory>,
    journal: Option<&Mutex<Journal>>,
    publisher: &P,
    stats: &ControlStats,
) {
    let completed = now_ns();
    if let Some(t) = result.timings.as_mut() {
        t.completed_ns = completed;
    }
    stats.count(&result);
    let code = RejectCode::ALL
        .iter()
        .copied()
        .find(|c| c.as_str() == result.reject_code);
    if let Some(code) = code {
        stats.reject(code);
    }
    let remember = !code.is_some_and(RejectCode::is_retriable);
    let shared = Arc::new(result);
    let keep = remember.then(|| (shared.clone(), shared.encoded_len()));
    if let Some(j) = journal {
        let server = req.server.clone();
        let request_id = req.request_id.clone();
        let at_unix_ms = journal::unix_ms(std::time::SystemTime::now());
        let entry = if remember {
            Entry::Done {
                server,
                request_id,
                at_unix_ms,
                result: shared.encode_to_vec(),
            }
        } else {
            Entry::Forget {
                server,
                request_id,
                at_unix_ms,
            }
        };
        write_journal(j, stats, &entry);
    }
    let waiters = lock(memory).finish(&req.server, &req.request_id, keep, Instant::now());
    for (i, w) in waiters.into_iter().enumerate() {
        if i == 0 {
            deliver(publisher, stats, w.to.as_deref(), &shared, w.ack).await;
        } else {
            // A duplicate that arrived while the first was running.
            stats.replayed.fetch_add(1, Ordering::Relaxed);
            let mut again = (*shared).clone();
            again.replayed = true;
            if let Some(t) = again.timings.as_mut() {
                t.received_ns = w.received_ns;
            }
            deliver(publisher, stats, w.to.as_deref(), &again, w.ack).await;
        }
    }
}

/// Publishes of one result, at most, while the bus refuses it retriably.
const PUBLISH_ATTEMPTS: u32 = 5;

/// The pause after the first retriable publish failure; it doubles after each.
const PUBLISH_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Publish `result` and acknowledge its message. A retriable failure is retried (the task
/// keeps its in-flight slot meanwhile, so a bus that refuses results also stops the intake);
/// after the last attempt the message stays unacknowledged (Kafka: its partition's offset
/// stays before it until a restart reads it again; JetStream delivers it again after
/// `ack_wait`). A permanent failure acknowledges it (see [`PublishError::Permanent`]). Every
/// failed attempt is counted.
async fn deliver<P: Publisher>(
    publisher: &P,
    stats: &ControlStats,
    to: Option<&str>,
    result: &ActionResult,
    ack: Option<Ack>,
) {
    let mut pause = PUBLISH_RETRY_PAUSE;
    for attempt in 1..=PUBLISH_ATTEMPTS {
        match publisher.publish(to, result).await {
            Ok(()) => {
                if let Some(ack) = ack {
                    ack();
                }
                return;
            }
            Err(e) if e.is_retriable() => {
                stats.publish_failures.fetch_add(1, Ordering::Relaxed);
                if attempt == PUBLISH_ATTEMPTS {
                    tracing::warn!(server = %result.server, error = %e, attempts = attempt, "control: result not published; the request stays unacknowledged");
                    return;
                }
                tracing::debug!(server = %result.server, error = %e, attempt, "control: result not published; retrying");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            Err(e) => {
                stats.publish_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(server = %result.server, error = %e, "control: result can never be published; acknowledging the request so the transport moves on");
                if let Some(ack) = ack {
                    ack();
                }
                return;
            }
        }
    }
}

/// Send the action once and fill in the result.
async fn execute(
    handle: &Handle,
    action: Action,
    await_event: Option<&'static str>,
    timeout: Duration,
    deadline_ns: i64,
    result: &mut ActionResult,
) {
    let mut req = Request::new(action, timeout);
    if let Some(e) = await_event {
        req = req.await_event(e);
    }
    if let Some(t) = result.timings.as_mut() {
        t.sent_ns = now_ns();
    }
    match handle.request(req).await {
        Ok(reply) => fill_reply(result, reply),
        Err(e) => fill_error(result, &e, deadline_ns),
    }
}

/// The result of a complete reply: `success` or `error` from the response (and, for an
/// async Originate, from its OriginateResponse).
pub fn fill_reply(result: &mut ActionResult, reply: ActionReply) {
    let ok = reply.is_success();
    let message = reply.message();
    result.action_id = reply
        .response
        .frame()
        .get("ActionID")
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    result.response = Some(reply_frame(&reply.response));
    result.events = reply.events.iter().map(reply_frame).collect();
    result.events_truncated = reply.truncated;
    let mut status = if ok {
        ActionStatus::Success
    } else {
        ActionStatus::Error
    };
    let mut reason = if ok {
        String::new()
    } else {
        message.unwrap_or_default()
    };
    if let Some(ev) = &reply.awaited {
        let f = ev.frame();
        let call_ok = f
            .get("Response")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"Success"));
        if !call_ok {
            status = ActionStatus::Error;
            reason = format!(
                "OriginateResponse: {} (Reason: {})",
                String::from_utf8_lossy(f.get("Response").unwrap_or(b"?")),
                String::from_utf8_lossy(f.get("Reason").unwrap_or(b"?"))
            );
        }
        result.originate_response = Some(reply_frame(ev));
    }
    result.status = status as i32;
    result.reason = reason;
}

/// The result of a failed send.
pub fn fill_error(result: &mut ActionResult, e: &ActionError, deadline_ns: i64) {
    let (status, code) = match e {
        ActionError::Invalid(_) => (ActionStatus::Rejected, Some(RejectCode::InvalidHeader)),
        ActionError::NotConnected => (ActionStatus::Rejected, Some(RejectCode::NotConnected)),
        // Not sent because the queue stayed full: past the request's deadline that is
        // simply expiry.
        ActionError::Busy if now_ns() >= deadline_ns => (ActionStatus::Expired, None),
        ActionError::Busy => (ActionStatus::Rejected, Some(RejectCode::Busy)),
        ActionError::Closed => (ActionStatus::Rejected, Some(RejectCode::ShuttingDown)),
        ActionError::OutcomeUnknown => (ActionStatus::OutcomeUnknown, None),
        ActionError::TimedOut => (ActionStatus::Timeout, None),
    };
    result.status = status as i32;
    result.reason = e.to_string();
    if let Some(code) = code {
        result.reject_code = code.as_str().to_owned();
        result.retriable = code.is_retriable();
    }
}

fn reply_frame(f: &OwnedFrame) -> ReplyFrame {
    ReplyFrame {
        headers: f
            .frame()
            .headers()
            .map(|h| pb::Header {
                key: h.key.to_vec(),
                value: h.value.map(<[u8]>::to_vec),
                normalized_key: String::new(),
            })
            .collect(),
    }
}

fn base(req: &ActionRequest, received_ns: i64) -> ActionResult {
    ActionResult {
        request_id: req.request_id.clone(),
        server: req.server.clone(),
        action: req.action.clone(),
        correlation: req.correlation.clone(),
        timings: Some(ActionTimings {
            received_ns,
            sent_ns: 0,
            completed_ns: 0,
        }),
        ..ActionResult::default()
    }
}

fn rejected(req: &ActionRequest, received_ns: i64, rej: Rejection) -> ActionResult {
    let mut r = base(req, received_ns);
    r.status = ActionStatus::Rejected as i32;
    r.retriable = rej.code.is_retriable();
    r.reject_code = rej.code.as_str().to_owned();
    r.reason = rej.reason;
    if let Some(t) = r.timings.as_mut() {
        t.completed_ns = now_ns();
    }
    r
}

fn expired(req: &ActionRequest, received_ns: i64, why: &str) -> ActionResult {
    let mut r = base(req, received_ns);
    r.status = ActionStatus::Expired as i32;
    r.reason = why.to_owned();
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use tokio::sync::mpsc;

    /// Requests from a channel.
    struct Chan(mpsc::Receiver<Incoming>);

    impl Source for Chan {
        async fn next(&mut self) -> Option<Incoming> {
            self.0.recv().await
        }
    }

    /// Fails the first `fail` publishes (retriably or not), then records what it publishes.
    struct Flaky {
        fail: AtomicU32,
        permanent: bool,
        out: mpsc::UnboundedSender<(Option<String>, ActionResult)>,
    }

    impl Publisher for Flaky {
        async fn publish(
            &self,
            to: Option<&str>,
            result: &ActionResult,
        ) -> Result<(), PublishError> {
            if self
                .fail
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(if self.permanent {
                    PublishError::Permanent("no such topic".into())
                } else {
                    PublishError::Retriable("broker down".into())
                });
            }
            let _ = self.out.send((to.map(str::to_owned), result.clone()));
            Ok(())
        }
    }

    struct Rig {
        tx: mpsc::Sender<Incoming>,
        out: mpsc::UnboundedReceiver<(Option<String>, ActionResult)>,
        acks: mpsc::UnboundedReceiver<&'static str>,
        ack_tx: mpsc::UnboundedSender<&'static str>,
        stats: Arc<ControlStats>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    /// A running consumer fed by the returned rig, its publisher failing the first `fail`
    /// results (permanently or not); `make` builds the controller around that publisher.
    fn start(fail: u32, permanent: bool, make: impl FnOnce(Flaky) -> Controller<Flaky>) -> Rig {
        let (tx, rx) = mpsc::channel(16);
        let (out_tx, out) = mpsc::unbounded_channel();
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let controller = make(Flaky {
            fail: AtomicU32::new(fail),
            permanent,
            out: out_tx,
        });
        let stats = controller.stats();
        let stop = CancellationToken::new();
        let task = tokio::spawn(controller.run(Chan(rx), stop.clone()));
        Rig {
            tx,
            out,
            acks,
            ack_tx,
            stats,
            stop,
            task,
        }
    }

    fn rig(fail: u32, permanent: bool, answer_not_owned: bool, owns: Owns) -> Rig {
        let cfg = ControlConfig {
            answer_not_owned,
            ..ControlConfig::default()
        };
        start(fail, permanent, |publisher| {
            Controller::new(HashMap::new(), owns, cfg, publisher)
        })
    }

    impl Rig {
        async fn send(&self, name: &'static str, payload: Vec<u8>, key: Option<&str>) {
            let ack_tx = self.ack_tx.clone();
            let msg = Incoming {
                payload: payload.into(),
                reply: None,
                ack: Some(Box::new(move || {
                    let _ = ack_tx.send(name);
                })),
                key: key.map(str::to_owned),
            };
            assert!(self.tx.send(msg).await.is_ok());
        }

        /// Until the consumer has taken everything sent, finished it, and stopped.
        async fn finish(self) -> (Vec<ActionResult>, Vec<&'static str>, ControlSnapshot) {
            let Rig {
                tx,
                mut out,
                mut acks,
                ack_tx,
                stats,
                stop,
                task,
            } = self;
            drop(tx);
            drop(ack_tx);
            let _ = task.await;
            drop(stop);
            let mut results = Vec::new();
            while let Ok((_, r)) = out.try_recv() {
                results.push(r);
            }
            let mut acked = Vec::new();
            while let Some(a) = acks.recv().await {
                acked.push(a);
            }
            (results, acked, stats.snapshot())
        }
    }

    /// A consumer for server `pbx1`, whose actions arrive on the returned receiver (the
    /// simulated Asterisk: what it receives was sent), keeping its memory in `journal`.
    fn journaled_rig(
        journal: &JournalConfig,
        broken: bool,
    ) -> (Rig, mpsc::Receiver<crate::ami::handle::Command>) {
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let targets = HashMap::from([(
            "pbx1".to_owned(),
            Target {
                handle: Handle::new(Arc::from("pbx1"), cmd_tx),
                allow: AllowList::new(["read-only"]),
            },
        )]);
        let cfg = ControlConfig {
            rate: 0.0,
            ..ControlConfig::default()
        };
        let rig = start(0, false, |publisher| {
            let controller = Controller::new(targets, Arc::new(|_: &str| true), cfg, publisher)
                .with_journal(journal)
                .expect("journal");
            if broken {
                let j = controller.journal.as_ref().expect("journal");
                lock(j).break_writes().expect("reopen");
            }
            controller
        });
        (rig, cmd_rx)
    }

    fn ping(id: &str) -> Vec<u8> {
        ActionRequest {
            request_id: id.into(),
            server: "pbx1".into(),
            action: "Ping".into(),
            deadline_ns: now_ns() + 60_000_000_000,
            timeout_ms: 50_000,
            ..ActionRequest::default()
        }
        .encode_to_vec()
    }

    fn journal_cfg(dir: &std::path::Path) -> JournalConfig {
        JournalConfig {
            path: dir.join("control-journal"),
            fsync: super::journal::JournalFsync::Never,
            max_bytes: 1 << 20,
        }
    }

    #[tokio::test]
    async fn an_action_the_journal_cannot_record_is_not_sent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (rig, mut asterisk) = journaled_rig(&journal_cfg(dir.path()), true);
        rig.send("a", ping("a"), None).await;
        let (results, acked, snap) = rig.finish().await;
        assert_eq!(results.len(), 1);
        let r = &results[0];
        assert_eq!(
            (r.status, r.reject_code.as_str(), r.retriable),
            (ActionStatus::Rejected as i32, "journal_unavailable", true)
        );
        assert_eq!(acked, ["a"]);
        assert_eq!(snap.journal_write_failures, 1);
        assert!(asterisk.try_recv().is_err(), "nothing was sent");
    }

    #[tokio::test]
    async fn after_a_restart_the_journal_answers_and_nothing_is_sent_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = journal_cfg(dir.path());
        let (mut first, mut asterisk) = journaled_rig(&cfg, false);
        // `answered` gets its reply; `running` never does: amibus stops first.
        first.send("answered", ping("answered"), None).await;
        let answered = asterisk.recv().await.expect("sent");
        let _ = answered.reply.send(Err(ActionError::TimedOut));
        let (_, r) = first.out.recv().await.expect("a result");
        assert_eq!(r.status, ActionStatus::Timeout as i32);
        first.send("running", ping("running"), None).await;
        let running = asterisk.recv().await.expect("sent");
        // The crash: the second amibus opens the journal while `running` is still held.

        let (second, mut asterisk2) = journaled_rig(&cfg, false);
        second.send("running", ping("running"), None).await;
        second.send("answered", ping("answered"), None).await;
        let (results, acked, snap) = second.finish().await;
        let mut got: Vec<_> = results
            .iter()
            .map(|r| {
                (
                    r.request_id.as_str(),
                    r.status,
                    r.replayed,
                    r.reason.as_str(),
                )
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                (
                    "answered",
                    ActionStatus::Timeout as i32,
                    true,
                    r.reason.as_str()
                ),
                (
                    "running",
                    ActionStatus::OutcomeUnknown as i32,
                    true,
                    journal::RESTARTED_REASON
                ),
            ]
        );
        assert_eq!(acked.len(), 2);
        assert_eq!((snap.journal_loaded, snap.journal_restart_unknown), (2, 1));
        assert!(asterisk2.try_recv().is_err(), "nothing was sent again");
        drop(running);
    }

    fn unknown(id: &str, server: &str) -> Vec<u8> {
        ActionRequest {
            request_id: id.into(),
            server: server.into(),
            action: "Ping".into(),
            deadline_ns: now_ns() + 60_000_000_000,
            ..ActionRequest::default()
        }
        .encode_to_vec()
    }

    #[tokio::test]
    async fn a_retriable_publish_failure_is_retried_and_acked_once_published() {
        let rig = rig(2, false, true, Arc::new(|_: &str| true));
        rig.send("a", unknown("a", "pbx9"), None).await;
        let (results, acked, snap) = rig.finish().await;
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].reject_code, "unknown_server");
        assert_eq!(acked, ["a"]);
        assert_eq!(snap.publish_failures, 2);
    }

    #[tokio::test]
    async fn a_result_the_bus_keeps_refusing_stays_unacknowledged() {
        let rig = rig(u32::MAX, false, true, Arc::new(|_: &str| true));
        rig.send("a", unknown("a", "pbx9"), None).await;
        let (results, acked, snap) = rig.finish().await;
        assert!(results.is_empty());
        assert!(acked.is_empty(), "never published, never acknowledged");
        assert_eq!(snap.publish_failures, u64::from(PUBLISH_ATTEMPTS));
    }

    #[tokio::test]
    async fn a_permanent_publish_failure_settles_the_message() {
        let rig = rig(1, true, true, Arc::new(|_: &str| true));
        rig.send("a", unknown("a", "pbx9"), None).await;
        rig.send("b", unknown("b", "pbx9"), None).await;
        let (results, mut acked, snap) = rig.finish().await;
        assert_eq!(results.len(), 1, "the second is published");
        acked.sort();
        assert_eq!(acked, ["a", "b"], "both settled");
        assert_eq!(snap.publish_failures, 1);
    }

    #[tokio::test]
    async fn where_every_replica_sees_every_request_only_the_owner_answers() {
        // This replica owns "mine" and the empty key, nothing else.
        let owns: Owns = Arc::new(|id: &str| id == "mine" || id.is_empty());
        let rig = rig(0, false, false, owns);
        let bad = vec![0xff, 0xff, 0xff];
        rig.send("bad-theirs", bad.clone(), Some("theirs")).await;
        rig.send("bad-mine", bad.clone(), Some("mine")).await;
        rig.send("bad-nokey", bad, None).await;
        rig.send("req-theirs", unknown("t", "theirs"), Some("mine"))
            .await;
        rig.send("req-mine", unknown("m", "mine"), Some("theirs"))
            .await;
        // Fails its checks, but is not ours: skipped before them.
        rig.send("invalid-theirs", unknown("", "theirs"), None)
            .await;
        let (results, mut acked, snap) = rig.finish().await;
        let mut answered: Vec<_> = results
            .iter()
            .map(|r| (r.request_id.as_str(), r.reject_code.as_str()))
            .collect();
        answered.sort();
        assert_eq!(
            answered,
            [
                ("", "malformed"),
                ("", "malformed"),
                ("m", "unknown_server")
            ],
            "the request decides over the key once it decodes"
        );
        acked.sort();
        assert_eq!(acked.len(), 6, "everything is acknowledged: {acked:?}");
        assert_eq!(snap.skipped_not_owned, 3);
    }
}
