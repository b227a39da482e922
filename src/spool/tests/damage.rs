//! Damage found on disk or at runtime: what it costs, how it is reported.

use super::*;

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
    let with_gap = |mut r: Record, epoch: u64, first_seq: u64, last_seq: u64| {
        r.meta.gap = Some(GapRange {
            epoch,
            first_seq,
            last_seq,
        });
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
