//! Actions from the bus back to Asterisk: safe, correlated, exactly one attempt.
//!
//! Owns: the action consumer ([`Controller`]) and its safety rules ([`rules`]: required
//! fields, header safety, allow-lists, deadlines), the idempotency memory ([`dedupe`]) and
//! the durable journal behind it ([`journal`]), the per-server token buckets ([`rate`]), the
//! [`RequestSource`] / [`Publisher`] traits a transport implements, and the transports: NATS
//! ([`nats`]) and Kafka ([`kafka`]).
//!
//! ```text
//! bus ──▶ RequestSource ──▶ Controller: decode, route (owns?), allow-list, dedupe, deadline, rate
//!                         ──▶ ami::Handle of the server (one attempt; ActionIDs unique per process)
//!                         ──▶ ActionResult ──▶ Publisher (reply subject / result subject)
//!                         ──▶ ack the message (after the result is published)
//! ```
//!
//! Knows nothing of how a sink sends: results leave through [`Publisher`], requests arrive
//! through [`RequestSource`].
//!
//! Must never: send an action twice, send one past its deadline, send one that is not on its
//! server's allow-list, crash or stall on anything a client publishes.
//!
//! Delivery: core NATS is at-most-once (a request lost with amibus gets no answer). Kafka and
//! JetStream are at-least-once: a request is acknowledged (offset committed, message acked)
//! only once its result is published, so one whose result was lost to a crash is read again.
//!
//! The idempotency memory survives a restart through the [`journal`]: an action is journaled
//! before it is sent and its result before its message is acknowledged, so a request
//! delivered again after a crash is answered (its result, or `outcome_unknown` if it was
//! running), never run again.
//!
//! Limits (as built): the journal is per replica, so a request redelivered to another replica
//! after a re-shard within the window can run again; nothing locks the file against a second
//! amibus using the same path. Journal appends are synchronous write(2)s on the consumer's
//! tasks; a compaction (when the file outgrows its limit) is prepared on a blocking thread. A result the bus keeps refusing
//! (retried a few times, holding its in-flight slot) stays unacknowledged: its Kafka
//! partition's offset stays before it until a restart reads it again (JetStream delivers it
//! again after `ack_wait`), and the remembered result is published then.

pub mod consumer;
pub mod dedupe;
pub mod journal;
pub mod kafka;
pub mod nats;
pub mod rate;
pub mod result;
pub mod rules;
pub mod stats;
pub mod transport;

pub use consumer::{ControlConfig, Controller, Owns, Target, Targets};
pub use rules::{AllowList, READ_ONLY_ACTIONS, RejectCode, Rejection};
pub use stats::{ControlSnapshot, ControlStats};
pub use transport::{Ack, Incoming, PublishError, Publisher, RequestSource};
