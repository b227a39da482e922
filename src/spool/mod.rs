//! The spool: a durable, bounded log between normalization and the sink.
//!
//! Owns: segment files on disk, record ids, the acknowledgement floor, the cap and its overflow
//! rule, and replay after a restart. Knows nothing of brokers, and of AMI only a record's typed
//! [`Meta`] (server, epoch, seq, kind, gap range): a [`Record`] is a key, that and payload bytes.
//!
//! How it works: every record gets the next id and is encoded into a queue of pending bytes
//! in memory; a flush (the pipeline's after each batch, the checkpoint's, or an append's once
//! 256 KiB wait) writes them to the active segment (into the page cache; fsync per [`Fsync`]).
//! The sink side reads the log in id order through a [`Reader`] (the newest records from the
//! memory tail, older ones back from the files) and acknowledges ids as the broker confirms
//! them, in any order. The floor (every id below it acknowledged) is persisted; a segment
//! whose records are all below the floor is deleted. After a crash or restart, everything
//! from the floor on is read again (at-least-once: a record acknowledged above the floor but
//! not yet persisted is sent twice, and its (server, epoch, seq) shows the duplicate).
//!
//! Decision: records are written through to disk always, instead of being held in memory and
//! spilled only when the sink lags. A SIGKILL then loses nothing that was flushed (the page
//! cache survives the process), normal and degraded operation share one code path, and the
//! cost is a memcpy per record into the page cache (see the end-to-end benchmark).
//!
//! Locks, and where I/O happens. A slow disk must not park the tasks that read AMI and
//! deliver, so the state lock is never held across file I/O:
//! - `state` (ids, segment list, floor, pending bytes, memory tail, counters) is held for
//!   memory work only: appends (encode, a memcpy), reads from the tail, acks, stats.
//! - `file` owns the active segment's file and is held by whoever writes: a flush takes the
//!   pending chunks under `state`, writes them holding `file` only (creating a segment's file
//!   when its first chunk is written: rotation is a record boundary decided at append), then
//!   takes `state` again to move `flushed_id` and wake a waiting reader. Lock order: `file`,
//!   then `state`; never `file` while holding `state`.
//! - The reader never writes: a record neither in the tail nor written yet is waited for,
//!   and the flush that writes it wakes the reader. It opens and reads segment files holding
//!   no lock.
//! - Deleting files happens after `state` is released: `ack` deletes the segments it frees
//!   (a segment acknowledged before it was all written is deleted by the next flush, after
//!   its writes); drop_oldest takes the oldest segments out under `state` (holding `file` too,
//!   so no flush is writing them), and the appending thread then reads them and deletes them:
//!   records the sink was sent and has not confirmed are held whole in memory (up to
//!   `in_doubt_bytes`; see `Doubt`) and sent again first after a rewind; the reader waits
//!   for one that is still being read rather than send newer records before it. The checkpoint (in `spawn_blocking`) fsyncs holding no lock, and reclaims
//!   an all-acknowledged active segment past `min(segment_bytes / 8, 1 MiB)`.
//!
//! When writes fail (disk full), what was not written stays queued and a later flush writes it
//! (each byte once); appends go on into memory until `max(memory_bytes, 256 KiB)` wait, then
//! are refused ([`SpoolError::Backlog`], counted in `write_errors`; the pipeline reports them
//! as gaps). With the tail at least that large, every waiting record can still be read.
//!
//! Damage: a record that fails its checksum (a flipped byte, a truncated closed segment) is
//! skipped, never a reason to stop. The reader scans forward to the next whole valid record
//! ([`segment::SegmentReader::resync`]); the ids in between are counted, acknowledged (so the
//! floor passes the hole and delivery goes on) and logged once per damaged span, and the
//! (server, epoch, seq) they held are inferred from their neighbours ([`damage`]) and handed
//! to the pipeline ([`Spool::take_damaged`]), which reports them as gap records. The same
//! happens on open and at runtime. Only a bad record at the very end of the active segment with
//! nothing valid after it is a torn tail (a crash mid-write, or an append in progress): cut off
//! on open, waited on at runtime.
//!
//! Files: this one holds the state and the append/ack/flush/checkpoint paths; `record.rs`
//! the record and its typed metadata (and their rendering as bus headers), `open.rs` opening
//! and recovery, `file.rs` the file side of flushes and of drop_oldest, `reader.rs` the sink's
//! reader, `segment.rs` the on-disk format (`format_v1.rs` the previous one, still read),
//! `damage.rs` what damaged records held.
//!
//! Must never: block on the network, do file I/O while holding the state lock, hold more than
//! the configured bytes on disk, read a record that is not whole, or stop delivering because
//! of one bad record.

mod ack;
mod append;
mod checkpoint;
mod config;
pub mod damage;
mod evict;
mod file;
mod format_v1;
mod open;
mod reader;
mod record;
pub mod segment;

use file::{copied_out, file_path, meta_only, read_records};
pub use reader::Reader;
pub use record::{GapRange, HEADER_NAMES, Kind, Meta, Record};

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

pub use config::{Fsync, SpoolConfig, WhenFull};
pub use damage::DamagedRange;
use segment::{SegmentReader, Torn};

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The record alone exceeds the cap (`max_bytes`) or the largest record the on-disk format
    /// reads back (256 MiB); it can never be stored. Segments are not a limit: a record larger
    /// than `segment_bytes` gets a segment of its own.
    #[error("record of {bytes} bytes is larger than the spool's cap (max_bytes) or 256 MiB")]
    TooLarge { bytes: usize },
    /// The disk refuses writes and {bytes} bytes already wait in memory for it: the record
    /// is refused (and reported as a gap by the pipeline) until a flush gets through.
    #[error("spool writes are failing and {bytes} bytes already wait in memory to be written")]
    Backlog { bytes: u64 },
}

impl SpoolError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
        move |source| SpoolError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// What became of an appended record.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    Stored {
        id: u64,
    },
    /// Refused under [`WhenFull::DropNewest`].
    DroppedNewest,
    /// Stored, after deleting the oldest segments; `dropped` are their records that had not
    /// been acknowledged (payloads left out), so the caller can report what was lost.
    StoredDroppingOldest {
        id: u64,
        dropped: Vec<Record>,
    },
}

/// What opening found on disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Records not acknowledged before the last stop; they are read again.
    pub pending: u64,
    /// Bytes of a torn record at the end of the last segment, cut off.
    pub torn_bytes: u64,
    /// Records skipped as damaged (their ids are acknowledged; see [`Spool::take_damaged`]).
    pub damaged_records: u64,
    /// Bytes skipped with them.
    pub damaged_bytes: u64,
}

/// Counters since open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub appended: u64,
    pub acknowledged: u64,
    pub dropped_newest: u64,
    pub dropped_oldest: u64,
    /// Records appended and not yet acknowledged.
    pub records_held: u64,
    /// Bytes of all segments on disk.
    pub bytes_held: u64,
    pub segments: u64,
    /// Records deleted by drop_oldest while the sink had them in flight: lost only if the
    /// sink does not confirm them (see [`Spool::take_lost`]).
    pub in_doubt: u64,
    /// In-doubt records sent again after the sink failed them (each time).
    pub in_doubt_resent: u64,
    /// Appends and flushes that failed (disk full, I/O error).
    pub write_errors: u64,
    /// The last write failed and none has succeeded since. Appends go on into memory until
    /// the bytes waiting to be written reach the bound (the memory tail's size, at least
    /// 256 KiB); past it new records are refused ([`SpoolError::Backlog`], counted in
    /// `write_errors`, reported as gaps by the pipeline) until a flush gets through.
    pub write_failing: bool,
    /// Records skipped as damaged, on open and since.
    pub damaged_records: u64,
    /// Bytes skipped with them.
    pub damaged_bytes: u64,
    /// Of the damaged records, those whose (server, epoch, seq) could not be inferred: lost
    /// without a gap record.
    pub damaged_unattributed: u64,
}

struct Segment {
    first_id: u64,
    /// One past the last id in it (for the active segment: so far).
    end_id: u64,
    bytes: u64,
    /// Its file. A segment started by rotation has none until the flush that writes its
    /// first bytes creates it.
    path: PathBuf,
}

/// Appended bytes not yet written: whole records of one segment, in id order.
struct Chunk {
    /// The first id of the segment they belong to.
    segment: u64,
    /// The id of the first record in `bytes`.
    first_id: u64,
    /// One past the id of the last record in `bytes`.
    end_id: u64,
    bytes: Vec<u8>,
    /// How many of `bytes` are in the file already (a write that failed part way).
    written: usize,
}

struct State {
    segments: VecDeque<Segment>,
    next_id: u64,
    /// Ids below this are whole in the files.
    flushed_id: u64,
    /// Appended and not yet written, oldest first; a chunk per segment at most, except after a
    /// write failed part way. Chunks of later segments start new files when written.
    pending: VecDeque<Chunk>,
    /// Bytes in `pending` not yet in a file.
    pending_bytes: u64,
    /// Written chunks' buffers, reused by the next chunks (no allocation per flush).
    spare: Vec<Vec<u8>>,
    /// Files of segments acknowledged before they were wholly written (their queued bytes
    /// are dropped): deleted by a flush, holding the file mutex, once no write to them is in
    /// progress and before anything after them is written.
    unwritten_dead: Vec<PathBuf>,
    total_bytes: u64,
    acked_floor: u64,
    acked_above: BTreeSet<u64>,
    persisted_floor: u64,
    stats: SpoolStats,
    /// (id, when appended) every [`AGE_SAMPLE_EVERY`] records, for the oldest record's age.
    age_samples: VecDeque<(u64, Instant)>,
    /// A reader found nothing to read and waits for `changed`: the next append, ack or flush
    /// that writes something wakes it (and only then: a wake per record would cost more than
    /// the record).
    reader_waiting: bool,
    /// One past the highest id a reader has ever handed to the sink (a rewind does not lower
    /// it: what was sent once may have reached the broker).
    handed_out: u64,
    /// Deleted by drop_oldest while in flight: delivered if acknowledged; after a rewind, sent
    /// again first while their bytes are held, lost if only their metadata is (see [`Doubt`]).
    in_doubt: BTreeMap<u64, Doubt>,
    /// Bytes of the [`Doubt::Held`] records, at most `in_doubt_bytes`.
    in_doubt_bytes: u64,
    /// In-doubt records that turned out lost, for [`Spool::take_lost`].
    lost_later: Vec<Record>,
    /// What damaged records held, for [`Spool::take_damaged`].
    damaged: Vec<DamagedRange>,
    /// Damaged spans already counted, by (segment's first id, offset): a reader that meets one
    /// again (after a rewind) skips it quietly.
    damage_seen: BTreeSet<(u64, u64)>,
    /// The newest records, consecutive ids; at most `memory_bytes` of them.
    tail: VecDeque<(u64, u64, Arc<Record>)>,
    tail_bytes: u64,
}

/// The file side of the spool, behind its own mutex: whoever writes holds it, and takes the
/// state lock only briefly, to take what to write and to say what was written.
struct FileState {
    /// The file appends go to, and the first id of its segment.
    active: File,
    segment: u64,
    /// `active` has writes not yet fsynced.
    unsynced: bool,
    /// Files of segments closed by rotation whose last writes are not yet fsynced: the next
    /// checkpoint syncs them, outside both locks.
    to_sync: Vec<File>,
    /// The chunks a flush took from [`State::pending`] (kept for the queue's allocation).
    writing: VecDeque<Chunk>,
    /// Written chunks' buffers, handed back to [`State::spare`].
    recycled: Vec<Vec<u8>>,
    /// Runs before every write: tests make the disk slow or full with it.
    #[cfg(test)]
    fault: Option<Box<dyn FnMut() -> io::Result<()> + Send>>,
}

const AGE_SAMPLE_EVERY: u64 = 256;

/// An append leaving this many bytes unwritten writes them (outside the state lock), as the
/// write buffer this replaced did when it filled.
const WRITE_CHUNK: u64 = 256 << 10;

/// Chunk buffers larger than this (grown while the disk refused writes) are not kept.
const SPARE_MAX: usize = 2 * WRITE_CHUNK as usize;

/// A record drop_oldest deleted while the sink had it in flight: the broker may have it or not.
#[derive(Debug)]
pub(super) enum Doubt {
    /// Its segment is being read, outside the lock, by the append that dropped it.
    Unread,
    /// Read whole: if the sink fails it, the reader sends it again (before anything newer).
    Held(Record),
    /// Only its metadata was kept (the held records reached `in_doubt_bytes`): if the sink fails
    /// it, it is lost, reported as `spool full (in doubt)`.
    Meta(Record),
}

impl Doubt {
    /// What a [`Doubt::Held`] record counts against the bound.
    pub(super) fn held_bytes(record: &Record) -> u64 {
        (record.key.len() + record.payload.len()) as u64
    }
}

struct Shared {
    cfg: SpoolConfig,
    state: Mutex<State>,
    /// The active file; lock order: `file`, then `state`.
    file: Mutex<FileState>,
    /// One checkpoint at a time (they sync and write the floor outside `state`).
    checkpointing: Mutex<()>,
    /// Woken on append, ack and flush.
    changed: Notify,
}

impl Drop for Shared {
    /// The last handle is gone: write what is still pending (as the write buffer this
    /// replaced did when dropped), best effort.
    fn drop(&mut self) {
        let st = self
            .state
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let file = self
            .file
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        file.writing.append(&mut st.pending);
        let _ = file.write_queued(&self.cfg);
        for path in &st.unwritten_dead {
            let _ = fs::remove_file(path);
        }
    }
}

/// The spool. Cheap to clone: clones share one log.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
}

const ACK_FILE: &str = "ack";

/// A segment drop_oldest took out of the spool, to be read (for the metadata of its records
/// that were not acknowledged) and deleted after the lock is released.
struct Detached {
    first_id: u64,
    end_id: u64,
    path: PathBuf,
    /// Its records below this are in the file; the rest are in `memory`.
    in_file_end: u64,
    /// Its chunks that were not written (taken out of the queue: they never will be).
    memory: Vec<Chunk>,
    /// Ids handed to the sink and not acknowledged: in doubt (see [`State::in_doubt`]).
    doubt: Range<u64>,
    /// Ids from here on were never handed out: lost now, except those in `acked`.
    lost_from: u64,
    /// Acknowledged ids at or above `lost_from` (sorted).
    acked: Vec<u64>,
}

impl Spool {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough state (ids only grow).
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The file side. Taken before the state lock, never while holding it.
    fn lock_file(&self) -> MutexGuard<'_, FileState> {
        self.shared
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn config(&self) -> &SpoolConfig {
        &self.shared.cfg
    }

    /// How long the oldest unacknowledged record has waited (to within a few hundred records;
    /// zero when everything is acknowledged).
    pub fn oldest_age(&self) -> Duration {
        let mut st = self.lock();
        let floor = st.acked_floor;
        if floor >= st.next_id {
            st.age_samples.clear();
            return Duration::ZERO;
        }
        // Keep only the newest sample at or below the floor, and those after it.
        while st.age_samples.len() > 1 && st.age_samples.get(1).is_some_and(|s| s.0 <= floor) {
            st.age_samples.pop_front();
        }
        st.age_samples
            .front()
            .map_or(Duration::ZERO, |s| s.1.elapsed())
    }

    pub fn stats(&self) -> SpoolStats {
        let st = self.lock();
        SpoolStats {
            records_held: st.next_id - st.acked_floor - st.acked_above.len() as u64,
            bytes_held: st.total_bytes,
            segments: st.segments.len() as u64,
            in_doubt: st.in_doubt.len() as u64,
            ..st.stats
        }
    }

    /// Give up on the records still in doubt (at shutdown, once the sink has stopped: they are
    /// held in memory only): they become lost, for [`Spool::take_lost`] to report as in doubt.
    /// Returns how many.
    pub fn abandon_in_doubt(&self) -> u64 {
        let mut guard = self.lock();
        let st = &mut *guard;
        let doubts = std::mem::take(&mut st.in_doubt);
        st.in_doubt_bytes = 0;
        let mut n = 0;
        for (_, doubt) in doubts {
            let record = match doubt {
                Doubt::Held(r) => meta_only(r),
                Doubt::Meta(r) => r,
                // Still being read: the append that dropped it reports it as damaged.
                Doubt::Unread => continue,
            };
            st.stats.dropped_oldest += 1;
            st.lost_later.push(record);
            n += 1;
        }
        n
    }

    /// Records deleted by drop_oldest while in flight that the sink then did not confirm (the
    /// reader rewound past them): lost after all, metadata only, counted in `dropped_oldest`
    /// now. The pipeline reports them as gaps.
    pub fn take_lost(&self) -> Vec<Record> {
        let mut st = self.lock();
        if st.lost_later.is_empty() {
            return Vec::new();
        }
        std::mem::take(&mut st.lost_later)
    }

    /// What damaged records held (inferred from their neighbours; see [`damage`]), found on
    /// open or by the reader since the last call. The pipeline reports them as gap records.
    pub fn take_damaged(&self) -> Vec<DamagedRange> {
        let mut st = self.lock();
        if st.damaged.is_empty() {
            return Vec::new();
        }
        std::mem::take(&mut st.damaged)
    }

    /// The reader found a damaged span at runtime: count it, acknowledge its ids, and infer
    /// what they held (reading the segments outside the lock). A span counted before (on open,
    /// or before a rewind) is skipped quietly.
    fn skip_damaged(&self, segment: u64, offset: u64, bytes: u64, ids: Range<u64>) {
        let (lost, window) = {
            let mut st = self.lock();
            let oldest = st.segments.front().map_or(0, |s| s.first_id);
            st.damage_seen.retain(|&(s, _)| s >= oldest);
            if !st.damage_seen.insert((segment, offset)) {
                return;
            }
            let mut lost: Vec<(u64, u64)> = Vec::new();
            for id in ids.clone() {
                if id < st.acked_floor || id >= st.next_id || st.acked_above.contains(&id) {
                    continue;
                }
                match lost.last_mut() {
                    Some(last) if last.1 + 1 == id => last.1 = id,
                    _ => lost.push((id, id)),
                }
            }
            let window: Vec<PathBuf> = st.segments.iter().map(|s| s.path.clone()).collect();
            (lost, window)
        };
        let records: u64 = lost.iter().map(|&(f, l)| l - f + 1).sum();
        tracing::warn!(
            segment = %segment::file_name(segment),
            offset,
            bytes,
            first_id = ids.start,
            last_id = ids.end.saturating_sub(1),
            records,
            "spool: damaged records skipped; reported as lost"
        );
        let inferred = damage::infer(&window, &lost);
        let mut st = self.lock();
        st.stats.damaged_records += records;
        st.stats.damaged_bytes += bytes;
        st.stats.damaged_unattributed += inferred.unattributed;
        st.damaged.extend(inferred.ranges);
        for &(first, last) in &lost {
            for id in first..=last {
                Self::mark_acked(&mut st, id);
            }
        }
        let dead = Self::settle_floor(&mut st);
        drop(st);
        for path in &dead {
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests;
