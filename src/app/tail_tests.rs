use super::*;
use crate::ami::{Parsed, Parser, Record, Stamp, Stamped};
use std::sync::Arc;

fn envelope(server: &str, name: &str) -> Bytes {
    let bytes = format!("Event: {name}\r\nPrivilege: call,all\r\nUniqueid: 1.2\r\n\r\n");
    let mut p = Parser::default();
    let Parsed::Frame { frame, .. } = p.parse(bytes.as_bytes()) else {
        panic!("frame")
    };
    let stamped = Stamped {
        stamp: Stamp {
            server: Arc::from(server),
            epoch: 1,
            seq: 7,
            received_at_ns: 42,
        },
        record: Record::Frame(frame.to_owned()),
    };
    let mut out = Vec::new();
    let Record::Frame(f) = &stamped.record else {
        unreachable!()
    };
    let frame = f.frame();
    let n = crate::model::normalize(&frame);
    crate::model::encode_frame(&stamped.stamp, &n, &frame, &mut out);
    Bytes::from(out)
}

fn msg(headers: &[(&str, &str)], payload: impl Into<Bytes>) -> Message {
    Message {
        subject: "ami.x.y".into(),
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        payload: payload.into(),
    }
}

fn printer(server: &[&str], event: &[&str], raw: bool) -> Printer {
    Printer::new(FilterArgs {
        server: server.iter().map(|s| (*s).to_owned()).collect(),
        event: event.iter().map(|s| (*s).to_owned()).collect(),
        limit: None,
        raw,
    })
}

fn line(out: &[u8]) -> serde_json::Value {
    serde_json::from_slice(out).expect("one JSON line")
}

#[test]
fn envelopes_print_as_json_lines() {
    let mut p = printer(&[], &[], false);
    let mut out = Vec::new();
    assert_eq!(
        p.handle(&msg(&[], envelope("pbx1", "Hangup")), &mut out),
        Outcome::Printed
    );
    let v = line(&out);
    assert_eq!(
        (v["server"].as_str(), v["name"].as_str(), v["seq"].as_str()),
        (Some("pbx1"), Some("Hangup"), Some("7"))
    );
    assert_eq!(out.last(), Some(&b'\n'));
}

#[test]
fn headers_filter_before_decoding() {
    let mut p = printer(&["pbx1"], &["hangup"], false);
    let mut out = Vec::new();
    // Garbage payload, but the headers already exclude it: not even decoded.
    let other = msg(&[("server", "pbx2"), ("event", "Hangup")], &b"\xff\xff"[..]);
    assert_eq!(p.handle(&other, &mut out), Outcome::FilteredOut);
    let wrong_event = msg(&[("server", "pbx1"), ("event", "Newchannel")], &b"\xff"[..]);
    assert_eq!(p.handle(&wrong_event, &mut out), Outcome::FilteredOut);
    let ok = msg(
        &[("server", "pbx1"), ("event", "Hangup")],
        envelope("pbx1", "Hangup"),
    );
    assert_eq!(p.handle(&ok, &mut out), Outcome::Printed);
    assert_eq!(p.stats.filtered_out, 2);
}

#[test]
fn messages_without_headers_are_filtered_on_the_decoded_envelope() {
    let mut p = printer(&["pbx1"], &[], false);
    let mut out = Vec::new();
    assert_eq!(
        p.handle(&msg(&[], envelope("pbx2", "Hangup")), &mut out),
        Outcome::FilteredOut
    );
    assert_eq!(
        p.handle(&msg(&[], envelope("pbx1", "Hangup")), &mut out),
        Outcome::Printed
    );
    let json = msg(&[], &br#"{"server":"pbx1","name":"X"}"#[..]);
    assert_eq!(p.handle(&json, &mut out), Outcome::Printed);
}

#[test]
fn json_passes_through_and_garbage_is_counted() {
    let mut p = printer(&[], &[], false);
    let mut out = Vec::new();
    let text = "{\"kind\":\"event\",\"name\":\"Hangup\",\"server\":\"pbx1\"}\n";
    assert_eq!(
        p.handle(&msg(&[], text.as_bytes().to_vec()), &mut out),
        Outcome::Printed
    );
    assert_eq!(out, text.as_bytes());
    for bad in [&b""[..], b"\xff\x00garbage", b"{not json", b"hello"] {
        assert!(
            matches!(
                p.handle(&msg(&[], bad.to_vec()), &mut out),
                Outcome::Undecodable(_)
            ),
            "{bad:?}"
        );
    }
    assert_eq!(out, text.as_bytes(), "nothing printed for garbage");
    assert_eq!(p.stats.undecodable, 4);
    // Multi-line JSON becomes one line.
    out.clear();
    p.handle(&msg(&[], &b"{\n\"a\": 1\n}\n"[..]), &mut out);
    assert_eq!(out, b"{\"a\":1}\n");
}

#[test]
fn raw_prints_what_is_on_the_bus() {
    let mut p = printer(&[], &[], true);
    let mut out = Vec::new();
    p.handle(&msg(&[("server", "pbx1")], &b"\xff\x00"[..]), &mut out);
    let v = line(&out);
    assert_eq!(v["subject"], "ami.x.y");
    assert_eq!(v["headers"][0], serde_json::json!(["server", "pbx1"]));
    assert_eq!(v["payload"]["b64"], "/wA=");
}

#[test]
fn the_limit_counts_printed_records() {
    let mut p = Printer::new(FilterArgs {
        limit: Some(1),
        server: vec!["pbx1".into()],
        ..FilterArgs::default()
    });
    let mut out = Vec::new();
    p.handle(&msg(&[("server", "pbx2")], envelope("pbx2", "A")), &mut out);
    assert!(!p.done());
    p.handle(&msg(&[("server", "pbx1")], envelope("pbx1", "A")), &mut out);
    assert!(p.done());
}

#[test]
fn start_positions_parse() {
    assert_eq!(parse_start("first"), Ok(StreamStart::First));
    assert_eq!(parse_start("new"), Ok(StreamStart::New));
    assert_eq!(parse_start("17"), Ok(StreamStart::Sequence(17)));
    assert!(parse_start("oldest").is_err());
}
