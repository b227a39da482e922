//! What a connection hands downstream: a frame or a synthetic record about the connection,
//! stamped with where it came from.
//!
//! Owns: the record stamp (server id, connection epoch, sequence number, receive time).
//! Knows nothing of protobuf: `model` turns a [`Record`] into an `amibus.v1.Envelope`.

use std::sync::Arc;

use super::frame::OwnedFrame;
use super::parser::ParseError;
use super::snapshot::{Begin, End};

/// Where and when a record was read. `seq` counts every record of one epoch from 1, synthetic
/// records included, so a consumer can see a hole; `epoch` increments on every successful login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub server: Arc<str>,
    pub epoch: u64,
    pub seq: u64,
    /// Nanoseconds since the Unix epoch when the bytes were read.
    pub received_at_ns: i64,
}

/// One record from a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// An AMI frame as read (event, response, banner).
    Frame(OwnedFrame),
    /// Logged in: events flow from here on.
    ConnectionUp {
        /// The version from the banner (`11.0.0` for `Asterisk Call Manager/11.0.0`).
        ami_version: String,
        /// `host:port` of the server.
        address: String,
    },
    /// The session ended; nothing is read until the next `ConnectionUp`. `reason` starts with
    /// a stable label: `eof`, `keepalive timeout`, `io error: …`, `shutdown`, or, for a login
    /// refused in a way that needs a human, `auth failure: …` / `filter rejected: …` (sent once
    /// per streak of refusals, in the refused attempt's own epoch, so without a `ConnectionUp`).
    ConnectionDown { reason: String },
    /// Records `first_seq..=last_seq` of `epoch` were read but dropped before they could be
    /// handed on (the hand-off queue was full).
    Gap {
        epoch: u64,
        first_seq: u64,
        last_seq: u64,
        reason: String,
    },
    /// Bytes skipped by the parser.
    ParseError(ParseErrorRecord),
    /// A snapshot began: the list actions asked (see [`super::snapshot`]).
    SnapshotBegin(Box<Begin>),
    /// One item of a snapshot's list (an event frame such as `CoreShowChannel`), tagged with
    /// the snapshot's id, at its place in wire order among live events.
    SnapshotItem {
        snapshot_id: Arc<str>,
        /// Boxed: keeps every record small (the hand-off queue moves them by value).
        frame: Box<OwnedFrame>,
    },
    /// A snapshot ended: items per list, and whether each completed.
    SnapshotEnd(Box<End>),
}

/// A parse error as a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseErrorRecord {
    /// A stable label: `frame_too_large`, `too_many_headers`, `truncated`.
    pub reason: &'static str,
    /// The human-readable message.
    pub message: String,
}

impl From<ParseError> for ParseErrorRecord {
    fn from(e: ParseError) -> Self {
        ParseErrorRecord {
            reason: e.reason(),
            message: e.to_string(),
        }
    }
}

/// A stamped record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamped {
    pub stamp: Stamp,
    pub record: Record,
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(i64::MAX as u128) as i64)
}
