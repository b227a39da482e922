use super::*;

fn record(headers: &[(&str, &str)], key: &str, payload: &str) -> Record {
    Record {
        key: Bytes::from(key.to_owned()),
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned().into(), Bytes::from((*v).to_owned())))
            .collect(),
        payload: Bytes::from(payload.to_owned()),
    }
}

#[test]
fn message_ids_are_stable_and_distinct() {
    let a = record(&[("server", "pbx1")], "pbx1/1.2", "payload-a");
    let b = record(&[("server", "pbx1")], "pbx1/1.2", "payload-b");
    assert_eq!(message_id(&a), message_id(&a.clone()));
    assert_ne!(message_id(&a), message_id(&b));
    assert!(message_id(&a).starts_with("pbx1/1.2/"));
    let gap = record(
        &[("server", "pbx1"), ("epoch", "3"), ("seq", "0")],
        "pbx1",
        "gap",
    );
    assert!(
        message_id(&gap).starts_with("pbx1/"),
        "seq 0 is not a connection seq"
    );
    assert_ne!(message_id(&gap), "pbx1/3/0");
    // Stable across builds: a fixed input has a fixed id.
    assert_eq!(message_id(&record(&[], "", "")), "cbf29ce484222325");
    let exact = record(
        &[("server", "pbx1"), ("epoch", "3"), ("seq", "17")],
        "k",
        "p",
    );
    assert_eq!(message_id(&exact), "pbx1/3/17");
}

#[test]
fn headers_carry_the_record_and_the_id() {
    let r = record(
        &[
            ("server", "pbx1"),
            ("event", "Hangup"),
            ("schema", "amibus.v1"),
        ],
        "k",
        "p",
    );
    let h = headers(&r, true).expect("valid");
    assert_eq!(h.get("event").map(HeaderValue::as_str), Some("Hangup"));
    assert_eq!(
        h.get(async_nats::header::NATS_MESSAGE_ID)
            .map(HeaderValue::as_str),
        Some(message_id(&r).as_str())
    );
    assert!(
        headers(&r, false)
            .expect("valid")
            .get("Nats-Msg-Id")
            .is_none()
    );
    let crlf = record(&[("server", "a\r\nb")], "", "");
    assert_eq!(
        headers(&crlf, false)
            .expect("sanitized")
            .get("server")
            .map(HeaderValue::as_str),
        Some("a  b")
    );
    let bad = record(&[("bad name", "x")], "", "");
    assert!(matches!(headers(&bad, false), Err(SinkError::Permanent(_))));
    // A repeated name keeps every value, in order; bytes that are not UTF-8 are replaced.
    let mut twice = record(&[("x", "1"), ("y", "2"), ("x", "3")], "", "");
    twice
        .headers
        .push(("z".into(), Bytes::from_static(b"caf\xe9")));
    let h = headers(&twice, false).expect("valid");
    let xs: Vec<&str> = h.get_all("x").map(HeaderValue::as_str).collect();
    assert_eq!(xs, ["1", "3"]);
    assert_eq!(h.get("z").map(HeaderValue::as_str), Some("caf\u{fffd}"));
}

#[test]
fn cached_header_maps_and_subjects_equal_the_ones_built_for_each_record() {
    // The default template, and one that names `seq` (expanded per record).
    let templates = ["ami.{server}.{event}", "x.{event}.{seq}"];
    let built = |r: &Record, with_id: bool, template: &str| {
        (
            headers(r, with_id).expect("valid"),
            Subject::from(expand_template(template, r)),
        )
    };
    let shapes: [&[(&str, &str)]; 6] = [
        &[
            ("server", "pbx1"),
            ("event", "Newexten"),
            ("epoch", "7"),
            ("seq", "1"),
        ],
        &[
            ("server", "pbx1"),
            ("event", "Newexten"),
            ("epoch", "7"),
            ("seq", "2"),
        ],
        &[
            ("server", "pbx1"),
            ("event", "Newexten"),
            ("epoch", "8"),
            ("seq", "1"),
        ],
        &[
            ("server", "pbx1"),
            ("event", "Hangup"),
            ("epoch", "7"),
            ("seq", "3"),
        ],
        // No seq, and two: built directly.
        &[("server", "pbx1"), ("event", "Hangup")],
        &[("seq", "4"), ("seq", "5")],
    ];
    for template in templates {
        let mut cache = HeaderCache::new(template.into());
        for with_id in [false, true] {
            for round in 0..2 {
                for (n, shape) in shapes.iter().enumerate() {
                    let r = record(shape, "k", &format!("payload {n} {round}"));
                    assert_eq!(
                        cache.headers(&r, with_id).expect("valid"),
                        built(&r, with_id, template),
                        "{shape:?}, with id: {with_id}, {template}"
                    );
                }
            }
        }
        // The same values under other names are another key.
        let a = record(&[("ab", "c"), ("seq", "1")], "", "");
        let b = record(&[("a", "bc"), ("seq", "1")], "", "");
        cache.headers(&a, false).expect("valid");
        assert_eq!(
            cache.headers(&b, false).expect("valid"),
            built(&b, false, template)
        );
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
