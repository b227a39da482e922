//! The spool: a durable, bounded log between normalization and the sink.
//!
//! Owns: segment files on disk, record ids, the acknowledgement floor, the cap and its overflow
//! rule, and replay after a restart. Knows nothing of AMI or brokers: a [`Record`] is a key,
//! a few headers and payload bytes.
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
//!   so no flush is writing them), and the appending thread then reads their headers and
//!   deletes them. The checkpoint (in `spawn_blocking`) fsyncs holding no lock, and reclaims
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
//! Files: this one holds the types, the state and the append/ack/flush/checkpoint paths;
//! `open.rs` opening and recovery, `file.rs` the file side of flushes and of drop_oldest,
//! `reader.rs` the sink's reader, `segment.rs` the on-disk format, `damage.rs` what damaged
//! records held.
//!
//! Must never: block on the network, do file I/O while holding the state lock, hold more than
//! the configured bytes on disk, read a record that is not whole, or stop delivering because
//! of one bad record.

pub mod damage;
mod file;
mod open;
mod reader;
pub mod segment;

use file::{file_path, headers_only, read_headers};
pub use reader::Reader;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

pub use damage::DamagedRange;
use segment::{SegmentReader, Torn};

/// A header name: the pipeline's names are static strings, so a record costs no allocation
/// per header name on the way in or (see [`segment`]'s decoding) back out.
pub type HeaderName = std::borrow::Cow<'static, str>;

/// One record: a partition key, a few headers, and the payload (an encoded envelope).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub key: Bytes,
    pub headers: Vec<(HeaderName, Bytes)>,
    pub payload: Bytes,
}

impl Record {
    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

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
        }
    }
}

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
    /// One past the highest id a reader has handed to the sink.
    handed_out: u64,
    /// Deleted by drop_oldest while in flight: delivered if acknowledged, lost if the reader
    /// rewinds past them instead. The headers (payload left out) are `None` until the thread
    /// that dropped the segment has read them, outside the lock.
    in_doubt: BTreeMap<u64, Option<Record>>,
    /// In-doubt ids the reader rewound past before their headers were read: lost, reported
    /// (through `lost_later`) once they are.
    lost_unread: BTreeSet<u64>,
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

/// A segment drop_oldest took out of the spool, to be read (for the headers of its records
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

    /// Append a record. Never waits on the sink. Writes nothing under the state lock: the
    /// record is encoded into memory, and written by the next flush (or by this call, outside
    /// the lock, once 256 KiB wait, or with [`Fsync::Always`]).
    ///
    /// # Errors
    /// The record alone is larger than a segment or the cap; or the disk refuses writes and
    /// the bytes waiting for it already fill the bound ([`SpoolError::Backlog`]).
    pub fn append(&self, record: &Record) -> Result<Appended, SpoolError> {
        self.append_inner(record, None, Some(self.shared.cfg.when_full))
    }

    /// [`Spool::append`] for a record the caller already shares: the memory tail keeps this
    /// `Arc` instead of a copy (the pipeline's path, once per record).
    ///
    /// # Errors
    /// As [`Spool::append`].
    pub fn append_shared(&self, record: &Arc<Record>) -> Result<Appended, SpoolError> {
        self.append_inner(record, Some(record), Some(self.shared.cfg.when_full))
    }

    /// Append only if the spool stays at most half full with it, whatever `when_full` says;
    /// `Ok(None)` otherwise (not counted as a drop). For records about other records (gap
    /// reports): they must not push out what they could report, and stored while the spool is
    /// under pressure they would soon be dropped themselves.
    ///
    /// # Errors
    /// As [`Spool::append`].
    pub fn append_if_room(&self, record: &Record) -> Result<Option<u64>, SpoolError> {
        Ok(match self.append_inner(record, None, None)? {
            Appended::Stored { id } => Some(id),
            _ => None,
        })
    }

    /// The most bytes appended and not yet written: the memory tail's size (so that, with a
    /// tail at least this large, every record waiting for the disk can still be read), and at
    /// least [`WRITE_CHUNK`] (what a batch between two flushes may hold).
    fn pending_limit(&self) -> u64 {
        self.shared.cfg.memory_bytes.max(WRITE_CHUNK)
    }

    fn append_inner(
        &self,
        record: &Record,
        shared: Option<&Arc<Record>>,
        when_full: Option<WhenFull>,
    ) -> Result<Appended, SpoolError> {
        let cfg = &self.shared.cfg;
        let len = segment::encoded_len(record) as u64;
        if len > cfg.max_bytes || len > segment::MAX_RECORD_BYTES as u64 {
            return Err(SpoolError::TooLarge {
                bytes: len as usize,
            });
        }
        let limit = if when_full.is_some() {
            cfg.max_bytes
        } else {
            cfg.max_bytes / 2
        };
        // Held only to drop the oldest segments: no flush may be writing while they are taken
        // out (their unwritten chunks go with them).
        let mut file: Option<MutexGuard<'_, FileState>> = None;
        let mut flushed_for_room = false;
        // Segment files to delete once the lock is released.
        let mut dead = Vec::new();
        let outcome = loop {
            let mut st = self.lock();
            if st.pending_bytes > 0 && st.pending_bytes + len > self.pending_limit() {
                if !st.stats.write_failing && !flushed_for_room {
                    // The disk keeps up, the appends were faster: write, then look again.
                    drop(st);
                    flushed_for_room = true;
                    let _ = match file.as_deref_mut() {
                        Some(f) => self.write_pending(f, false),
                        None => self.write_pending(&mut self.lock_file(), false),
                    };
                    continue;
                }
                // Refused: the pipeline reports it as a gap.
                st.stats.write_errors += 1;
                break Err(SpoolError::Backlog {
                    bytes: st.pending_bytes,
                });
            }
            if st.total_bytes + len > limit {
                dead.extend(Self::reclaim_active(&mut st, &cfg.dir));
            }
            let mut detached = Vec::new();
            if st.total_bytes + len > limit {
                match when_full {
                    None => break Ok(None),
                    Some(WhenFull::DropNewest) => {
                        st.stats.dropped_newest += 1;
                        break Ok(None);
                    }
                    Some(WhenFull::DropOldest) if file.is_none() => {
                        drop(st);
                        file = Some(self.lock_file());
                        continue;
                    }
                    Some(WhenFull::DropOldest) => {
                        detached = self.detach_oldest(&mut st, len);
                    }
                }
            }
            let id = self.push(&mut st, record, shared, len);
            let write_now = cfg.fsync == Fsync::Always
                || (st.pending_bytes >= WRITE_CHUNK && !st.stats.write_failing);
            let wake = std::mem::take(&mut st.reader_waiting);
            drop(st);
            if wake {
                self.shared.changed.notify_waiters();
            }
            break Ok(Some((id, detached, write_now)));
        };
        // A failed write is counted and its bytes stay queued for the next flush: the record
        // is stored either way (an error here would report it lost while it is delivered).
        if let Ok(Some((_, _, true))) = &outcome {
            let sync = cfg.fsync == Fsync::Always;
            let _ = match file.as_deref_mut() {
                Some(f) => self.write_pending(f, sync),
                // Another thread is writing: it or the next flush takes these bytes too.
                None if !sync => match self.shared.file.try_lock() {
                    Ok(mut f) => self.write_pending(&mut f, false),
                    Err(_) => Ok(()),
                },
                None => self.write_pending(&mut self.lock_file(), true),
            };
        }
        drop(file);
        for path in &dead {
            let _ = fs::remove_file(path);
        }
        Ok(match outcome? {
            None => Appended::DroppedNewest,
            Some((id, detached, _)) if detached.is_empty() => Appended::Stored { id },
            Some((id, detached, _)) => Appended::StoredDroppingOldest {
                id,
                dropped: self.read_detached(detached),
            },
        })
    }

    /// Give `record` the next id and queue its bytes (a memcpy: no I/O under the lock).
    fn push(&self, st: &mut State, record: &Record, shared: Option<&Arc<Record>>, len: u64) -> u64 {
        let cfg = &self.shared.cfg;
        let active_bytes = st.segments.back().map_or(0, |s| s.bytes);
        if active_bytes > 0 && active_bytes + len > cfg.segment_bytes {
            Self::rotate(st, &cfg.dir);
        }
        let id = st.next_id;
        let segment = st.segments.back().map_or(id, |s| s.first_id);
        if st.pending.back().is_none_or(|c| c.segment != segment) {
            let bytes = st.spare.pop().unwrap_or_default();
            st.pending.push_back(Chunk {
                segment,
                first_id: id,
                end_id: id,
                bytes,
                written: 0,
            });
        }
        if let Some(chunk) = st.pending.back_mut() {
            segment::encode(id, record, &mut chunk.bytes);
            chunk.end_id = id + 1;
        }
        st.pending_bytes += len;
        st.next_id += 1;
        st.total_bytes += len;
        if let Some(s) = st.segments.back_mut() {
            s.bytes += len;
            s.end_id = id + 1;
        }
        st.stats.appended += 1;
        // The tail holds the newest ids without a hole: a record too large for it empties it.
        if cfg.memory_bytes >= len {
            let kept = shared.map_or_else(|| Arc::new(record.clone()), Arc::clone);
            st.tail.push_back((id, len, kept));
            st.tail_bytes += len;
            while st.tail_bytes > cfg.memory_bytes {
                Self::pop_tail(st);
            }
        } else {
            st.tail.clear();
            st.tail_bytes = 0;
        }
        if id % AGE_SAMPLE_EVERY == 0 || st.age_samples.is_empty() {
            st.age_samples.push_back((id, Instant::now()));
        }
        id
    }

    /// Let go of tail records below the floor: no reader needs them any more.
    fn trim_tail(st: &mut State) {
        while st
            .tail
            .front()
            .is_some_and(|(id, _, _)| *id < st.acked_floor)
        {
            Self::pop_tail(st);
        }
    }

    fn pop_tail(st: &mut State) {
        if let Some((_, len, _)) = st.tail.pop_front() {
            st.tail_bytes -= len;
        }
    }

    /// When every record is acknowledged, the active segment's bytes are reclaimable too:
    /// start a new segment; the old ones' files (once written) are returned for deletion.
    fn reclaim_active(st: &mut State, dir: &Path) -> Vec<PathBuf> {
        if st.acked_floor == st.next_id && st.segments.back().is_some_and(|s| s.bytes > 0) {
            Self::rotate(st, dir);
            return Self::settle_floor(st);
        }
        Vec::new()
    }

    /// Start a new segment at the next id. Its file is created by the flush that writes its
    /// first record.
    fn rotate(st: &mut State, dir: &Path) {
        let first_id = st.next_id;
        st.segments.push_back(Segment {
            first_id,
            end_id: first_id,
            bytes: 0,
            path: dir.join(segment::file_name(first_id)),
        });
    }

    /// Take the oldest segments out until `len` more bytes fit. Their ids handed to the sink
    /// and not acknowledged become in doubt now; reading their headers, deciding what is lost
    /// and deleting the files is [`Spool::read_detached`]'s, outside the lock.
    ///
    /// The caller holds the file mutex: no flush is writing, so every byte of these segments
    /// is either in their files or in `pending`, where it is taken from.
    fn detach_oldest(&self, st: &mut State, len: u64) -> Vec<Detached> {
        let mut out = Vec::new();
        while st.total_bytes + len > self.shared.cfg.max_bytes {
            if st.segments.len() == 1 {
                if st.segments.back().is_some_and(|s| s.bytes == 0) {
                    break;
                }
                Self::rotate(st, &self.shared.cfg.dir);
            }
            let Some(seg) = st.segments.pop_front() else {
                break;
            };
            // Pending chunks are in id order and this is the oldest segment: its are first.
            let mut memory = Vec::new();
            while st
                .pending
                .front()
                .is_some_and(|c| c.segment == seg.first_id)
            {
                if let Some(c) = st.pending.pop_front() {
                    st.pending_bytes -= (c.bytes.len() - c.written) as u64;
                    memory.push(c);
                }
            }
            let in_file_end = memory.first().map_or(seg.end_id, |c| c.first_id);
            let held_from = seg.first_id.max(st.acked_floor);
            let lost_from = held_from.max(st.handed_out).min(seg.end_id);
            let doubt = held_from.min(lost_from)..lost_from;
            for id in doubt.clone() {
                if !st.acked_above.contains(&id) {
                    st.in_doubt.insert(id, None);
                }
            }
            let acked = st
                .acked_above
                .range(lost_from..seg.end_id)
                .copied()
                .collect();
            st.total_bytes -= seg.bytes;
            let floor = seg.end_id.max(st.acked_floor);
            st.acked_above = st.acked_above.split_off(&floor);
            st.acked_floor = floor;
            Self::advance_floor(st);
            out.push(Detached {
                first_id: seg.first_id,
                end_id: seg.end_id,
                path: seg.path,
                in_file_end,
                memory,
                doubt,
                lost_from,
                acked,
            });
        }
        Self::trim_tail(st);
        out
    }

    /// After [`Spool::detach_oldest`], without the lock: read the dropped segments' records
    /// (headers only), delete their files, and sort the records out: in doubt (kept for
    /// [`Spool::ack`] or [`Reader::rewind`] to decide), lost now (returned, counted in
    /// `dropped_oldest`), or acknowledged meanwhile (nothing). Records that cannot be read
    /// (damaged) are counted, lost without a gap record.
    fn read_detached(&self, detached: Vec<Detached>) -> Vec<Record> {
        let mut lost = Vec::new();
        for d in detached {
            let mut found: Vec<(u64, Record)> = Vec::new();
            if d.first_id < d.in_file_end {
                read_headers(&d.path, d.first_id..d.in_file_end, &mut found);
            }
            for chunk in d.memory {
                segment::decode_all(Bytes::from(chunk.bytes), |id, rec| {
                    found.push((id, headers_only(rec)));
                });
            }
            let _ = fs::remove_file(&d.path);
            let mut st = self.lock();
            let mut lost_now = 0u64;
            for (id, rec) in found {
                if id >= d.end_id || id < d.doubt.start {
                    continue;
                }
                if id >= d.lost_from {
                    if d.acked.binary_search(&id).is_err() {
                        lost.push(rec);
                        lost_now += 1;
                    }
                    continue;
                }
                match st.in_doubt.get_mut(&id) {
                    Some(slot @ None) => *slot = Some(rec),
                    Some(Some(_)) => {}
                    // Acknowledged meanwhile (delivered), or the reader rewound past it.
                    None => {
                        if st.lost_unread.remove(&id) {
                            st.lost_later.push(rec);
                        }
                    }
                }
            }
            st.stats.dropped_oldest += lost_now;
            // What was held and not found: damaged.
            let mut damaged = (d.end_id - d.lost_from)
                .saturating_sub(d.acked.len() as u64)
                .saturating_sub(lost_now);
            let unread: Vec<u64> = st
                .in_doubt
                .range(d.doubt.clone())
                .filter(|(_, r)| r.is_none())
                .map(|(id, _)| *id)
                .collect();
            for id in unread {
                st.in_doubt.remove(&id);
                damaged += 1;
            }
            let rewound: Vec<u64> = st.lost_unread.range(d.doubt.clone()).copied().collect();
            for id in rewound {
                st.lost_unread.remove(&id);
                damaged += 1;
            }
            if damaged > 0 {
                tracing::warn!(
                    segment = %d.path.display(),
                    first_id = d.first_id,
                    last_id = d.end_id - 1,
                    records = damaged,
                    "spool: damaged records dropped with the oldest segment; lost without a gap record"
                );
                st.stats.damaged_records += damaged;
                st.stats.damaged_unattributed += damaged;
            }
        }
        lost
    }

    /// Write what is pending; the caller holds the file mutex. The state lock is taken twice,
    /// briefly: to take the chunks, and to publish what was written (moving `flushed_id`,
    /// waking a waiting reader, putting back what could not be written).
    fn write_pending(&self, file: &mut FileState, sync: bool) -> Result<(), SpoolError> {
        let unwritten = {
            let mut st = self.lock();
            std::mem::swap(&mut st.pending, &mut file.writing);
            st.pending_bytes = 0;
            std::mem::take(&mut st.unwritten_dead)
        };
        // Before writing anything after them: a crash must not leave a closed segment without
        // its last records (they would read as damage, though they were delivered).
        for path in &unwritten {
            let _ = fs::remove_file(path);
        }
        let (written_to, failed) = file.write_queued(&self.shared.cfg);
        let synced = if failed.is_none() && sync && file.unsynced {
            let r = file.active.sync_data();
            file.unsynced = r.is_err();
            r.map_err(SpoolError::io(&file_path(&self.shared.cfg, file.segment)))
        } else {
            Ok(())
        };
        let (wake, dead) = {
            let mut st = self.lock();
            // What was not written goes back in front of what was appended meanwhile, unless
            // its segment was acknowledged whole meanwhile.
            let oldest = st.segments.front().map_or(0, |s| s.first_id);
            while let Some(chunk) = file.writing.pop_back() {
                if chunk.segment < oldest {
                    continue;
                }
                st.pending_bytes += (chunk.bytes.len() - chunk.written) as u64;
                st.pending.push_front(chunk);
            }
            while st.spare.len() < 2
                && let Some(b) = file.recycled.pop()
            {
                st.spare.push(b);
            }
            file.recycled.clear();
            if failed.is_some() {
                // A full disk is a state: what was not written is written by a later flush,
                // and the records are in the memory tail meanwhile (up to its size).
                st.stats.write_errors += 1;
                st.stats.write_failing = true;
            } else {
                st.stats.write_failing = false;
            }
            // Died during this flush: every write to them is done (flushes take turns on the
            // file mutex), and if one was cut short nothing after it was written.
            let mut dead = std::mem::take(&mut st.unwritten_dead);
            match written_to {
                Some(end) => {
                    st.flushed_id = st.flushed_id.max(end);
                    // Segments acknowledged before they were written can go now.
                    dead.extend(Self::settle_floor(&mut st));
                    (std::mem::take(&mut st.reader_waiting), dead)
                }
                None => (false, dead),
            }
        };
        if wake {
            self.shared.changed.notify_waiters();
        }
        for path in &dead {
            let _ = fs::remove_file(path);
        }
        match failed {
            Some(e) => Err(e),
            None => synced,
        }
    }

    /// Whether `id` was held and not acknowledged until now.
    fn mark_acked(st: &mut State, id: u64) -> bool {
        id >= st.acked_floor && id < st.next_id && st.acked_above.insert(id)
    }

    /// After acknowledgements (or a flush): move the floor, let go of what is below it, and
    /// take out closed segments wholly below it. The files of those wholly written are
    /// returned, for the caller to delete once the lock is released. Those acknowledged before
    /// they were all written (read from memory) need not be written: their queued bytes go
    /// now, and their files (a flush in progress may still be writing one) are deleted by the
    /// next flush, after its writes.
    fn settle_floor(st: &mut State) -> Vec<PathBuf> {
        Self::advance_floor(st);
        Self::trim_tail(st);
        let mut dead = Vec::new();
        while st.segments.len() > 1
            && st
                .segments
                .front()
                .is_some_and(|s| s.end_id <= st.acked_floor)
        {
            let Some(s) = st.segments.pop_front() else {
                break;
            };
            st.total_bytes -= s.bytes;
            if s.end_id <= st.flushed_id {
                dead.push(s.path);
                continue;
            }
            while st.pending.front().is_some_and(|c| c.segment == s.first_id) {
                if let Some(c) = st.pending.pop_front() {
                    Self::discard(st, c);
                }
            }
            st.unwritten_dead.push(s.path);
        }
        dead
    }

    /// Forget a queued chunk that need not be written; its buffer is reused.
    fn discard(st: &mut State, mut chunk: Chunk) {
        st.pending_bytes -= (chunk.bytes.len() - chunk.written) as u64;
        chunk.bytes.clear();
        if st.spare.len() < 2 && chunk.bytes.capacity() <= SPARE_MAX {
            st.spare.push(chunk.bytes);
        }
    }

    fn advance_floor(st: &mut State) {
        while st.acked_above.first() == Some(&st.acked_floor) {
            st.acked_above.pop_first();
            st.acked_floor += 1;
        }
    }

    /// Acknowledge record `id` (the broker confirmed it, or it was given up as undeliverable).
    /// Segments it frees are deleted after the lock is released.
    pub fn ack(&self, id: u64) {
        let mut st = self.lock();
        if st.in_doubt.remove(&id).is_some() {
            // Deleted while in flight, and delivered after all.
            st.stats.acknowledged += 1;
            return;
        }
        if !Self::mark_acked(&mut st, id) {
            return;
        }
        st.stats.acknowledged += 1;
        let dead = Self::settle_floor(&mut st);
        let wake = std::mem::take(&mut st.reader_waiting);
        drop(st);
        if wake {
            self.shared.changed.notify_waiters();
        }
        for path in &dead {
            let _ = fs::remove_file(path);
        }
    }

    /// Hand appended records to the OS (no fsync): from here they survive a crash of amibus,
    /// SIGKILL included. The pipeline calls this after every batch it appends. One write per
    /// segment the records are in; the state lock is not held while writing.
    ///
    /// # Errors
    /// Writing fails (what was not written stays queued for the next flush).
    pub fn flush(&self) -> Result<(), SpoolError> {
        self.write_pending(&mut self.lock_file(), false)
    }

    /// Flush, fsync if `sync`, persist the floor, and reclaim the active segment when all of it
    /// is acknowledged and it is larger than `min(segment_bytes / 8, 1 MiB)`. Call
    /// periodically (off the runtime's workers: it does file I/O) and at shutdown.
    ///
    /// The flush holds the file mutex (the state lock only to take and publish); the fsyncs,
    /// the floor's file and deletions hold neither, so appends and reads go on meanwhile.
    ///
    /// # Errors
    /// Writing or syncing fails (what was not synced is synced by the next checkpoint).
    pub fn checkpoint(&self, sync: bool) -> Result<(), SpoolError> {
        let _one = self
            .shared
            .checkpointing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (files, active_path) = {
            let mut file = self.lock_file();
            self.write_pending(&mut file, false)?;
            let active_path = file_path(&self.shared.cfg, file.segment);
            let mut files = Vec::new();
            if sync {
                files = std::mem::take(&mut file.to_sync);
                if file.unsynced {
                    // Everything written so far is in the file: a sync through a second
                    // handle covers it, and later writes mark the file unsynced again.
                    match file.active.try_clone() {
                        Ok(f) => {
                            file.unsynced = false;
                            files.push(f);
                        }
                        Err(e) => {
                            file.to_sync = files;
                            return Err(SpoolError::io(&active_path)(e));
                        }
                    }
                }
            }
            (files, active_path)
        };
        for (i, f) in files.iter().enumerate() {
            if let Err(e) = f.sync_data() {
                // Synced by the next checkpoint instead.
                let mut file = self.lock_file();
                file.unsynced = true;
                file.to_sync.extend(files.into_iter().skip(i));
                return Err(SpoolError::io(&active_path)(e));
            }
        }
        let (floor, persisted) = {
            let st = self.lock();
            (st.acked_floor, st.persisted_floor)
        };
        if floor != persisted {
            let dir = &self.shared.cfg.dir;
            let tmp = dir.join("ack.tmp");
            let path = dir.join(ACK_FILE);
            fs::write(&tmp, format!("{floor}\n")).map_err(SpoolError::io(&tmp))?;
            if sync {
                File::open(&tmp)
                    .and_then(|f| f.sync_all())
                    .map_err(SpoolError::io(&tmp))?;
            }
            fs::rename(&tmp, &path).map_err(SpoolError::io(&path))?;
            self.lock().persisted_floor = floor;
        }
        for path in self.reclaim_idle_active() {
            let _ = fs::remove_file(path);
        }
        self.shared.changed.notify_waiters();
        Ok(())
    }

    /// Everything is acknowledged, written, and the persisted floor says so: start a new
    /// segment so the active one's bytes can go now instead of when it reaches `segment_bytes`.
    /// (With the floor persisted first, a restart before the new segment's file exists still
    /// numbers on from it.) Returns the files to delete.
    fn reclaim_idle_active(&self) -> Vec<PathBuf> {
        let cfg = &self.shared.cfg;
        let threshold = (cfg.segment_bytes / 8).min(1 << 20);
        let mut st = self.lock();
        let idle = st.acked_floor == st.next_id
            && st.persisted_floor == st.next_id
            && st.flushed_id >= st.next_id
            && st.segments.back().is_some_and(|s| s.bytes > threshold);
        if !idle {
            return Vec::new();
        }
        Self::rotate(&mut st, &cfg.dir);
        Self::settle_floor(&mut st)
    }

    /// Run [`Spool::checkpoint`] every 100 ms (or the fsync interval, if shorter) to persist
    /// the floor, syncing once per fsync interval, until `shutdown` resolves, then once more
    /// with a sync.
    pub async fn maintain(self, shutdown: impl std::future::Future<Output = ()>) {
        let (period, interval) = match self.shared.cfg.fsync {
            Fsync::Interval(d) => (
                d.min(Duration::from_millis(100))
                    .max(Duration::from_millis(1)),
                Some(d),
            ),
            Fsync::Never | Fsync::Always => (Duration::from_millis(100), None),
        };
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sync = Instant::now();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // Sync when the next tick would be later than the interval allows (it used
                    // to sync on every tick: ten times a second for an interval of 1 s).
                    let sync = interval.is_some_and(|d| last_sync.elapsed() + period > d);
                    if sync {
                        last_sync = Instant::now();
                    }
                    let spool = self.clone();
                    let _ = tokio::task::spawn_blocking(move || spool.checkpoint(sync)).await;
                }
                _ = &mut shutdown => break,
            }
        }
        let spool = self.clone();
        let _ = tokio::task::spawn_blocking(move || spool.checkpoint(true)).await;
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

    /// Records deleted by drop_oldest while in flight that the sink then did not confirm (the
    /// reader rewound past them): lost after all, headers only, counted in `dropped_oldest`
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
