use super::*;

fn rec(key: &str, n: u64) -> Record {
    Record {
        key: Bytes::copy_from_slice(key.as_bytes()),
        headers: vec![("seq".into(), Bytes::from(n.to_string()))],
        payload: Bytes::from(vec![b'x'; 100]),
    }
}

fn seq(r: &Record) -> u64 {
    r.header("seq")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Records are read back from the files (no memory tail), unless a test says otherwise.
fn cfg(dir: &Path) -> SpoolConfig {
    SpoolConfig {
        segment_bytes: 1000,
        max_bytes: 100_000,
        fsync: Fsync::Never,
        memory_bytes: 1,
        ..SpoolConfig::new(dir)
    }
}

/// Write what was appended (the reader never does), then read everything there is.
fn drain(reader: &mut Reader) -> Vec<(u64, u64)> {
    reader.spool().flush().expect("flush");
    let mut out = Vec::new();
    while let Some((id, r)) = reader.try_next().expect("reads") {
        out.push((id, seq(&r)));
    }
    out
}

#[test]
fn appended_records_are_read_in_order_across_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, rec0) = Spool::open(cfg(dir.path())).expect("open");
    assert_eq!(rec0, Recovery::default());
    for n in 0..50 {
        assert!(matches!(
            spool.append(&rec("k", n)).expect("append"),
            Appended::Stored { .. }
        ));
    }
    let mut reader = spool.reader();
    let got = drain(&mut reader);
    assert_eq!(
        got.iter().map(|g| g.1).collect::<Vec<_>>(),
        (0..50).collect::<Vec<_>>()
    );
    assert!(spool.stats().segments > 5, "small segments rotate");
    // Nothing more until something is appended.
    assert!(reader.try_next().expect("ok").is_none());
    spool.append(&rec("k", 50)).expect("append");
    assert_eq!(
        drain(&mut reader).iter().map(|g| g.1).collect::<Vec<_>>(),
        vec![50]
    );
}

#[test]
fn acknowledged_segments_are_deleted_and_the_rest_replays_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (spool, _) = Spool::open(cfg(dir.path())).expect("open");
        for n in 0..40 {
            spool.append(&rec("k", n)).expect("append");
        }
        let mut reader = spool.reader();
        let got = drain(&mut reader);
        // Acknowledge the first 30 out of order, and one far ahead.
        for (id, _) in got[..30].iter().rev() {
            spool.ack(*id);
        }
        spool.ack(got[35].0);
        let held = spool.stats();
        assert_eq!(held.records_held, 9);
        assert!(
            held.segments < 8,
            "segments below the floor are gone: {held:?}"
        );
        spool.checkpoint(true).expect("checkpoint");
    }
    let (spool, recovery) = Spool::open(cfg(dir.path())).expect("reopen");
    assert_eq!(
        recovery.pending, 10,
        "the floor was persisted; 30..40 are pending"
    );
    let mut reader = spool.reader();
    let seqs: Vec<u64> = drain(&mut reader).iter().map(|g| g.1).collect();
    assert_eq!(
        seqs,
        (30..40).collect::<Vec<_>>(),
        "an ack above the floor may be resent"
    );
    // Ids keep growing across restarts.
    let Appended::Stored { id } = spool.append(&rec("k", 99)).expect("append") else {
        panic!("stored");
    };
    assert_eq!(id, 41);
}

#[test]
fn a_torn_tail_is_cut_off_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (spool, _) = Spool::open(SpoolConfig {
            segment_bytes: 1 << 20,
            ..cfg(dir.path())
        })
        .expect("open");
        for n in 0..5 {
            spool.append(&rec("k", n)).expect("append");
        }
        spool.checkpoint(false).expect("flush");
    }
    let seg = dir.path().join(segment::file_name(1));
    let len = fs::metadata(&seg).expect("segment").len();
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .and_then(|f| f.set_len(len - 10))
        .expect("tear");
    let (spool, recovery) = Spool::open(cfg(dir.path())).expect("reopen");
    assert_eq!(recovery.pending, 4);
    assert!(recovery.torn_bytes > 0);
    let mut reader = spool.reader();
    assert_eq!(drain(&mut reader).len(), 4);
}

#[test]
fn rewind_resends_unacknowledged_records_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(cfg(dir.path())).expect("open");
    for n in 0..10 {
        spool.append(&rec("k", n)).expect("append");
    }
    let mut reader = spool.reader();
    let got = drain(&mut reader);
    spool.ack(got[0].0);
    spool.ack(got[2].0);
    reader.rewind();
    let again: Vec<u64> = drain(&mut reader).iter().map(|g| g.1).collect();
    assert_eq!(again, vec![1, 3, 4, 5, 6, 7, 8, 9]);
}

#[test]
fn the_in_flight_window_is_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(SpoolConfig {
        max_in_flight: 3,
        ..cfg(dir.path())
    })
    .expect("open");
    for n in 0..10 {
        spool.append(&rec("k", n)).expect("append");
    }
    let mut reader = spool.reader();
    let first = drain(&mut reader);
    assert_eq!(first.len(), 3);
    spool.ack(first[0].0);
    assert_eq!(drain(&mut reader).len(), 1);
}

#[test]
fn drop_newest_refuses_and_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = segment::encoded_len(&rec("k", 0)) as u64;
    let (spool, _) = Spool::open(SpoolConfig {
        max_bytes: one * 5,
        when_full: WhenFull::DropNewest,
        ..cfg(dir.path())
    })
    .expect("open");
    let outcomes: Vec<Appended> = (0..8)
        .map(|n| spool.append(&rec("k", n)).expect("append"))
        .collect();
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == Appended::DroppedNewest)
            .count(),
        3
    );
    assert_eq!(spool.stats().dropped_newest, 3);
    let mut reader = spool.reader();
    for (id, _) in drain(&mut reader) {
        spool.ack(id);
    }
    assert!(matches!(
        spool.append(&rec("k", 9)).expect("append"),
        Appended::Stored { .. }
    ));
}

/// A spool of three segments of three records each that drops the oldest when full.
fn three_segments_drop_oldest(dir: &Path) -> Spool {
    let one = segment::encoded_len(&rec("k", 0)) as u64;
    let (spool, _) = Spool::open(SpoolConfig {
        segment_bytes: one * 3,
        max_bytes: one * 9,
        when_full: WhenFull::DropOldest,
        ..cfg(dir)
    })
    .expect("open");
    spool
}

#[test]
fn drop_oldest_deletes_the_oldest_segment_and_reports_its_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = three_segments_drop_oldest(dir.path());
    let mut lost = Vec::new();
    for n in 0..12 {
        if let Appended::StoredDroppingOldest { dropped, .. } =
            spool.append(&rec("k", n)).expect("append")
        {
            lost.extend(dropped.iter().map(seq));
        }
    }
    assert_eq!(lost, vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(spool.stats().dropped_oldest, 6);
    let mut reader = spool.reader();
    let seqs: Vec<u64> = drain(&mut reader).iter().map(|g| g.1).collect();
    assert_eq!(seqs, (6..12).collect::<Vec<_>>());
}

#[test]
fn a_record_larger_than_the_cap_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(SpoolConfig {
        max_bytes: 50,
        ..cfg(dir.path())
    })
    .expect("open");
    assert!(matches!(
        spool.append(&rec("k", 1)),
        Err(SpoolError::TooLarge { .. })
    ));
}

#[tokio::test]
async fn the_reader_waits_for_appends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(cfg(dir.path())).expect("open");
    let mut reader = spool.reader();
    let writer = spool.clone();
    let task = tokio::spawn(async move {
        tokio::task::yield_now().await;
        writer.append(&rec("k", 7)).expect("append");
        // Not in memory (the tail is too small for it): readable once written.
        tokio::task::yield_now().await;
        writer.flush().expect("flush");
    });
    let (_, r) = reader.next().await.expect("next");
    assert_eq!(seq(&r), 7);
    task.await.expect("join");
}

#[derive(Clone, Debug)]
enum Op {
    Append,
    Read,
    /// Acknowledge the i-th record read and not yet acknowledged (modulo their number).
    Ack(usize),
    Rewind,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        4 => Just(Op::Append),
        4 => Just(Op::Read),
        3 => any::<usize>().prop_map(Op::Ack),
        1 => Just(Op::Rewind),
    ]
}

/// Run `ops` on a spool; what the reader returned, in order.
fn replay(dir: &Path, memory_bytes: u64, when_full: WhenFull, ops: &[Op]) -> Vec<(u64, u64)> {
    let one = segment::encoded_len(&rec("k", 0)) as u64;
    let (spool, _) = Spool::open(SpoolConfig {
        segment_bytes: one * 4,
        max_bytes: one * 16,
        when_full,
        max_in_flight: 10,
        memory_bytes,
        ..cfg(dir)
    })
    .expect("open");
    let mut reader = spool.reader();
    let (mut n, mut read, mut unacked) = (0, Vec::new(), Vec::new());
    for op in ops {
        match op {
            Op::Append => {
                spool.append(&rec("k", n)).expect("append");
                n += 1;
            }
            Op::Read => {
                // Read what was appended: from the files, the reader needs it written.
                spool.flush().expect("flush");
                if let Some((id, r)) = reader.try_next().expect("read") {
                    read.push((id, seq(&r)));
                    unacked.push(id);
                }
            }
            Op::Ack(i) if !unacked.is_empty() => {
                let id = unacked.remove(i % unacked.len());
                spool.ack(id);
            }
            Op::Ack(_) => {}
            Op::Rewind => {
                reader.rewind();
                unacked.clear();
            }
        }
    }
    read
}

proptest::proptest! {
    /// Whether a record comes from the memory tail or back from its file is invisible: any
    /// mix of appends, reads, acknowledgements (in any order), rewinds and drops reads the
    /// same records in the same order as with no tail at all.
    #[test]
    fn the_memory_tail_reads_what_the_files_hold(
        ops in proptest::collection::vec(op(), 1..200),
        tail_records in 1u64..8,
        drop_oldest in proptest::bool::ANY,
    ) {
        let when_full = if drop_oldest { WhenFull::DropOldest } else { WhenFull::DropNewest };
        let one = segment::encoded_len(&rec("k", 0)) as u64;
        let dir = tempfile::tempdir().expect("tempdir");
        let from_files = replay(&dir.path().join("files"), 1, when_full, &ops);
        let with_tail = replay(&dir.path().join("tail"), one * tail_records, when_full, &ops);
        proptest::prop_assert_eq!(from_files, with_tail);
    }
}

#[test]
fn a_reader_that_keeps_up_reads_from_memory_and_a_late_one_from_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = segment::encoded_len(&rec("k", 0)) as u64;
    let (spool, _) = Spool::open(SpoolConfig {
        memory_bytes: one * 4,
        ..cfg(dir.path())
    })
    .expect("open");
    for n in 0..10 {
        spool.append(&rec("k", n)).expect("append");
    }
    {
        let st = spool.lock();
        assert_eq!(st.tail.len(), 4, "bounded by memory_bytes");
        assert_eq!(st.tail.front().map(|t| seq(&t.2)), Some(6));
    }
    let mut reader = spool.reader();
    // The first six from the files, the last four from memory.
    let got = drain(&mut reader);
    assert_eq!(
        got.iter().map(|g| g.1).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    // Acknowledged records leave memory, once every record before them is acknowledged.
    spool.ack(got[9].0);
    assert_eq!(spool.lock().tail.len(), 4);
    for (id, _) in &got[..9] {
        spool.ack(*id);
    }
    assert!(spool.lock().tail.is_empty(), "{:?}", spool.lock().tail);
}

/// drop_oldest deleting records the sink has in flight: those the sink then confirms were
/// delivered, not lost; those it fails (the reader rewinds) are lost, reported once.
#[test]
fn records_deleted_while_in_flight_are_lost_only_if_the_sink_fails_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = three_segments_drop_oldest(dir.path());
    for n in 0..6 {
        spool.append(&rec("k", n)).expect("append");
    }
    spool.flush().expect("flush");
    // The sink takes 0..4 in flight; 4.. are not handed out yet.
    let mut reader = spool.reader();
    let in_flight: Vec<(u64, u64)> = (0..4)
        .map(|_| {
            let (id, r) = reader.try_next().expect("read").expect("record");
            (id, seq(&r))
        })
        .collect();
    // The cap deletes the first two segments (0..6): 0..4 are in doubt, 4 and 5 lost now.
    let mut lost_now = Vec::new();
    for n in 6..12 {
        if let Appended::StoredDroppingOldest { dropped, .. } =
            spool.append(&rec("k", n)).expect("append")
        {
            lost_now.extend(dropped.iter().map(seq));
        }
    }
    assert_eq!(lost_now, vec![4, 5]);
    assert_eq!(spool.stats().in_doubt, 4);
    assert_eq!(spool.stats().dropped_oldest, 2);
    // The sink confirms 0 and 2, fails 1 and 3, and rewinds.
    spool.ack(in_flight[0].0);
    spool.ack(in_flight[2].0);
    assert!(
        spool.take_lost().is_empty(),
        "nothing known lost before the rewind"
    );
    reader.rewind();
    let lost_later: Vec<u64> = spool.take_lost().iter().map(seq).collect();
    assert_eq!(lost_later, vec![1, 3]);
    assert!(spool.take_lost().is_empty(), "reported once");
    let st = spool.stats();
    assert_eq!((st.in_doubt, st.dropped_oldest, st.acknowledged), (0, 4, 2));
    // The rest is read again from the oldest record still held.
    let again: Vec<u64> = drain(&mut reader).iter().map(|g| g.1).collect();
    assert_eq!(again, (6..12).collect::<Vec<_>>());
}

#[test]
fn closed_segments_wait_for_the_checkpoint_to_be_synced_outside_the_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(SpoolConfig {
        fsync: Fsync::Interval(Duration::from_secs(1)),
        ..cfg(dir.path())
    })
    .expect("open");
    for n in 0..40 {
        spool.append(&rec("k", n)).expect("append");
    }
    assert!(
        spool.lock_file().to_sync.is_empty(),
        "nothing written before the flush"
    );
    spool.flush().expect("flush");
    {
        let segments = spool.lock().segments.len();
        let file = spool.lock_file();
        assert!(segments > 2, "rotated: {segments}");
        assert_eq!(file.to_sync.len(), segments - 1, "each closed segment");
        assert!(file.unsynced, "the active segment has writes");
    }
    spool.checkpoint(false).expect("flush only");
    assert!(
        !spool.lock_file().to_sync.is_empty(),
        "a flush syncs nothing"
    );
    spool.checkpoint(true).expect("checkpoint");
    {
        let file = spool.lock_file();
        assert!(file.to_sync.is_empty() && !file.unsynced);
    }
    spool.append(&rec("k", 40)).expect("append");
    spool.flush().expect("flush");
    assert!(
        spool.lock_file().unsynced,
        "a later write is unsynced again"
    );
    drop(spool);
    let (spool, recovery) = Spool::open(cfg(dir.path())).expect("reopen");
    assert_eq!(recovery.pending, 41);
    let seqs: Vec<u64> = drain(&mut spool.reader()).iter().map(|g| g.1).collect();
    assert_eq!(seqs, (0..41).collect::<Vec<_>>());

    // With fsync off nothing waits to be synced.
    let other = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(cfg(other.path())).expect("open");
    for n in 0..40 {
        spool.append(&rec("k", n)).expect("append");
    }
    spool.flush().expect("flush");
    assert!(spool.lock_file().to_sync.is_empty());
}

// Damage: records whose bytes were flipped or cut off on disk.

/// A record as the pipeline stamps it: `server`, `epoch` and `seq` headers.
fn stamped(server: &str, epoch: u64, seq: u64) -> Record {
    Record {
        key: Bytes::copy_from_slice(server.as_bytes()),
        headers: vec![
            ("server".into(), Bytes::copy_from_slice(server.as_bytes())),
            ("epoch".into(), Bytes::from(epoch.to_string())),
            ("seq".into(), Bytes::from(seq.to_string())),
        ],
        payload: Bytes::from(vec![b'x'; 100]),
    }
}

type Key = (String, u64, u64);

fn key_of(r: &Record) -> Key {
    let s = segment::stamp(r).expect("stamped");
    (
        String::from_utf8_lossy(&s.server).into_owned(),
        s.epoch,
        s.seq,
    )
}

/// Two interleaved streams, `pbx1` epoch 7 (two records of three) and `pbx2` epoch 9, `n`
/// records appended to a spool of small segments and flushed; each record's key, by id.
fn two_streams(spool: &Spool, n: u64) -> BTreeMap<u64, Key> {
    let (mut a, mut b) = (0, 0);
    let mut by_id = BTreeMap::new();
    for i in 0..n {
        let r = if i % 3 == 2 {
            b += 1;
            stamped("pbx2", 9, b)
        } else {
            a += 1;
            stamped("pbx1", 7, a)
        };
        let Appended::Stored { id } = spool.append(&r).expect("append") else {
            panic!("stored");
        };
        by_id.insert(id, key_of(&r));
    }
    spool.flush().expect("flush");
    by_id
}

/// (offset, length, id) of a record in a segment file.
type Placed = (u64, u64, u64);

/// Every segment file, oldest first, with where each of its records is.
fn layout(dir: &Path) -> Vec<(PathBuf, Vec<Placed>)> {
    segment::list(dir)
        .expect("dir")
        .into_iter()
        .map(|(_, p)| {
            let mut r = SegmentReader::open(&p).expect("open");
            let mut records = Vec::new();
            loop {
                let at = r.offset();
                match r.read_next() {
                    Ok(Some((id, _))) => records.push((at, r.offset() - at, id)),
                    _ => break,
                }
            }
            (p, records)
        })
        .collect()
}

fn flip(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).expect("read");
    bytes[offset as usize] ^= 0x5a;
    fs::write(path, bytes).expect("write");
}

/// The seq ranges `keys` make, as the spool reports damaged ones.
fn ranges(mut keys: Vec<Key>) -> Vec<DamagedRange> {
    keys.sort();
    let mut out: Vec<DamagedRange> = Vec::new();
    for (server, epoch, seq) in keys {
        match out.last_mut() {
            Some(r) if r.server == server && r.epoch == epoch && r.last_seq + 1 == seq => {
                r.last_seq = seq;
            }
            _ => out.push(DamagedRange {
                server,
                epoch,
                first_seq: seq,
                last_seq: seq,
            }),
        }
    }
    out
}

/// Read everything, acknowledging as it goes; the keys read.
fn deliver(reader: &mut Reader) -> Vec<Key> {
    reader.spool().flush().expect("flush");
    let mut out = Vec::new();
    while let Some((id, r)) = reader.try_next().expect("reads") {
        out.push(key_of(&r));
        reader.spool().ack(id);
    }
    out
}

fn persisted_floor(dir: &Path) -> u64 {
    fs::read_to_string(dir.join(ACK_FILE))
        .expect("ack file")
        .trim()
        .parse()
        .expect("a number")
}

#[test]
fn a_flipped_byte_in_a_middle_segment_costs_its_record_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let by_id = {
        let (spool, _) = Spool::open(cfg(dir.path())).expect("open");
        two_streams(&spool, 40)
    };
    let segs = layout(dir.path());
    assert!(segs.len() >= 5, "{} segments", segs.len());
    let (path, records) = &segs[2];
    let (offset, len, lost_id) = records[2];
    flip(path, offset + len / 2);

    let (spool, recovery) = Spool::open(SpoolConfig {
        max_in_flight: 3,
        ..cfg(dir.path())
    })
    .expect("reopen");
    assert_eq!(
        (recovery.damaged_records, recovery.damaged_bytes),
        (1, len),
        "{recovery:?}"
    );
    assert_eq!(recovery.pending, 39);
    assert_eq!(recovery.torn_bytes, 0);
    assert_eq!(fs::metadata(path).expect("kept").len(), {
        let bytes: u64 = records.iter().map(|r| r.1).sum();
        bytes
    });
    let lost = by_id[&lost_id].clone();
    assert_eq!(spool.take_damaged(), ranges(vec![lost.clone()]));
    assert!(spool.take_damaged().is_empty(), "taken once");
    // Delivery goes on past the hole, three in flight at a time.
    let got = deliver(&mut spool.reader());
    let want: Vec<Key> = by_id.values().filter(|k| **k != lost).cloned().collect();
    assert_eq!(got, want);
    // The floor passed the hole: nothing is held, every segment but the active one is gone,
    // and the next start finds nothing to resend or report.
    let st = spool.stats();
    assert_eq!(
        (st.records_held, st.damaged_records, st.damaged_bytes),
        (0, 1, len)
    );
    spool.checkpoint(true).expect("checkpoint");
    assert_eq!(persisted_floor(dir.path()), 41);
    assert_eq!(layout(dir.path()).len(), 1);
    drop(spool);
    let (spool, recovery) = Spool::open(cfg(dir.path())).expect("reopen");
    assert_eq!(recovery, Recovery::default());
    assert!(spool.take_damaged().is_empty());
}

#[test]
fn a_truncated_middle_segment_loses_its_tail_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let by_id = {
        let (spool, _) = Spool::open(cfg(dir.path())).expect("open");
        two_streams(&spool, 40)
    };
    let segs = layout(dir.path());
    // One segment cut inside its third record, another at a record boundary.
    let (cut, records) = &segs[1];
    let (offset, _, first_lost) = records[2];
    let size: u64 = records.iter().map(|r| r.1).sum();
    OpenOptions::new()
        .write(true)
        .open(cut)
        .and_then(|f| f.set_len(offset + 5))
        .expect("truncate");
    let (boundary, records3) = &segs[3];
    let (offset3, _, first_lost3) = records3[records3.len() - 2];
    OpenOptions::new()
        .write(true)
        .open(boundary)
        .and_then(|f| f.set_len(offset3))
        .expect("truncate");
    let next_first = |i: usize| segs[i + 1].1[0].2;
    let lost_ids: Vec<u64> = (first_lost..next_first(1))
        .chain(first_lost3..next_first(3))
        .collect();
    assert_eq!(lost_ids.len(), records.len() - 2 + 2);

    let (spool, recovery) = Spool::open(cfg(dir.path())).expect("reopen");
    assert_eq!(recovery.damaged_records, lost_ids.len() as u64);
    assert_eq!(recovery.damaged_bytes, 5, "what was left of the cut record");
    assert_eq!(recovery.pending, 40 - lost_ids.len() as u64);
    assert!(size > offset + 5);
    let lost: Vec<Key> = lost_ids.iter().map(|id| by_id[id].clone()).collect();
    assert_eq!(spool.take_damaged(), ranges(lost.clone()));
    let got = deliver(&mut spool.reader());
    let want: Vec<Key> = by_id
        .values()
        .filter(|k| !lost.contains(k))
        .cloned()
        .collect();
    assert_eq!(got, want);
    assert_eq!(spool.stats().records_held, 0);
}

#[test]
fn damage_in_the_active_segment_is_skipped_at_runtime() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(SpoolConfig {
        segment_bytes: 1 << 20,
        max_in_flight: 4,
        ..cfg(dir.path())
    })
    .expect("open");
    let by_id = two_streams(&spool, 12);
    let segs = layout(dir.path());
    assert_eq!(segs.len(), 1, "one active segment");
    let (path, records) = &segs[0];
    // Two neighbours damaged under the running spool, one of each stream.
    let lost_ids = [records[4].2, records[5].2];
    flip(path, records[4].0 + 20);
    flip(path, records[5].0 + 3);
    let mut reader = spool.reader();
    let got = deliver(&mut reader);
    let lost: Vec<Key> = lost_ids.iter().map(|id| by_id[id].clone()).collect();
    let want: Vec<Key> = by_id
        .values()
        .filter(|k| !lost.contains(k))
        .cloned()
        .collect();
    assert_eq!(got, want);
    let st = spool.stats();
    assert_eq!(
        (
            st.damaged_records,
            st.damaged_bytes,
            st.damaged_unattributed
        ),
        (2, records[4].1 + records[5].1, 0)
    );
    assert_eq!(spool.take_damaged(), ranges(lost));
    // Appends go on, and so does delivery; nothing is held.
    for seq in 9..12 {
        spool.append(&stamped("pbx1", 7, seq)).expect("append");
    }
    assert_eq!(deliver(&mut reader).len(), 3);
    assert_eq!(spool.stats().records_held, 0);
    assert_eq!(spool.stats().damaged_records, 2, "counted once");
}

#[test]
fn a_bad_last_record_of_the_active_segment_waits_for_what_follows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(SpoolConfig {
        segment_bytes: 1 << 20,
        ..cfg(dir.path())
    })
    .expect("open");
    let by_id = two_streams(&spool, 5);
    let (path, records) = layout(dir.path()).remove(0);
    let (offset, len, lost_id) = records[4];
    flip(&path, offset + len - 1);
    let mut reader = spool.reader();
    assert_eq!(deliver(&mut reader).len(), 4);
    // Nothing valid after it yet: as a torn tail, it is waited on, not skipped.
    assert_eq!(spool.stats().damaged_records, 0);
    assert_eq!(spool.stats().records_held, 1);
    // The next append shows it was damage.
    spool.append(&stamped("pbx1", 7, 5)).expect("append");
    let got = deliver(&mut reader);
    assert_eq!(got, vec![("pbx1".to_owned(), 7, 5)]);
    assert_eq!(spool.stats().damaged_records, 1);
    assert_eq!(spool.stats().records_held, 0);
    assert_eq!(spool.take_damaged(), ranges(vec![by_id[&lost_id].clone()]));
}

/// The same damage, found at runtime first and again on the next open: counted and reported
/// once per finding, and a rewind does not count it again.
#[test]
fn damage_found_at_runtime_is_counted_once_and_found_again_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(cfg(dir.path())).expect("open");
    let by_id = two_streams(&spool, 30);
    let segs = layout(dir.path());
    let (offset, len, lost_id) = segs[2].1[1];
    flip(&segs[2].0, offset + len / 3);
    let lost = ranges(vec![by_id[&lost_id].clone()]);
    let mut reader = spool.reader();
    assert_eq!(drain(&mut reader).len(), 29);
    assert_eq!(spool.stats().damaged_records, 1);
    reader.rewind();
    assert_eq!(
        drain(&mut reader).len(),
        29,
        "sent again, without the damaged one"
    );
    assert_eq!(spool.stats().damaged_records, 1, "not counted again");
    assert_eq!(spool.take_damaged(), lost);
    assert!(spool.take_damaged().is_empty());
    // Nothing was delivered: the floor is where it was, and the next open finds the damage
    // again (and the reader then skips it quietly).
    spool.checkpoint(true).expect("checkpoint");
    drop((reader, spool));
    let (spool, recovery) = Spool::open(cfg(dir.path())).expect("reopen");
    assert_eq!((recovery.damaged_records, recovery.pending), (1, 29));
    assert_eq!(spool.take_damaged(), lost);
    assert_eq!(deliver(&mut spool.reader()).len(), 29);
    assert_eq!(spool.stats().damaged_records, 1);
}

/// Several records wrecked at once, among gap records: the pipeline's own (seq 0, not
/// numbered) and a connection's (numbered, naming seqs it dropped before the spool saw them).
/// What the damaged records held is inferred exactly, and the connection's dropped range,
/// though it is a seq hole around the damage too, is not named again.
#[test]
fn inferred_ranges_are_exact_for_two_interleaved_streams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one_segment = SpoolConfig {
        segment_bytes: 1 << 20,
        ..cfg(dir.path())
    };
    let (spool, _) = Spool::open(one_segment.clone()).expect("open");
    // pbx1 1..=10 and pbx2 1..=4.
    let mut by_id = two_streams(&spool, 14);
    let with_gap = |mut r: Record, epoch: u64, first: u64, last: u64| {
        for (name, v) in [
            ("gap_epoch", epoch),
            ("gap_first_seq", first),
            ("gap_last_seq", last),
        ] {
            r.headers.push((name.into(), Bytes::from(v.to_string())));
        }
        r
    };
    // pbx1's spool-drop gap record (seq 0), two more pbx1 records, then pbx2's connection says
    // it dropped 5..=7 (its gap record is seq 8); then both streams go on.
    let mut next = vec![
        with_gap(stamped("pbx1", 7, 0), 3, 100, 101),
        stamped("pbx1", 7, 11),
        stamped("pbx1", 7, 12),
        with_gap(stamped("pbx2", 9, 8), 9, 5, 7),
    ];
    for i in 0..6 {
        next.push(stamped("pbx1", 7, 13 + i));
        next.push(stamped("pbx2", 9, 9 + i));
    }
    for r in next {
        let Appended::Stored { id } = spool.append(&r).expect("append") else {
            panic!("stored");
        };
        by_id.insert(id, key_of(&r));
    }
    spool.flush().expect("flush");
    drop(spool);
    // Wreck pbx1 10 through pbx1 12: four records, the seq-0 gap record among them.
    let (path, records) = layout(dir.path()).remove(0);
    let id_of = |k: (&str, u64)| {
        by_id
            .iter()
            .find(|(_, v)| v.0 == k.0 && v.2 == k.1)
            .map(|(id, _)| *id)
            .expect("stored")
    };
    let (from, to) = (id_of(("pbx1", 10)), id_of(("pbx1", 12)));
    assert_eq!(to - from, 3);
    let at = |id: u64| records.iter().find(|r| r.2 == id).expect("record");
    let mut bytes = fs::read(&path).expect("read");
    bytes[at(from).0 as usize..(at(to).0 + at(to).1) as usize].fill(0xee);
    fs::write(&path, &bytes).expect("write");

    let (spool, recovery) = Spool::open(one_segment).expect("reopen");
    assert_eq!(recovery.damaged_records, 4);
    assert_eq!(
        recovery.torn_bytes, 0,
        "valid records follow: skipped, not cut"
    );
    let pbx1 = |seq| ("pbx1".to_owned(), 7, seq);
    assert_eq!(
        spool.take_damaged(),
        ranges(vec![pbx1(10), pbx1(11), pbx1(12)])
    );
    // The seq-0 record explains no seq: counted as unattributed.
    assert_eq!(spool.stats().damaged_unattributed, 1);
    assert_eq!(deliver(&mut spool.reader()).len(), by_id.len() - 4);
}

/// Lost records no seq hole explains: a key whose first records are lost has records after
/// the damage only. When it is the only such key, the lost records are its first seqs; with two
/// such keys nobody can tell: unattributed.
#[test]
fn a_remainder_is_attributed_only_to_a_single_candidate() {
    let run = |late_key: bool| {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spool, _) = Spool::open(cfg(dir.path())).expect("open");
        // pbx1 throughout; pbx2's epoch 5 starts after twelve of them.
        for seq in 1..=30 {
            spool.append(&stamped("pbx1", 1, seq)).expect("append");
            if seq > 12 {
                spool.append(&stamped("pbx2", 5, seq - 12)).expect("append");
            }
        }
        if late_key {
            for seq in 50..53 {
                spool.append(&stamped("pbx3", 1, seq)).expect("append");
            }
        }
        spool.flush().expect("flush");
        drop(spool);
        let segs = layout(dir.path());
        // pbx1 13 is id 13, pbx2 1 id 14: cut its segment inside pbx2 1.
        let i = segs
            .iter()
            .position(|(_, r)| r.iter().any(|r| r.2 == 14))
            .expect("segment");
        let (path, records) = &segs[i];
        let at = records.iter().position(|r| r.2 == 14).expect("record");
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(records[at].0 + 10))
            .expect("truncate");
        let lost_ids = 14..segs[i + 1].1[0].2;
        let (spool, recovery) = Spool::open(cfg(dir.path())).expect("reopen");
        assert_eq!(recovery.damaged_records, lost_ids.end - lost_ids.start);
        // Ids 14.. alternate pbx2 and pbx1, pbx2 first.
        let pbx2: Vec<Key> = lost_ids
            .clone()
            .step_by(2)
            .map(|id| ("pbx2".to_owned(), 5, (id - 14) / 2 + 1))
            .collect();
        let pbx1: Vec<Key> = lost_ids
            .clone()
            .skip(1)
            .step_by(2)
            .map(|id| ("pbx1".to_owned(), 1, (id - 15) / 2 + 14))
            .collect();
        (spool, pbx1, pbx2)
    };
    let (spool, pbx1, pbx2) = run(false);
    assert!(!pbx1.is_empty() && !pbx2.is_empty());
    let all: Vec<Key> = pbx1.iter().chain(&pbx2).cloned().collect();
    assert_eq!(spool.take_damaged(), ranges(all));
    assert_eq!(spool.stats().damaged_unattributed, 0);

    let (spool, pbx1, pbx2) = run(true);
    assert_eq!(spool.take_damaged(), ranges(pbx1));
    assert_eq!(spool.stats().damaged_unattributed, pbx2.len() as u64);
}

/// drop_oldest deletes a segment between the reader's look at the segment list and its open:
/// the reader goes on with the next segment instead of failing.
#[test]
fn a_segment_deleted_under_the_reader_is_passed_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(cfg(dir.path())).expect("open");
    for n in 0..30 {
        spool.append(&rec("k", n)).expect("append");
    }
    spool.flush().expect("flush");
    let segs = layout(dir.path());
    let mut reader = spool.reader();
    fs::remove_file(&segs[0].0).expect("delete the oldest segment");
    let got = drain(&mut reader);
    let second_first = segs[1].1[0].2;
    assert_eq!(got.first().map(|g| g.0), Some(second_first));
    assert_eq!(got.len() as u64, 30 - segs[0].1.len() as u64);
    // In the middle of the reading too.
    reader.rewind();
    let (first, _) = reader.try_next().expect("reads").expect("a record");
    assert_eq!(first, second_first);
    fs::remove_file(&segs[2].0).expect("delete the segment after");
    reader.rewind();
    let after: Vec<u64> = drain(&mut reader).iter().map(|g| g.0).collect();
    assert!(after.contains(&second_first));
    assert!(!after.contains(&segs[2].1[0].2));
    assert_eq!(after.last(), got.last().map(|g| g.0).as_ref());
}

/// drop_oldest deletes a segment with a damaged record the reader never met: the records after
/// it are reported as dropped, and the damaged one is counted (unattributed: what it held is
/// not inferred under the lock).
#[test]
fn drop_oldest_reports_the_records_after_damage_in_the_segment_it_drops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = three_segments_drop_oldest(dir.path());
    for n in 0..9 {
        spool.append(&rec("k", n)).expect("append");
    }
    spool.flush().expect("flush");
    let (path, records) = layout(dir.path()).remove(0);
    assert_eq!(records.len(), 3);
    flip(&path, records[0].0 + records[0].1 / 2);
    let Appended::StoredDroppingOldest { dropped, .. } =
        spool.append(&rec("k", 9)).expect("append")
    else {
        panic!("the cap drops the first segment");
    };
    assert_eq!(dropped.iter().map(seq).collect::<Vec<_>>(), vec![1, 2]);
    let st = spool.stats();
    assert_eq!(
        (
            st.dropped_oldest,
            st.damaged_records,
            st.damaged_unattributed
        ),
        (2, 1, 1)
    );
    let seqs: Vec<u64> = drain(&mut spool.reader()).iter().map(|g| g.1).collect();
    assert_eq!(seqs, (3..10).collect::<Vec<_>>());
}

// The state lock and file I/O: writes hold the file mutex only; reads from memory, acks and
// appends go on meanwhile.

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

/// drop_oldest takes segments out under the lock and reads their headers after it: a record
/// in flight that the sink confirms or fails in between is still delivered or lost, once.
#[test]
fn in_doubt_records_decided_before_their_headers_are_read_are_reported_once() {
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
    // Before the headers are read: one is confirmed, then the reader rewinds past the rest.
    spool.ack(in_flight[1]);
    reader.rewind();
    assert!(
        spool.take_lost().is_empty(),
        "their headers are not read yet"
    );
    assert_eq!(spool.stats().dropped_oldest, 4);
    let lost_now: Vec<u64> = spool.read_detached(detached).iter().map(seq).collect();
    assert_eq!(lost_now, vec![5], "never handed out: lost now");
    let lost_later: Vec<u64> = spool.take_lost().iter().map(seq).collect();
    assert_eq!(lost_later, vec![0, 2, 3, 4]);
    let st = spool.stats();
    assert_eq!(
        (
            st.in_doubt,
            st.dropped_oldest,
            st.acknowledged,
            st.damaged_records
        ),
        (0, 5, 1, 0)
    );
    assert!(spool.lock().lost_unread.is_empty());
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
