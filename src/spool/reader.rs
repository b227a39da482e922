//! The sink's side of the spool: reading the log in id order, from the memory tail or the
//! segment files, past damage, and going back after a failed delivery.

use super::*;

impl Spool {
    /// The reader of this spool, starting at the oldest unacknowledged record.
    pub fn reader(&self) -> Reader {
        let next_id = self.lock().acked_floor;
        Reader {
            spool: self.clone(),
            next_id,
            segment: None,
            resend_from: None,
        }
    }
}

/// Reads the log in id order for the sink.
pub struct Reader {
    spool: Spool,
    next_id: u64,
    segment: Option<OpenSegment>,
    /// After a rewind: the in-doubt records from this id on go first.
    resend_from: Option<u64>,
}

/// The segment a [`Reader`] reads from the file.
struct OpenSegment {
    /// Its first id.
    first: u64,
    reader: SegmentReader,
    /// The id the next record in it should have.
    next: u64,
}

/// The open segment as the spool saw it just before a read: what was appended before this
/// look is whole in the file when the read comes after it.
#[derive(Clone, Copy)]
struct SegmentView {
    /// The first id of the segment after it: it is closed, all its records written.
    next_first: Option<u64>,
    /// Ids below this were flushed to the file.
    flushed: u64,
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

    /// The next record if one is ready now. Damaged records are skipped (see the module docs);
    /// a segment deleted by drop_oldest before it could be opened is passed over (its records
    /// are reported on drop_oldest's path).
    ///
    /// # Errors
    /// A segment cannot be read.
    pub fn try_next(&mut self) -> Result<Option<(u64, Arc<Record>)>, SpoolError> {
        match self.next_resend() {
            Some(Some(r)) => return Ok(Some(r)),
            // One is still being read by the append that dropped it: wait for it.
            Some(None) => return Ok(None),
            None => {}
        }
        loop {
            let (segment_first, view) = {
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
                // Not yet in the file: wait. The reader never writes; the next flush (the
                // pipeline's after its batch, or the checkpoint's) wakes it.
                if self.next_id >= st.flushed_id {
                    return Ok(None);
                }
                let Some(at) = st.segments.iter().rposition(|s| s.first_id <= self.next_id) else {
                    return Ok(None);
                };
                let seg = &st.segments[at];
                let view = SegmentView {
                    // Closed and wholly written; one not wholly written yet is read as the
                    // active one is (its end may be an append in progress).
                    next_first: st
                        .segments
                        .get(at + 1)
                        .map(|s| s.first_id)
                        .filter(|&next| next <= st.flushed_id),
                    flushed: st.flushed_id,
                };
                let open = match &self.segment {
                    Some(o) if o.first == seg.first_id => None,
                    _ => Some((seg.first_id, seg.path.clone())),
                };
                (open, view)
            };
            if let Some((first, path)) = segment_first {
                match SegmentReader::open(&path) {
                    Ok(reader) => {
                        self.segment = Some(OpenSegment {
                            first,
                            reader,
                            next: first,
                        });
                    }
                    // drop_oldest deleted it between the look above and the open: its records
                    // were dropped, and are reported on that path. Go on with the next one.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        self.segment = None;
                        match view.next_first {
                            Some(next) => self.next_id = self.next_id.max(next),
                            None => return Ok(None),
                        }
                        continue;
                    }
                    Err(e) => return Err(SpoolError::io(&path)(e)),
                }
            }
            let Some(open) = self.segment.as_mut() else {
                return Ok(None);
            };
            match open.reader.read_next() {
                Ok(Some((id, record))) => {
                    open.next = id + 1;
                    if id < self.next_id {
                        continue;
                    }
                    self.next_id = id + 1;
                    let mut st = self.spool.lock();
                    st.handed_out = st.handed_out.max(self.next_id);
                    return Ok(Some((id, Arc::new(record))));
                }
                Ok(None) => {
                    if !self.at_segment_end(None, view)? {
                        return Ok(None);
                    }
                }
                Err(Ok(torn)) => {
                    if !self.at_segment_end(Some(torn), view)? {
                        return Ok(None);
                    }
                }
                Err(Err(e)) => {
                    let path = open.reader.path().to_owned();
                    self.segment = None;
                    return Err(SpoolError::io(&path)(e));
                }
            }
        }
    }

    /// The open segment ends here, cleanly or at a bad record (`torn`): skip damage and go on
    /// in it, or move on to the next segment; false when there is nothing more to read now.
    ///
    /// `view` was taken before the read, so the segment's records below `view.flushed` (all of
    /// them if it was closed then) were whole in the file when it was read: a bad record
    /// among them is damage, not an append in progress.
    fn at_segment_end(
        &mut self,
        torn: Option<Torn>,
        view: SegmentView,
    ) -> Result<bool, SpoolError> {
        let Some(open) = self.segment.as_mut() else {
            return Ok(false);
        };
        let first = open.first;
        if torn.is_some() {
            if view.next_first.is_none() && open.next >= view.flushed {
                // The active segment's tail, still being written.
                return Ok(false);
            }
            // In the active segment, only what was written before the look is whole.
            let bound = view.next_first.unwrap_or(view.flushed);
            let path = open.reader.path().to_owned();
            match open.reader.resync(open.next..bound) {
                Ok(Some(r)) => {
                    let ids = open.next..r.next_id;
                    open.next = r.next_id;
                    self.spool.skip_damaged(first, r.offset, r.bytes, ids);
                    return Ok(true);
                }
                // Nothing valid after it in the active segment yet: wait for the next append
                // (a later look finds it, and skips the damage then).
                Ok(None) if view.next_first.is_none() => return Ok(false),
                Ok(None) => {}
                Err(e) => return Err(SpoolError::io(&path)(e)),
            }
        }
        let Some(next_first) = view.next_first else {
            return Ok(false);
        };
        // A closed segment holds every id up to the next one's first: what it lacks (from a
        // bad record on, or past a truncation) is lost.
        if open.next < next_first {
            let offset = torn.map_or(open.reader.offset(), |t| t.offset);
            let len = fs::metadata(open.reader.path()).map_or(offset, |m| m.len());
            let ids = open.next..next_first;
            self.spool
                .skip_damaged(first, offset, len.saturating_sub(offset), ids);
        }
        self.next_id = self.next_id.max(next_first);
        self.segment = None;
        Ok(true)
    }

    /// Go back to the oldest unacknowledged record (after the sink lost deliveries), skipping
    /// records acknowledged since.
    ///
    /// Records deleted by drop_oldest while they were in flight and not confirmed since are
    /// sent again first, in id order, while their bytes are held; those held by their
    /// metadata only are lost then (see [`Spool::take_lost`]).
    pub fn rewind(&mut self) {
        let st = self.spool.lock();
        // `handed_out` stays: a record sent once may be at the broker whatever happens next,
        // so if drop_oldest deletes it before it is confirmed, it is in doubt, not lost.
        self.next_id = st.acked_floor;
        self.resend_from = (!st.in_doubt.is_empty()).then_some(0);
        drop(st);
        self.segment = None;
    }

    /// The next in-doubt record to send again after a rewind: `None` when there is none left
    /// (the log goes on), `Some(None)` while the next one is still being read.
    fn next_resend(&mut self) -> Option<Option<(u64, Arc<Record>)>> {
        let mut from = self.resend_from?;
        let mut guard = self.spool.lock();
        let st = &mut *guard;
        loop {
            let Some((&id, doubt)) = st.in_doubt.range(from..).next() else {
                self.resend_from = None;
                return None;
            };
            match doubt {
                Doubt::Unread => return Some(None),
                Doubt::Held(record) => {
                    let out = (id, Arc::new(record.clone()));
                    self.resend_from = Some(id + 1);
                    st.stats.in_doubt_resent += 1;
                    return Some(Some(out));
                }
                Doubt::Meta(_) => {
                    if let Some(Doubt::Meta(record)) = st.in_doubt.remove(&id) {
                        st.stats.dropped_oldest += 1;
                        st.lost_later.push(record);
                    }
                    from = id + 1;
                }
            }
        }
    }

    /// Acknowledge through the spool.
    pub fn spool(&self) -> &Spool {
        &self.spool
    }
}
