//! Upgrading: a spool an older amibus wrote (format 1: bus headers) drains after the upgrade,
//! damage in it is still attributed from its neighbours, and new records (format 2) follow.

use super::*;

/// The records an older amibus spooled for pbx1's epoch 3, seqs 1..=10, the fifth a gap
/// record (its connection lost 20..=22 of epoch 2), with the metadata they should read back as.
fn old_records() -> Vec<Record> {
    (1..=10)
        .map(|seq| {
            let mut r = stamped("pbx1", 3, seq);
            r.meta.event = Bytes::from_static(b"Newexten");
            r.meta.kind = Kind::Event;
            r.meta.class = Bytes::from_static(b"dialplan");
            if seq == 5 {
                r.meta.event = Bytes::from_static(b"gap");
                r.meta.kind = Kind::Gap;
                r.meta.class = Bytes::from_static(b"amibus");
                r.meta.gap = Some(GapRange {
                    epoch: 2,
                    first_seq: 20,
                    last_seq: 22,
                });
            }
            r
        })
        .collect()
}

/// Write `records` with ids from `first_id` as one format 1 segment file.
fn write_v1_segment(dir: &Path, first_id: u64, records: &[Record]) -> PathBuf {
    let mut bytes = Vec::new();
    for (id, r) in (first_id..).zip(records) {
        format_v1::encode(id, &r.key, &r.meta, &r.payload, &mut bytes);
    }
    let path = dir.join(segment::file_name(first_id));
    fs::write(&path, bytes).expect("write");
    path
}

#[test]
fn a_spool_written_in_format_1_drains_after_the_upgrade() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = old_records();
    write_v1_segment(dir.path(), 1, &old[..5]);
    let second = write_v1_segment(dir.path(), 6, &old[5..]);
    // Damage one old record (id 8, seq 8) in the middle of the second segment.
    let (offset, len, id) = layout(dir.path())[1].1[2];
    assert_eq!(id, 8);
    flip(&second, offset + len / 2);

    let (spool, recovery) = Spool::open(cfg(dir.path())).expect("open");
    assert_eq!(recovery.damaged_records, 1, "{recovery:?}");
    assert_eq!(
        spool.take_damaged(),
        ranges(vec![("pbx1".into(), 3, 8)]),
        "attributed from format 1 neighbours"
    );
    // New records follow the old ones, in format 2.
    let new: Vec<Record> = (11..=12).map(|seq| stamped("pbx1", 3, seq)).collect();
    for r in &new {
        spool.append(r).expect("append");
    }
    spool.flush().expect("flush");
    let mut reader = spool.reader();
    let mut got = Vec::new();
    while let Some((id, r)) = reader.try_next().expect("reads") {
        got.push(Record::clone(&r));
        spool.ack(id);
    }
    let want: Vec<Record> = old
        .into_iter()
        .filter(|r| r.meta.seq != 8)
        .chain(new)
        .collect();
    assert_eq!(got, want, "key, typed metadata and payload of every record");
    // Delivered and acknowledged: the next start has nothing to resend.
    spool.checkpoint(true).expect("checkpoint");
    drop(spool);
    let (spool, recovery) = Spool::open(cfg(dir.path())).expect("reopen");
    assert_eq!(recovery, Recovery::default());
    assert!(spool.reader().try_next().expect("reads").is_none());
}
