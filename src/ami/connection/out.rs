//! The downstream side of a connection: stamping, a hand-off that never waits, gap ranges for
//! what was dropped, and the read hold.

use super::*;

/// The downstream side: stamps records and never waits.
pub(super) struct Out {
    pub(super) server: Arc<str>,
    pub(super) tx: handoff::Sender,
    pub(super) epoch: u64,
    pub(super) seq: u64,
    pub(super) gaps: VecDeque<GapRange>,
    pub(super) stats: Arc<Stats>,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct GapRange {
    pub(super) epoch: u64,
    pub(super) first: u64,
    pub(super) last: u64,
}

/// The downstream queue's receiver is gone: nobody will read records any more.
#[derive(Debug)]
pub(super) struct DownstreamClosed;

impl Out {
    pub(super) fn start_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.seq = 0;
    }

    pub(super) fn stamp(&mut self, received_at_ns: i64) -> Stamp {
        self.seq += 1;
        Stamp {
            server: self.server.clone(),
            epoch: self.epoch,
            seq: self.seq,
            received_at_ns,
        }
    }

    /// Hand a record on, or drop it and remember its seq. Never waits.
    pub(super) fn emit(&mut self, record: Record, at: i64) -> Result<(), DownstreamClosed> {
        if !self.try_flush_gaps(at)? {
            self.seq += 1;
            self.dropped(self.seq);
            return Ok(());
        }
        let stamp = self.stamp(at);
        match self.tx.try_send(Stamped { stamp, record }) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(s)) => {
                self.dropped(s.stamp.seq);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(DownstreamClosed),
        }
    }

    pub(super) fn dropped(&mut self, seq: u64) {
        inc(&self.stats.dropped_records);
        if let Some(g) = self.gaps.back_mut()
            && g.epoch == self.epoch
            && g.last + 1 == seq
        {
            g.last = seq;
            return;
        }
        if self.gaps.len() >= MAX_PENDING_GAPS {
            self.gaps.pop_front();
            inc(&self.stats.gaps_lost);
        }
        self.gaps.push_back(GapRange {
            epoch: self.epoch,
            first: seq,
            last: seq,
        });
    }

    pub(super) fn gap_record(&mut self, g: GapRange, at: i64) -> Stamped {
        inc(&self.stats.gaps);
        Stamped {
            stamp: self.stamp(at),
            record: Record::Gap {
                epoch: g.epoch,
                first_seq: g.first,
                last_seq: g.last,
                reason: "downstream queue full".to_owned(),
            },
        }
    }

    /// Send pending gaps while there is room. `Ok(true)` when none is left.
    pub(super) fn try_flush_gaps(&mut self, at: i64) -> Result<bool, DownstreamClosed> {
        while let Some(&g) = self.gaps.front() {
            // A clone, so the permit does not borrow `self` (only while gaps are pending).
            let tx = self.tx.clone();
            match tx.try_reserve() {
                Ok(permit) => {
                    self.gaps.pop_front();
                    let rec = self.gap_record(g, at);
                    permit.send(rec);
                }
                Err(mpsc::error::TrySendError::Full(())) => return Ok(false),
                Err(mpsc::error::TrySendError::Closed(())) => return Err(DownstreamClosed),
            }
        }
        Ok(true)
    }

    /// Use a slot obtained by waiting (see [`reserve`]) for the oldest pending gap.
    pub(super) fn send_gap(
        &mut self,
        permit: mpsc::OwnedPermit<Stamped>,
    ) -> Result<(), DownstreamClosed> {
        let at = now_ns();
        if let Some(g) = self.gaps.pop_front() {
            let rec = self.gap_record(g, at);
            permit.send(rec);
        }
        self.try_flush_gaps(at).map(|_| ())
    }
}

/// Wait for room in the downstream queue (used only when gaps are pending; reading goes on
/// meanwhile because this is one branch of a `select!`).
pub(super) async fn reserve(
    tx: Option<handoff::Sender>,
) -> Result<mpsc::OwnedPermit<Stamped>, DownstreamClosed> {
    match tx {
        Some(tx) => tx.reserve_owned().await.map_err(|_| DownstreamClosed),
        None => std::future::pending().await,
    }
}

/// How a hold ended.
pub(super) enum HoldEnd {
    /// The queue made room.
    Room,
    /// `handoff_wait` passed.
    Deadline,
}

/// Wait for the end of the hold that lasts until `until` (one branch of the read loop's
/// `select!`; never ends if there is no hold). Wakes on the queue's room notification or the
/// deadline, nothing else.
pub(super) async fn hold(
    tx: &handoff::Sender,
    until: Option<Instant>,
) -> Result<HoldEnd, DownstreamClosed> {
    let Some(until) = until else {
        return std::future::pending().await;
    };
    tokio::select! {
        biased;
        r = tx.room() => r.map(|()| HoldEnd::Room).map_err(|_| DownstreamClosed),
        _ = sleep_until(until) => Ok(HoldEnd::Deadline),
    }
}
