//! The spool's settings.

use std::path::PathBuf;
use std::time::Duration;

/// When appended bytes are forced to stable storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// Leave it to the OS: survives a crash of amibus, not of the machine.
    Never,
    /// At most this long after an append.
    Interval(Duration),
    /// After every append (slow; for small volumes that must survive power loss). The append
    /// writes and syncs after releasing the state lock; if that fails the record stays queued
    /// (counted in `write_errors`, written and synced by a later flush) and is still stored.
    Always,
}

/// What happens to a record when the spool holds `max_bytes` already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenFull {
    /// Delete the oldest segment, acknowledged or not; its unacknowledged records are lost.
    DropOldest,
    /// Refuse the new record.
    DropNewest,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
    /// The cap on all segments together.
    pub max_bytes: u64,
    pub fsync: Fsync,
    pub when_full: WhenFull,
    /// The most records handed to the sink and not yet acknowledged.
    pub max_in_flight: u64,
    /// The newest records are also kept in memory, up to this many bytes, so a reader that
    /// keeps up takes them from there instead of reading back what was just written.
    pub memory_bytes: u64,
    /// Records drop_oldest deletes while the sink has them in flight are held whole, up to
    /// this many bytes of key and payload, to be sent again if the sink fails them; past it
    /// only their metadata is kept, and such a record is lost if the sink fails it. With the
    /// default `max_in_flight`, 16 MiB holds every in-flight record of up to ~800 bytes.
    pub in_doubt_bytes: u64,
}

impl SpoolConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SpoolConfig {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            max_bytes: 1 << 30,
            fsync: Fsync::Interval(Duration::from_secs(1)),
            when_full: WhenFull::DropOldest,
            max_in_flight: 20_000,
            memory_bytes: 16 << 20,
            in_doubt_bytes: 16 << 20,
        }
    }
}
