//! The action consumer's counters ([`ControlStats`]), exported by `telemetry`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use super::rules::RejectCode;
use crate::model::pb::ActionResult;

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
    pub(super) rejected: [AtomicU64; RejectCode::ALL.len()],
    pub(super) replayed: AtomicU64,
    pub(super) skipped_not_owned: AtomicU64,
    pub(super) publish_failures: AtomicU64,
    pub(super) receive_errors: AtomicU64,
    pub(super) ack_failures: AtomicU64,
    pub(super) in_flight: AtomicU64,
    pub(super) journal_loaded: AtomicU64,
    pub(super) journal_restart_unknown: AtomicU64,
    pub(super) journal_torn_bytes: AtomicU64,
    pub(super) journal_write_failures: AtomicU64,
    pub(super) journal_compactions: AtomicU64,
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

    pub(super) fn count(&self, result: &ActionResult) {
        let rows = self.rows.read().unwrap_or_else(PoisonError::into_inner);
        let i = rows.index.get(&result.server).copied().unwrap_or(0);
        let status = usize::try_from(result.status).unwrap_or(0).min(6);
        if let Some(row) = rows.results.get(i) {
            row[status].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn reject(&self, code: RejectCode) {
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
