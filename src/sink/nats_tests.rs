use super::*;
use crate::spool::{GapRange, Kind, Meta};
use bytes::Bytes;

fn meta(server: &str, event: &str, epoch: u64, seq: u64) -> Meta {
    Meta {
        server: Bytes::from(server.to_owned()),
        event: Bytes::from(event.to_owned()),
        kind: Kind::Event,
        class: Bytes::from_static(b"call"),
        epoch,
        seq,
        snapshot: None,
        gap: None,
    }
}

fn record(meta: Meta, key: &str, payload: &str) -> Record {
    Record {
        key: Bytes::from(key.to_owned()),
        meta,
        payload: Bytes::from(payload.to_owned()),
    }
}

#[test]
fn message_ids_are_stable_and_distinct() {
    // Seq 0: outside a connection's numbering, told apart by key and payload.
    let a = record(meta("pbx1", "Gap", 3, 0), "pbx1/1.2", "payload-a");
    let b = record(meta("pbx1", "Gap", 3, 0), "pbx1/1.2", "payload-b");
    assert_eq!(message_id(&a), message_id(&a.clone()));
    assert_ne!(message_id(&a), message_id(&b));
    assert!(message_id(&a).starts_with("pbx1/1.2/"));
    assert_ne!(message_id(&a), "pbx1/3/0", "seq 0 is not a connection seq");
    // Stable across builds: a fixed input has a fixed id.
    assert_eq!(
        message_id(&record(Meta::default(), "", "")),
        "cbf29ce484222325"
    );
    let exact = record(meta("pbx1", "Hangup", 3, 17), "k", "p");
    assert_eq!(message_id(&exact), "pbx1/3/17");
    let largest = record(meta("pbx1", "Hangup", u64::MAX, u64::MAX), "k", "p");
    assert_eq!(
        message_id(&largest),
        format!("pbx1/{}/{}", u64::MAX, u64::MAX)
    );
}

/// A header block as a subscriber's client reads it: the version line, then `name: value`
/// lines, every line ending in CRLF.
fn parsed(block: &[u8]) -> Vec<(String, String)> {
    let text = std::str::from_utf8(block).expect("utf-8");
    let rest = text.strip_prefix("NATS/1.0\r\n").expect("version line");
    assert!(rest.ends_with("\r\n") || rest.is_empty(), "{rest:?}");
    rest.split_terminator("\r\n")
        .map(|l| {
            let (k, v) = l.split_once(": ").expect("name: value");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// Every header of `r` as the cache renders it (block and suffix).
fn wire(r: &Record, with_id: bool) -> Vec<(String, String)> {
    let mut cache = WireHeaders::new("x".into());
    let (_, block, suffix) = cache.lookup(r, with_id);
    parsed(&[block, suffix].concat())
}

fn get(h: &[(String, String)], name: &str) -> Option<String> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

#[test]
fn headers_carry_the_record_and_the_id() {
    let r = record(meta("pbx1", "Hangup", 4, 9), "k", "p");
    let h = wire(&r, true);
    for (name, value) in r.meta.headers() {
        assert_eq!(
            get(&h, name).as_deref(),
            Some(std::str::from_utf8(&value).expect("utf-8")),
            "{name}"
        );
    }
    assert_eq!(get(&h, "schema").as_deref(), Some("amibus.v1"));
    assert_eq!(get(&h, "seq").as_deref(), Some("9"));
    assert_eq!(
        get(&h, "Nats-Msg-Id"),
        Some(message_id(&r)),
        "JetStream's id"
    );
    assert_eq!(h.len(), r.meta.headers().len() + 1, "each name once");
    assert_eq!(get(&wire(&r, false), "Nats-Msg-Id"), None);
    assert_eq!(get(&parsed(&wire_block(&r, true)), "seq"), None);
    // CR and LF cannot end a header early; bytes that are not UTF-8 are replaced.
    let mut odd = meta("a\r\nb", "x", 1, 1);
    odd.event = Bytes::from_static(b"caf\xe9");
    let h = wire(&record(odd, "", ""), false);
    assert_eq!(get(&h, "server").as_deref(), Some("a  b"));
    assert_eq!(get(&h, "event").as_deref(), Some("caf\u{fffd}"));
    // A gap record names its range; a snapshot's record its id.
    let mut gap = meta("pbx1", "gap", 4, 0);
    gap.kind = Kind::Gap;
    gap.snapshot = Some(Bytes::from_static(b"pbx1-4-1"));
    gap.gap = Some(GapRange {
        epoch: 3,
        first_seq: 10,
        last_seq: 12,
    });
    let gap = record(gap, "", "");
    let h = wire(&gap, true);
    for (name, value) in [
        ("kind", "gap"),
        ("snapshot", "pbx1-4-1"),
        ("gap_epoch", "3"),
        ("gap_first_seq", "10"),
        ("gap_last_seq", "12"),
    ] {
        assert_eq!(get(&h, name).as_deref(), Some(value), "{name}");
    }
    assert_eq!(get(&h, "Nats-Msg-Id"), Some(message_id(&gap)));
}

#[test]
fn cached_header_blocks_and_subjects_equal_the_ones_built_for_each_record() {
    // The default template, and one that names `seq` (expanded per record).
    let templates = ["ami.{server}.{event}", "x.{event}.{seq}"];
    let built = |r: &Record, with_id: bool, template: &str| {
        let mut block = wire_block(r, false);
        if with_id {
            push_header(&mut block, "Nats-Msg-Id", message_id(r).as_bytes());
        }
        (expand_template(template, r), parsed(&block))
    };
    let mut snapshot = meta("pbx1", "Hangup", 7, 5);
    snapshot.snapshot = Some(Bytes::from_static(b"s-1"));
    let mut gap = meta("pbx1", "gap", 7, 0);
    gap.kind = Kind::Gap;
    gap.gap = Some(GapRange {
        epoch: 6,
        first_seq: 1,
        last_seq: 2,
    });
    let mut response = meta("pbx1", "Hangup", 7, 6);
    response.kind = Kind::Response;
    let shapes = [
        meta("pbx1", "Newexten", 7, 1),
        meta("pbx1", "Newexten", 7, 2),
        meta("pbx1", "Newexten", 8, 1),
        meta("pbx1", "Hangup", 7, 3),
        meta("p\r\nx", "Hangup", 7, 3),
        // Seq 0: the id is not server/epoch/seq.
        meta("pbx1", "Hangup", 7, 0),
        response,
        // Not cached: built directly.
        snapshot,
        gap,
    ];
    for template in templates {
        let mut cache = WireHeaders::new(template.into());
        let mut cached = |r: &Record, with_id: bool| {
            let (subject, block, suffix) = cache.lookup(r, with_id);
            (subject.to_string(), parsed(&[block, suffix].concat()))
        };
        for with_id in [false, true] {
            for round in 0..2 {
                for (n, shape) in shapes.iter().enumerate() {
                    let r = record(shape.clone(), "k", &format!("payload {n} {round}"));
                    let (subject, mut headers) = cached(&r, with_id);
                    let (want_subject, mut want) = built(&r, with_id, template);
                    headers.sort();
                    want.sort();
                    assert_eq!(
                        (subject, headers),
                        (want_subject, want),
                        "{shape:?}, with id: {with_id}, {template}"
                    );
                }
            }
        }
        // The same bytes split differently are another key.
        let a = record(meta("ab", "c", 1, 1), "", "");
        let b = record(meta("a", "bc", 1, 1), "", "");
        cached(&a, false);
        assert_eq!(cached(&b, false), built(&b, false, template));
    }
}

#[test]
fn hpub_frames_count_their_bytes_and_refuse_what_exceeds_max_payload() {
    let mut out = Vec::new();
    render_hpub(
        &mut out,
        "ami.pbx1.Hangup",
        Some(("_INBOX.ab.", 42)),
        (b"NATS/1.0\r\nserver: pbx1\r\n", b"seq: 9\r\n"),
        b"payload",
        1000,
    )
    .expect("fits");
    let text = String::from_utf8(out).expect("utf-8");
    let (line, rest) = text.split_once("\r\n").expect("a control line");
    let words: Vec<&str> = line.split(' ').collect();
    assert_eq!(words[..3], ["HPUB", "ami.pbx1.Hangup", "_INBOX.ab.42"]);
    let (hlen, total): (usize, usize) = (words[3].parse().unwrap(), words[4].parse().unwrap());
    assert_eq!(&rest[..hlen], "NATS/1.0\r\nserver: pbx1\r\nseq: 9\r\n\r\n");
    assert_eq!(&rest[hlen..total], "payload");
    assert_eq!(&rest[total..], "\r\n");

    let mut out = Vec::new();
    let too_big = render_hpub(
        &mut out,
        "s",
        None,
        (b"NATS/1.0\r\n", b""),
        &[b'x'; 100],
        111,
    );
    assert!(matches!(too_big, Err(SinkError::Permanent(ref why)) if why.contains("max payload")));
    assert!(out.is_empty(), "nothing written");
    render_hpub(
        &mut out,
        "s",
        None,
        (b"NATS/1.0\r\n", b""),
        &[b'x'; 100],
        112,
    )
    .expect("fits");
}

#[test]
fn stream_subjects_come_from_the_template_prefix() {
    let mut cfg = NatsSinkConfig::default();
    assert_eq!(cfg.stream_subjects().expect("prefix"), vec!["ami.>"]);
    cfg.subject = "a.b.{server}.x.{event}".into();
    assert_eq!(cfg.stream_subjects().expect("prefix"), vec!["a.b.>"]);
    cfg.subject = "fixed.subject".into();
    assert_eq!(cfg.stream_subjects().expect("fixed"), vec!["fixed.subject"]);
    cfg.subject = "{server}.x".into();
    assert!(cfg.stream_subjects().is_err());
    cfg.stream = Some(StreamSpec {
        subjects: vec!["x.>".into()],
        ..StreamSpec::new("S")
    });
    assert_eq!(cfg.stream_subjects().expect("given"), vec!["x.>"]);
}
