//! Envelope encoding: frames straight from the read buffer to protobuf bytes.
//!
//! Owns: [`encode_frame`], a hand-written encoder of `amibus.v1.Envelope` that writes header
//! slices directly into the output (no intermediate message, no allocation per header), and
//! [`to_envelope`], the same envelope built as a prost message. A test holds the two to the
//! same bytes on every frame of the real recordings, so the fast path cannot drift from the
//! `.proto`.
//! Must never: write a non-UTF-8 `string` field (typed fields are converted lossily; the
//! lossless bytes stay in `headers`).

use std::borrow::Cow;

use prost::Message;
use prost::encoding::encoded_len_varint;

use crate::ami::frame::Span;
use crate::ami::snapshot::Trigger;
use crate::ami::{Frame, Header, Record, Stamp, Stamped};

use super::cursor::Cursor;
use super::legacy;
use super::normalize::{Normalized, normalize};
use super::pb;

// Field numbers of amibus.v1.Envelope and Header, as in proto/amibus/v1/envelope.proto.
const SERVER: u32 = 1;
const EPOCH: u32 = 2;
const SEQ: u32 = 3;
const KIND: u32 = 4;
const NAME: u32 = 5;
const HEADERS: u32 = 6;
const RECEIVED_AT_NS: u32 = 7;
const UNIQUEID: u32 = 8;
const LINKEDID: u32 = 9;
const CHANNEL: u32 = 10;
const ACTION_ID: u32 = 11;
const PRIVILEGE: u32 = 12;
const ORIGINAL_NAME: u32 = 13;
const ASTERISK_TIME_US: u32 = 14;
const BODY: u32 = 15;
const SNAPSHOT_ID: u32 = 20;
const HEADER_KEY: u32 = 1;
const HEADER_VALUE: u32 = 2;
const HEADER_NORMALIZED_KEY: u32 = 3;

pub(super) const VARINT: u32 = 0;
pub(super) const LEN: u32 = 2;

// One-byte tags of the header submessage and its fields.
const HEADERS_TAG: u8 = (HEADERS << 3 | LEN) as u8;
const HEADER_KEY_TAG: u8 = (HEADER_KEY << 3 | LEN) as u8;
const HEADER_VALUE_TAG: u8 = (HEADER_VALUE << 3 | LEN) as u8;

/// The longest `key: value` line the encoder copies as one fixed-size chunk.
const SHORT_LINE: usize = 64;
/// How much of the chunk is always copied; the rest only for lines longer than this.
const CHUNK_SPLIT: usize = 48;

/// Encode `frame` as an `Envelope`, appending to `out`. `n` must be `normalize(frame)`.
pub fn encode_frame(stamp: &Stamp, n: &Normalized<'_>, frame: &Frame<'_>, out: &mut Vec<u8>) {
    Writer { n, frame }.write(stamp, out);
}

/// The encoded length of [`encode_frame`]'s output, for length-delimited streams.
pub fn encoded_frame_len(stamp: &Stamp, n: &Normalized<'_>, frame: &Frame<'_>) -> usize {
    Writer { n, frame }.len(stamp)
}

struct Writer<'n, 'a> {
    n: &'n Normalized<'a>,
    frame: &'n Frame<'a>,
}

impl Writer<'_, '_> {
    fn len(&self, stamp: &Stamp) -> usize {
        let n = self.n;
        let mut len = string_len(SERVER, stamp.server.as_bytes())
            + uint_len(EPOCH, stamp.epoch)
            + uint_len(SEQ, stamp.seq)
            + uint_len(KIND, n.kind as i32 as u64)
            + text_len(NAME, n.name)
            + uint_len(RECEIVED_AT_NS, stamp.received_at_ns as u64)
            + opt_text_len(UNIQUEID, n.uniqueid)
            + opt_text_len(LINKEDID, n.linkedid)
            + opt_text_len(CHANNEL, n.channel)
            + opt_text_len(ACTION_ID, n.action_id)
            + opt_text_len(PRIVILEGE, n.privilege)
            + opt_text_len(ORIGINAL_NAME, n.original_name)
            + n.asterisk_time_us.map_or(0, |t| {
                key_len(ASTERISK_TIME_US) + encoded_len_varint(t as u64)
            })
            + self.frame.body().map_or(0, |b| string_len(BODY, b));
        for h in self.frame.headers() {
            let inner = self.header_len(h.key, h.value);
            len += key_len(HEADERS) + encoded_len_varint(inner as u64) + inner;
        }
        len
    }

    fn header_len(&self, key: &[u8], value: Option<&[u8]>) -> usize {
        string_len(HEADER_KEY, key)
            + value.map_or(0, |v| {
                key_len(HEADER_VALUE) + encoded_len_varint(v.len() as u64) + v.len()
            })
            + self
                .normalized_key(key)
                .map_or(0, |k| string_len(HEADER_NORMALIZED_KEY, k.as_bytes()))
    }

    fn normalized_key(&self, key: &[u8]) -> Option<&'static str> {
        self.n
            .legacy
            .as_ref()
            .and_then(|m| legacy::modern_key(m, key))
    }

    /// Every header line as a `Header` submessage, in wire order.
    fn write_headers(&self, c: &mut Cursor<'_>) {
        let (buf, spans) = self.frame.lines();
        // A legacy mapping gives the keys it renames a normalized name.
        let renamed = self.n.legacy.map_or(legacy::NONE, |m| m.fields);
        let tail = Tail::of(buf);
        let mut rest = spans;
        while !rest.is_empty() {
            // Room for every remaining line in the common shape: four bytes more than the line
            // without its end (at least one byte), and a chunk's overhang past the last.
            c.room(buf.len() + 3 * rest.len() + SHORT_LINE + 4);
            // Most frames rename nothing: their loop is compiled without the key comparison.
            let (written, end) = if renamed.is_empty() {
                write_short_lines(buf, &tail, rest, |_| false, c.out, c.at)
            } else {
                let is_renamed = |key: &[u8]| renamed.iter().any(|(k, _)| key == k.as_bytes());
                write_short_lines(buf, &tail, rest, is_renamed, c.out, c.at)
            };
            rest = rest.get(written..).unwrap_or_default();
            c.at = end;
            let Some((span, tail)) = rest.split_first() else {
                break;
            };
            self.write_header(span.resolve(buf), c);
            rest = tail;
        }
    }

    /// One header in the general shape: any separator, no value, lengths of more than one
    /// byte, a normalized key.
    fn write_header(&self, h: Header<'_>, c: &mut Cursor<'_>) {
        c.key(HEADERS, LEN);
        c.varint(self.header_len(h.key, h.value) as u64);
        c.string(HEADER_KEY, h.key);
        if let Some(v) = h.value {
            c.key(HEADER_VALUE, LEN);
            c.varint(v.len() as u64);
            c.bytes(v);
        }
        if let Some(k) = self.normalized_key(h.key) {
            c.string(HEADER_NORMALIZED_KEY, k.as_bytes());
        }
    }

    fn write(&self, stamp: &Stamp, out: &mut Vec<u8>) {
        let n = self.n;
        let (buf, spans) = self.frame.lines();
        // Room for the usual envelope, zeroed once: the headers as `write_headers` asks, and
        // a few hundred bytes for the fixed fields and the typed ones (short values).
        let mut c = Cursor::new(
            out,
            buf.len() + 3 * spans.len() + stamp.server.len() + 4 * SHORT_LINE,
        );
        c.string(SERVER, stamp.server.as_bytes());
        c.uint(EPOCH, stamp.epoch);
        c.uint(SEQ, stamp.seq);
        c.uint(KIND, n.kind as i32 as u64);
        put_text(&mut c, NAME, n.name);
        self.write_headers(&mut c);
        c.uint(RECEIVED_AT_NS, stamp.received_at_ns as u64);
        // One call each, not a loop over an array: the field numbers stay constants.
        let mut typed = |field, v: Option<&[u8]>| {
            if let Some(v) = v {
                put_text(&mut c, field, v);
            }
        };
        typed(UNIQUEID, n.uniqueid);
        typed(LINKEDID, n.linkedid);
        typed(CHANNEL, n.channel);
        typed(ACTION_ID, n.action_id);
        typed(PRIVILEGE, n.privilege);
        typed(ORIGINAL_NAME, n.original_name);
        if let Some(t) = n.asterisk_time_us {
            c.key(ASTERISK_TIME_US, VARINT);
            c.varint(t as u64);
        }
        if let Some(b) = self.frame.body() {
            c.string(BODY, b);
        }
        c.finish();
    }
}

/// Write the leading `spans` that are `key: value` lines of at most [`SHORT_LINE`] bytes, as
/// `Header` submessages into `dst` from `at`; return how many were written and where they end.
/// Stops at the first other line (or one whose key `renamed` picks: it carries a normalized key),
/// or where `dst` has no room for a chunk's overhang.
///
/// Each becomes the submessage's tag and length, the key's tag and length, the key, the value's
/// tag and length in place of `": "`, the value: every length fits one byte, so this is four
/// bytes and one copy of the line with two bytes rewritten. The line goes as a fixed-size chunk
/// (a few vector moves, where a copy of a length known only at run time is a call): from the
/// frame, or for the lines in its last [`SHORT_LINE`] bytes from `tail`, a padded copy. Writing
/// by index into room made beforehand keeps the position in a register, where a `Vec` would
/// store and reload its length around every write.
#[inline]
fn write_short_lines(
    buf: &[u8],
    tail: &Tail,
    spans: &[Span],
    renamed: impl Fn(&[u8]) -> bool,
    dst: &mut [u8],
    mut at: usize,
) -> (usize, usize) {
    let mut written = 0;
    for span in spans {
        let Some((start, key_len, len)) = span.short_line(SHORT_LINE) else {
            break;
        };
        let from_line = match buf.get(start..).and_then(<[u8]>::first_chunk::<SHORT_LINE>) {
            Some(chunk) => chunk,
            None => match tail.chunk_at(start) {
                Some(chunk) => chunk,
                None => break,
            },
        };
        if renamed(buf.get(start..start + key_len).unwrap_or_default()) {
            break;
        }
        let Some((head, line)) = dst
            .get_mut(at..)
            .and_then(<[u8]>::split_first_chunk_mut::<4>)
        else {
            break;
        };
        let Some(line) = line.first_chunk_mut::<SHORT_LINE>() else {
            break;
        };
        *head = [HEADERS_TAG, (len + 2) as u8, HEADER_KEY_TAG, key_len as u8];
        // Nearly every line fits the first 48 bytes (98 % on the recordings): the last 16 are
        // written only for a line that reaches them, a branch that is then rarely taken. With
        // the split at 32 (83 % of lines below it), the branch went both ways and cost more
        // than the third 16-byte move does.
        let (line_low, line_high) = line.split_at_mut(CHUNK_SPLIT);
        let (from_low, from_high) = from_line.split_at(CHUNK_SPLIT);
        line_low.copy_from_slice(from_low);
        if len > CHUNK_SPLIT {
            line_high.copy_from_slice(from_high);
        }
        line[key_len..key_len + 2].copy_from_slice(&[HEADER_VALUE_TAG, (len - key_len - 2) as u8]);
        at += 4 + len;
        written += 1;
    }
    (written, at)
}

/// A frame's last [`SHORT_LINE`] bytes followed by as many zeros, so that a line among them
/// can be copied as a fixed-size chunk too. Made once per frame.
struct Tail {
    /// Where the copied bytes start in the frame.
    start: usize,
    bytes: [u8; 2 * SHORT_LINE],
}

impl Tail {
    fn of(buf: &[u8]) -> Self {
        let mut bytes = [0u8; 2 * SHORT_LINE];
        match buf.last_chunk::<SHORT_LINE>() {
            Some(last) => bytes[..SHORT_LINE].copy_from_slice(last),
            None => bytes[..buf.len()].copy_from_slice(buf),
        }
        Tail {
            start: buf.len().saturating_sub(SHORT_LINE),
            bytes,
        }
    }

    /// The chunk from frame offset `at`, if `at` lies among the copied bytes.
    #[inline]
    fn chunk_at(&self, at: usize) -> Option<&[u8; SHORT_LINE]> {
        at.checked_sub(self.start)
            .and_then(|i| self.bytes.get(i..))
            .and_then(<[u8]>::first_chunk::<SHORT_LINE>)
    }
}

#[inline]
fn key_len(field: u32) -> usize {
    encoded_len_varint(u64::from(field << 3))
}

/// proto3 `bytes`/`string` with implicit presence: nothing when empty.
#[inline]
fn string_len(field: u32, v: &[u8]) -> usize {
    if v.is_empty() {
        0
    } else {
        key_len(field) + encoded_len_varint(v.len() as u64) + v.len()
    }
}

/// A `string` field's bytes from bytes that may not be UTF-8: as they are when ASCII (typed
/// fields are, on every server we have seen; `is_ascii` checks a word at a time where
/// `from_utf8` pays for its generality on these short values), else with replacement
/// characters where they are not UTF-8.
#[inline]
fn text_bytes(v: &[u8]) -> Cow<'_, [u8]> {
    if v.is_ascii() {
        return Cow::Borrowed(v);
    }
    match utf8(v) {
        Cow::Borrowed(s) => Cow::Borrowed(s.as_bytes()),
        Cow::Owned(s) => Cow::Owned(s.into_bytes()),
    }
}

/// A `string` field from bytes that may not be UTF-8 (see [`text_bytes`]); the lossy
/// conversion stays out of line.
#[inline]
fn put_text(c: &mut Cursor<'_>, field: u32, v: &[u8]) {
    if v.is_ascii() {
        c.string(field, v);
    } else {
        lossy_text(c, field, v);
    }
}

#[cold]
#[inline(never)]
fn lossy_text(c: &mut Cursor<'_>, field: u32, v: &[u8]) {
    c.string(field, &text_bytes(v));
}

/// A `string` field from bytes that may not be UTF-8.
#[inline]
fn text_len(field: u32, v: &[u8]) -> usize {
    string_len(field, &text_bytes(v))
}

#[inline]
fn opt_text_len(field: u32, v: Option<&[u8]>) -> usize {
    v.map_or(0, |v| text_len(field, v))
}

#[inline]
fn uint_len(field: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(field) + encoded_len_varint(v)
    }
}

/// Bytes as text; replacement characters only where they are not UTF-8.
#[inline]
pub fn utf8(v: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(v) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(v),
    }
}

fn text(v: Option<&[u8]>) -> String {
    v.map(|v| utf8(v).into_owned()).unwrap_or_default()
}

/// The envelope of `frame` as a prost message (allocates; for tests, tools and rare records).
pub fn to_envelope(stamp: &Stamp, n: &Normalized<'_>, frame: &Frame<'_>) -> pb::Envelope {
    let normalized_key = |key: &[u8]| {
        n.legacy
            .as_ref()
            .and_then(|m| legacy::modern_key(m, key))
            .unwrap_or_default()
            .to_owned()
    };
    pb::Envelope {
        server: stamp.server.to_string(),
        epoch: stamp.epoch,
        seq: stamp.seq,
        kind: n.kind as i32,
        name: text(Some(n.name)),
        headers: frame
            .headers()
            .map(|h| pb::Header {
                key: h.key.to_vec(),
                value: h.value.map(<[u8]>::to_vec),
                normalized_key: normalized_key(h.key),
            })
            .collect(),
        received_at_ns: stamp.received_at_ns,
        uniqueid: text(n.uniqueid),
        linkedid: text(n.linkedid),
        channel: text(n.channel),
        action_id: text(n.action_id),
        privilege: text(n.privilege),
        original_name: text(n.original_name),
        asterisk_time_us: n.asterisk_time_us,
        body: frame.body().map(<[u8]>::to_vec).unwrap_or_default(),
        detail: None,
        snapshot_id: String::new(),
    }
}

/// The envelope of any record. Frames take the prost path here too; use [`encode_record`] on
/// the hot path.
pub fn record_envelope(stamped: &Stamped) -> pb::Envelope {
    let stamp = &stamped.stamp;
    let synthetic = |kind: pb::Kind, detail: pb::envelope::Detail| pb::Envelope {
        server: stamp.server.to_string(),
        epoch: stamp.epoch,
        seq: stamp.seq,
        kind: kind as i32,
        received_at_ns: stamp.received_at_ns,
        detail: Some(detail),
        ..Default::default()
    };
    use pb::envelope::Detail;
    match &stamped.record {
        Record::Frame(f) => {
            let frame = f.frame();
            to_envelope(stamp, &normalize(&frame), &frame)
        }
        Record::ConnectionUp {
            ami_version,
            address,
        } => synthetic(
            pb::Kind::ConnectionUp,
            Detail::ConnectionUp(pb::ConnectionUp {
                ami_version: ami_version.clone(),
                address: address.clone(),
            }),
        ),
        Record::ConnectionDown { reason } => synthetic(
            pb::Kind::ConnectionDown,
            Detail::ConnectionDown(pb::ConnectionDown {
                reason: reason.clone(),
            }),
        ),
        Record::Gap {
            epoch,
            first_seq,
            last_seq,
            reason,
        } => synthetic(
            pb::Kind::Gap,
            Detail::Gap(pb::Gap {
                epoch: *epoch,
                first_seq: *first_seq,
                last_seq: *last_seq,
                reason: reason.clone(),
            }),
        ),
        Record::ParseError(e) => synthetic(
            pb::Kind::ParseError,
            Detail::ParseError(pb::ParseError {
                reason: e.reason.to_owned(),
                message: e.message.clone(),
            }),
        ),
        Record::SnapshotItem { snapshot_id, frame } => {
            let frame = frame.frame();
            pb::Envelope {
                snapshot_id: snapshot_id.to_string(),
                ..to_envelope(stamp, &normalize(&frame), &frame)
            }
        }
        Record::SnapshotBegin(b) => pb::Envelope {
            snapshot_id: b.id.to_string(),
            ..synthetic(
                pb::Kind::SnapshotBegin,
                Detail::SnapshotBegin(pb::SnapshotBegin {
                    snapshot_id: b.id.to_string(),
                    trigger: trigger(b.trigger) as i32,
                    lists: b.lists.clone(),
                }),
            )
        },
        Record::SnapshotEnd(e) => pb::Envelope {
            snapshot_id: e.id.to_string(),
            ..synthetic(
                pb::Kind::SnapshotEnd,
                Detail::SnapshotEnd(pb::SnapshotEnd {
                    snapshot_id: e.id.to_string(),
                    trigger: trigger(e.trigger) as i32,
                    lists: e
                        .lists
                        .iter()
                        .map(|l| pb::SnapshotList {
                            action: l.action.clone(),
                            items: l.items,
                            complete: l.complete,
                            error: l.error.clone(),
                        })
                        .collect(),
                    complete: e.complete,
                    reason: e.reason.clone(),
                    duration_us: u64::try_from(e.duration.as_micros()).unwrap_or(u64::MAX),
                }),
            )
        },
    }
}

fn trigger(t: Trigger) -> pb::SnapshotTrigger {
    match t {
        Trigger::Login => pb::SnapshotTrigger::Login,
        Trigger::Gap => pb::SnapshotTrigger::Gap,
    }
}

/// Append a snapshot item's `snapshot_id` to its frame's envelope (fields may come in any
/// order; prost and every protobuf reader accept it).
pub fn encode_snapshot_id(snapshot_id: &str, out: &mut Vec<u8>) {
    let mut c = Cursor::new(out, snapshot_id.len() + 8);
    c.string(SNAPSHOT_ID, snapshot_id.as_bytes());
    c.finish();
}

/// Encode any record as an `Envelope`, appending to `out`; frames take the fast path.
pub fn encode_record(stamped: &Stamped, out: &mut Vec<u8>) {
    match &stamped.record {
        Record::Frame(f) => {
            let frame = f.frame();
            encode_frame(&stamped.stamp, &normalize(&frame), &frame, out);
        }
        Record::SnapshotItem { snapshot_id, frame } => {
            let frame = frame.frame();
            encode_frame(&stamped.stamp, &normalize(&frame), &frame, out);
            encode_snapshot_id(snapshot_id, out);
        }
        _ => record_envelope(stamped).encode_raw(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ami::{Parsed, Parser};
    use std::sync::Arc;

    fn stamp() -> Stamp {
        Stamp {
            server: Arc::from("pbx-1"),
            epoch: 1_795_671_272_000,
            seq: 42,
            received_at_ns: 1_795_671_272_123_456_789,
        }
    }

    #[test]
    fn fast_encoder_matches_prost_on_quirky_frames() {
        let inputs: [&[u8]; 6] = [
            b"Event: Dial\r\nSubEvent: Begin\r\nDestination: SIP/b\r\nUniqueID: 1.1\r\nTimestamp: 1.5\r\n\r\n",
            b"Event: UserEvent\r\nNoColonLine\r\nEmpty:\r\nName: Jos\xe9\r\n\r\n",
            b"Response: Follows\r\nPrivilege: Command\r\nout\n--END COMMAND--\r\n\r\n",
            b"Asterisk Call Manager/11.0.0\r\n",
            b"Event: X\r\nChannel: \xff\xfe\r\nLinkedid: <unknown>\r\n\r\n",
            b"Response: Success\r\nActionID: a\r\nMessage: Park successful\n\r\n\r\n",
        ];
        for input in inputs {
            let mut p = Parser::default();
            let Parsed::Frame { frame, .. } = p.parse(input) else {
                panic!("expected a frame");
            };
            let n = normalize(&frame);
            let mut fast = Vec::new();
            encode_frame(&stamp(), &n, &frame, &mut fast);
            let slow = to_envelope(&stamp(), &n, &frame).encode_to_vec();
            assert_eq!(fast, slow, "{}", String::from_utf8_lossy(input));
            assert_eq!(encoded_frame_len(&stamp(), &n, &frame), fast.len());
            let back = pb::Envelope::decode(&fast[..]).expect("decodes");
            assert_eq!(back.headers.len(), frame.len());
        }
    }

    #[test]
    fn a_snapshot_item_encodes_as_its_frame_plus_the_snapshot_id() {
        let mut p = Parser::default();
        let Parsed::Frame { frame, .. } =
            p.parse(b"Event: CoreShowChannel\r\nActionID: x\r\nChannel: PJSIP/1-0001\r\n\r\n")
        else {
            panic!("expected a frame");
        };
        let rec = Stamped {
            stamp: stamp(),
            record: Record::SnapshotItem {
                snapshot_id: Arc::from("1795671272000-1"),
                frame: Box::new(frame.to_owned()),
            },
        };
        let mut fast = Vec::new();
        encode_record(&rec, &mut fast);
        let env = pb::Envelope::decode(&fast[..]).expect("decodes");
        assert_eq!(env, record_envelope(&rec));
        assert_eq!(env.kind(), pb::Kind::Event);
        assert_eq!(env.name, "CoreShowChannel");
        assert_eq!(env.snapshot_id, "1795671272000-1");
        assert_eq!(env.channel, "PJSIP/1-0001");
    }

    #[test]
    fn synthetic_records_round_trip() {
        let rec = Stamped {
            stamp: stamp(),
            record: Record::Gap {
                epoch: 7,
                first_seq: 10,
                last_seq: 19,
                reason: "handoff queue full".into(),
            },
        };
        let mut out = Vec::new();
        encode_record(&rec, &mut out);
        let env = pb::Envelope::decode(&out[..]).expect("decodes");
        assert_eq!(env.kind(), pb::Kind::Gap);
        assert_eq!(
            env.detail,
            Some(pb::envelope::Detail::Gap(pb::Gap {
                epoch: 7,
                first_seq: 10,
                last_seq: 19,
                reason: "handoff queue full".into()
            }))
        );
    }
}
