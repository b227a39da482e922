//! The spool: a durable, bounded log between normalization and the sink.
//!
//! Owns: segment files on disk, record ids, the acknowledgement floor, the cap and its overflow
//! rule, and replay after a restart. Knows nothing of AMI or brokers: a [`Record`] is a key,
//! a few headers and payload bytes.
//!
//! How it works: every record is appended to the active segment (a buffered write into the
//! page cache; fsync per [`Fsync`]) and gets the next id. The sink side reads the log in id
//! order through a [`Reader`] and acknowledges ids as the broker confirms them, in any order.
//! The floor (every id below it acknowledged) is persisted; a segment whose records are all
//! below the floor is deleted. After a crash or restart, everything from the floor on is read
//! again (at-least-once: a record acknowledged above the floor but not yet persisted is sent
//! twice, and its (server, epoch, seq) shows the duplicate).
//!
//! Decision: records are written through to disk always, instead of being held in memory and
//! spilled only when the sink lags. A SIGKILL then loses nothing that was appended (the page
//! cache survives the process), normal and degraded operation share one code path, and the
//! cost is a memcpy per record into the page cache (see the end-to-end benchmark).
//!
//! Must never: block on the network, hold more than the configured bytes on disk, or read a
//! record that is not whole (a torn tail from a crash is cut off and counted on open).

pub mod segment;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use segment::SegmentReader;

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
    /// After every append (slow; for small volumes that must survive power loss).
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
    #[error("record of {bytes} bytes is larger than the spool's segment or cap")]
    TooLarge { bytes: usize },
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
    /// Bytes of a torn record at the end of a segment, cut off.
    pub torn_bytes: u64,
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
}

struct Segment {
    first_id: u64,
    /// One past the last id in it (for the active segment: so far).
    end_id: u64,
    bytes: u64,
    path: PathBuf,
}

struct State {
    segments: VecDeque<Segment>,
    active: BufWriter<File>,
    next_id: u64,
    /// Ids below this are whole in the files (the write buffer was flushed after them).
    flushed_id: u64,
    total_bytes: u64,
    acked_floor: u64,
    acked_above: BTreeSet<u64>,
    persisted_floor: u64,
    /// The active segment has appends not yet fsynced.
    unsynced: bool,
    /// Segments closed by rotation whose last appends are not yet fsynced: the next
    /// checkpoint syncs them, outside the lock.
    to_sync: Vec<File>,
    scratch: Vec<u8>,
    stats: SpoolStats,
    /// (id, when appended) every [`AGE_SAMPLE_EVERY`] records, for the oldest record's age.
    age_samples: VecDeque<(u64, Instant)>,
    /// A reader found nothing to read and waits for `changed`: the next append or ack wakes
    /// it (and only then: a wake per record would cost more than the record).
    reader_waiting: bool,
    /// One past the highest id a reader has handed to the sink.
    handed_out: u64,
    /// Deleted by drop_oldest while in flight (headers only): delivered if acknowledged,
    /// lost if the reader rewinds past them instead.
    in_doubt: BTreeMap<u64, Record>,
    /// In-doubt records that turned out lost, for [`Spool::take_lost`].
    lost_later: Vec<Record>,
    /// The newest records, consecutive ids, also on disk; at most `memory_bytes` of them.
    tail: VecDeque<(u64, u64, Arc<Record>)>,
    tail_bytes: u64,
}

const AGE_SAMPLE_EVERY: u64 = 256;

struct Shared {
    cfg: SpoolConfig,
    state: Mutex<State>,
    /// One checkpoint at a time (they sync and write the floor outside `state`).
    checkpointing: Mutex<()>,
    /// Woken on append, ack and flush.
    changed: Notify,
}

/// The spool. Cheap to clone: clones share one log.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
}

const ACK_FILE: &str = "ack";

impl Spool {
    /// Open (or create) the spool in `cfg.dir`, cutting off a torn tail and finding the floor.
    ///
    /// # Errors
    /// The directory or a segment cannot be read or written.
    pub fn open(cfg: SpoolConfig) -> Result<(Spool, Recovery), SpoolError> {
        let dir = cfg.dir.clone();
        fs::create_dir_all(&dir).map_err(SpoolError::io(&dir))?;
        let mut paths: Vec<(u64, PathBuf)> = fs::read_dir(&dir)
            .map_err(SpoolError::io(&dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| segment::parse_file_name(&p).map(|id| (id, p)))
            .collect();
        paths.sort();
        let mut recovery = Recovery::default();
        let mut segments = VecDeque::new();
        for (first_id, path) in paths {
            let mut reader = SegmentReader::open(&path).map_err(SpoolError::io(&path))?;
            let mut end_id = first_id;
            let cut = loop {
                match reader.read_next() {
                    Ok(Some((id, _))) => end_id = id + 1,
                    Ok(None) => break None,
                    Err(Ok(torn)) => break Some(torn.offset),
                    Err(Err(e)) => return Err(SpoolError::io(&path)(e)),
                }
            };
            let mut bytes = reader.offset();
            if let Some(offset) = cut {
                let len = fs::metadata(&path).map_err(SpoolError::io(&path))?.len();
                recovery.torn_bytes += len - offset;
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(SpoolError::io(&path))?;
                f.set_len(offset).map_err(SpoolError::io(&path))?;
                bytes = offset;
            }
            segments.push_back(Segment {
                first_id,
                end_id,
                bytes,
                path,
            });
        }
        let ack_path = dir.join(ACK_FILE);
        let stored_floor = match fs::read_to_string(&ack_path) {
            Ok(s) => s.trim().parse::<u64>().ok(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(SpoolError::io(&ack_path)(e)),
        };
        let next_id = segments
            .back()
            .map(|s| s.end_id)
            .unwrap_or(1)
            .max(stored_floor.unwrap_or(1));
        let first_id = segments.front().map_or(next_id, |s| s.first_id);
        let acked_floor = stored_floor.unwrap_or(first_id).clamp(first_id, next_id);
        // Segments wholly below the floor are done.
        while segments.len() > 1 && segments.front().is_some_and(|s| s.end_id <= acked_floor) {
            if let Some(s) = segments.pop_front() {
                let _ = fs::remove_file(&s.path);
            }
        }
        // Append to a new segment unless the last one is still empty.
        let active_path = dir.join(segment::file_name(next_id));
        let active = if segments.back().is_some_and(|s| s.first_id == next_id) {
            OpenOptions::new().append(true).open(&active_path)
        } else {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&active_path)
        }
        .map_err(SpoolError::io(&active_path))?;
        if segments.back().is_none_or(|s| s.first_id != next_id) {
            segments.push_back(Segment {
                first_id: next_id,
                end_id: next_id,
                bytes: 0,
                path: active_path,
            });
        }
        recovery.pending = next_id - acked_floor;
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        let state = State {
            segments,
            active: BufWriter::with_capacity(256 << 10, active),
            next_id,
            flushed_id: next_id,
            total_bytes,
            acked_floor,
            acked_above: BTreeSet::new(),
            persisted_floor: acked_floor,
            unsynced: false,
            to_sync: Vec::new(),
            scratch: Vec::with_capacity(4096),
            stats: SpoolStats::default(),
            // Records found on disk at open count as appended now: their age is at least that.
            age_samples: VecDeque::from([(acked_floor, Instant::now())]),
            tail: VecDeque::new(),
            tail_bytes: 0,
            reader_waiting: false,
            handed_out: acked_floor,
            in_doubt: BTreeMap::new(),
            lost_later: Vec::new(),
        };
        let spool = Spool {
            shared: Arc::new(Shared {
                cfg,
                state: Mutex::new(state),
                checkpointing: Mutex::new(()),
                changed: Notify::new(),
            }),
        };
        Ok((spool, recovery))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough state (ids only grow).
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn config(&self) -> &SpoolConfig {
        &self.shared.cfg
    }

    /// Append a record. Never waits on the sink.
    ///
    /// # Errors
    /// Writing the segment fails, or the record alone is larger than a segment or the cap.
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
        let mut st = self.lock();
        let mut dropped = None;
        let limit = if when_full.is_some() {
            cfg.max_bytes
        } else {
            cfg.max_bytes / 2
        };
        if st.total_bytes + len > limit {
            self.reclaim_active(&mut st)?;
        }
        if st.total_bytes + len > limit && when_full.is_none() {
            return Ok(Appended::DroppedNewest);
        }
        if st.total_bytes + len > cfg.max_bytes {
            match when_full {
                None => return Ok(Appended::DroppedNewest),
                Some(WhenFull::DropNewest) => {
                    st.stats.dropped_newest += 1;
                    return Ok(Appended::DroppedNewest);
                }
                Some(WhenFull::DropOldest) => {
                    dropped = Some(self.drop_oldest(&mut st, len)?);
                }
            }
        }
        let active_bytes = st.segments.back().map_or(0, |s| s.bytes);
        if active_bytes > 0 && active_bytes + len > cfg.segment_bytes {
            self.rotate(&mut st)?;
        }
        let id = st.next_id;
        let mut scratch = std::mem::take(&mut st.scratch);
        scratch.clear();
        segment::encode(id, record, &mut scratch);
        let written = st.active.write_all(&scratch);
        st.scratch = scratch;
        if let Err(e) = written {
            return Err(SpoolError::io(&Self::active_path(&st))(e));
        }
        st.next_id += 1;
        st.total_bytes += len;
        if let Some(s) = st.segments.back_mut() {
            s.bytes += len;
            s.end_id = id + 1;
        }
        st.stats.appended += 1;
        st.unsynced = true;
        // The tail holds the newest ids without a hole: a record too large for it empties it.
        if cfg.memory_bytes >= len {
            let kept = shared.map_or_else(|| Arc::new(record.clone()), Arc::clone);
            st.tail.push_back((id, len, kept));
            st.tail_bytes += len;
            while st.tail_bytes > cfg.memory_bytes {
                Self::pop_tail(&mut st);
            }
        } else {
            st.tail.clear();
            st.tail_bytes = 0;
        }
        if id % AGE_SAMPLE_EVERY == 0 || st.age_samples.is_empty() {
            st.age_samples.push_back((id, Instant::now()));
        }
        if cfg.fsync == Fsync::Always {
            Self::flush_locked(&mut st, true)?;
        }
        let wake = std::mem::take(&mut st.reader_waiting);
        drop(st);
        if wake {
            self.shared.changed.notify_waiters();
        }
        Ok(match dropped {
            Some(dropped) => Appended::StoredDroppingOldest { id, dropped },
            None => Appended::Stored { id },
        })
    }

    fn active_path(st: &State) -> PathBuf {
        st.segments
            .back()
            .map(|s| s.path.clone())
            .unwrap_or_default()
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

    /// When every record is acknowledged, the active segment's bytes are reclaimable too.
    fn reclaim_active(&self, st: &mut State) -> Result<(), SpoolError> {
        if st.acked_floor == st.next_id && st.segments.back().is_some_and(|s| s.bytes > 0) {
            self.rotate(st)?;
            while st.segments.len() > 1 {
                if let Some(s) = st.segments.pop_front() {
                    st.total_bytes -= s.bytes;
                    let _ = fs::remove_file(&s.path);
                }
            }
        }
        Ok(())
    }

    fn rotate(&self, st: &mut State) -> Result<(), SpoolError> {
        // Flushed here, fsynced by the next checkpoint: an fsync under the lock stalled every
        // append and read behind it (both runtime workers, on a slow disk for 100 ms or more).
        Self::flush_locked(st, false)?;
        let path = self.shared.cfg.dir.join(segment::file_name(st.next_id));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(SpoolError::io(&path))?;
        let closed = std::mem::replace(&mut st.active, BufWriter::with_capacity(256 << 10, file));
        if std::mem::replace(&mut st.unsynced, false) && self.shared.cfg.fsync != Fsync::Never {
            // Flushed above, so taking the file out of its buffer writes nothing.
            st.to_sync.push(closed.into_parts().0);
        }
        st.segments.push_back(Segment {
            first_id: st.next_id,
            end_id: st.next_id,
            bytes: 0,
            path,
        });
        Ok(())
    }

    /// Delete oldest segments until `len` more bytes fit; returns their unacknowledged records.
    fn drop_oldest(&self, st: &mut State, len: u64) -> Result<Vec<Record>, SpoolError> {
        let mut lost = Vec::new();
        while st.total_bytes + len > self.shared.cfg.max_bytes {
            if st.segments.len() == 1 {
                if st.segments.back().is_some_and(|s| s.bytes == 0) {
                    break;
                }
                self.rotate(st)?;
            }
            let Some(seg) = st.segments.pop_front() else {
                break;
            };
            Self::flush_locked(st, false)?;
            let mut reader = SegmentReader::open(&seg.path).map_err(SpoolError::io(&seg.path))?;
            let before = lost.len();
            while let Ok(Some((id, mut rec))) = reader.read_next() {
                if id >= st.acked_floor && !st.acked_above.contains(&id) {
                    // Copied out of the reader's chunk, which they would otherwise keep whole
                    // for as long as they wait to be reported.
                    rec.payload = Bytes::new();
                    rec.key = Bytes::copy_from_slice(&rec.key);
                    for (_, value) in &mut rec.headers {
                        *value = Bytes::copy_from_slice(value);
                    }
                    if id < st.handed_out {
                        // The sink may still confirm it: lost only if it does not.
                        st.in_doubt.insert(id, rec);
                    } else {
                        lost.push(rec);
                    }
                }
            }
            st.total_bytes -= seg.bytes;
            st.stats.dropped_oldest += (lost.len() - before) as u64;
            let _ = fs::remove_file(&seg.path);
            let floor = seg.end_id.max(st.acked_floor);
            st.acked_above = st.acked_above.split_off(&floor);
            st.acked_floor = floor;
            Self::advance_floor(st);
        }
        Self::trim_tail(st);
        Ok(lost)
    }

    fn flush_locked(st: &mut State, sync: bool) -> Result<(), SpoolError> {
        if let Err(e) = st.active.flush() {
            return Err(SpoolError::io(&Self::active_path(st))(e));
        }
        st.flushed_id = st.next_id;
        if sync && st.unsynced {
            st.active
                .get_ref()
                .sync_data()
                .map_err(|e| SpoolError::io(&Self::active_path(st))(e))?;
            st.unsynced = false;
        }
        Ok(())
    }

    fn advance_floor(st: &mut State) {
        while st.acked_above.first() == Some(&st.acked_floor) {
            st.acked_above.pop_first();
            st.acked_floor += 1;
        }
    }

    /// Acknowledge record `id` (the broker confirmed it, or it was given up as undeliverable).
    pub fn ack(&self, id: u64) {
        let mut st = self.lock();
        if st.in_doubt.remove(&id).is_some() {
            // Deleted while in flight, and delivered after all.
            st.stats.acknowledged += 1;
            return;
        }
        if id < st.acked_floor || id >= st.next_id || !st.acked_above.insert(id) {
            return;
        }
        st.stats.acknowledged += 1;
        Self::advance_floor(&mut st);
        Self::trim_tail(&mut st);
        // Delete closed segments wholly below the floor.
        while st.segments.len() > 1
            && st
                .segments
                .front()
                .is_some_and(|s| s.end_id <= st.acked_floor)
        {
            if let Some(s) = st.segments.pop_front() {
                st.total_bytes -= s.bytes;
                let _ = fs::remove_file(&s.path);
            }
        }
        let wake = std::mem::take(&mut st.reader_waiting);
        drop(st);
        if wake {
            self.shared.changed.notify_waiters();
        }
    }

    /// Hand buffered appends to the OS (no fsync): from here they survive a crash of amibus,
    /// SIGKILL included. The pipeline calls this after every batch it appends.
    ///
    /// # Errors
    /// Writing fails.
    pub fn flush(&self) -> Result<(), SpoolError> {
        let mut st = self.lock();
        Self::flush_locked(&mut st, false)
    }

    /// Flush, fsync if `sync`, and persist the floor. Call periodically and at shutdown.
    ///
    /// Only the flush holds the spool's lock: the fsyncs and the floor's file are written
    /// outside it, so appends and reads go on meanwhile.
    ///
    /// # Errors
    /// Writing or syncing fails (what was not synced is synced by the next checkpoint).
    pub fn checkpoint(&self, sync: bool) -> Result<(), SpoolError> {
        let _one = self
            .shared
            .checkpointing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (files, floor, persisted, active_path) = {
            let mut st = self.lock();
            Self::flush_locked(&mut st, false)?;
            let active_path = Self::active_path(&st);
            let mut files = Vec::new();
            if sync {
                files = std::mem::take(&mut st.to_sync);
                if st.unsynced {
                    // Everything appended so far is in the file: a sync through a second
                    // handle covers it, and later appends mark the segment unsynced again.
                    match st.active.get_ref().try_clone() {
                        Ok(f) => {
                            st.unsynced = false;
                            files.push(f);
                        }
                        Err(e) => {
                            st.to_sync = files;
                            return Err(SpoolError::io(&active_path)(e));
                        }
                    }
                }
            }
            (files, st.acked_floor, st.persisted_floor, active_path)
        };
        for (i, f) in files.iter().enumerate() {
            if let Err(e) = f.sync_data() {
                // Synced by the next checkpoint instead.
                let mut st = self.lock();
                st.unsynced = true;
                st.to_sync.extend(files.into_iter().skip(i));
                return Err(SpoolError::io(&active_path)(e));
            }
        }
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
        self.shared.changed.notify_waiters();
        Ok(())
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

    /// The reader of this spool, starting at the oldest unacknowledged record.
    pub fn reader(&self) -> Reader {
        let next_id = self.lock().acked_floor;
        Reader {
            spool: self.clone(),
            next_id,
            segment: None,
        }
    }
}

/// Reads the log in id order for the sink.
pub struct Reader {
    spool: Spool,
    next_id: u64,
    segment: Option<(u64, SegmentReader)>,
}

impl Reader {
    /// The next record to send, waiting for one to be appended (and for the in-flight window
    /// to have room).
    ///
    /// # Errors
    /// A segment cannot be read.
    pub async fn next(&mut self) -> Result<(u64, Arc<Record>), SpoolError> {
        let shared = Arc::clone(&self.spool.shared);
        loop {
            let notified = shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.try_next()? {
                return Ok(r);
            }
            // Ask to be woken, then look once more: an append between the look above and
            // the flag did not wake anyone, but is seen now.
            self.spool.lock().reader_waiting = true;
            if let Some(r) = self.try_next()? {
                return Ok(r);
            }
            notified.await;
        }
    }

    /// The next record if one is ready now.
    ///
    /// # Errors
    /// A segment cannot be read.
    pub fn try_next(&mut self) -> Result<Option<(u64, Arc<Record>)>, SpoolError> {
        loop {
            let segment_first = {
                let mut st = self.spool.lock();
                if self.next_id < st.acked_floor {
                    self.next_id = st.acked_floor;
                }
                while st.acked_above.contains(&self.next_id) {
                    self.next_id += 1;
                }
                if self.next_id >= st.next_id
                    || self.next_id - st.acked_floor >= self.spool.shared.cfg.max_in_flight
                {
                    return Ok(None);
                }
                if let Some(&(first, _, _)) = st.tail.front()
                    && self.next_id >= first
                {
                    let (id, _, record) = &st.tail[(self.next_id - first) as usize];
                    debug_assert_eq!(*id, self.next_id);
                    let out = (*id, Arc::clone(record));
                    self.next_id += 1;
                    st.handed_out = st.handed_out.max(self.next_id);
                    return Ok(Some(out));
                }
                if self.next_id >= st.flushed_id {
                    Spool::flush_locked(&mut st, false)?;
                }
                let Some(seg) = st
                    .segments
                    .iter()
                    .rev()
                    .find(|s| s.first_id <= self.next_id)
                else {
                    return Ok(None);
                };
                match &self.segment {
                    Some((first, _)) if *first == seg.first_id => None,
                    _ => Some((seg.first_id, seg.path.clone())),
                }
            };
            if let Some((first, path)) = segment_first {
                let reader = SegmentReader::open(&path).map_err(SpoolError::io(&path))?;
                self.segment = Some((first, reader));
            }
            let Some((_, reader)) = self.segment.as_mut() else {
                return Ok(None);
            };
            match reader.read_next() {
                Ok(Some((id, record))) => {
                    if id < self.next_id {
                        continue;
                    }
                    self.next_id = id + 1;
                    let mut st = self.spool.lock();
                    st.handed_out = st.handed_out.max(self.next_id);
                    return Ok(Some((id, Arc::new(record))));
                }
                // The end of a segment. A closed one: move on to the next. The active one cannot
                // end before `flushed_id`, checked above, unless records are still arriving.
                Ok(None) | Err(Ok(_)) => {
                    let current = self.segment.as_ref().map_or(0, |(first, _)| *first);
                    let st = self.spool.lock();
                    match st.segments.iter().find(|s| s.first_id > current) {
                        Some(next) => {
                            self.next_id = self.next_id.max(next.first_id);
                            self.segment = None;
                        }
                        None => return Ok(None),
                    }
                }
                Err(Err(e)) => {
                    let path = reader.path().to_owned();
                    self.segment = None;
                    return Err(SpoolError::io(&path)(e));
                }
            }
        }
    }

    /// Go back to the oldest unacknowledged record (after the sink lost deliveries), skipping
    /// records acknowledged since.
    ///
    /// Records deleted by drop_oldest while they were in flight and not confirmed since cannot
    /// be sent again: they become lost (see [`Spool::take_lost`]).
    pub fn rewind(&mut self) {
        let mut st = self.spool.lock();
        self.next_id = st.acked_floor;
        st.handed_out = st.acked_floor;
        let lost = std::mem::take(&mut st.in_doubt);
        st.stats.dropped_oldest += lost.len() as u64;
        st.lost_later.extend(lost.into_values());
        drop(st);
        self.segment = None;
    }

    /// Acknowledge through the spool.
    pub fn spool(&self) -> &Spool {
        &self.spool
    }
}

#[cfg(test)]
mod tests;
