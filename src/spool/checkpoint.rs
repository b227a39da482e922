//! Flushes, checkpoints of the ack floor, and reclaiming an idle active segment.

use super::*;

impl Spool {
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
            let path = dir.join(ACK_FILE);
            crate::durable::replace(&path, format!("{floor}\n").as_bytes(), sync)
                .map_err(SpoolError::io(&path))?;
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
    pub(super) fn reclaim_idle_active(&self) -> Vec<PathBuf> {
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
}
