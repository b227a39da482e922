use super::*;
use crate::ami::connection::DownstreamGaps;
use crate::ami::{Parsed, Parser};
use crate::spool::{Fsync, SpoolConfig, WhenFull};
use std::collections::{BTreeMap, BTreeSet};

fn frame_record(server: &str, epoch: u64, seq: u64, bytes: &[u8]) -> Stamped {
    let mut p = Parser::default();
    let Parsed::Frame { frame, .. } = p.parse(bytes) else {
        panic!("frame")
    };
    Stamped {
        stamp: Stamp {
            server: Arc::from(server),
            epoch,
            seq,
            received_at_ns: 1,
        },
        record: AmiRecord::Frame(frame.to_owned()),
    }
}

const VARSET: &[u8] =
    b"Event: VarSet\r\nPrivilege: dialplan,all\r\nVariable: X\r\nValue: 1\r\n\r\n";

/// A spool under `dir` whose cap holds `records` and a half [`VARSET`] records, in segments of
/// two.
fn spool_of_varsets(dir: &std::path::Path, records: u64, when_full: WhenFull) -> Spool {
    Spool::open(varsets_config(dir, records, when_full))
        .expect("open")
        .0
}

/// The configuration of [`spool_of_varsets`].
fn varsets_config(dir: &std::path::Path, records: u64, when_full: WhenFull) -> SpoolConfig {
    let one = {
        let (spool, _) = Spool::open(SpoolConfig::new(dir.join("probe"))).expect("open");
        let mut p = Pipeline::new(spool, PayloadFormat::Proto);
        crate::spool::segment::encoded_len(&p.to_spool_record(&frame_record("pbx1", 3, 1, VARSET)))
            as u64
    };
    SpoolConfig {
        max_bytes: one * records + one / 2,
        segment_bytes: one * 2,
        when_full,
        fsync: Fsync::Never,
        ..SpoolConfig::new(dir.join("spool"))
    }
}

#[test]
fn records_carry_key_headers_and_an_envelope() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(SpoolConfig::new(dir.path())).expect("open");
    let mut p = Pipeline::new(spool, PayloadFormat::Proto);
    let r = p.to_spool_record(&frame_record(
        "pbx1",
        5,
        9,
        b"Event: Hangup\r\nPrivilege: call,all\r\nUniqueid: 1.2\r\nLinkedid: 1.1\r\n\r\n",
    ));
    assert_eq!(&r.key[..], b"pbx1/1.1");
    let h = |n: &str| {
        r.meta
            .header(n)
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    };
    assert_eq!(h("event").as_deref(), Some("Hangup"));
    assert_eq!(h("class").as_deref(), Some("call"));
    assert_eq!(h("kind").as_deref(), Some("event"));
    assert_eq!(h("seq").as_deref(), Some("9"));
    assert_eq!(h("epoch").as_deref(), Some("5"));
    assert_eq!(h("server").as_deref(), Some("pbx1"));
    let env = decode_payload(&r.payload).expect("envelope");
    assert_eq!((env.server.as_str(), env.epoch, env.seq), ("pbx1", 5, 9));

    // Records share chunks: the next ones (one larger than a chunk) leave it intact.
    let big = format!(
        "Event: UserEvent\r\nData: {}\r\n\r\n",
        "x".repeat(CHUNK_BYTES)
    );
    let next = p.to_spool_record(&frame_record("pbx22", 6, 10, big.as_bytes()));
    let after = p.to_spool_record(&frame_record("pbx3", 7, 11, b"Event: Newexten\r\n\r\n"));
    assert_eq!(&r.key[..], b"pbx1/1.1");
    assert_eq!(decode_payload(&r.payload).expect("envelope").seq, 9);
    assert_eq!(&next.meta.server[..], b"pbx22");
    assert_eq!(&next.meta.event[..], b"UserEvent");
    let env = decode_payload(&next.payload).expect("big envelope");
    assert!(
        env.headers
            .iter()
            .any(|h| h.value.as_ref().map(Vec::len) == Some(CHUNK_BYTES))
    );
    assert_eq!(after.meta.seq, 11);
    assert_eq!(&after.key[..], b"pbx3");
}

/// Every record shape gets its typed metadata: what the sinks render as bus headers.
#[test]
fn each_kind_of_record_gets_its_metadata() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(SpoolConfig::new(dir.path())).expect("open");
    let mut p = Pipeline::new(spool, PayloadFormat::Proto);
    let stamp = |seq| Stamp {
        server: Arc::from("pbx1"),
        epoch: 4,
        seq,
        received_at_ns: 1,
    };
    let frame = frame_record(
        "pbx1",
        4,
        1,
        b"Event: CoreShowChannel\r\nPrivilege: system,all\r\nUniqueid: 1.2\r\n\r\n",
    );
    let AmiRecord::Frame(f) = frame.record.clone() else {
        panic!("frame")
    };
    let item = p.to_spool_record(&Stamped {
        stamp: stamp(2),
        record: AmiRecord::SnapshotItem {
            snapshot_id: Arc::from("pbx1-4-1"),
            frame: Box::new(f),
        },
    });
    assert_eq!(item.meta.kind, spool::Kind::Event);
    assert_eq!(&item.meta.event[..], b"CoreShowChannel");
    assert_eq!(&item.meta.class[..], b"system");
    assert_eq!(item.meta.snapshot.as_deref(), Some(&b"pbx1-4-1"[..]));
    assert_eq!(
        decode_payload(&item.payload).expect("env").snapshot_id,
        "pbx1-4-1"
    );
    let gap = p.to_spool_record(&Stamped {
        stamp: stamp(3),
        record: AmiRecord::Gap {
            epoch: 4,
            first_seq: 7,
            last_seq: 9,
            reason: "queue full".into(),
        },
    });
    assert_eq!(
        (gap.meta.kind, &gap.meta.event[..], &gap.meta.class[..]),
        (spool::Kind::Gap, &b"gap"[..], &b"amibus"[..])
    );
    assert_eq!(
        gap.meta.gap,
        Some(spool::GapRange {
            epoch: 4,
            first_seq: 7,
            last_seq: 9
        })
    );
    assert_eq!((gap.meta.epoch, gap.meta.seq), (4, 3));
    assert_eq!(gap.meta.snapshot, None);
    let down = p.to_spool_record(&Stamped {
        stamp: stamp(4),
        record: AmiRecord::ConnectionDown {
            reason: "eof".into(),
        },
    });
    assert_eq!(
        (down.meta.kind, &down.meta.event[..], down.meta.gap),
        (spool::Kind::ConnectionDown, &b"connection_down"[..], None)
    );
    assert_eq!(&down.key[..], b"pbx1");
}

#[test]
fn dropped_records_become_gap_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let frame = VARSET;
    let spool = spool_of_varsets(dir.path(), 4, WhenFull::DropNewest);
    let notices = Arc::new(DownstreamGaps::default());
    let counted = notices.counter("pbx1");
    let mut p = Pipeline::new(spool.clone(), PayloadFormat::Proto).with_gap_notices(notices);
    for seq in 1..=7 {
        p.accept(&frame_record("pbx1", 3, seq, frame));
    }
    assert_eq!(p.stats().dropped_newest, 3);
    // The sink catches up; the next record fits. The gap is reported once the spool is at
    // most half full with it: here, when the next record is delivered too.
    let mut reader = spool.reader();
    while let Some((id, _)) = reader.try_next().expect("read") {
        spool.ack(id);
    }
    p.accept(&frame_record("pbx1", 3, 8, frame));
    assert!(p.has_unreported_gaps());
    let mut seqs = Vec::new();
    while let Some((id, r)) = reader.try_next().expect("read") {
        seqs.push(decode_payload(&r.payload).expect("envelope").seq);
        spool.ack(id);
    }
    assert_eq!(seqs, vec![8]);
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        counted.load(Relaxed),
        0,
        "counted once published, not before"
    );
    p.report_unreported_gaps();
    assert_eq!(p.stats().gap_records, 1);
    assert_eq!(
        counted.load(Relaxed),
        1,
        "the gap record is counted for its server's connection"
    );
    let mut gaps = Vec::new();
    while let Some((_, r)) = reader.try_next().expect("read") {
        let env = decode_payload(&r.payload).expect("envelope");
        if let Some(pb::envelope::Detail::Gap(g)) = env.detail {
            gaps.push((g.epoch, g.first_seq, g.last_seq));
        }
    }
    assert_eq!(gaps, vec![(3, 5, 7)]);
}

/// Gap ranges by reason.
type Gaps = BTreeMap<String, Vec<(u64, u64)>>;

/// The cap deletes seqs 1..=3 while the sink has them in flight and seq 4 before it was sent;
/// the sink then fails what it had and goes back. Returns the envelope seqs read after the
/// rewind and the gap ranges by reason, once every gap record went out.
fn lose_three_in_flight(in_doubt_bytes: u64) -> (Vec<u64>, Gaps) {
    let dir = tempfile::tempdir().expect("tempdir");
    let frame = VARSET;
    let spool = Spool::open(SpoolConfig {
        in_doubt_bytes,
        ..varsets_config(dir.path(), 6, WhenFull::DropOldest)
    })
    .expect("open")
    .0;
    let mut p = Pipeline::new(spool.clone(), PayloadFormat::Proto);
    for seq in 1..=4 {
        p.accept(&frame_record("pbx1", 3, seq, frame));
    }
    p.flush();
    let mut reader = spool.reader();
    for _ in 0..3 {
        reader.try_next().expect("read").expect("record");
    }
    for seq in 5..=12 {
        p.accept(&frame_record("pbx1", 3, seq, frame));
    }
    p.flush();
    assert_eq!(spool.stats().in_doubt, 3, "{:?}", spool.stats());
    reader.rewind();
    // The sink catches up, and the gap records go out as the spool has room for them.
    let mut seqs = Vec::new();
    let mut gaps = BTreeMap::new();
    for _ in 0..10 {
        while let Some((id, r)) = reader.try_next().expect("read") {
            spool.ack(id);
            let env = decode_payload(&r.payload).expect("envelope");
            match env.detail {
                Some(pb::envelope::Detail::Gap(g)) => gaps
                    .entry(g.reason)
                    .or_insert_with(Vec::new)
                    .push((g.first_seq, g.last_seq)),
                _ if env.kind() == pb::Kind::Event => seqs.push(env.seq),
                _ => {}
            }
        }
        p.collect_spool_losses();
        if !p.has_unreported_gaps() {
            break;
        }
        p.report_unreported_gaps();
        p.flush();
    }
    assert!(!p.has_unreported_gaps(), "{gaps:?}");
    (seqs, gaps)
}

/// Records the cap deleted while the sink had them in flight, which the sink then failed, are
/// held whole and sent again, first: no gap names them. Seq 4, deleted before it was sent, is
/// plainly `spool full`.
#[test]
fn records_lost_in_flight_are_sent_again() {
    let (seqs, gaps) = lose_three_in_flight(SpoolConfig::new("x").in_doubt_bytes);
    assert_eq!(&seqs[..3], &[1, 2, 3], "sent again first: {seqs:?}");
    assert!(!gaps.contains_key("spool full (in doubt)"), "{gaps:?}");
    assert!(
        gaps["spool full"].iter().all(|&(a, _)| a > 3),
        "never sent: plainly lost {gaps:?}"
    );
}

/// Past `in_doubt_bytes`, such records are known by their metadata only: the sink's failure
/// loses them, and their gap says they may have reached the broker all the same.
#[test]
fn records_lost_in_flight_past_the_bound_are_gapped_in_doubt() {
    let (seqs, gaps) = lose_three_in_flight(0);
    assert!(!seqs.iter().any(|&s| s <= 3), "{seqs:?}");
    let in_doubt = &gaps["spool full (in doubt)"];
    let named: u64 = in_doubt.iter().map(|(a, b)| b - a + 1).sum();
    assert_eq!(named, 3, "{gaps:?}");
    assert!(in_doubt.iter().all(|&(a, b)| a >= 1 && b <= 3), "{gaps:?}");
    assert!(
        gaps.get("spool full")
            .into_iter()
            .flatten()
            .all(|&(a, _)| a > 3),
        "never sent: plainly lost {gaps:?}"
    );
}

#[test]
fn unreported_loss_survives_a_restart_in_the_spool_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let range = |server: &str, epoch, first_seq, last_seq, reason| LostRange {
        server: server.to_owned(),
        epoch,
        first_seq,
        last_seq,
        reason,
    };
    let lost = vec![
        range("pbx1", 3, 5, 9, LossReason::SpoolFull),
        range("pbx-2", 4, 1, 1, LossReason::SpoolFull),
        range("pbx-2", 4, 7, 8, LossReason::SpoolDamaged),
        range("pbx-2", 4, 10, 12, LossReason::SpoolFullInDoubt),
    ];
    save_unreported(dir.path(), &lost).expect("save");
    let path = dir.path().join(UNREPORTED_FILE);
    // A spool-full line reads as before reasons existed; the others say theirs.
    assert_eq!(
        std::fs::read_to_string(&path).expect("file"),
        "pbx1 3 5 9\npbx-2 4 1 1\npbx-2 4 7 8 spool-damaged\npbx-2 4 10 12 spool-full-in-doubt\n"
    );
    let (back, bad) = load_unreported(dir.path()).expect("load");
    assert_eq!((back, bad.len()), (lost.clone(), 0));
    // A damaged line is reported, not guessed at; the good ones still count.
    std::fs::write(
        &path,
        "pbx1 3 5 9\npbx1 x 1 2\npbx1 3 9 5\npbx1 3 1 2 spool-full\npbx1 3 1 2 why\n\n",
    )
    .expect("write");
    let (back, bad) = load_unreported(dir.path()).expect("load");
    assert_eq!(
        back,
        vec![
            range("pbx1", 3, 5, 9, LossReason::SpoolFull),
            range("pbx1", 3, 1, 2, LossReason::SpoolFull)
        ]
    );
    assert_eq!(
        bad,
        vec![
            "pbx1 x 1 2".to_owned(),
            "pbx1 3 9 5".to_owned(),
            "pbx1 3 1 2 why".to_owned()
        ]
    );
    // Nothing left to carry: no file.
    save_unreported(dir.path(), &[]).expect("save");
    assert!(!path.exists());
    assert_eq!(load_unreported(dir.path()).expect("load").0, vec![]);
    // A pipeline given the ranges reports them as gap records, each with its reason.
    let (spool, _) = Spool::open(SpoolConfig::new(dir.path().join("spool"))).expect("open");
    let mut p = Pipeline::new(spool.clone(), PayloadFormat::Proto);
    for r in &lost {
        p.remember_range(r);
    }
    let (mut carried, mut want) = (p.unreported(), lost.clone());
    carried.sort();
    want.sort();
    assert_eq!(carried, want);
    p.report_unreported_gaps();
    assert!(!p.has_unreported_gaps());
    let mut reader = spool.reader();
    let mut gaps = Vec::new();
    while let Some((_, r)) = reader.try_next().expect("read") {
        if let Some(pb::envelope::Detail::Gap(g)) = decode_payload(&r.payload).expect("env").detail
        {
            let env_server = String::from_utf8_lossy(&r.meta.server).into_owned();
            gaps.push((env_server, g.epoch, g.first_seq, g.last_seq, g.reason));
        }
    }
    gaps.sort();
    let mut want: Vec<_> = lost
        .iter()
        .map(|l| {
            let reason = l.reason.as_str().to_owned();
            (l.server.clone(), l.epoch, l.first_seq, l.last_seq, reason)
        })
        .collect();
    want.sort();
    assert_eq!(gaps, want);
}

/// A record the spool cannot hold becomes a parse_error record with its own stamp; the
/// records around it are stored as usual.
#[test]
fn a_record_too_large_for_the_spool_becomes_a_parse_error_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(SpoolConfig {
        max_bytes: 4096,
        segment_bytes: 1024,
        fsync: Fsync::Never,
        ..SpoolConfig::new(dir.path())
    })
    .expect("open");
    let mut p = Pipeline::new(spool.clone(), PayloadFormat::Proto);
    let big = format!("Event: UserEvent\r\nData: {}\r\n\r\n", "x".repeat(8192));
    p.accept(&frame_record("pbx1", 3, 1, b"Event: Newexten\r\n\r\n"));
    p.accept(&frame_record("pbx1", 3, 2, big.as_bytes()));
    p.accept(&frame_record("pbx2", 4, 1, b"Event: Newexten\r\n\r\n"));
    assert_eq!(p.stats().too_large, 1);
    let mut reader = spool.reader();
    let mut got = Vec::new();
    while let Some((id, r)) = reader.try_next().expect("read") {
        spool.ack(id);
        let env = decode_payload(&r.payload).expect("envelope");
        let kind = env.kind();
        let detail = match env.detail {
            Some(pb::envelope::Detail::ParseError(e)) => e.reason,
            _ => String::new(),
        };
        got.push((env.server, env.epoch, env.seq, kind, detail));
    }
    assert_eq!(
        got,
        vec![
            ("pbx1".into(), 3, 1, pb::Kind::Event, String::new()),
            (
                "pbx1".into(),
                3,
                2,
                pb::Kind::ParseError,
                "record_too_large".into()
            ),
            ("pbx2".into(), 4, 1, pb::Kind::Event, String::new()),
        ]
    );
}

/// Logins and logouts are mirrored in the spool directory; what a killed run left open is
/// closed by the next start with a seq-0 connection_down, once.
#[test]
fn epochs_a_killed_run_left_open_are_closed_at_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = |server: &str, epoch: u64| Stamped {
        stamp: Stamp {
            server: Arc::from(server),
            epoch,
            seq: 1,
            received_at_ns: 1,
        },
        record: AmiRecord::ConnectionUp {
            ami_version: "11.0.0".into(),
            address: "127.0.0.1:5038".into(),
        },
    };
    let (spool, _) = Spool::open(SpoolConfig::new(dir.path())).expect("open");
    let (open, left) = OpenEpochs::load(dir.path()).expect("load");
    assert!(left.epochs.is_empty() && left.bad_lines.is_empty());
    let mut p = Pipeline::new(spool, PayloadFormat::Proto).with_open_epochs(open);
    p.accept(&up("pbx1", 10));
    p.accept(&up("pbx2", 20));
    p.accept(&Stamped {
        stamp: Stamp {
            seq: 2,
            ..up("pbx2", 20).stamp
        },
        record: AmiRecord::ConnectionDown {
            reason: "eof".into(),
        },
    });
    // Killed here: pbx1's epoch 10 is open.
    drop(p);
    let (open, left) = OpenEpochs::load(dir.path()).expect("load");
    assert_eq!(left.epochs, vec![("pbx1".to_owned(), 10)]);
    let (spool, _) = Spool::open(SpoolConfig::new(dir.path())).expect("open");
    let mut reader = spool.reader();
    while reader.try_next().expect("read").is_some() {}
    let mut p = Pipeline::new(spool.clone(), PayloadFormat::Proto).with_open_epochs(open.clone());
    p.close_unclosed(&left.epochs);
    p.flush();
    open.persist();
    let mut closed = Vec::new();
    while let Some((_, r)) = reader.try_next().expect("read") {
        let env = decode_payload(&r.payload).expect("envelope");
        if let Some(pb::envelope::Detail::ConnectionDown(d)) = env.detail {
            closed.push((env.server, env.epoch, env.seq, d.reason));
        }
    }
    assert_eq!(
        closed,
        vec![("pbx1".into(), 10, 0, UNCLOSED_REASON.to_owned())]
    );
    let (_, left) = OpenEpochs::load(dir.path()).expect("load");
    assert!(left.epochs.is_empty(), "closed once: {left:?}");
}

/// A spool damaged on disk while amibus was stopped: the next start's pipeline names
/// exactly the seqs the damaged records held, in `spool damaged` gap records, and nothing
/// that was delivered; a drop not reported yet keeps its own reason.
#[test]
fn a_damaged_spool_becomes_gap_records_naming_exactly_the_lost_seqs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let frame = b"Event: VarSet\r\nPrivilege: dialplan,all\r\nVariable: X\r\nValue: 1\r\n\r\n";
    let cfg = SpoolConfig {
        segment_bytes: 2000,
        fsync: Fsync::Never,
        memory_bytes: 1,
        ..SpoolConfig::new(dir.path())
    };
    // Two servers, interleaved, spooled while nothing is delivered.
    let mut by_id = BTreeMap::new();
    {
        let (spool, _) = Spool::open(cfg.clone()).expect("open");
        let mut p = Pipeline::new(spool.clone(), PayloadFormat::Proto);
        for seq in 1..=40 {
            p.accept(&frame_record("pbx1", 3, seq, frame));
            if seq % 2 == 0 {
                p.accept(&frame_record("pbx2", 8, seq / 2, frame));
            }
        }
        p.flush();
        let mut reader = spool.reader();
        while let Some((id, r)) = reader.try_next().expect("read") {
            let env = decode_payload(&r.payload).expect("envelope");
            by_id.insert(id, (env.server, env.epoch, env.seq));
        }
    }
    // A byte flipped in one middle segment, another middle segment cut short.
    let listed = crate::spool::segment::list(dir.path()).expect("dir");
    let segments: Vec<_> = listed.iter().map(|(_, p)| p.clone()).collect();
    assert!(segments.len() >= 6, "{segments:?}");
    let first_id = |i: usize| listed[i].0;
    let mut bytes = std::fs::read(&segments[1]).expect("read");
    let flipped = bytes.len() / 2;
    bytes[flipped] ^= 0xff;
    std::fs::write(&segments[1], &bytes).expect("write");
    let cut = std::fs::metadata(&segments[3]).expect("segment").len() / 3;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segments[3])
        .and_then(|f| f.set_len(cut))
        .expect("truncate");
    // What the damaged records held, from the segments as they were.
    let (spool, recovery) = Spool::open(cfg).expect("reopen");
    let mut reader = spool.reader();
    let mut delivered = BTreeSet::new();
    while let Some((id, r)) = reader.try_next().expect("read") {
        spool.ack(id);
        let env = decode_payload(&r.payload).expect("envelope");
        delivered.insert((env.server, env.epoch, env.seq));
    }
    let lost: BTreeSet<_> = by_id
        .values()
        .filter(|k| !delivered.contains(*k))
        .cloned()
        .collect();
    assert_eq!(lost.len() as u64, recovery.damaged_records, "{recovery:?}");
    assert!(lost.len() > 2, "{lost:?}");
    let in_segment = |i: usize, k: &(String, u64, u64)| {
        by_id
            .iter()
            .any(|(id, v)| v == k && (first_id(i)..first_id(i + 1)).contains(id))
    };
    assert_eq!(lost.iter().filter(|k| in_segment(1, k)).count(), 1);
    assert!(lost.iter().all(|k| in_segment(1, k) || in_segment(3, k)));
    // The pipeline of the next start reports them, one gap record per range.
    let mut p = Pipeline::new(spool.clone(), PayloadFormat::Proto);
    p.remember_range(&LostRange {
        server: "pbx2".into(),
        epoch: 8,
        first_seq: 21,
        last_seq: 22,
        reason: LossReason::SpoolFull,
    });
    assert!(p.collect_spool_losses());
    assert_eq!(p.stats().damaged_seqs, lost.len() as u64);
    p.report_unreported_gaps();
    // Written as the pipeline's loop does after reporting: the reader reads files only.
    p.flush();
    let mut named = BTreeSet::new();
    let mut full = Vec::new();
    while let Some((id, r)) = reader.try_next().expect("read") {
        spool.ack(id);
        let env = decode_payload(&r.payload).expect("envelope");
        let Some(pb::envelope::Detail::Gap(g)) = env.detail else {
            panic!("only gap records: {env:?}");
        };
        assert_eq!(env.seq, 0);
        if g.reason == "spool full" {
            full.push((env.server, g.epoch, g.first_seq, g.last_seq));
            continue;
        }
        assert_eq!(g.reason, "spool damaged");
        for seq in g.first_seq..=g.last_seq {
            assert!(
                named.insert((env.server.clone(), g.epoch, seq)),
                "{seq} named twice"
            );
        }
    }
    assert_eq!(named, lost);
    assert_eq!(full, vec![("pbx2".to_owned(), 8, 21, 22)]);
    assert!(!p.collect_spool_losses(), "reported once");
    assert_eq!(spool.stats().records_held, 0);
}

#[test]
fn ranges_merge_where_they_touch() {
    let mut r = Vec::new();
    for range in [
        (10, 12),
        (1, 2),
        (20, 20),
        (4, 5),
        (13, 13),
        (3, 3),
        (15, 19),
    ] {
        add_range(&mut r, range);
    }
    assert_eq!(r, vec![(1, 5), (10, 13), (15, 20)]);
    add_range(&mut r, (6, 16));
    assert_eq!(r, vec![(1, 20)]);
}

/// A long outage under drop_oldest: the spool wraps many times and drops its own gap
/// records too. Whatever is left names every seq exactly once, delivered or in a gap.
#[test]
fn a_dropped_gap_record_is_reported_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let frame = b"Event: VarSet\r\nPrivilege: dialplan,all\r\nVariable: X\r\nValue: 1\r\n\r\n";
    let one = {
        let (spool, _) = Spool::open(SpoolConfig::new(dir.path().join("probe"))).expect("open");
        let mut p = Pipeline::new(spool, PayloadFormat::Proto);
        crate::spool::segment::encoded_len(&p.to_spool_record(&frame_record("pbx1", 3, 1, frame)))
            as u64
    };
    let (spool, _) = Spool::open(SpoolConfig {
        max_bytes: one * 20,
        segment_bytes: one * 4,
        when_full: WhenFull::DropOldest,
        fsync: Fsync::Never,
        ..SpoolConfig::new(dir.path().join("spool"))
    })
    .expect("open");
    let mut p = Pipeline::new(spool.clone(), PayloadFormat::Proto);
    let (mut records, mut gaps, mut covered) = (0, 0, Vec::new());
    let mut reader = spool.reader();
    let mut deliver = |covered: &mut Vec<u64>| {
        while let Some((id, r)) = reader.try_next().expect("read") {
            spool.ack(id);
            let env = decode_payload(&r.payload).expect("envelope");
            match env.detail {
                Some(pb::envelope::Detail::Gap(g)) => {
                    assert_eq!(g.epoch, 3);
                    covered.extend(g.first_seq..=g.last_seq);
                    gaps += 1;
                }
                _ => {
                    covered.push(env.seq);
                    records += 1;
                }
            }
        }
    };
    let accept = |p: &mut Pipeline, seqs: std::ops::RangeInclusive<u64>| {
        for seq in seqs {
            p.accept(&frame_record("pbx1", 3, seq, frame));
        }
    };
    // An outage: the spool wraps; the loss waits, merged, in memory while it is full.
    accept(&mut p, 1..=100);
    assert_eq!(p.stats().gap_records, 0);
    assert!(
        p.lost.values().map(Vec::len).sum::<usize>() == 1,
        "{:?}",
        p.lost
    );
    // The sink catches up, but a new outage starts before the gap record is delivered.
    deliver(&mut covered);
    p.report_unreported_gaps();
    assert_eq!(p.stats().gap_records, 1);
    accept(&mut p, 101..=300);
    assert_eq!(p.stats().dropped_gap_records, 1, "{:?}", p.stats());
    // Back again: what the dropped gap record named is named again.
    deliver(&mut covered);
    p.report_unreported_gaps();
    assert!(!p.has_unreported_gaps());
    deliver(&mut covered);
    covered.sort_unstable();
    assert_eq!(covered, (1..=300).collect::<Vec<u64>>(), "each seq once");
    let st = p.stats();
    assert_eq!(
        records,
        300 - (st.dropped_oldest - st.dropped_gap_records),
        "{st:?}"
    );
    assert_eq!(gaps, st.gap_records - st.dropped_gap_records, "{st:?}");
}
