//! Appending: records into the memory tail and the pending write chunks, rotation, and the
//! writes themselves (under the file mutex, never under the state lock).

use super::*;

impl Spool {
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
    pub(super) fn pending_limit(&self) -> u64 {
        self.shared.cfg.memory_bytes.max(WRITE_CHUNK)
    }

    pub(super) fn append_inner(
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
    pub(super) fn push(
        &self,
        st: &mut State,
        record: &Record,
        shared: Option<&Arc<Record>>,
        len: u64,
    ) -> u64 {
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
        if id.is_multiple_of(AGE_SAMPLE_EVERY) || st.age_samples.is_empty() {
            st.age_samples.push_back((id, Instant::now()));
        }
        id
    }

    /// Let go of tail records below the floor: no reader needs them any more.
    pub(super) fn trim_tail(st: &mut State) {
        while st
            .tail
            .front()
            .is_some_and(|(id, _, _)| *id < st.acked_floor)
        {
            Self::pop_tail(st);
        }
    }

    pub(super) fn pop_tail(st: &mut State) {
        if let Some((_, len, _)) = st.tail.pop_front() {
            st.tail_bytes -= len;
        }
    }

    /// When every record is acknowledged, the active segment's bytes are reclaimable too:
    /// start a new segment; the old ones' files (once written) are returned for deletion.
    pub(super) fn reclaim_active(st: &mut State, dir: &Path) -> Vec<PathBuf> {
        if st.acked_floor == st.next_id && st.segments.back().is_some_and(|s| s.bytes > 0) {
            Self::rotate(st, dir);
            return Self::settle_floor(st);
        }
        Vec::new()
    }

    /// Start a new segment at the next id. Its file is created by the flush that writes its
    /// first record.
    pub(super) fn rotate(st: &mut State, dir: &Path) {
        let first_id = st.next_id;
        st.segments.push_back(Segment {
            first_id,
            end_id: first_id,
            bytes: 0,
            path: dir.join(segment::file_name(first_id)),
        });
    }

    /// Write what is pending; the caller holds the file mutex. The state lock is taken twice,
    /// briefly: to take the chunks, and to publish what was written (moving `flushed_id`,
    /// waking a waiting reader, putting back what could not be written).
    pub(super) fn write_pending(&self, file: &mut FileState, sync: bool) -> Result<(), SpoolError> {
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
}
