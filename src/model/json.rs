//! Envelopes as JSON lines, for people and for tools that don't speak protobuf.
//!
//! Shape: `{"kind":"event","name":"Newchannel","server":"pbx1","epoch":"1795671272021",
//! "seq":"9","received_at_ns":"1795671272021146000","partition_key":"pbx1/1795671272.4",
//! ..typed fields when set..,"headers":[["Event","Newchannel"],["NoColonLine",null],
//! ["CallerIDName",{"b64":"Sm9z6Q=="}],["Destination","SIP/2-0001","DestChannel"]]}`.
//!
//! - 64-bit integers (`epoch`, `seq`, `received_at_ns`, `asterisk_time_us`, and `epoch`,
//!   `first_seq`, `last_seq` of a `gap`) are decimal strings, as the proto3 JSON mapping writes
//!   them: they exceed 2^53, which a JSON number read as a double (JavaScript's `JSON.parse`,
//!   jq, most JSON libraries by default) cannot hold exactly.
//! - A header is `[key, value]`, or `[key, value, normalized_key]` when the key is a legacy
//!   name with a modern equivalent. A key or value that is not UTF-8 is written as
//!   `{"b64": "<standard base64>"}`; a line without a colon has `null` as its value.
//! - Synthetic records add their detail object (`connection_up`, `connection_down`, `gap`,
//!   `parse_error`, `snapshot_begin`, `snapshot_end`; see [`super::snapshot_json`]).
//!
//! Frames are written by [`write_frame_line`] straight from the frame and its normalized fields;
//! [`write_json_line`] writes a prost `Envelope` (synthetic records, and envelopes read back from
//! the bus). A test holds the two to the same bytes on every recorded frame.
//!
//! Must never: write a number a double cannot hold, or lose a byte of a header.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::ami::{Frame, Stamp};

use super::encode::utf8;
use super::legacy;
use super::normalize::Normalized;
use super::pb::{self, envelope::Detail};

/// The JSON name of a kind.
pub fn kind_name(kind: pb::Kind) -> &'static str {
    match kind {
        pb::Kind::Unspecified => "unspecified",
        pb::Kind::Event => "event",
        pb::Kind::Response => "response",
        pb::Kind::ConnectionUp => "connection_up",
        pb::Kind::ConnectionDown => "connection_down",
        pb::Kind::Gap => "gap",
        pb::Kind::ParseError => "parse_error",
        pb::Kind::Banner => "banner",
        pb::Kind::Action => "action",
        pb::Kind::Unknown => "unknown",
        pb::Kind::SnapshotBegin => "snapshot_begin",
        pb::Kind::SnapshotEnd => "snapshot_end",
    }
}

/// The partition key of an envelope: `server/Linkedid`, else `server/Uniqueid`, else `server`.
pub fn envelope_partition_key(env: &pb::Envelope) -> String {
    let id = if env.linkedid.is_empty() {
        &env.uniqueid
    } else {
        &env.linkedid
    };
    if id.is_empty() {
        env.server.clone()
    } else {
        format!("{}/{}", env.server, id)
    }
}

/// Append `env` as one JSON object and a newline.
pub fn write_json_line(env: &pb::Envelope, out: &mut Vec<u8>) {
    out.push(b'{');
    field(out, "kind", true);
    string(out, kind_name(env.kind()));
    field(out, "name", false);
    string(out, &env.name);
    field(out, "server", false);
    string(out, &env.server);
    field(out, "epoch", false);
    int64(out, env.epoch);
    field(out, "seq", false);
    int64(out, env.seq);
    field(out, "received_at_ns", false);
    int64(out, env.received_at_ns);
    field(out, "partition_key", false);
    string(out, &envelope_partition_key(env));
    for (name, v) in [
        ("original_name", &env.original_name),
        ("privilege", &env.privilege),
        ("action_id", &env.action_id),
        ("uniqueid", &env.uniqueid),
        ("linkedid", &env.linkedid),
        ("channel", &env.channel),
        ("snapshot_id", &env.snapshot_id),
    ] {
        if !v.is_empty() {
            field(out, name, false);
            string(out, v);
        }
    }
    if let Some(t) = env.asterisk_time_us {
        field(out, "asterisk_time_us", false);
        int64(out, t);
    }
    if !env.headers.is_empty() || env.detail.is_none() {
        field(out, "headers", false);
        out.push(b'[');
        for (i, h) in env.headers.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'[');
            bytes(out, &h.key);
            out.push(b',');
            match &h.value {
                Some(v) => bytes(out, v),
                None => out.extend_from_slice(b"null"),
            }
            if !h.normalized_key.is_empty() {
                out.push(b',');
                string(out, &h.normalized_key);
            }
            out.push(b']');
        }
        out.push(b']');
    }
    if !env.body.is_empty() {
        field(out, "body", false);
        bytes(out, &env.body);
    }
    match &env.detail {
        None => {}
        Some(Detail::ConnectionUp(d)) => detail(
            out,
            "connection_up",
            &[("ami_version", &d.ami_version), ("address", &d.address)],
        ),
        Some(Detail::ConnectionDown(d)) => detail(out, "connection_down", &[("reason", &d.reason)]),
        Some(Detail::ParseError(d)) => detail(
            out,
            "parse_error",
            &[("reason", &d.reason), ("message", &d.message)],
        ),
        Some(Detail::Gap(g)) => {
            field(out, "gap", false);
            out.push(b'{');
            field(out, "epoch", true);
            int64(out, g.epoch);
            field(out, "first_seq", false);
            int64(out, g.first_seq);
            field(out, "last_seq", false);
            int64(out, g.last_seq);
            field(out, "reason", false);
            string(out, &g.reason);
            out.push(b'}');
        }
        Some(Detail::SnapshotBegin(b)) => super::snapshot_json::begin(out, b),
        Some(Detail::SnapshotEnd(e)) => super::snapshot_json::end(out, e),
    }
    out.extend_from_slice(b"}\n");
}

/// Append the envelope of `frame` as one JSON object and a newline, written from the frame and
/// `n` (which must be `normalize(frame)`) without building an `Envelope`: the same bytes as
/// `write_json_line(&to_envelope(stamp, n, frame), out)`.
pub fn write_frame_line(stamp: &Stamp, n: &Normalized<'_>, frame: &Frame<'_>, out: &mut Vec<u8>) {
    out.push(b'{');
    field(out, "kind", true);
    string(out, kind_name(n.kind));
    field(out, "name", false);
    string(out, &utf8(n.name));
    field(out, "server", false);
    string(out, &stamp.server);
    field(out, "epoch", false);
    int64(out, stamp.epoch);
    field(out, "seq", false);
    int64(out, stamp.seq);
    field(out, "received_at_ns", false);
    int64(out, stamp.received_at_ns);
    field(out, "partition_key", false);
    // An id that is set is never empty (normalize drops empty ones), as text it stays non-empty.
    match n.linkedid.or(n.uniqueid).filter(|id| !id.is_empty()) {
        Some(id) => string(out, &format!("{}/{}", stamp.server, utf8(id))),
        None => string(out, &stamp.server),
    }
    for (name, v) in [
        ("original_name", n.original_name),
        ("privilege", n.privilege),
        ("action_id", n.action_id),
        ("uniqueid", n.uniqueid),
        ("linkedid", n.linkedid),
        ("channel", n.channel),
    ] {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            field(out, name, false);
            string(out, &utf8(v));
        }
    }
    if let Some(t) = n.asterisk_time_us {
        field(out, "asterisk_time_us", false);
        int64(out, t);
    }
    field(out, "headers", false);
    out.push(b'[');
    for (i, h) in frame.headers().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'[');
        bytes(out, h.key);
        out.push(b',');
        match h.value {
            Some(v) => bytes(out, v),
            None => out.extend_from_slice(b"null"),
        }
        if let Some(modern) = n.legacy.as_ref().and_then(|m| legacy::modern_key(m, h.key)) {
            out.push(b',');
            string(out, modern);
        }
        out.push(b']');
    }
    out.push(b']');
    if let Some(body) = frame.body().filter(|b| !b.is_empty()) {
        field(out, "body", false);
        bytes(out, body);
    }
    out.extend_from_slice(b"}\n");
}

fn detail(out: &mut Vec<u8>, name: &str, fields: &[(&str, &String)]) {
    field(out, name, false);
    out.push(b'{');
    for (i, (k, v)) in fields.iter().enumerate() {
        field(out, k, i == 0);
        string(out, v);
    }
    out.push(b'}');
}

pub(super) fn field(out: &mut Vec<u8>, name: &str, first: bool) {
    if !first {
        out.push(b',');
    }
    string(out, name);
    out.push(b':');
}

/// A 64-bit integer as the proto3 JSON mapping writes it: a decimal string.
pub(super) fn int64(out: &mut Vec<u8>, v: impl itoa::Integer) {
    out.push(b'"');
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
    out.push(b'"');
}

pub(super) fn string(out: &mut Vec<u8>, s: &str) {
    // serde_json escapes exactly as JSON requires; writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    match std::str::from_utf8(b) {
        Ok(s) => string(out, s),
        Err(_) => {
            out.extend_from_slice(b"{\"b64\":\"");
            out.extend_from_slice(STANDARD.encode(b).as_bytes());
            out.extend_from_slice(b"\"}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_keep_bytes_and_lines_without_colon() {
        let env = pb::Envelope {
            server: "pbx1".into(),
            epoch: 3,
            seq: 9,
            kind: pb::Kind::Event as i32,
            name: "UserEvent".into(),
            linkedid: "1.2".into(),
            headers: vec![
                pb::Header {
                    key: b"Event".to_vec(),
                    value: Some(b"UserEvent".to_vec()),
                    normalized_key: String::new(),
                },
                pb::Header {
                    key: b"NoColon \"q\"".to_vec(),
                    value: None,
                    normalized_key: String::new(),
                },
                pb::Header {
                    key: b"CallerIDName".to_vec(),
                    value: Some(b"Jos\xe9".to_vec()),
                    normalized_key: String::new(),
                },
            ],
            ..Default::default()
        };
        let mut out = Vec::new();
        write_json_line(&env, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["kind"], "event");
        assert_eq!(v["partition_key"], "pbx1/1.2");
        assert_eq!(v["headers"][1], serde_json::json!(["NoColon \"q\"", null]));
        assert_eq!(v["headers"][2][1]["b64"], "Sm9z6Q==");
        assert_eq!(out.last(), Some(&b'\n'));
    }

    #[test]
    fn every_64_bit_integer_is_a_string_that_keeps_its_value() {
        // Past 2^53: a double rounds each of these.
        let big = (1u64 << 53) + 1;
        let env = pb::Envelope {
            server: "pbx1".into(),
            epoch: big,
            seq: u64::MAX,
            kind: pb::Kind::Gap as i32,
            received_at_ns: 1_795_671_272_021_146_123,
            asterisk_time_us: Some(-9_007_199_254_740_993),
            detail: Some(Detail::Gap(pb::Gap {
                epoch: big,
                first_seq: big + 2,
                last_seq: u64::MAX - 1,
                reason: "handoff queue full".into(),
            })),
            ..Default::default()
        };
        let mut out = Vec::new();
        write_json_line(&env, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["epoch"], big.to_string());
        assert_eq!(v["seq"], u64::MAX.to_string());
        assert_eq!(v["received_at_ns"], "1795671272021146123");
        assert_eq!(v["asterisk_time_us"], "-9007199254740993");
        assert_eq!(
            v["gap"],
            serde_json::json!({"epoch": big.to_string(), "first_seq": (big + 2).to_string(),
                               "last_seq": (u64::MAX - 1).to_string(),
                               "reason": "handoff queue full"})
        );
        // No bare number anywhere in the line.
        fn no_numbers(v: &serde_json::Value) -> bool {
            match v {
                serde_json::Value::Number(_) => false,
                serde_json::Value::Array(a) => a.iter().all(no_numbers),
                serde_json::Value::Object(o) => o.values().all(no_numbers),
                _ => true,
            }
        }
        assert!(no_numbers(&v), "{v}");
    }

    #[test]
    fn frames_write_the_bytes_their_envelope_writes() {
        use crate::ami::{Parsed, Parser};
        use std::sync::Arc;
        let stamp = Stamp {
            server: Arc::from("pbx \"1\""),
            epoch: (1 << 53) + 1,
            seq: 9,
            received_at_ns: 1_795_671_272_021_146_123,
        };
        let inputs: [&[u8]; 8] = [
            b"Event: Dial\r\nPrivilege: call,all\r\nSubEvent: Begin\r\nDestination: SIP/b\r\nUniqueID: 1.1\r\nTimestamp: 1.5\r\n\r\n",
            b"Event: UserEvent\r\nNoColonLine\r\nEmpty:\r\nName: Jos\xe9\r\nChannel: \xff\r\n\r\n",
            b"Response: Follows\r\nPrivilege: Command\r\nActionID: \"q\"\r\nout\r\n\r\n\xfe\n--END COMMAND--\r\n\r\n",
            b"Response: Follows\r\nPrivilege: Command\r\n--END COMMAND--\r\n\r\n",
            b"Asterisk Call Manager/11.0.0\r\n",
            b"Event: X\r\nLinkedid: <unknown>\r\nUniqueid: 7.\xc3\r\n\r\n",
            b"Event: X\r\nLinkedid:\r\nDestLinkedid: d\\/\r\nUniqueid: u\r\n\r\n",
            b"NoColonFirst\r\nkey: v\r\n\r\n",
        ];
        for input in inputs {
            let mut p = Parser::default();
            let Parsed::Frame { frame, .. } = p.parse(input) else {
                panic!("expected a frame: {}", input.escape_ascii());
            };
            let n = crate::model::normalize(&frame);
            let (mut direct, mut via_envelope) = (Vec::new(), Vec::new());
            write_frame_line(&stamp, &n, &frame, &mut direct);
            write_json_line(
                &crate::model::to_envelope(&stamp, &n, &frame),
                &mut via_envelope,
            );
            assert_eq!(
                String::from_utf8_lossy(&direct),
                String::from_utf8_lossy(&via_envelope)
            );
            assert_eq!(direct, via_envelope);
        }
    }

    #[test]
    fn a_renamed_legacy_header_carries_its_normalized_key_third() {
        let env = pb::Envelope {
            server: "pbx1".into(),
            kind: pb::Kind::Event as i32,
            name: "DialBegin".into(),
            headers: vec![pb::Header {
                key: b"Destination".to_vec(),
                value: Some(b"SIP/2-0001".to_vec()),
                normalized_key: "DestChannel".into(),
            }],
            ..Default::default()
        };
        let mut out = Vec::new();
        write_json_line(&env, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(
            v["headers"][0],
            serde_json::json!(["Destination", "SIP/2-0001", "DestChannel"])
        );
    }
}
