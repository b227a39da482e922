//! The action consumer: requests in from a [`RequestSource`], results out through a [`Publisher`].
//!
//! Owns: the order of the checks, the in-flight limit, the per-server token buckets, the
//! idempotency memory ([`Dedupe`]), turning an AMI reply into an [`ActionResult`], and
//! [`ControlStats`].
//!
//! For each message, in the consumer task (no I/O, so one bad or slow request never holds up
//! the next beyond an in-flight permit):
//! 1. decode; the body names the server of its subject or key (`server_mismatch`, answered by
//!    the owner of the subject or key); required fields; header safety → `rejected`
//!    (`malformed`, `missing_field`, `invalid_header`). Where every replica sees every request (Kafka, JetStream:
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
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::dedupe::{Begin, Dedupe};
use super::journal::{self, Entry, Journal, JournalConfig};
use super::rate::TokenBucket;
use super::result::{base, expired, fill_error, fill_reply, rejected};
use super::rules::{self, AllowList, RejectCode, Rejection};
use super::stats::ControlStats;
use super::transport::{Ack, Incoming, Publisher, RequestSource};
use crate::ami::record::now_ns;
use crate::ami::{Action, Handle, Request};
use crate::model::pb::{ActionRequest, ActionResult, ActionStatus};

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
    /// Bytes of list replies held per server connection, all replies in flight together;
    /// past it list items are dropped and the result is marked `events_truncated`.
    pub max_reply_bytes: usize,
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
            max_reply_bytes: crate::ami::connection::DEFAULT_MAX_REPLY_BYTES,
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
    /// Requests the journal says were running when amibus stopped and that have not been
    /// answered since: their first answer (`outcome_unknown`) is not a replay.
    unanswered_restarts: std::collections::HashSet<(String, String)>,
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
            unanswered_restarts: Default::default(),
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
        self.unanswered_restarts = restored
            .iter()
            .filter(|r| r.running)
            .map(|r| (r.server.clone(), r.request_id.clone()))
            .collect();
        let unknown = self.unanswered_restarts.len();
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
    pub async fn run<S: RequestSource>(mut self, mut source: S, shutdown: CancellationToken) {
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
        // A body naming another server than its subject or key: answered (refused) by the
        // owner of the subject or key, which is where the transport routed it.
        if let Err(rej) = rules::check_route(&req, key.as_deref()) {
            if !answer_all && !(self.owns)(key.as_deref().unwrap_or("")) {
                return self.skip(ack);
            }
            let to = reply.or_else(|| (!req.reply_to.is_empty()).then(|| req.reply_to.clone()));
            return self.answer(rejected(&req, received_ns, rej), to, ack, permit);
        }
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
                // Running when amibus stopped and not answered since: this is its first
                // answer, not a replay. Journaled as its result, so after another restart it
                // is a replay.
                let first = self
                    .unanswered_restarts
                    .remove(&(req.server.clone(), req.request_id.clone()));
                let mut again = (*earlier).clone();
                if first {
                    self.stats
                        .journal_restart_unknown
                        .fetch_add(1, Ordering::Relaxed);
                    self.stats.count(&again);
                } else {
                    self.stats.replayed.fetch_add(1, Ordering::Relaxed);
                    again.replayed = true;
                }
                if let Some(t) = again.timings.as_mut() {
                    t.received_ns = waiter.received_ns;
                }
                let publisher = self.publisher.clone();
                let stats = self.stats.clone();
                let journal = self.journal.clone().filter(|_| first);
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Some(j) = &journal {
                        let done = Entry::Done {
                            server: again.server.clone(),
                            request_id: again.request_id.clone(),
                            at_unix_ms: journal::unix_ms(std::time::SystemTime::now()),
                            result: again.encode_to_vec(),
                        };
                        write_journal(j, &stats, &done);
                    }
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
            finish(&req, result, &memory, journal.as_ref(), &*publisher, &stats).await;
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
        if result.status == ActionStatus::Rejected as i32
            && let Some(code) = RejectCode::ALL
                .iter()
                .find(|c| c.as_str() == result.reject_code)
        {
            self.stats.reject(*code);
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
fn write_journal(journal: &Arc<Mutex<Journal>>, stats: &Arc<ControlStats>, entry: &Entry) -> bool {
    let mut j = lock(journal);
    let written = j.append(entry);
    let compaction = j.begin_compaction();
    drop(j);
    if let Some(c) = compaction {
        // Read, filter and rewrite on a blocking thread; only the final copy of what was
        // appended meanwhile and the rename take the journal's lock.
        let journal = journal.clone();
        let stats = stats.clone();
        tokio::task::spawn_blocking(move || {
            let prepared = c.prepare();
            match lock(&journal).finish_compaction(prepared) {
                Ok(()) => {
                    stats.journal_compactions.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control journal: compaction failed; the journal goes on in the old file");
                }
            }
        });
    }
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
    journal: Option<&Arc<Mutex<Journal>>>,
    publisher: &P,
    stats: &Arc<ControlStats>,
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

#[cfg(test)]
#[path = "consumer_tests.rs"]
mod tests;
