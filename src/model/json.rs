//! Envelopes as JSON lines, for people and for tools that don't speak protobuf.
//!
//! Shape: `{"kind":"event","name":"Newchannel","server":"pbx1","epoch":..,"seq":..,
//! "received_at_ns":..,"partition_key":"pbx1/1795671272.4", ..typed fields when set..,
//! "headers":[["Event","Newchannel"],["NoColonLine",null],["CallerIDName",{"b64":"Sm9z6Q=="}]]}`.
//! A key or value that is not UTF-8 is written as `{"b64": "<standard base64>"}`; a line
//! without a colon has `null` as its value. Synthetic records add their detail object
//! (`connection_up`, `connection_down`, `gap`, `parse_error`).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

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
    number(out, env.epoch);
    field(out, "seq", false);
    number(out, env.seq);
    field(out, "received_at_ns", false);
    out.extend_from_slice(env.received_at_ns.to_string().as_bytes());
    field(out, "partition_key", false);
    string(out, &envelope_partition_key(env));
    for (name, v) in [
        ("original_name", &env.original_name),
        ("privilege", &env.privilege),
        ("action_id", &env.action_id),
        ("uniqueid", &env.uniqueid),
        ("linkedid", &env.linkedid),
        ("channel", &env.channel),
    ] {
        if !v.is_empty() {
            field(out, name, false);
            string(out, v);
        }
    }
    if let Some(t) = env.asterisk_time_us {
        field(out, "asterisk_time_us", false);
        out.extend_from_slice(t.to_string().as_bytes());
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
            out.extend_from_slice(
                format!(
                    "{{\"epoch\":{},\"first_seq\":{},\"last_seq\":{},\"reason\":",
                    g.epoch, g.first_seq, g.last_seq
                )
                .as_bytes(),
            );
            string(out, &g.reason);
            out.push(b'}');
        }
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

fn field(out: &mut Vec<u8>, name: &str, first: bool) {
    if !first {
        out.push(b',');
    }
    string(out, name);
    out.push(b':');
}

fn number(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(v.to_string().as_bytes());
}

fn string(out: &mut Vec<u8>, s: &str) {
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
}
