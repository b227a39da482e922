//! Making room when the spool is full: detaching the oldest segments under the lock, reading
//! what they held (for gap records) and deleting them outside it.

use super::*;

impl Spool {
    /// Take the oldest segments out until `len` more bytes fit. Their ids handed to the sink
    /// and not acknowledged become in doubt now; reading their metadata, deciding what is lost
    /// and deleting the files is [`Spool::read_detached`]'s, outside the lock.
    ///
    /// The caller holds the file mutex: no flush is writing, so every byte of these segments
    /// is either in their files or in `pending`, where it is taken from.
    pub(super) fn detach_oldest(&self, st: &mut State, len: u64) -> Vec<Detached> {
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
                    st.in_doubt.insert(id, Doubt::Unread);
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

    /// After [`Spool::detach_oldest`], without the lock: read the dropped segments' records,
    /// delete their files, and sort the records out: in doubt (held whole, within
    /// `in_doubt_bytes`, for [`Spool::ack`] to settle or the reader to send again after a
    /// rewind), lost now (returned, metadata only, counted in `dropped_oldest`), or
    /// acknowledged meanwhile (nothing). Records that cannot be read (damaged) are counted,
    /// lost without a gap record.
    pub(super) fn read_detached(&self, detached: Vec<Detached>) -> Vec<Record> {
        let mut lost = Vec::new();
        let mut filled = false;
        for d in detached {
            let mut found: Vec<(u64, Record)> = Vec::new();
            let whole = |id: u64| d.doubt.contains(&id);
            if d.first_id < d.in_file_end {
                read_records(&d.path, d.first_id..d.in_file_end, whole, &mut found);
            }
            for chunk in d.memory {
                segment::decode_all(Bytes::from(chunk.bytes), |id, rec| {
                    found.push((id, copied_out(rec, whole(id))));
                });
            }
            let _ = fs::remove_file(&d.path);
            let mut guard = self.lock();
            let st = &mut *guard;
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
                // Not there: acknowledged meanwhile (delivered).
                if let Some(slot @ Doubt::Unread) = st.in_doubt.get_mut(&id) {
                    let size = Doubt::held_bytes(&rec);
                    *slot = if st.in_doubt_bytes + size <= self.shared.cfg.in_doubt_bytes {
                        st.in_doubt_bytes += size;
                        Doubt::Held(rec)
                    } else {
                        Doubt::Meta(meta_only(rec))
                    };
                    filled = true;
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
                .filter(|(_, r)| matches!(r, Doubt::Unread))
                .map(|(id, _)| *id)
                .collect();
            for id in unread {
                st.in_doubt.remove(&id);
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
            // A reader waiting to send them again (after a rewind) goes on.
            if filled && std::mem::take(&mut st.reader_waiting) {
                drop(guard);
                self.shared.changed.notify_waiters();
            }
        }
        lost
    }
}
