//! State snapshots: after every login, and after a gap on the connection, ask the server for
//! its current state with list actions and publish the answer on the event stream.
//!
//! Owns: when a snapshot starts (login; a gap, at most once per `snapshot_gap_interval`), the
//! list actions it asks, routing their frames (the response and completion event are consumed;
//! every item goes downstream as [`Record::SnapshotItem`], in wire order, where it arrived among
//! the live events), its deadline, and the two synthetic records that bracket it
//! ([`Record::SnapshotBegin`], [`Record::SnapshotEnd`]), and the snapshot counters.
//!
//! Lives inside the connection task, one [`Snapshots`] per session: the list actions take the
//! session's own ActionIDs and write buffer (the path every action takes), but not the
//! caller path of [`super::handle`], which gathers a list into one reply for a caller: here the
//! items must go to the stream one by one, at their place among live events, so a consumer's
//! state is right at every position of the stream.
//!
//! Must never:
//! - wait, or hold the reader: everything here is a synchronous step of the read loop that
//!   returns records for the connection to hand on (with `try_send`, like every record);
//! - end without a [`Record::SnapshotEnd`] for a snapshot that began, in the same epoch: a
//!   list that never completes ends at the deadline, a session that ends ends it first, both
//!   marked incomplete;
//! - retry an action the server refused (`Response: Error`, e.g. `Permission denied`): it is
//!   reported in `SnapshotEnd` and not asked again in that session;
//! - cost anything per frame while no snapshot is running and no abandoned list is pending.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::time::Instant;
use tracing::{info, warn};

use super::action::Action;
use super::frame::OwnedFrame;
use super::record::Record;

/// The snapshot-duration histogram, recorded here once per snapshot and described by
/// `telemetry`.
pub const DURATION_SECONDS: &str = "amibus_snapshot_duration_seconds";

/// The lists asked when the configuration says nothing.
pub const DEFAULT_LISTS: [&str; 4] = [
    "CoreShowChannels",
    "QueueStatus",
    "DeviceStateList",
    "BridgeList",
];

/// The list actions a snapshot may ask: read-only actions that answer with an event list
/// (`EventList: start` … `EventList: Complete`) describing current state.
pub const LIST_ACTIONS: [&str; 13] = [
    "CoreShowChannels",
    "QueueStatus",
    "QueueSummary",
    "DeviceStateList",
    "BridgeList",
    "ExtensionStateList",
    "PresenceStateList",
    "ParkedCalls",
    "Status",
    "Agents",
    "ConfbridgeListRooms",
    "PJSIPShowEndpoints",
    "SIPpeers",
];

/// The configured name of `name` if it is a list action a snapshot may ask (ASCII case ignored).
pub fn list_action(name: &str) -> Option<&'static str> {
    LIST_ACTIONS
        .iter()
        .copied()
        .find(|a| a.eq_ignore_ascii_case(name))
}

/// Not asked again in a session once refused: remembered at most this many.
const MAX_REFUSED: usize = 32;
/// Lists abandoned at the deadline whose late frames are still dropped, at most.
const MAX_ABANDONED: usize = 64;

/// What makes a connection take snapshots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// List actions, in order; empty: no snapshots.
    pub lists: Vec<String>,
    /// A gap starts a snapshot at most once per this interval (counted from the last start).
    pub gap_interval: Duration,
    /// A snapshot not complete by then ends incomplete (`timeout`).
    pub timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            lists: DEFAULT_LISTS.iter().map(|s| (*s).to_owned()).collect(),
            gap_interval: Duration::from_secs(30),
            timeout: Duration::from_secs(30),
        }
    }
}

/// Why a snapshot was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Login,
    Gap,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Login => "login",
            Trigger::Gap => "gap",
        }
    }
}

/// The record that opens a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    pub id: Arc<str>,
    pub trigger: Trigger,
    pub lists: Vec<String>,
}

/// The outcome of one list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListOutcome {
    pub action: String,
    pub items: u64,
    pub complete: bool,
    /// Empty when complete.
    pub error: String,
}

/// The record that closes a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct End {
    pub id: Arc<str>,
    pub trigger: Trigger,
    pub lists: Vec<ListOutcome>,
    pub complete: bool,
    /// Empty when complete; else `timeout`, `connection ended: …` or `refused: <lists>`.
    pub reason: String,
    pub duration: Duration,
}

/// Snapshot counters of one connection (read by telemetry at scrape time).
#[derive(Debug, Default)]
pub struct Counters {
    login: AtomicU64,
    gap: AtomicU64,
    items: AtomicU64,
    incomplete: AtomicU64,
    late_frames: AtomicU64,
}

/// A copy of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// Snapshots begun after a login.
    pub login: u64,
    /// Snapshots begun after a gap.
    pub gap: u64,
    /// Items published.
    pub items: u64,
    /// Snapshots that ended incomplete (timeout, connection ended, a list refused).
    pub incomplete: u64,
    /// Frames of lists abandoned at the deadline that arrived later, dropped.
    pub late_frames: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CountersSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CountersSnapshot {
            login: r(&self.login),
            gap: r(&self.gap),
            items: r(&self.items),
            incomplete: r(&self.incomplete),
            late_frames: r(&self.late_frames),
        }
    }
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// What became of a frame offered to [`Snapshots::route`].
#[derive(Debug)]
pub enum Routed {
    /// Not a snapshot's: route it as usual.
    Pass(OwnedFrame),
    /// Hand this record on (an item, or the `SnapshotEnd` the frame completed).
    Emit(Record),
    /// Taken (a list's response or completion event, or a late frame of an abandoned list).
    Consumed,
}

#[derive(Debug)]
enum State {
    /// Sent; no response yet.
    Asked,
    /// `Response: Success` with `EventList: start`: items flow.
    Listing,
    Complete,
    Failed(String),
}

#[derive(Debug)]
struct List {
    action: String,
    action_id: String,
    items: u64,
    state: State,
}

impl List {
    fn open(&self) -> bool {
        matches!(self.state, State::Asked | State::Listing)
    }
}

#[derive(Debug)]
struct Active {
    id: Arc<str>,
    trigger: Trigger,
    started: Instant,
    deadline: Instant,
    lists: Vec<List>,
}

/// The snapshots of one session.
#[derive(Debug)]
pub struct Snapshots {
    server: Arc<str>,
    settings: Arc<Settings>,
    counters: Arc<Counters>,
    epoch: u64,
    taken: u64,
    active: Option<Active>,
    /// The login snapshot is still to start.
    login_due: bool,
    /// A gap was published since the last snapshot started.
    gap_due: bool,
    /// The connection's gap-record count when last looked at.
    gaps_seen: u64,
    last_start: Option<Instant>,
    /// Lists the server refused this session, with its message: not asked again.
    refused: Vec<(String, String)>,
    /// ActionIDs of lists still open when their snapshot ended: their late frames are dropped.
    abandoned: VecDeque<String>,
}

impl Snapshots {
    /// The snapshots of a session of `epoch` that just logged in; `gaps` is the connection's
    /// gap-record count now (only later gaps trigger a snapshot: the login one covers these).
    pub fn new(
        server: Arc<str>,
        settings: Arc<Settings>,
        counters: Arc<Counters>,
        epoch: u64,
        gaps: u64,
    ) -> Self {
        let login_due = !settings.lists.is_empty();
        Snapshots {
            server,
            settings,
            counters,
            epoch,
            taken: 0,
            active: None,
            login_due,
            gap_due: false,
            gaps_seen: gaps,
            last_start: None,
            refused: Vec::new(),
            abandoned: VecDeque::new(),
        }
    }

    /// Whether a snapshot is running.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// When [`Snapshots::due`] has something to do next without any frame arriving: the
    /// running snapshot's deadline, or the end of the gap interval for a gap snapshot waiting.
    pub fn next_wake(&self) -> Option<Instant> {
        match &self.active {
            Some(a) => Some(a.deadline),
            None if self.gap_due => Some(
                self.last_start
                    .map_or_else(Instant::now, |t| t + self.settings.gap_interval),
            ),
            None => None,
        }
    }

    /// One step at the top of each turn of the read loop: notice gaps (`gaps` is the
    /// connection's gap-record count), end a snapshot past its deadline, start one that is due
    /// (writing its actions into `wbuf` with ActionIDs from `next_id`). The record to hand on,
    /// if any; call again until `None`.
    pub fn due(
        &mut self,
        now: Instant,
        gaps: u64,
        next_id: &mut dyn FnMut() -> String,
        wbuf: &mut BytesMut,
    ) -> Option<Record> {
        if gaps != self.gaps_seen {
            self.gaps_seen = gaps;
            self.gap_due = !self.settings.lists.is_empty();
        }
        if let Some(a) = &self.active {
            if now >= a.deadline {
                return self.finish(now, Some("timeout".to_owned()));
            }
            return None;
        }
        let trigger = if self.login_due {
            Trigger::Login
        } else if self.gap_due
            && self
                .last_start
                .is_none_or(|t| now >= t + self.settings.gap_interval)
        {
            Trigger::Gap
        } else {
            return None;
        };
        self.login_due = false;
        self.gap_due = false;
        Some(self.start(trigger, now, next_id, wbuf))
    }

    fn start(
        &mut self,
        trigger: Trigger,
        now: Instant,
        next_id: &mut dyn FnMut() -> String,
        wbuf: &mut BytesMut,
    ) -> Record {
        self.taken += 1;
        self.last_start = Some(now);
        inc(match trigger {
            Trigger::Login => &self.counters.login,
            Trigger::Gap => &self.counters.gap,
        });
        let id: Arc<str> = Arc::from(format!("{}-{}", self.epoch, self.taken));
        let mut lists = Vec::with_capacity(self.settings.lists.len());
        for action in &self.settings.lists {
            let refused = self
                .refused
                .iter()
                .find(|(a, _)| a == action)
                .map(|(_, m)| m.clone());
            let mut list = List {
                action: action.clone(),
                action_id: String::new(),
                items: 0,
                state: State::Asked,
            };
            if let Some(message) = refused {
                list.state = State::Failed(format!("{message} (not asked again this session)"));
            } else {
                let action_id = next_id();
                match Action::new(action.as_str()).encode(Some(&action_id), wbuf) {
                    Ok(()) => list.action_id = action_id,
                    Err(e) => list.state = State::Failed(format!("not sent: {e}")),
                }
            }
            lists.push(list);
        }
        let begin = Begin {
            id: id.clone(),
            trigger,
            lists: self.settings.lists.clone(),
        };
        self.active = Some(Active {
            id,
            trigger,
            started: now,
            deadline: now + self.settings.timeout,
            lists,
        });
        Record::SnapshotBegin(Box::new(begin))
    }

    /// Offer a frame: a running snapshot's items go downstream tagged, its responses and
    /// completion events are taken, anything else passes.
    pub fn route(&mut self, f: OwnedFrame) -> Routed {
        if self.active.is_none() && self.abandoned.is_empty() {
            return Routed::Pass(f);
        }
        let view = f.frame();
        let Some(id) = view.get("ActionID") else {
            return Routed::Pass(f);
        };
        let is_response = view.header(0).is_some_and(|h| h.is("Response"));
        let is_complete = view
            .get("EventList")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"Complete"));
        if let Some(i) = self.abandoned.iter().position(|a| a.as_bytes() == id) {
            inc(&self.counters.late_frames);
            let refused = is_response
                && !view
                    .get("Response")
                    .is_some_and(|v| v.eq_ignore_ascii_case(b"Success"));
            if is_complete || refused {
                self.abandoned.remove(i);
            }
            return Routed::Consumed;
        }
        let Some(active) = self.active.as_mut() else {
            return Routed::Pass(f);
        };
        let Some(list) = active
            .lists
            .iter_mut()
            .find(|l| l.open() && l.action_id.as_bytes() == id)
        else {
            return Routed::Pass(f);
        };
        if is_response {
            let success = view
                .get("Response")
                .is_some_and(|v| v.eq_ignore_ascii_case(b"Success"));
            let message = view
                .get("Message")
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .unwrap_or_default();
            if !success {
                if self.refused.len() < MAX_REFUSED {
                    self.refused.push((list.action.clone(), message.clone()));
                }
                list.state = State::Failed(if message.is_empty() {
                    "refused".to_owned()
                } else {
                    message
                });
            } else if view
                .get("EventList")
                .is_some_and(|v| v.eq_ignore_ascii_case(b"start"))
            {
                list.state = State::Listing;
            } else {
                // A success without a list: nothing will follow.
                list.state = State::Complete;
            }
        } else if is_complete {
            list.state = State::Complete;
        } else {
            list.items += 1;
            inc(&self.counters.items);
            return Routed::Emit(Record::SnapshotItem {
                snapshot_id: active.id.clone(),
                frame: Box::new(f),
            });
        }
        if active.lists.iter().any(List::open) {
            return Routed::Consumed;
        }
        match self.finish(Instant::now(), None) {
            Some(end) => Routed::Emit(end),
            None => Routed::Consumed,
        }
    }

    /// The session ended (`reason` as in `ConnectionDown`): the running snapshot's
    /// `SnapshotEnd`, incomplete, if one runs.
    pub fn abort(&mut self, reason: &str) -> Option<Record> {
        self.finish(Instant::now(), Some(format!("connection ended: {reason}")))
    }

    /// End the running snapshot; `cut` says why its open lists stop short.
    fn finish(&mut self, now: Instant, cut: Option<String>) -> Option<Record> {
        let active = self.active.take()?;
        let mut refused = Vec::new();
        let lists: Vec<ListOutcome> = active
            .lists
            .into_iter()
            .map(|l| {
                let (complete, error) = match l.state {
                    State::Complete => (true, String::new()),
                    State::Failed(e) => {
                        refused.push(l.action.clone());
                        (false, e)
                    }
                    State::Asked | State::Listing => {
                        if cut.as_deref() == Some("timeout") {
                            if self.abandoned.len() >= MAX_ABANDONED {
                                self.abandoned.pop_front();
                            }
                            self.abandoned.push_back(l.action_id.clone());
                        }
                        (false, cut.clone().unwrap_or_default())
                    }
                };
                ListOutcome {
                    action: l.action,
                    items: l.items,
                    complete,
                    error,
                }
            })
            .collect();
        let complete = lists.iter().all(|l| l.complete);
        let reason = match cut {
            Some(c) if !complete => c,
            _ if !refused.is_empty() => format!("refused: {}", refused.join(", ")),
            _ => String::new(),
        };
        let duration = now.saturating_duration_since(active.started);
        let items: u64 = lists.iter().map(|l| l.items).sum();
        metrics::histogram!(DURATION_SECONDS, "server" => self.server.to_string(), "trigger" => active.trigger.as_str())
            .record(duration.as_secs_f64());
        if complete {
            info!(server = %self.server, snapshot = %active.id, trigger = active.trigger.as_str(), items, ms = duration.as_millis() as u64, "snapshot complete");
        } else {
            inc(&self.counters.incomplete);
            warn!(server = %self.server, snapshot = %active.id, trigger = active.trigger.as_str(), items, %reason, "snapshot incomplete");
        }
        Some(Record::SnapshotEnd(Box::new(End {
            id: active.id,
            trigger: active.trigger,
            lists,
            complete,
            reason,
            duration,
        })))
    }
}

#[cfg(test)]
#[path = "snapshot_tests.rs"]
mod tests;
