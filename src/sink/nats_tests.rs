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

#[test]
fn headers_carry_the_record_and_the_id() {
    let r = record(meta("pbx1", "Hangup", 4, 9), "k", "p");
    let h = headers(&r, true, false);
    let get = |h: &HeaderMap, name: &str| h.get(name).map(|v| v.as_str().to_owned());
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
    assert_eq!(get(&headers(&r, false, false), "Nats-Msg-Id"), None);
    assert_eq!(get(&headers(&r, false, true), "seq"), None);
    // CR and LF cannot end a header early; bytes that are not UTF-8 are replaced.
    let mut odd = meta("a\r\nb", "x", 1, 1);
    odd.event = Bytes::from_static(b"caf\xe9");
    let h = headers(&record(odd, "", ""), false, false);
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
    let h = headers(&record(gap, "", ""), false, false);
    for (name, value) in [
        ("kind", "gap"),
        ("snapshot", "pbx1-4-1"),
        ("gap_epoch", "3"),
        ("gap_first_seq", "10"),
        ("gap_last_seq", "12"),
    ] {
        assert_eq!(get(&h, name).as_deref(), Some(value), "{name}");
    }
}

#[test]
fn cached_header_maps_and_subjects_equal_the_ones_built_for_each_record() {
    // The default template, and one that names `seq` (expanded per record).
    let templates = ["ami.{server}.{event}", "x.{event}.{seq}"];
    let built = |r: &Record, with_id: bool, template: &str| {
        (
            headers(r, with_id, false),
            Subject::from(expand_template(template, r)),
        )
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
        response,
        // Not cached: built directly.
        snapshot,
        gap,
    ];
    for template in templates {
        let mut cache = HeaderCache::new(template.into());
        for with_id in [false, true] {
            for round in 0..2 {
                for (n, shape) in shapes.iter().enumerate() {
                    let r = record(shape.clone(), "k", &format!("payload {n} {round}"));
                    assert_eq!(
                        cache.headers(&r, with_id),
                        built(&r, with_id, template),
                        "{shape:?}, with id: {with_id}, {template}"
                    );
                }
            }
        }
        // The same bytes split differently are another key.
        let a = record(meta("ab", "c", 1, 1), "", "");
        let b = record(meta("a", "bc", 1, 1), "", "");
        cache.headers(&a, false);
        assert_eq!(cache.headers(&b, false), built(&b, false, template));
    }
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
