//! The envelope contract on the real recordings: the fast encoder equals prost's encoding of the
//! same envelope on every frame, and `amibus decode` turns every recording into records with
//! zero parse errors, in JSON and in length-delimited protobuf.

use std::io;
use std::process::Command;
use std::sync::Arc;

use amibus::ami::{Parsed, Parser, Stamp};
use amibus::app::decode::{self, Args, Format};
use amibus::model::{self, pb};
use prost::Message;

const RECORDINGS: [&str; 6] = [
    "asterisk22-events.ami",
    "asterisk22-actions.ami",
    "asterisk22-actions.sent",
    "asterisk13-actions-head.ami",
    "asterisk22-md5login.ami",
    "asterisk22-authfail-md5badkey.ami",
];

fn fixture_path(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture_path(name)).expect("fixture")
}

fn args(format: Format) -> Args {
    Args {
        input: String::new(),
        server: "pbx-7".into(),
        format,
        max_frame_bytes: amibus::ami::Limits::DEFAULT_MAX_FRAME_BYTES,
        max_headers: amibus::ami::Limits::DEFAULT_MAX_HEADERS,
    }
}

/// `amibus decode --format json` writes frames without a prost `Envelope`; it must write what the
/// envelope path (`json::write_json_line(&to_envelope(..))`) writes, byte for byte.
#[test]
fn direct_json_equals_the_envelope_json_on_every_recorded_frame() {
    let stamp = Stamp {
        server: Arc::from("pbx-7"),
        epoch: 1_795_671_272_000,
        seq: 1,
        received_at_ns: 1_795_671_272_000_000_001,
    };
    let mut frames = 0;
    for name in RECORDINGS {
        let input = fixture(name);
        let mut parser = Parser::default();
        let mut at = 0;
        let (mut direct, mut via_envelope) = (Vec::new(), Vec::new());
        while let Some(rest) = input.get(at..) {
            match parser.parse(rest) {
                Parsed::Frame { frame, consumed } => {
                    let n = model::normalize(&frame);
                    direct.clear();
                    via_envelope.clear();
                    model::json::write_frame_line(&stamp, &n, &frame, &mut direct);
                    let env = model::to_envelope(&stamp, &n, &frame);
                    model::json::write_json_line(&env, &mut via_envelope);
                    assert_eq!(direct, via_envelope, "{name} at byte {at}");
                    frames += 1;
                    at += consumed;
                }
                Parsed::Skip { consumed, .. } => at += consumed,
                Parsed::Partial => break,
            }
        }
    }
    assert!(frames > 16_000, "{frames} frames");
}

#[test]
fn fast_encoder_equals_prost_on_every_recorded_frame() {
    let stamp = Stamp {
        server: Arc::from("pbx-7"),
        epoch: 1_795_671_272_000,
        seq: 1,
        received_at_ns: 1_795_671_272_000_000_001,
    };
    let mut renamed = 0;
    for name in RECORDINGS {
        let input = fixture(name);
        let mut parser = Parser::default();
        let mut at = 0;
        let mut fast = Vec::new();
        loop {
            match parser.parse(&input[at..]) {
                Parsed::Frame { frame, consumed } => {
                    let n = model::normalize(&frame);
                    fast.clear();
                    model::encode_frame(&stamp, &n, &frame, &mut fast);
                    let slow = model::to_envelope(&stamp, &n, &frame);
                    assert_eq!(fast, slow.encode_to_vec(), "{name} at byte {at}");
                    assert_eq!(fast.len(), model::encoded_frame_len(&stamp, &n, &frame));
                    renamed += usize::from(n.original_name.is_some());
                    at += consumed;
                }
                Parsed::Skip { consumed, error } => {
                    assert_eq!(error, None, "{name} at byte {at}");
                    at += consumed;
                }
                Parsed::Partial => break,
            }
        }
        assert_eq!(at, input.len(), "{name} is consumed to the end");
    }
    assert_eq!(
        renamed, 0,
        "Asterisk 13 and 22 recordings use modern event names"
    );
}

/// Frames the recordings do not hold: legacy names whose fields are renamed, separators without
/// the space or with two, lines without a colon, values of 128 bytes and more (two-byte
/// lengths), bytes that are not UTF-8 in typed fields. The fast encoder must still equal prost.
mod fast_encoder_on_generated_frames {
    use super::*;
    use proptest::prelude::*;

    const EVENTS: [&str; 8] = [
        "Newchannel",
        "Link",
        "Dial",
        "Newexten",
        "Bridge",
        "ParkedCall",
        "Hangup",
        "Join",
    ];
    const KEYS: [&str; 16] = [
        "Channel",
        "Uniqueid",
        "Linkedid",
        "ActionID",
        "Privilege",
        "Timestamp",
        "Extension",
        "Channel1",
        "Uniqueid1",
        "Destination",
        "CallerID",
        "DestLinkedid",
        "From",
        "Exten",
        "Value",
        "X",
    ];

    fn value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => "[A-Za-z0-9/._-]{0,24}".prop_map(String::into_bytes),
            1 => prop::collection::vec(any::<u8>().prop_filter("no line end", |b| *b != b'\n' && *b != b'\r'), 0..200),
            1 => Just(b"1795671272.021146".to_vec()),
        ]
    }

    fn frame() -> impl Strategy<Value = Vec<u8>> {
        let line = (
            0..KEYS.len(),
            prop_oneof![Just(": "), Just(":"), Just(":  "), Just("")],
            value(),
        );
        (0..EVENTS.len(), prop::collection::vec(line, 0..12)).prop_map(|(event, lines)| {
            let mut f = format!("Event: {}\r\n", EVENTS[event]).into_bytes();
            for (key, sep, value) in lines {
                f.extend_from_slice(KEYS[key].as_bytes());
                f.extend_from_slice(sep.as_bytes());
                if !sep.is_empty() {
                    f.extend_from_slice(&value);
                }
                f.extend_from_slice(b"\r\n");
            }
            f.extend_from_slice(b"\r\n");
            f
        })
    }

    proptest! {
        #[test]
        fn equals_prost(input in frame()) {
            let stamp = Stamp {
                server: Arc::from("pbx-7"),
                epoch: 1_795_671_272_000,
                seq: 300,
                received_at_ns: 1_795_671_272_000_000_001,
            };
            let mut parser = Parser::default();
            let Parsed::Frame { frame, .. } = parser.parse(&input) else {
                return Err(TestCaseError::fail("a whole frame"));
            };
            let n = model::normalize(&frame);
            let mut fast = b"kept".to_vec();
            model::encode_frame(&stamp, &n, &frame, &mut fast);
            let slow = model::to_envelope(&stamp, &n, &frame).encode_to_vec();
            prop_assert_eq!(&fast[..4], b"kept");
            prop_assert_eq!(&fast[4..], &slow[..]);
            prop_assert_eq!(slow.len(), model::encoded_frame_len(&stamp, &n, &frame));
        }
    }
}

#[test]
fn decode_json_lines_cover_every_frame() {
    let input = fixture("asterisk22-events.ami");
    let mut out = Vec::new();
    let summary = decode::decode(
        io::Cursor::new(input.clone()),
        &mut out,
        &args(Format::Json),
    )
    .expect("decodes");
    assert_eq!(summary.parse_errors, 0);
    assert_eq!(summary.frames, 7704);
    assert_eq!(summary.bytes, input.len() as u64);
    let mut kinds = std::collections::BTreeMap::new();
    let mut last_seq = 0;
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line).expect("each line is JSON");
        *kinds
            .entry(v["kind"].as_str().unwrap_or("?").to_owned())
            .or_insert(0) += 1;
        let seq: u64 = v["seq"]
            .as_str()
            .expect("seq, a string")
            .parse()
            .expect("seq");
        assert_eq!(seq, last_seq + 1, "seq counts every record");
        last_seq = seq;
        assert_eq!(v["server"], "pbx-7");
        assert!(v["headers"].as_array().is_some_and(|h| !h.is_empty()));
        if v["kind"] == "event" {
            assert_eq!(v["name"], v["headers"][0][1]);
        }
    }
    assert_eq!(kinds.get("banner"), Some(&1));
    assert_eq!(kinds.get("response"), Some(&1));
    assert_eq!(kinds.get("event"), Some(&7702));
}

#[test]
fn decode_proto_stream_round_trips() {
    for name in RECORDINGS {
        let input = fixture(name);
        let mut out = Vec::new();
        let summary = decode::decode(
            io::Cursor::new(input.clone()),
            &mut out,
            &args(Format::Proto),
        )
        .expect("decodes");
        assert_eq!(summary.parse_errors, 0, "{name}");
        let mut rest = &out[..];
        let mut headers = 0;
        let mut records = 0;
        while !rest.is_empty() {
            let env = pb::Envelope::decode_length_delimited(&mut rest).expect("envelope");
            assert_eq!(env.server, "pbx-7");
            headers += env.headers.len();
            records += 1;
        }
        assert_eq!(records, summary.frames, "{name}");
        assert!(headers > 0);
    }
}

/// A reader that hands out its bytes in reads of the given sizes, in turn.
struct Trickle {
    bytes: Vec<u8>,
    at: usize,
    sizes: Vec<usize>,
    turn: usize,
}

impl io::Read for Trickle {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let size = self.sizes[self.turn % self.sizes.len()];
        self.turn += 1;
        let n = size.min(out.len()).min(self.bytes.len() - self.at);
        out[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Frames cut anywhere by the reads, and joined to the next chunk (the action recording holds a
/// 109 KB `UserEvent`, longer than the room kept before a chunk): the same envelopes as one
/// read, but for the receive time, which is taken per read.
#[test]
fn decode_gives_the_same_envelopes_whatever_the_reads() {
    let envelopes = |out: &[u8]| {
        let mut rest = out;
        let mut all = Vec::new();
        while !rest.is_empty() {
            let mut env = pb::Envelope::decode_length_delimited(&mut rest).expect("envelope");
            env.received_at_ns = 0;
            all.push(env);
        }
        all
    };
    for name in ["asterisk22-actions.ami", "asterisk13-actions-head.ami"] {
        let input = fixture(name);
        let mut whole = Vec::new();
        decode::decode(
            io::Cursor::new(input.clone()),
            &mut whole,
            &args(Format::Proto),
        )
        .expect("decodes");
        let whole = envelopes(&whole);
        for sizes in [
            vec![1, 7, 1000],
            vec![70_000, 3],
            vec![65_536 + 13, 200_000, 5],
        ] {
            let trickle = Trickle {
                bytes: input.clone(),
                at: 0,
                sizes: sizes.clone(),
                turn: 0,
            };
            let mut out = Vec::new();
            let summary = decode::decode(trickle, &mut out, &args(Format::Proto)).expect("decodes");
            assert_eq!(summary.bytes, input.len() as u64, "{name} {sizes:?}");
            assert_eq!(summary.parse_errors, 0, "{name} {sizes:?}");
            assert!(envelopes(&out) == whole, "{name} in reads of {sizes:?}");
        }
    }
}

/// A read error mid-file ends the decode with that error, after the frames read before it.
#[test]
fn a_read_error_is_the_decode_error_after_what_was_read() {
    struct Failing {
        bytes: Vec<u8>,
        at: usize,
    }
    impl io::Read for Failing {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.at == self.bytes.len() {
                return Err(io::Error::other("disk went away"));
            }
            let n = out.len().min(self.bytes.len() - self.at).min(4096);
            out[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }
    let input = fixture("asterisk22-events.ami");
    let cut = input.len() / 2;
    let mut out = Vec::new();
    let failing = Failing {
        bytes: input[..cut].to_vec(),
        at: 0,
    };
    match decode::decode(failing, &mut out, &args(Format::Json)) {
        Err(decode::DecodeError::Input(e)) => assert_eq!(e.to_string(), "disk went away"),
        other => panic!("expected the read error, got {other:?}"),
    }
    // Every whole frame of the part read was written, and no `truncated` record for the rest.
    let read = decode::decode(
        io::Cursor::new(input[..cut].to_vec()),
        &mut Vec::new(),
        &args(Format::None),
    )
    .expect("decodes");
    let written = out.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count();
    assert!(read.frames > 1000);
    assert_eq!(written as u64, read.frames);
}

#[test]
fn oversized_frames_become_parse_error_records() {
    let input = b"Event: A\r\n\r\nEvent: Big\r\nX: 0123456789012345678901234567890123456789\r\n\r\nEvent: B\r\n\r\nEvent: Cut\r\nPartial";
    let mut a = args(Format::Json);
    a.max_frame_bytes = 40;
    let mut out = Vec::new();
    let summary = decode::decode(&input[..], &mut out, &a).expect("decodes");
    assert_eq!(summary.frames, 2);
    assert_eq!(summary.parse_errors, 2);
    let lines: Vec<serde_json::Value> = out
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("JSON"))
        .collect();
    let kinds: Vec<_> = lines
        .iter()
        .map(|v| v["kind"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(kinds, ["event", "parse_error", "event", "parse_error"]);
    assert_eq!(lines[1]["parse_error"]["reason"], "frame_too_large");
    assert_eq!(lines[3]["parse_error"]["reason"], "truncated");
}

#[test]
fn the_binary_decodes_a_recording() {
    let out = Command::new(env!("CARGO_BIN_EXE_amibus"))
        .args(["decode", "--server", "pbx-1", "--format", "json"])
        .arg(fixture_path("asterisk22-md5login.ami"))
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("UTF-8");
    assert_eq!(stdout.lines().count(), 5);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("decoded 5 frames, 315 bytes, 0 parse errors"),
        "{stderr}"
    );

    let missing = Command::new(env!("CARGO_BIN_EXE_amibus"))
        .args(["decode", "/nonexistent/recording.ami"])
        .output()
        .expect("runs");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot open recording"));
}
