use super::*;

fn begin(id: &str, at: u64) -> Entry {
    Entry::Begin {
        server: "pbx1".into(),
        request_id: id.into(),
        action: "Originate".into(),
        at_unix_ms: at,
    }
}

fn done(id: &str, at: u64) -> Entry {
    let result = ActionResult {
        request_id: id.into(),
        server: "pbx1".into(),
        action: "Originate".into(),
        status: ActionStatus::Success as i32,
        ..ActionResult::default()
    };
    Entry::Done {
        server: "pbx1".into(),
        request_id: id.into(),
        at_unix_ms: at,
        result: result.encode_to_vec(),
    }
}

fn cfg(dir: &Path) -> JournalConfig {
    JournalConfig {
        path: dir.join("sub").join("control-journal"),
        fsync: JournalFsync::Never,
        max_bytes: 1 << 20,
    }
}

fn now() -> u64 {
    unix_ms(SystemTime::now())
}

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn entries_round_trip() {
    let forget = Entry::Forget {
        server: "s".into(),
        request_id: "x".into(),
        at_unix_ms: 4,
    };
    let entries = vec![begin("a", 1), done("a", 2), begin("", 3), forget];
    let mut buf = Vec::new();
    for e in &entries {
        encode(e, &mut buf);
    }
    let p = parse(&buf);
    assert_eq!(p.entries, entries);
    assert_eq!(p.valid_len, buf.len());
    assert_eq!(parse(&[]), Parsed::default());
}

#[test]
fn a_torn_tail_is_cut_off_at_every_length() {
    let mut buf = Vec::new();
    encode(&begin("a", 1), &mut buf);
    let whole = buf.len();
    encode(&done("a", 2), &mut buf);
    for cut in whole..buf.len() {
        let p = parse(&buf[..cut]);
        assert_eq!((p.entries.len(), p.valid_len), (1, whole), "cut at {cut}");
    }
}

#[test]
fn a_flipped_bit_fails_the_checksum_and_ends_the_journal_there() {
    let mut buf = Vec::new();
    encode(&begin("a", 1), &mut buf);
    let whole = buf.len();
    encode(&begin("b", 2), &mut buf);
    encode(&begin("c", 3), &mut buf);
    buf[whole + FRAME_HEADER + 3] ^= 1;
    let p = parse(&buf);
    assert_eq!((p.entries, p.valid_len), (vec![begin("a", 1)], whole));
    // An absurd length is corruption too, not an allocation.
    let mut bad = u32::MAX.to_le_bytes().to_vec();
    bad.extend_from_slice(&[0; 12]);
    assert_eq!(parse(&bad).valid_len, 0);
}

#[test]
fn open_restores_what_is_within_the_window_and_counts_a_torn_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = cfg(dir.path());
    let t = now();
    let old = t - 2 * 3_600_000;
    let mut buf = Vec::new();
    for e in [
        begin("expired", old),
        done("expired", old),
        begin("ran", t - 10),
        done("ran", t - 5),
        begin("running", t - 1),
    ] {
        encode(&e, &mut buf);
    }
    let whole = buf.len();
    encode(&begin("torn", t), &mut buf);
    buf.truncate(buf.len() - 3);
    std::fs::create_dir_all(cfg.path.parent().expect("dir")).expect("mkdir");
    std::fs::write(&cfg.path, &buf).expect("write");

    let (journal, restored) = Journal::open(&cfg, HOUR).expect("open");
    assert_eq!(journal.torn_bytes(), (buf.len() - whole) as u64);
    let got: Vec<_> = restored
        .iter()
        .map(|r| {
            (
                r.request_id.as_str(),
                ActionStatus::try_from(r.result.status).expect("status"),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("ran", ActionStatus::Success),
            ("running", ActionStatus::OutcomeUnknown)
        ]
    );
    assert!(restored[1].running && !restored[0].running);
    assert_eq!(restored[1].result.action, "Originate");
    drop(journal);
    // Rewritten compacted: the live entries only, no tail.
    let p = parse(&std::fs::read(&cfg.path).expect("read"));
    assert_eq!(p.entries, vec![done("ran", t - 5), begin("running", t - 1)]);
    let (_, again) = Journal::open(&cfg, HOUR).expect("reopen");
    assert_eq!(again, restored);
}

proptest::proptest! {
    /// Any bytes: no panic, and what parses is a whole-entry prefix that parses the same.
    #[test]
    fn parse_takes_any_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
        let p = parse(&bytes);
        proptest::prop_assert!(p.valid_len <= bytes.len());
        proptest::prop_assert_eq!(parse(&bytes[..p.valid_len]), p);
    }

    /// A valid journal damaged at any bit keeps exactly the entries before the damage.
    #[test]
    fn damage_keeps_the_entries_before_it(at in 0usize..10_000, bit in 0u8..8) {
        let mut buf = Vec::new();
        let mut ends = vec![0];
        for i in 0..6u64 {
            encode(&begin(&format!("r{i}"), i), &mut buf);
            ends.push(buf.len());
            encode(&done(&format!("r{i}"), i), &mut buf);
            ends.push(buf.len());
        }
        let at = at % buf.len();
        buf[at] ^= 1 << bit;
        let p = parse(&buf);
        let before = ends.iter().copied().filter(|&e| e <= at).max().unwrap_or(0);
        proptest::prop_assert_eq!(p.valid_len, before);
        proptest::prop_assert_eq!(p.entries.len(), ends.iter().filter(|&&e| e > 0 && e <= at).count());
    }
}

#[test]
fn a_forgotten_request_is_not_restored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = cfg(dir.path());
    let t = now();
    let (mut journal, _) = Journal::open(&cfg, HOUR).expect("open");
    journal.append(&begin("a", t)).expect("append");
    let forget = Entry::Forget {
        server: "pbx1".into(),
        request_id: "a".into(),
        at_unix_ms: t,
    };
    journal.append(&forget).expect("append");
    drop(journal);
    let (journal, restored) = Journal::open(&cfg, HOUR).expect("reopen");
    assert!(restored.is_empty() && journal.is_empty());
}

#[test]
fn compaction_keeps_live_entries_only_and_bounds_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = cfg(dir.path());
    cfg.max_bytes = 4096;
    let (mut journal, restored) = Journal::open(&cfg, HOUR).expect("open");
    assert!(restored.is_empty() && journal.is_empty());
    let t = now();
    journal
        .append(&begin("old", t - 2 * 3_600_000))
        .expect("append");
    journal.append(&begin("live", t)).expect("append");
    journal.compact().expect("compact");
    assert_eq!(
        parse(&std::fs::read(&cfg.path).expect("read")).entries,
        vec![begin("live", t)]
    );
    // Appends after a compaction land in the new file.
    journal.append(&done("live", t)).expect("append");
    for i in 0..1000 {
        let id = format!("r{i}");
        journal.append(&begin(&id, t)).expect("append");
        // A compaction prepared while appends go on keeps them.
        let c = journal.begin_compaction();
        journal.append(&done(&id, t)).expect("append");
        if let Some(c) = c {
            journal.finish_compaction(c.prepare()).expect("compact");
        }
        if let Some(c) = journal.begin_compaction() {
            journal.finish_compaction(c.prepare()).expect("compact");
        }
        assert!(journal.len() <= cfg.max_bytes, "bounded");
    }
    assert!(journal.compactions() > 1);
    journal.compact().expect("compact");
    let entries = parse(&std::fs::read(&cfg.path).expect("read")).entries;
    assert!(
        entries.iter().all(|e| matches!(e, Entry::Done { .. })),
        "a Begin followed by its Done is not kept"
    );
    assert_eq!(entries.last(), Some(&done("r999", t)), "the newest is kept");
}
