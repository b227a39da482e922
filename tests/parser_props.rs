//! Property tests for the AMI frame parser (`src/ami/parser.rs`).
//!
//! - Chunking invariance: any way of cutting a stream into reads gives the same items (frames with
//!   their raw bytes, errors, the end-of-stream verdict) as one read, through `AmiCodec` and through
//!   `Parser` directly, with default and with tiny limits (so the discard path runs).
//! - A naive reference parser, written from the module docs' wire rules (byte by byte, allocating,
//!   re-reading from the frame start), agrees with the fast parser on arbitrary input, with every
//!   classifier the machine runs (AVX2, SSE2 or NEON, and the portable fallback), under every
//!   chunking; the headers the parser notes for normalization ([`Known`]) equal a search.
//! - Progress: every call returns a frame, skips at least one byte, reports an error, or says
//!   Partial; Partial is stable; what stays buffered after Partial is bounded by the frame limit.

use amibus::ami::parser::{BANNER_PREFIX, END_COMMAND};
use amibus::ami::{
    AmiCodec, Classifier, Decoded, FrameKind, Known, Limits, ParseError, Parsed, Parser,
};
use bytes::BytesMut;
use proptest::prelude::*;
use tokio_util::codec::Decoder;

/// Bytes that print as escaped text in failure reports.
#[derive(Clone, PartialEq, Eq)]
struct B(Vec<u8>);

impl std::fmt::Debug for B {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{}\"", self.0.escape_ascii())
    }
}

fn b(bytes: &[u8]) -> B {
    B(bytes.to_vec())
}

type Header = (B, Option<B>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Item {
    Frame {
        kind: FrameKind,
        headers: Vec<Header>,
        body: Option<B>,
        raw: B,
        /// The value of each of [`KNOWN`], as the frame reports it.
        known: Vec<Option<B>>,
    },
    Error(ParseError),
    Truncated(usize),
}

const KNOWN: [Known; 8] = [
    Known::Channel,
    Known::Uniqueid,
    Known::Linkedid,
    Known::ActionId,
    Known::Privilege,
    Known::Timestamp,
    Known::Extension,
    Known::PrefixedLinkedid,
];

fn frame_item(frame: &amibus::ami::Frame<'_>) -> Item {
    Item::Frame {
        kind: frame.kind(),
        headers: frame
            .headers()
            .map(|h| (b(h.key), h.value.map(b)))
            .collect(),
        body: frame.body().map(b),
        raw: b(frame.raw()),
        known: KNOWN.iter().map(|&k| frame.known(k).map(b)).collect(),
    }
}

/// The reference parser: the wire rules of the module docs, with no state kept between calls.
mod naive {
    use super::*;

    /// The limits as the parser applies them: a frame limit below 2 would make blank lines
    /// between frames errors, and at least one header must fit.
    pub fn clamp(limits: Limits) -> (usize, usize) {
        (
            limits
                .max_frame_bytes
                .clamp(2, Limits::MAX_FRAME_BYTES_CEILING),
            limits.max_headers.max(1),
        )
    }

    /// The line starting at `i`: `(content_end, next_line_start)`, or `None` until more bytes
    /// decide it. A line ends at `\r\n` or a bare `\n`; a bare `\n` after content that is directly
    /// followed by `\r\n` is part of the content and the `\r\n` ends the line.
    pub fn line_at(b: &[u8], i: usize) -> Option<(usize, usize)> {
        let mut j = i;
        while *b.get(j)? != b'\n' {
            j += 1;
        }
        if j == i {
            return Some((j, j + 1));
        }
        if b[j - 1] == b'\r' {
            return Some((j - 1, j + 1));
        }
        match (b.get(j + 1), b.get(j + 2)) {
            (None, _) | (Some(b'\r'), None) => None,
            (Some(b'\r'), Some(b'\n')) => Some((j + 1, j + 3)),
            _ => Some((j, j + 1)),
        }
    }

    fn first_lf(b: &[u8], i: usize) -> Option<usize> {
        b[i..].iter().position(|&c| c == b'\n').map(|k| i + k)
    }

    /// `Key: value`: the key is before the first colon, one space after it is dropped.
    pub fn header(line: &[u8]) -> Header {
        match line.iter().position(|&c| c == b':') {
            None => (b(line), None),
            Some(colon) => {
                let mut value = &line[colon + 1..];
                if value.first() == Some(&b' ') {
                    value = &value[1..];
                }
                (b(&line[..colon]), Some(b(value)))
            }
        }
    }

    fn key_is(h: &Header, name: &str) -> bool {
        h.0.0.eq_ignore_ascii_case(name.as_bytes())
    }

    /// Each of [`KNOWN`]: the first header after the first line with that key and a value.
    pub fn known(headers: &[Header]) -> Vec<Option<B>> {
        let is_known = |key: &[u8], k: Known| -> bool {
            let named = |name: &str| key.eq_ignore_ascii_case(name.as_bytes());
            match k {
                Known::Channel => named("Channel"),
                Known::Uniqueid => named("Uniqueid"),
                Known::Linkedid => named("Linkedid"),
                Known::ActionId => named("ActionID"),
                Known::Privilege => named("Privilege"),
                Known::Timestamp => named("Timestamp"),
                Known::Extension => named("Extension"),
                Known::PrefixedLinkedid => {
                    key.len() > 8 && key[key.len() - 8..].eq_ignore_ascii_case(b"Linkedid")
                }
            }
        };
        KNOWN
            .iter()
            .map(|&k| {
                headers
                    .iter()
                    .skip(1)
                    .find(|(key, value)| value.is_some() && is_known(&key.0, k))
                    .and_then(|(_, value)| value.clone())
            })
            .collect()
    }

    fn is_follows(h: &Header) -> bool {
        key_is(h, "Response")
            && h.1
                .as_ref()
                .is_some_and(|v| v.0.eq_ignore_ascii_case(b"Follows"))
    }

    /// A header Asterisk 13 writes between `Response: Follows` and the output.
    fn is_follows_header(line: &[u8]) -> bool {
        let h = header(line);
        h.1.is_some() && (key_is(&h, "Privilege") || key_is(&h, "ActionID"))
    }

    enum Outcome {
        Frame {
            end: usize,
            kind: FrameKind,
            headers: Vec<Header>,
            body: Option<(usize, usize)>,
        },
        /// The frame is given up: bytes are dropped through the first empty line ending after `at`.
        Abandon {
            at: usize,
            error: ParseError,
        },
        Need,
    }

    struct Ctx<'a> {
        b: &'a [u8],
        fs: usize,
        max: usize,
        max_headers: usize,
    }

    impl Ctx<'_> {
        fn window(&self) -> usize {
            self.fs + self.max
        }

        fn too_large(&self) -> Outcome {
            Outcome::Abandon {
                at: self.window(),
                error: ParseError::FrameTooLarge { limit: self.max },
            }
        }

        /// No decision yet for the line at `i`. The frame is too large once a byte past its
        /// window is known and the line's first `\n` is not inside the window.
        fn need(&self, i: usize) -> Outcome {
            let lf_in_window = first_lf(self.b, i).is_some_and(|l| l < self.window());
            if !lf_in_window && self.b.len() > self.window() {
                self.too_large()
            } else {
                Outcome::Need
            }
        }

        fn frame(&self) -> Outcome {
            let b = self.b;
            let mut headers = Vec::new();
            let mut i = self.fs;
            let mut follows = false;
            loop {
                if follows {
                    // After `Response: Follows`: a `Privilege:` or `ActionID:` line is a header,
                    // any other line (an empty one too) begins the body. The line's first `\n`
                    // decides it.
                    let Some(lf) = first_lf(b, i).filter(|&l| l < self.window()) else {
                        return self.need(i);
                    };
                    if !is_follows_header(&b[i..lf]) {
                        return self.body(i, headers);
                    }
                }
                let Some((content_end, next)) = line_at(b, i) else {
                    return self.need(i);
                };
                if next > self.window() {
                    return self.too_large();
                }
                let line = &b[i..content_end];
                if line.is_empty() {
                    return Outcome::Frame {
                        end: next,
                        kind: FrameKind::Message,
                        headers,
                        body: None,
                    };
                }
                if i == self.fs && line.starts_with(BANNER_PREFIX) && !line.contains(&b':') {
                    return Outcome::Frame {
                        end: next,
                        kind: FrameKind::Banner,
                        headers: vec![(B(line.to_vec()), None)],
                        body: None,
                    };
                }
                if headers.len() == self.max_headers {
                    return Outcome::Abandon {
                        at: next,
                        error: ParseError::TooManyHeaders {
                            limit: self.max_headers,
                        },
                    };
                }
                let h = header(line);
                if i == self.fs {
                    follows = is_follows(&h);
                }
                headers.push(h);
                i = next;
            }
        }

        /// A `Response: Follows` body from `start`: it ends only at `--END COMMAND--` (blank
        /// lines are body bytes); after the marker the frame runs to the next `\n`.
        fn body(&self, start: usize, headers: Vec<Header>) -> Outcome {
            let b = self.b;
            let mut k = start;
            loop {
                if b[k..].starts_with(END_COMMAND) {
                    let Some(lf) = first_lf(b, k + END_COMMAND.len()) else {
                        return self.need(b.len());
                    };
                    if lf + 1 > self.window() {
                        return self.too_large();
                    }
                    return Outcome::Frame {
                        end: lf + 1,
                        kind: FrameKind::Message,
                        headers,
                        body: Some((start, k)),
                    };
                }
                if k == b.len() {
                    return self.need(b.len());
                }
                k += 1;
            }
        }
    }

    /// Parse everything in `b`; return the items and how many bytes remain for a frame that
    /// needs more input (0 while an abandoned frame is being dropped).
    pub fn parse(b: &[u8], limits: Limits) -> (Vec<Item>, usize) {
        let (max, max_headers) = clamp(limits);
        let mut items = Vec::new();
        let mut p = 0;
        loop {
            // Blank lines between frames are no part of any frame.
            while let Some((content_end, next)) = line_at(b, p) {
                if content_end != p {
                    break;
                }
                p = next;
            }
            let ctx = Ctx {
                b,
                fs: p,
                max,
                max_headers,
            };
            match ctx.frame() {
                Outcome::Need => return (items, b.len() - p),
                Outcome::Frame {
                    end,
                    kind,
                    headers,
                    body,
                } => {
                    items.push(Item::Frame {
                        kind,
                        known: known(&headers),
                        headers,
                        body: body.map(|(s, e)| B(b[s..e].to_vec())),
                        raw: B(b[p..end].to_vec()),
                    });
                    p = end;
                }
                Outcome::Abandon { at, error } => {
                    items.push(Item::Error(error));
                    // Lines are read from the frame start, so they split exactly as in a frame.
                    let mut i = p;
                    loop {
                        let Some((content_end, next)) = line_at(b, i) else {
                            return (items, 0);
                        };
                        if content_end == i && next > at {
                            p = next;
                            break;
                        }
                        i = next;
                    }
                }
            }
        }
    }

    /// What the codec reports at end of stream for the `left` bytes still buffered.
    pub fn eof(b: &[u8], left: usize) -> Option<Item> {
        let rest = &b[b.len() - left..];
        (!rest.is_empty() && rest != b"\r").then_some(Item::Truncated(left))
    }
}

fn fed_sizes(cuts: &[usize], total: usize) -> impl Iterator<Item = usize> + '_ {
    let mut fed = 0;
    let mut k = 0;
    std::iter::from_fn(move || {
        if fed >= total {
            return None;
        }
        let n = if cuts.is_empty() {
            total
        } else {
            cuts[k % cuts.len()].max(1).min(total - fed)
        };
        k += 1;
        fed += n;
        Some(fed)
    })
}

/// Feed `input` to a `Parser` in reads cut by `cuts` (cycled; empty = one read), checking the
/// per-call invariants. Returns the items and the bytes left buffered.
fn parse_fed(
    input: &[u8],
    limits: Limits,
    cuts: &[usize],
    classifier: Classifier,
) -> (Vec<Item>, usize) {
    let mut parser = Parser::with_classifier(limits, classifier);
    let max = parser.limits().max_frame_bytes;
    let max_headers = parser.limits().max_headers;
    let mut buf: Vec<u8> = Vec::new();
    let mut items = Vec::new();
    let mut consumed_total = 0;
    let mut calls = 0;
    for upto in fed_sizes(cuts, input.len()) {
        buf.extend_from_slice(&input[consumed_total + buf.len()..upto]);
        loop {
            calls += 1;
            assert!(
                calls <= 2 * input.len() + 64,
                "the parser does not progress"
            );
            let len = buf.len();
            let consumed = match parser.parse(&buf) {
                Parsed::Frame { frame, consumed } => {
                    assert!(consumed > 0 && consumed <= len, "frame of {consumed}/{len}");
                    assert!(
                        consumed <= max,
                        "a {consumed}-byte frame passed the limit {max}"
                    );
                    assert!(frame.len() <= max_headers, "too many headers passed");
                    assert_eq!(frame.raw(), &buf[..consumed]);
                    items.push(frame_item(&frame));
                    consumed
                }
                Parsed::Skip { consumed, error } => {
                    assert!(consumed <= len, "skip of {consumed}/{len}");
                    assert!(consumed > 0, "a skip must drop bytes");
                    items.extend(error.map(Item::Error));
                    consumed
                }
                Parsed::Partial => {
                    assert!(
                        len <= max + 2,
                        "{len} bytes buffered after Partial, limit {max}"
                    );
                    assert!(
                        matches!(parser.parse(&buf), Parsed::Partial),
                        "Partial must be stable without new bytes"
                    );
                    break;
                }
            };
            buf.drain(..consumed);
            consumed_total += consumed;
        }
    }
    (items, buf.len())
}

/// Feed `input` through `AmiCodec` in reads cut by `cuts`, then end the stream.
fn decode_fed(input: &[u8], limits: Limits, cuts: &[usize]) -> Vec<Item> {
    let mut codec = AmiCodec::new(limits);
    let bound = Parser::new(limits).limits().max_frame_bytes + 2;
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    let mut fed = 0;
    let convert = |d: Decoded| match d {
        Decoded::Frame(f) => {
            let item = frame_item(&f.frame());
            assert_eq!(f.bytes().as_ref(), f.frame().raw());
            item
        }
        Decoded::Error(e) => Item::Error(e),
        Decoded::Truncated { bytes } => Item::Truncated(bytes),
    };
    for upto in fed_sizes(cuts, input.len()) {
        buf.extend_from_slice(&input[fed..upto]);
        fed = upto;
        while let Some(d) = codec.decode(&mut buf).expect("the codec never fails") {
            items.push(convert(d));
        }
        assert!(buf.len() <= bound, "{} bytes buffered", buf.len());
    }
    for _ in 0..3 {
        match codec.decode_eof(&mut buf).expect("the codec never fails") {
            Some(d) => items.push(convert(d)),
            None => {
                assert!(buf.is_empty(), "bytes left after the end of stream");
                return items;
            }
        }
    }
    panic!("decode_eof keeps returning items: {items:?}");
}

// ---------------------------------------------------------------------------------------------
// Strategies

/// Pieces of AMI and of things that confuse AMI parsers.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    let fixed: &[&[u8]] = &[
        b"Event: ",
        b"Event: Newchannel\r\n",
        b"Key: value\r\n",
        b"Key:x\n",
        b"NoColon\r\n",
        b"Response: Follows\r\n",
        b"response:follows\n",
        b"Privilege: Command\r\n",
        b"ActionID: 42\r\n",
        b"--END COMMAND--",
        b"--END COMMAND--\r\n\r\n",
        b"Asterisk Call Manager/1.0\r\n",
        b"Asterisk Call Manager/",
        b"Message: Park successful\n\r\n",
        b"\r\n\r\n",
        b"\n\r\n",
    ];
    let fixed: Vec<Vec<u8>> = fixed.iter().map(|p| p.to_vec()).collect();
    prop_oneof![
        4 => prop::sample::select(fixed),
        4 => prop::sample::select(vec![
            b"\r\n".to_vec(),
            b"\n".to_vec(),
            b"\r".to_vec(),
            b":".to_vec(),
            b" ".to_vec(),
        ]),
        2 => prop::collection::vec(prop::sample::select(b"abcXYZ01-/:".to_vec()), 1..8),
        1 => prop::collection::vec(any::<u8>(), 1..4),
    ]
}

fn stream(max_pieces: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(piece(), 0..max_pieces).prop_map(|p| p.concat())
}

/// An Asterisk 13 `Command` response, more or less well formed: Follows headers, output lines
/// with any line end, the marker (glued or not, or missing) and any terminator.
fn follows_frame() -> impl Strategy<Value = Vec<u8>> {
    let header = prop::sample::select(vec![
        b"Privilege: Command\r\n".to_vec(),
        b"ActionID: 7\r\n".to_vec(),
        b"actionid:x\n".to_vec(),
        b"ActionID: a\n\r\n".to_vec(),
        b"Privilege\r\n".to_vec(),
    ]);
    let output = prop::collection::vec(
        prop_oneof![
            prop::sample::select(vec![
                b"\n".to_vec(),
                b"\r\n".to_vec(),
                b"\r\n\r\n".to_vec(),
                b"\r".to_vec(),
                b"Name: not a header".to_vec(),
                b"--END".to_vec(),
            ]),
            prop::collection::vec(prop::sample::select(b"ab :-".to_vec()), 1..6),
        ],
        0..8,
    );
    let end = prop::sample::select(vec![
        b"--END COMMAND--\r\n\r\n".to_vec(),
        b"--END COMMAND--\n".to_vec(),
        b"--END COMMAND--\n\r\n".to_vec(),
        b"--END COMMAND--".to_vec(),
        b"\r\n\r\n".to_vec(),
        b"\n\n".to_vec(),
        Vec::new(),
    ]);
    (
        prop::collection::vec(header, 0..3),
        output,
        end,
        prop::sample::select(vec![
            b"Response: Follows\r\n".to_vec(),
            b"Response: Follows\n".to_vec(),
        ]),
    )
        .prop_map(|(headers, output, end, first)| {
            [first, headers.concat(), output.concat(), end].concat()
        })
}

/// Frames of every kind, one after another, sometimes with noise in between.
fn frames_stream() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            2 => follows_frame(),
            1 => stream(6),
        ],
        1..6,
    )
    .prop_map(|p| p.concat())
}

/// Read sizes, cycled: mostly small, sometimes large.
fn cuts() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![3 => 1usize..8, 1 => 8usize..200], 1..12)
}

/// Default limits, or tiny ones (0 and 1 included: the parser clamps them).
fn limits() -> impl Strategy<Value = Limits> {
    prop_oneof![
        1 => Just(Limits::default()),
        3 => (0usize..64, 0usize..6).prop_map(|(max_frame_bytes, max_headers)| Limits {
            max_frame_bytes,
            max_headers,
        }),
    ]
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

const FIXTURES: &[&str] = &[
    "asterisk13-actions-head.ami",
    "asterisk22-actions.ami",
    "asterisk22-actions.sent",
    "asterisk22-events.ami",
    "asterisk22-md5login.ami",
    "asterisk22-authfail-md5badkey.ami",
];

fn fixtures() -> &'static [Vec<u8>] {
    static CACHE: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    CACHE.get_or_init(|| FIXTURES.iter().map(|n| fixture(n)).collect())
}

/// The items a whole-stream read gives, checked against the reference, plus the codec's end.
fn check_stream(input: &[u8], limits: Limits, cuts: &[usize]) -> Result<(), TestCaseError> {
    let (expected, expected_left) = naive::parse(input, limits);
    for classifier in Classifier::available() {
        let name = classifier.name();
        let (whole, left) = parse_fed(input, limits, &[], classifier);
        prop_assert_eq!(&whole, &expected, "{} parser vs reference", name);
        prop_assert_eq!(
            left,
            expected_left,
            "{}: bytes left buffered vs reference",
            name
        );

        let (chunked, chunked_left) = parse_fed(input, limits, cuts, classifier);
        prop_assert_eq!(&chunked, &whole, "{}: chunked vs whole (Parser)", name);
        prop_assert_eq!(chunked_left, left);
    }

    let mut with_eof = expected;
    with_eof.extend(naive::eof(input, expected_left));
    let decoded_whole = decode_fed(input, limits, &[]);
    prop_assert_eq!(&decoded_whole, &with_eof, "codec vs reference");
    let decoded = decode_fed(input, limits, cuts);
    prop_assert_eq!(&decoded, &decoded_whole, "chunked vs whole (AmiCodec)");
    Ok(())
}

/// `cases` per property, or `PROPTEST_CASES` when set (for long hunts).
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(4000))]

    #[test]
    fn ami_ish_streams(input in stream(40), limits in limits(), cuts in cuts()) {
        check_stream(&input, limits, &cuts)?;
    }
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn command_follows_streams(input in frames_stream(), limits in limits(), cuts in cuts()) {
        check_stream(&input, limits, &cuts)?;
    }
}

proptest! {
    #![proptest_config(config(800))]

    #[test]
    fn arbitrary_bytes(input in prop::collection::vec(any::<u8>(), 0..300), limits in limits(), cuts in cuts()) {
        check_stream(&input, limits, &cuts)?;
    }

    /// A slice of a real recording, cut anywhere, fed in random reads.
    #[test]
    fn fixture_slices(
        which in 0..FIXTURES.len(),
        start in any::<prop::sample::Index>(),
        len in 0usize..6000,
        big_limit in any::<bool>(),
        max_frame_bytes in 16usize..1500,
        cuts in cuts(),
    ) {
        let data = &fixtures()[which];
        let start = start.index(data.len());
        let input = &data[start..(start + len).min(data.len())];
        let limits = if big_limit {
            Limits::default()
        } else {
            Limits { max_frame_bytes, max_headers: 24 }
        };
        check_stream(input, limits, &cuts)?;
    }
}

/// Each recording, whole: the fast parser agrees with the reference on every frame.
#[test]
fn fixtures_agree_with_reference() {
    for ((name, data), classifier) in FIXTURES
        .iter()
        .zip(fixtures())
        .flat_map(|f| Classifier::available().into_iter().map(move |c| (f, c)))
    {
        let name = format!("{name} ({})", classifier.name());
        let (fast, left) = parse_fed(data, Limits::default(), &[65_536], classifier);
        let (reference, reference_left) = naive::parse(data, Limits::default());
        assert_eq!(fast.len(), reference.len(), "{name}: item count");
        if let Some(i) = fast.iter().zip(&reference).position(|(a, b)| a != b) {
            panic!(
                "{name}: item {i} differs\nfast:      {:?}\nreference: {:?}",
                fast[i], reference[i]
            );
        }
        assert_eq!(left, reference_left, "{name}: bytes left");
    }
}
