use super::*;

fn rec(key: &str, n: u64) -> Record {
    Record {
        key: Bytes::copy_from_slice(key.as_bytes()),
        meta: Meta {
            seq: n,
            ..Meta::default()
        },
        payload: Bytes::from(vec![b'x'; 100]),
    }
}

fn seq(r: &Record) -> u64 {
    r.meta.seq
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
    // Every record is the same size: nine fit, and each third past them drops a segment.
    for n in 0..15 {
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
    assert_eq!(seqs, (6..15).collect::<Vec<_>>());
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

/// Records 0..6 appended and written; the sink takes 0..4 in flight (their ids returned), 4..
/// are not handed out yet. The caller's next appends make drop_oldest delete the first two
/// segments (0..6): 0..4 in doubt, 4 and 5 lost at once.
fn four_in_flight(spool: &Spool) -> (Reader, Vec<u64>) {
    for n in 0..6 {
        spool.append(&rec("k", n)).expect("append");
    }
    spool.flush().expect("flush");
    let mut reader = spool.reader();
    let ids = (0..4)
        .map(|_| reader.try_next().expect("read").expect("record").0)
        .collect();
    (reader, ids)
}

/// drop_oldest deleting records the sink has in flight: those the sink then confirms were
/// delivered, not lost; those it fails (the reader rewinds) are sent again, first and in order,
/// until the sink confirms them.
#[test]
fn records_deleted_while_in_flight_are_sent_again_if_the_sink_fails_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = three_segments_drop_oldest(dir.path());
    let (mut reader, in_flight) = four_in_flight(&spool);
    let mut lost_now = Vec::new();
    for n in 6..15 {
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
    spool.ack(in_flight[0]);
    spool.ack(in_flight[2]);
    assert!(
        spool.take_lost().is_empty(),
        "nothing known lost before the rewind"
    );
    reader.rewind();
    spool.flush().expect("flush");
    assert!(spool.take_lost().is_empty(), "held whole: nothing lost");
    // 1 and 3 first, whole, then the rest from the oldest record still held.
    let first = reader.try_next().expect("read").expect("record");
    assert_eq!(
        (first.0, &first.1.payload),
        (in_flight[1], &rec("k", 1).payload)
    );
    // Failed again (the broker is still away): sent again again.
    reader.rewind();
    let again = drain(&mut reader);
    let seqs: Vec<u64> = again.iter().map(|g| g.1).collect();
    assert_eq!(seqs, [1, 3].into_iter().chain(6..15).collect::<Vec<_>>());
    assert_eq!(
        (again[0].0, again[1].0),
        (in_flight[1], in_flight[3]),
        "their own ids"
    );
    for (id, _) in &again {
        spool.ack(*id);
    }
    let st = spool.stats();
    assert_eq!(
        (st.in_doubt, st.dropped_oldest, st.acknowledged),
        (0, 2, 13)
    );
    assert_eq!(spool.lock().in_doubt_bytes, 0);
    assert!(spool.take_lost().is_empty());
}

/// At shutdown, in-doubt records the sink has not confirmed are given up: lost, reported once,
/// by their metadata.
#[test]
fn in_doubt_records_given_up_at_shutdown_are_reported_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = three_segments_drop_oldest(dir.path());
    let (_reader, in_flight) = four_in_flight(&spool);
    for n in 6..15 {
        spool.append(&rec("k", n)).expect("append");
    }
    spool.ack(in_flight[0]);
    assert_eq!(spool.stats().in_doubt, 3);
    assert_eq!(spool.abandon_in_doubt(), 3);
    let lost = spool.take_lost();
    assert_eq!(lost.iter().map(seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(lost.iter().all(|r| r.payload.is_empty()), "metadata only");
    assert!(spool.take_lost().is_empty(), "reported once");
    let st = spool.stats();
    assert_eq!(
        (st.in_doubt, st.dropped_oldest),
        (0, 5),
        "4 and 5 never sent, 1..=3"
    );
    assert_eq!(spool.lock().in_doubt_bytes, 0);
}

/// In-doubt records are held whole only up to `in_doubt_bytes`; past it, only their metadata,
/// and one the sink then fails is lost, reported once as in doubt.
#[test]
fn in_doubt_records_past_the_memory_bound_are_lost_if_the_sink_fails_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = segment::encoded_len(&rec("k", 0)) as u64;
    let (spool, _) = Spool::open(SpoolConfig {
        segment_bytes: one * 3,
        max_bytes: one * 9,
        when_full: WhenFull::DropOldest,
        // Room for two records' key and payload.
        in_doubt_bytes: 2 * Doubt::held_bytes(&rec("k", 0)),
        ..cfg(dir.path())
    })
    .expect("open");
    let (mut reader, _) = four_in_flight(&spool);
    for n in 6..15 {
        spool.append(&rec("k", n)).expect("append");
    }
    assert_eq!(spool.stats().in_doubt, 4);
    reader.rewind();
    // 0 and 1 held whole and sent again; 2 and 3 known by their metadata only: lost.
    let got: Vec<u64> = drain(&mut reader).iter().map(|g| g.1).collect();
    assert_eq!(got, [0, 1].into_iter().chain(6..15).collect::<Vec<_>>());
    let lost: Vec<u64> = spool.take_lost().iter().map(seq).collect();
    assert_eq!(lost, vec![2, 3]);
    assert!(spool.take_lost().is_empty(), "reported once");
    assert_eq!(
        spool.stats().dropped_oldest,
        4,
        "4 and 5 never sent, 2 and 3"
    );
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

/// A record as the pipeline stamps it: `server`, `epoch` and `seq`.
fn stamped(server: &str, epoch: u64, seq: u64) -> Record {
    Record {
        key: Bytes::copy_from_slice(server.as_bytes()),
        meta: Meta {
            server: Bytes::copy_from_slice(server.as_bytes()),
            epoch,
            seq,
            ..Meta::default()
        },
        payload: Bytes::from(vec![b'x'; 100]),
    }
}

type Key = (String, u64, u64);

fn key_of(r: &Record) -> Key {
    (
        String::from_utf8_lossy(&r.meta.server).into_owned(),
        r.meta.epoch,
        r.meta.seq,
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

mod damage;
mod file_io;
mod upgrade;
