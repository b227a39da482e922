//! The real Asterisk recordings in `tests/fixtures/` (copied from `shared/fixtures/`, bytes
//! unchanged) parse with exact frame and header counts, whatever the read sizes.

use amibus::ami::{AmiCodec, Decoded, FrameKind, OwnedFrame};
use bytes::BytesMut;
use tokio_util::codec::Decoder;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Decode `input` delivered in reads of `chunk` bytes; parse errors fail the test.
fn decode(input: &[u8], chunk: usize) -> Vec<OwnedFrame> {
    let mut codec = AmiCodec::default();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        while let Some(item) = codec
            .decode(&mut buf)
            .expect("the codec never fails the stream")
        {
            match item {
                Decoded::Frame(f) => frames.push(f),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    if let Some(item) = codec.decode_eof(&mut buf).expect("eof") {
        panic!("unexpected at end of stream: {item:?}");
    }
    assert_eq!(codec.stats().errors, 0);
    frames
}

struct Counts {
    banners: usize,
    events: usize,
    responses: usize,
    actions: usize,
    headers: usize,
    bodies: usize,
}

fn counts(frames: &[OwnedFrame]) -> Counts {
    let mut c = Counts {
        banners: 0,
        events: 0,
        responses: 0,
        actions: 0,
        headers: 0,
        bodies: 0,
    };
    for f in frames {
        let f = f.frame();
        if f.kind() == FrameKind::Banner {
            c.banners += 1;
            continue;
        }
        c.headers += f.len();
        c.bodies += usize::from(f.body().is_some());
        match f.header(0).map(|h| h.key) {
            Some(b"Event") => c.events += 1,
            Some(b"Response") => c.responses += 1,
            Some(b"Action") => c.actions += 1,
            other => panic!("frame starting with {other:?}"),
        }
    }
    c
}

fn check(name: &str, expect: (usize, usize, usize, usize, usize)) -> Vec<OwnedFrame> {
    let input = fixture(name);
    let whole = decode(&input, input.len());
    for chunk in [4096, 1000, 7] {
        let chunked = decode(&input, chunk);
        let first_diff = chunked.iter().zip(&whole).position(|(a, b)| a != b);
        assert_eq!(
            (chunked.len(), first_diff),
            (whole.len(), None),
            "{name} in reads of {chunk}: {:?}",
            first_diff.map(|i| (&chunked[i], &whole[i]))
        );
    }
    let c = counts(&whole);
    assert_eq!(
        (c.banners, c.events, c.responses, c.actions, c.headers),
        expect,
        "{name}: (banners, events, responses, actions, headers)"
    );
    let consumed: usize = whole.iter().map(|f| f.bytes().len()).sum();
    assert!(consumed <= input.len());
    whole
}

#[test]
fn asterisk22_events() {
    let frames = check("asterisk22-events.ami", (1, 7702, 1, 0, 165_052));
    assert_eq!(frames[0].frame().banner_version(), Some(&b"11.0.0"[..]));
    // The longest frame in the recording: a 109,078-byte UserEvent with 120 headers.
    let raw: usize = frames.iter().map(|f| f.bytes().len()).sum();
    assert_eq!(
        raw,
        fixture("asterisk22-events.ami").len(),
        "every byte is in a frame"
    );
}

#[test]
fn asterisk22_actions_session() {
    let frames = check("asterisk22-actions.ami", (1, 5894, 2494, 0, 134_450));
    // Park's stray `\n` stays in the value.
    let parks = frames
        .iter()
        .filter(|f| f.frame().get("Message") == Some(&b"Park successful\n"[..]))
        .count();
    assert_eq!(parks, 6);
    // Command output: one `Output:` header per CLI line, duplicates kept.
    let outputs: usize = frames
        .iter()
        .map(|f| f.frame().get_all("Output").count())
        .max()
        .unwrap_or(0);
    assert!(outputs > 50, "a Command response keeps every Output line");
    // The longest frame in the recordings: a 109,078-byte UserEvent with 120 headers.
    let longest = frames.iter().map(|f| f.bytes().len()).max();
    assert!(longest >= Some(109_078));
    let most_headers = frames.iter().map(|f| f.frame().len()).max();
    assert!(most_headers >= Some(120));
}

#[test]
fn asterisk22_actions_sent_by_the_client() {
    check("asterisk22-actions.sent", (0, 0, 0, 2494, 12_623));
}

#[test]
fn asterisk13_command_follows() {
    // 39 Follows frames: Response and Privilege each, ActionID on 34 of them.
    let frames = check(
        "asterisk13-actions-head.ami",
        (1, 683, 286, 0, 16_245 + 39 * 2 + 34),
    );
    let follows: Vec<_> = frames
        .iter()
        .filter(|f| f.frame().body().is_some())
        .collect();
    assert_eq!(follows.len(), 39);
    for f in follows {
        let body = f.frame().body().unwrap_or_default();
        assert!(!body.windows(15).any(|w| w == b"--END COMMAND--"));
        assert_eq!(f.frame().get("Privilege"), Some(&b"Command"[..]));
    }
}

#[test]
fn small_recordings() {
    check("asterisk22-md5login.ami", (1, 0, 4, 0, 13));
    check("asterisk22-md5login.sent", (0, 0, 0, 4, 13));
    check("asterisk22-authfail-badpassword.ami", (1, 0, 2, 0, 6));
    check("asterisk22-authfail-md5badkey.ami", (1, 0, 3, 0, 9));
    check("asterisk22-authfail-unknownuser.ami", (1, 0, 1, 0, 3));
    for name in [
        "asterisk22-md5login.ami",
        "asterisk22-authfail-md5badkey.ami",
    ] {
        let input = fixture(name);
        assert_eq!(
            decode(&input, 1),
            decode(&input, input.len()),
            "{name} byte by byte"
        );
    }
}
