//! Acknowledgements and the floor below which every record is delivered.

use super::*;

impl Spool {
    /// Whether `id` was held and not acknowledged until now. The caller settles the floor.
    pub(super) fn mark_acked(st: &mut State, id: u64) -> bool {
        // The usual case, acknowledgements in order: the floor moves, no set is touched (an
        // insert and a pop of a `BTreeSet` per record). The floor is never in the set.
        if id == st.acked_floor && id < st.next_id {
            st.acked_floor += 1;
            return true;
        }
        id > st.acked_floor && id < st.next_id && st.acked_above.insert(id)
    }

    /// After acknowledgements (or a flush): move the floor, let go of what is below it, and
    /// take out closed segments wholly below it. The files of those wholly written are
    /// returned, for the caller to delete once the lock is released. Those acknowledged before
    /// they were all written (read from memory) need not be written: their queued bytes go
    /// now, and their files (a flush in progress may still be writing one) are deleted by the
    /// next flush, after its writes.
    pub(super) fn settle_floor(st: &mut State) -> Vec<PathBuf> {
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
    pub(super) fn discard(st: &mut State, mut chunk: Chunk) {
        st.pending_bytes -= (chunk.bytes.len() - chunk.written) as u64;
        chunk.bytes.clear();
        if st.spare.len() < 2 && chunk.bytes.capacity() <= SPARE_MAX {
            st.spare.push(chunk.bytes);
        }
    }

    pub(super) fn advance_floor(st: &mut State) {
        while st.acked_above.first() == Some(&st.acked_floor) {
            st.acked_above.pop_first();
            st.acked_floor += 1;
        }
    }

    /// Acknowledge record `id` (the broker confirmed it, or it was given up as undeliverable).
    /// Segments it frees are deleted after the lock is released.
    pub fn ack(&self, id: u64) {
        let mut st = self.lock();
        if let Some(doubt) = st.in_doubt.remove(&id) {
            // Deleted while in flight, and delivered after all.
            if let Doubt::Held(r) = &doubt {
                st.in_doubt_bytes -= Doubt::held_bytes(r);
            }
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
}
