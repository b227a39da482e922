//! The state lock and file I/O: writes hold the file mutex only; reads from memory, acks and
//! appends go on meanwhile; a full disk; reclaiming; wake-ups.

use super::*;

/// A write hook that blocks the flush inside its write until released; `entered` says when a
/// write is blocked. Dropping `release` lets every later write through.
fn block_writes(spool: &Spool) -> (std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>) {
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    spool.lock_file().fault = Some(Box::new(move || {
        let _ = entered_tx.send(());
        let _ = release_rx.recv();
        Ok(())
    }));
    (entered, release)
}

/// Read what is ready without writing anything first (unlike [`drain`]).
fn take_ready(reader: &mut Reader) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    while let Some((id, r)) = reader.try_next().expect("reads") {
        out.push((id, seq(&r)));
    }
    out
}

#[test]
fn a_write_blocked_on_the_disk_holds_up_no_append_read_or_ack() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = segment::encoded_len(&rec("k", 0)) as u64;
    let (spool, _) = Spool::open(SpoolConfig {
        segment_bytes: one * 4,
        memory_bytes: one * 100,
        ..cfg(dir.path())
    })
    .expect("open");
    for n in 0..8 {
        spool.append(&rec("k", n)).expect("append");
    }
    spool.flush().expect("flush");
    let written = layout(dir.path());
    assert_eq!(written.len(), 2, "two segments written");

    let (entered, release) = block_writes(&spool);
    for n in 8..12 {
        spool.append(&rec("k", n)).expect("append");
    }
    let flusher = {
        let spool = spool.clone();
        std::thread::spawn(move || spool.flush())
    };
    entered.recv().expect("the flush is inside its write");
    // The writer holds the file mutex, and not the state lock.
    assert!(spool.shared.file.try_lock().is_err(), "a write in progress");
    assert!(
        spool.shared.state.try_lock().is_ok(),
        "the state lock is free during the write"
    );
    // Appends go on (into memory), the reader reads them from memory, acks and stats work.
    for n in 12..14 {
        assert!(matches!(
            spool.append(&rec("k", n)).expect("append"),
            Appended::Stored { .. }
        ));
    }
    let mut reader = spool.reader();
    let got = take_ready(&mut reader);
    assert_eq!(
        got.iter().map(|g| g.1).collect::<Vec<_>>(),
        (0..14).collect::<Vec<_>>()
    );
    for (id, _) in &got {
        spool.ack(*id);
    }
    // The written segments are deleted by the acks themselves, while the write still hangs.
    for (path, _) in &written {
        assert!(!path.exists(), "{} deleted", path.display());
    }
    let st = spool.stats();
    assert_eq!((st.records_held, st.acknowledged, st.segments), (0, 14, 1));

    drop(release);
    flusher
        .join()
        .expect("join")
        .expect("the flush gets through");
    // The segment the blocked flush wrote was acknowledged meanwhile: deleted after the write.
    spool.flush().expect("flush");
    let left = layout(dir.path());
    assert_eq!(left.len(), 1, "the active segment only: {left:?}");
    assert_eq!(left[0].1.last().map(|r| r.2), Some(14));
    let bytes: u64 = left[0].1.iter().map(|r| r.1).sum();
    assert_eq!(bytes, st.bytes_held);
    spool.checkpoint(false).expect("checkpoint");
    drop((reader, spool));
    let (_, recovery) = Spool::open(cfg(dir.path())).expect("reopen");
    assert_eq!(recovery.pending, 0);
}

#[test]
fn a_full_disk_keeps_appends_in_memory_up_to_the_bound_then_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = segment::encoded_len(&rec("k", 0)) as u64;
    let memory = 2 * WRITE_CHUNK;
    let (spool, _) = Spool::open(SpoolConfig {
        segment_bytes: 64 << 10,
        max_bytes: 100 << 20,
        memory_bytes: memory,
        ..cfg(dir.path())
    })
    .expect("open");
    let full = Arc::new(std::sync::atomic::AtomicBool::new(true));
    {
        let full = Arc::clone(&full);
        spool.lock_file().fault = Some(Box::new(move || {
            if full.load(std::sync::atomic::Ordering::Relaxed) {
                Err(io::Error::from_raw_os_error(28))
            } else {
                Ok(())
            }
        }));
    }
    let mut stored = 0u64;
    let refused = loop {
        match spool.append(&rec("k", stored)) {
            Ok(Appended::Stored { .. }) => stored += 1,
            Ok(other) => panic!("{other:?}"),
            Err(e) => break e,
        }
        assert!(stored < 100_000, "never refused");
    };
    assert!(
        matches!(refused, SpoolError::Backlog { bytes } if bytes <= memory && bytes + one > memory),
        "{refused:?}"
    );
    let st = spool.stats();
    assert!(st.write_failing);
    // The write an append tried at WRITE_CHUNK bytes, and the refusal.
    assert_eq!(st.write_errors, 2, "{st:?}");
    assert!(layout(dir.path()).iter().all(|(_, r)| r.is_empty()));
    // Everything waiting for the disk is readable from memory meanwhile.
    let mut reader = spool.reader();
    let got = take_ready(&mut reader);
    assert_eq!(got.len() as u64, stored);
    assert!(spool.flush().is_err(), "still full");
    // The disk has room again: a flush writes what waited, each record once.
    full.store(false, std::sync::atomic::Ordering::Relaxed);
    spool.flush().expect("flush");
    assert!(!spool.stats().write_failing);
    spool.append(&rec("k", stored)).expect("append");
    spool.flush().expect("flush");
    drop((reader, spool));
    let (spool, recovery) = Spool::open(cfg(dir.path())).expect("reopen");
    assert_eq!(recovery.pending, stored + 1);
    let seqs: Vec<u64> = drain(&mut spool.reader()).iter().map(|g| g.1).collect();
    assert_eq!(seqs, (0..=stored).collect::<Vec<_>>());
}

#[test]
fn the_active_segment_is_reclaimed_by_the_checkpoint_once_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = segment::encoded_len(&rec("k", 0)) as u64;
    let (spool, _) = Spool::open(SpoolConfig {
        segment_bytes: one * 400,
        ..cfg(dir.path())
    })
    .expect("open");
    // Below an eighth of a segment it stays; above, it goes once everything is acknowledged.
    for n in 0..40 {
        spool.append(&rec("k", n)).expect("append");
    }
    let mut reader = spool.reader();
    for (id, _) in drain(&mut reader) {
        spool.ack(id);
    }
    let size = |seqs: std::ops::Range<u64>| -> u64 {
        seqs.map(|n| segment::encoded_len(&rec("k", n)) as u64)
            .sum()
    };
    spool.checkpoint(false).expect("checkpoint");
    assert_eq!(spool.stats().bytes_held, size(0..40), "small: kept");
    for n in 40..80 {
        spool.append(&rec("k", n)).expect("append");
    }
    let got = drain(&mut reader);
    let (last, _) = got[got.len() - 1];
    for (id, _) in &got[..got.len() - 1] {
        spool.ack(*id);
    }
    spool.checkpoint(false).expect("checkpoint");
    assert_eq!(
        spool.stats().bytes_held,
        size(0..80),
        "one record not acknowledged"
    );
    spool.ack(last);
    spool.checkpoint(false).expect("checkpoint");
    let st = spool.stats();
    assert_eq!((st.bytes_held, st.segments, st.records_held), (0, 1, 0));
    assert!(layout(dir.path()).is_empty(), "its file is gone");
    // Ids go on, in a new segment, after a restart too.
    let Appended::Stored { id } = spool.append(&rec("k", 80)).expect("append") else {
        panic!("stored");
    };
    assert_eq!(id, 81);
    drop((reader, spool));
    let (spool, recovery) = Spool::open(cfg(dir.path())).expect("reopen");
    assert_eq!(recovery.pending, 1);
    assert_eq!(drain(&mut spool.reader()), vec![(81, 80)]);
}

/// drop_oldest takes segments out under the lock and reads them after it: a record in flight
/// that the sink confirms in between is delivered; one it fails is sent again once it is read
/// (the reader waits for it rather than sending newer records first).
#[test]
fn in_doubt_records_failed_before_they_are_read_are_sent_again_once_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = three_segments_drop_oldest(dir.path());
    for n in 0..9 {
        spool.append(&rec("k", n)).expect("append");
    }
    spool.flush().expect("flush");
    let mut reader = spool.reader();
    let in_flight: Vec<u64> = (0..5)
        .map(|_| reader.try_next().expect("read").expect("record").0)
        .collect();
    // The first segment is written, the second one's last record only in memory.
    let detached = {
        let _file = spool.lock_file();
        let mut st = spool.lock();
        spool.detach_oldest(&mut st, 4 * segment::encoded_len(&rec("k", 0)) as u64)
    };
    assert_eq!(detached.len(), 2);
    let st = spool.stats();
    assert_eq!((st.in_doubt, st.dropped_oldest), (5, 0), "{st:?}");
    // Before they are read: one is confirmed, then the sink fails the rest and rewinds.
    spool.ack(in_flight[1]);
    reader.rewind();
    assert!(
        reader.try_next().expect("read").is_none(),
        "waits for the in-doubt records, sends nothing newer first"
    );
    let lost_now: Vec<u64> = spool.read_detached(detached).iter().map(seq).collect();
    assert_eq!(lost_now, vec![5], "never handed out: lost now");
    assert!(spool.take_lost().is_empty(), "the rest is held whole");
    let resent: Vec<u64> = (0..4)
        .map(|_| seq(&reader.try_next().expect("read").expect("record").1))
        .collect();
    assert_eq!(resent, vec![0, 2, 3, 4]);
    let st = spool.stats();
    assert_eq!(
        (
            st.in_doubt,
            st.dropped_oldest,
            st.acknowledged,
            st.damaged_records
        ),
        (4, 1, 1, 0)
    );
    assert_eq!(layout(dir.path()).len(), 1, "both files deleted");
    let again: Vec<u64> = drain(&mut reader).iter().map(|g| g.1).collect();
    assert_eq!(again, vec![6, 7, 8]);
}

/// A waker that counts its wakes.
struct CountWakes(std::sync::atomic::AtomicUsize);

impl std::task::Wake for CountWakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_reader_waiting_for_a_write_is_woken_by_the_flush() {
    use std::future::Future;
    use std::task::{Context, Poll};
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(cfg(dir.path())).expect("open");
    let mut reader = spool.reader();
    let wakes = Arc::new(CountWakes(std::sync::atomic::AtomicUsize::new(0)));
    let waker = std::task::Waker::from(Arc::clone(&wakes));
    let mut cx = Context::from_waker(&waker);
    let woken = || wakes.0.load(std::sync::atomic::Ordering::SeqCst);
    let mut next = Box::pin(reader.next());
    assert!(next.as_mut().poll(&mut cx).is_pending());
    // Appended, but not in memory (the tail is too small) and not written: still waiting.
    spool.append(&rec("k", 1)).expect("append");
    assert_eq!(woken(), 1, "the append wakes it");
    assert!(next.as_mut().poll(&mut cx).is_pending());
    spool.flush().expect("flush");
    assert_eq!(woken(), 2, "the flush that wrote it wakes it");
    let Poll::Ready(Ok((_, r))) = next.as_mut().poll(&mut cx) else {
        panic!("the record is read");
    };
    assert_eq!(seq(&r), 1);
}
