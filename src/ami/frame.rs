//! AMI frames as views over the bytes they were parsed from.
//!
//! Owns: [`Frame`], a borrowed view (header keys and values are slices of the read buffer), and
//! [`OwnedFrame`], the same view over a reference-counted [`Bytes`] for handing a frame to
//! another task without copying its bytes.
//!
//! Must never: copy or re-encode a key or value. Offsets are `u32`, checked by the parser's
//! limits, so a span costs 16 bytes whatever the frame's size.

use bytes::Bytes;

const NO_VALUE: u32 = u32::MAX;

/// Where one header line lies in its frame's buffer: the key's and the value's `start..end`, each
/// packed as `start | end << 32` (two registers to build and one 16-byte store to push, where
/// four `u32` fields went through the stack and stalled the store).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    key: u64,
    value: u64,
}

/// The `value` of a line without a colon.
const NO_VALUE_SPAN: u64 = u64::MAX;

#[inline]
fn pack(start: usize, end: usize) -> u64 {
    (start as u32 as u64) | ((end as u32 as u64) << 32)
}

#[inline]
fn unpack(range: u64) -> std::ops::Range<usize> {
    (range as u32 as usize)..((range >> 32) as usize)
}

impl Span {
    /// A placeholder for slots not yet written.
    pub(crate) const EMPTY: Span = Span { key: 0, value: 0 };

    #[inline]
    pub(crate) fn header(
        key_start: usize,
        key_end: usize,
        value_start: usize,
        value_end: usize,
    ) -> Self {
        Span {
            key: pack(key_start, key_end),
            value: pack(value_start, value_end),
        }
    }

    #[inline]
    pub(crate) fn no_colon(start: usize, end: usize) -> Self {
        Span {
            key: pack(start, end),
            value: NO_VALUE_SPAN,
        }
    }

    /// Whether this header, read in `buf`, is `Response: Follows`. The key's length, read from
    /// the span, rules out nearly every first line (`Event`) without a call.
    #[inline]
    pub(crate) fn is_follows(&self, buf: &[u8]) -> bool {
        unpack(self.key).len() == "Response".len() && self.is_follows_header(buf)
    }

    fn is_follows_header(&self, buf: &[u8]) -> bool {
        let header = self.resolve(buf);
        header.key.eq_ignore_ascii_case(b"Response")
            && header
                .value
                .is_some_and(|v| v.eq_ignore_ascii_case(b"Follows"))
    }

    /// `key: value` as one line of at most `max` bytes, the common shape, read from the span
    /// alone: `(start, key length, line length)` when the key is not empty and the value begins
    /// two bytes after it (the usual `": "`). A line without a colon has no value span, whose
    /// start is never two bytes after a key's end.
    #[inline]
    pub(crate) fn short_line(&self, max: usize) -> Option<(usize, usize, usize)> {
        let (key_start, key_end) = (self.key as u32, (self.key >> 32) as u32);
        let (value_start, value_end) = (self.value as u32, (self.value >> 32) as u32);
        let key_len = key_end.wrapping_sub(key_start) as usize;
        let len = value_end.wrapping_sub(key_start) as usize;
        (u64::from(value_start) == u64::from(key_end) + 2 && key_len != 0 && len <= max)
            .then_some((key_start as usize, key_len, len))
    }

    /// The value alone, without resolving the key.
    #[inline]
    fn value_in<'a>(&self, buf: &'a [u8]) -> Option<&'a [u8]> {
        if self.value == NO_VALUE_SPAN {
            None
        } else {
            Some(buf.get(unpack(self.value)).unwrap_or_default())
        }
    }

    #[inline]
    pub(crate) fn resolve<'a>(&self, buf: &'a [u8]) -> Header<'a> {
        let key = buf.get(unpack(self.key)).unwrap_or_default();
        let value = if self.value == NO_VALUE_SPAN {
            None
        } else {
            Some(buf.get(unpack(self.value)).unwrap_or_default())
        };
        Header { key, value }
    }
}

/// One header line: `key` is everything before the first colon, `value` what follows the
/// `": "` separator. A line without a colon has the whole line as `key` and no value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header<'a> {
    pub key: &'a [u8],
    pub value: Option<&'a [u8]>,
}

impl<'a> Header<'a> {
    /// The value, or an empty slice for a line without a colon.
    pub fn value_or_empty(&self) -> &'a [u8] {
        self.value.unwrap_or_default()
    }

    /// Whether the key is `name`, ignoring ASCII case (as Asterisk does).
    #[inline]
    pub fn is(&self, name: &str) -> bool {
        self.key.eq_ignore_ascii_case(name.as_bytes())
    }
}

/// Headers the parser notes while it reads a frame, so that normalization finds them without a
/// second pass over every header. Each is the first header after the frame's first line whose
/// key matches (ASCII case ignored) and that has a colon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Known {
    Channel,
    Uniqueid,
    Linkedid,
    ActionId,
    Privilege,
    Timestamp,
    /// `Extension` (the legacy Newexten field).
    Extension,
    /// A key longer than `Linkedid` that ends in it (`ParkeeLinkedid`, `DestLinkedid`, ...).
    PrefixedLinkedid,
}

impl Known {
    const COUNT: usize = 8;

    /// Which known header `key` is, if any: the reference [`Known::slot`] is tested against.
    #[cfg(test)]
    pub(crate) fn of(key: &[u8]) -> Option<Known> {
        // Every name is ASCII letters only, so `| 0x20` lowercases exactly: a byte matches a
        // lowercase letter that way only if it is that letter in either case.
        const LOWER: u64 = 0x2020_2020_2020_2020;
        let name = |s: &[u8; 8]| u64::from_le_bytes(*s);
        match key.len() {
            // Two overlapping 4-byte words cover the 7 bytes of `Channel`.
            7 => {
                let (Some(head), Some(tail)) = (key.first_chunk::<4>(), key.last_chunk::<4>())
                else {
                    return None;
                };
                let head = u32::from_le_bytes(*head) | 0x2020_2020;
                let tail = u32::from_le_bytes(*tail) | 0x2020_2020;
                (head == u32::from_le_bytes(*b"chan") && tail == u32::from_le_bytes(*b"nnel"))
                    .then_some(Known::Channel)
            }
            len if len >= 8 => {
                let (Some(head), Some(tail)) = (key.first_chunk::<8>(), key.last_chunk::<8>())
                else {
                    return None;
                };
                let head = u64::from_le_bytes(*head) | LOWER;
                let tail = u64::from_le_bytes(*tail) | LOWER;
                match len {
                    8 if head == name(b"uniqueid") => Some(Known::Uniqueid),
                    8 if head == name(b"linkedid") => Some(Known::Linkedid),
                    8 if head == name(b"actionid") => Some(Known::ActionId),
                    8 => None,
                    9 if head == name(b"privileg") && tail == name(b"rivilege") => {
                        Some(Known::Privilege)
                    }
                    9 if head == name(b"timestam") && tail == name(b"imestamp") => {
                        Some(Known::Timestamp)
                    }
                    9 if head == name(b"extensio") && tail == name(b"xtension") => {
                        Some(Known::Extension)
                    }
                    _ if tail == name(b"linkedid") => Some(Known::PrefixedLinkedid),
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

/// The known headers of fixed length, found by a perfect hash of a key's first eight bytes
/// lowercased (`| 0x20`, which keeps `:`): `(first eight bytes, length, last eight bytes and
/// which of them to compare, slot)`. A 7-byte key's eighth byte is its colon; a 9-byte key's
/// last eight bytes hold its ninth.
type Fixed = (u64, usize, u64, u64, u8);
const FIXED: [Fixed; 8] = {
    const fn word(name: &[u8; 8]) -> u64 {
        u64::from_le_bytes(*name)
    }
    const NONE: u64 = 0;
    const ALL: u64 = u64::MAX;
    [
        (word(b"linkedid"), 8, 0, NONE, Known::Linkedid as u8),
        (
            word(b"privileg"),
            9,
            word(b"rivilege"),
            ALL,
            Known::Privilege as u8,
        ),
        (
            word(b"timestam"),
            9,
            word(b"imestamp"),
            ALL,
            Known::Timestamp as u8,
        ),
        (0, usize::MAX, 0, NONE, Known::COUNT as u8),
        (word(b"uniqueid"), 8, 0, NONE, Known::Uniqueid as u8),
        (word(b"channel:"), 7, 0, NONE, Known::Channel as u8),
        (word(b"actionid"), 8, 0, NONE, Known::ActionId as u8),
        (
            word(b"extensio"),
            9,
            word(b"xtension"),
            ALL,
            Known::Extension as u8,
        ),
    ]
};
/// Spreads the seven heads of [`FIXED`] over its eight entries (`>> 61`), each to its own.
const FIXED_HASH: u64 = 0x6513_270e_269e_0d37;

impl Known {
    /// Whether the key `buf[start..end]` may be a known one, from its length and the low five
    /// bits of its last byte (so either case): a table lookup that rules out most keys before
    /// [`Known::slot`] hashes them. Never false for a known key.
    #[inline]
    pub(crate) fn maybe(buf: &[u8], start: usize, end: usize) -> bool {
        const fn bit(b: u8) -> u32 {
            1 << (b & 31)
        }
        /// By length modulo 32: the last bytes a known key of that length ends in. A
        /// `<prefix>Linkedid` of any length ends in `d`, so every entry takes `d` (a short key
        /// ending in `d` is rare: `Paused`, `Kind`), and the length needs no clamp.
        const MAYBE: [u32; 32] = {
            let mut t = [bit(b'd'); 32];
            t[7] |= bit(b'l');
            t[9] |= bit(b'e') | bit(b'p') | bit(b'n');
            t
        };
        let last = buf.get(end.wrapping_sub(1)).map_or(0, |&b| b);
        MAYBE[(end - start) % 32] & bit(last) != 0
    }

    /// The slot in [`Noted`] of the key `buf[start..end]`, whose colon is `buf[end]`: its
    /// [`Known`] as a number, or [`Known::COUNT`] for any other key. The same answer as
    /// [`Known::of`] without a branch on the key's length, which the parser's hot path would
    /// mispredict from line to line.
    #[inline]
    pub(crate) fn slot(buf: &[u8], start: usize, end: usize) -> usize {
        const LOWER: u64 = 0x2020_2020_2020_2020;
        let word = |at: usize| match buf.get(at..).and_then(<[u8]>::first_chunk::<8>) {
            Some(w) => u64::from_le_bytes(*w),
            None => {
                let mut w = [0u8; 8];
                let rest = buf.get(at..).unwrap_or_default();
                let n = rest.len().min(8);
                w[..n].copy_from_slice(&rest[..n]);
                u64::from_le_bytes(w)
            }
        };
        let len = end - start;
        let head = word(start) | LOWER;
        let tail = buf
            .get(end.wrapping_sub(8)..end)
            .and_then(<[u8]>::first_chunk::<8>)
            .map_or(0, |w| u64::from_le_bytes(*w) | LOWER);
        let (name, name_len, name_tail, tail_mask, slot) =
            FIXED[(head.wrapping_mul(FIXED_HASH) >> 61) as usize];
        let fixed = (name == head) & (name_len == len) & (tail & tail_mask == name_tail);
        let prefixed = (len > 8) & (tail == u64::from_le_bytes(*b"linkedid"));
        let other = if prefixed {
            Known::PrefixedLinkedid as usize
        } else {
            Known::COUNT
        };
        if fixed { slot as usize } else { other }
    }
}

/// Where the known headers of one frame are: the index of each in the span list.
/// One slot more than there are known headers: [`Noted::note_slot`] writes other keys there,
/// and equality ignores it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Noted([u32; Known::COUNT + 1]);

impl PartialEq for Noted {
    fn eq(&self, other: &Self) -> bool {
        self.0[..Known::COUNT] == other.0[..Known::COUNT]
    }
}

impl Eq for Noted {}

impl Default for Noted {
    fn default() -> Self {
        Noted([NO_VALUE; Known::COUNT + 1])
    }
}

impl Noted {
    /// Note header `index` in `slot` (from [`Known::slot`]) unless an earlier one was: indexes
    /// grow, so the first is the least.
    #[inline]
    pub(crate) fn note_slot(&mut self, slot: usize, index: usize) {
        if let Some(at) = self.0.get_mut(slot) {
            *at = (*at).min(index as u32);
        }
    }

    fn get(&self, known: Known) -> Option<usize> {
        let i = self.0[known as usize];
        (i != NO_VALUE).then_some(i as usize)
    }
}

/// What a frame is on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// `Asterisk Call Manager/<version>`: the one line a server sends on connect.
    Banner,
    /// A header block: a response, an event, or an action.
    Message,
}

/// A parsed frame borrowing its bytes from the read buffer.
#[derive(Clone, Copy)]
pub struct Frame<'a> {
    buf: &'a [u8],
    spans: &'a [Span],
    noted: &'a Noted,
    kind: FrameKind,
    body: Option<(u32, u32)>,
}

impl std::fmt::Debug for Frame<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        for h in self.headers() {
            list.entry(&(
                String::from_utf8_lossy(h.key),
                h.value.map(String::from_utf8_lossy),
            ));
        }
        list.finish()
    }
}

impl<'a> Frame<'a> {
    pub(crate) fn new(
        buf: &'a [u8],
        spans: &'a [Span],
        noted: &'a Noted,
        kind: FrameKind,
        body: Option<(usize, usize)>,
    ) -> Self {
        Frame {
            buf,
            spans,
            noted,
            kind,
            body: body.map(|(s, e)| (s as u32, e as u32)),
        }
    }

    pub fn kind(&self) -> FrameKind {
        self.kind
    }

    /// The bytes the frame was parsed from, with any blank lines skipped before it.
    pub fn raw(&self) -> &'a [u8] {
        self.buf
    }

    /// The number of header lines.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The `i`th header line in wire order.
    pub fn header(&self, i: usize) -> Option<Header<'a>> {
        self.spans.get(i).map(|s| s.resolve(self.buf))
    }

    /// Every header line in wire order, duplicates included.
    pub fn headers(&self) -> impl ExactSizeIterator<Item = Header<'a>> + use<'a> {
        let buf = self.buf;
        self.spans.iter().map(move |s| s.resolve(buf))
    }

    /// The frame's bytes and its header spans, for an encoder that reads lines by offset.
    #[inline]
    pub(crate) fn lines(&self) -> (&'a [u8], &'a [Span]) {
        (self.buf, self.spans)
    }

    /// The first value of header `name` (ASCII case ignored, as Asterisk does).
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.headers().find(|h| h.is(name)).and_then(|h| h.value)
    }

    /// The value of a [`Known`] header, as noted by the parser: the first one after the first
    /// line that has a colon. The same as a search of every header, without the search.
    #[inline]
    pub fn known(&self, known: Known) -> Option<&'a [u8]> {
        self.spans.get(self.noted.get(known)?)?.value_in(self.buf)
    }

    /// Every value of header `name`, in wire order.
    pub fn get_all<'n>(&self, name: &'n str) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
        self.headers()
            .filter(move |h| h.is(name))
            .filter_map(|h| h.value)
    }

    /// The raw output of an Asterisk 13 `Response: Follows` frame, without `--END COMMAND--`.
    pub fn body(&self) -> Option<&'a [u8]> {
        self.body
            .and_then(|(s, e)| self.buf.get(s as usize..e as usize))
    }

    /// The banner's version (`11.0.0` in `Asterisk Call Manager/11.0.0`).
    pub fn banner_version(&self) -> Option<&'a [u8]> {
        match self.kind {
            FrameKind::Banner => self
                .header(0)
                .and_then(|h| h.key.strip_prefix(super::parser::BANNER_PREFIX)),
            FrameKind::Message => None,
        }
    }

    /// Copy the span list out, so the buffer can be split before the frame is rebuilt on it.
    pub(crate) fn detach(&self) -> Detached {
        Detached {
            spans: self.spans.to_vec(),
            noted: *self.noted,
            kind: self.kind,
            body: self.body,
        }
    }

    /// Copy the span list so the frame can outlive the parser, sharing `bytes` (which must be
    /// the same bytes this frame was parsed from).
    pub fn to_owned_with(&self, bytes: Bytes) -> OwnedFrame {
        debug_assert_eq!(bytes.len(), self.buf.len());
        OwnedFrame {
            bytes,
            spans: self.spans.to_vec(),
            noted: *self.noted,
            kind: self.kind,
            body: self.body,
        }
    }

    /// Copy the frame's bytes and spans into an owned frame.
    pub fn to_owned(&self) -> OwnedFrame {
        self.to_owned_with(Bytes::copy_from_slice(self.buf))
    }
}

/// A frame's spans without its bytes.
pub(crate) struct Detached {
    spans: Vec<Span>,
    noted: Noted,
    kind: FrameKind,
    body: Option<(u32, u32)>,
}

impl Detached {
    pub(crate) fn attach(self, bytes: Bytes) -> OwnedFrame {
        OwnedFrame {
            bytes,
            spans: self.spans,
            noted: self.noted,
            kind: self.kind,
            body: self.body,
        }
    }
}

/// A frame that owns (a shared reference to) its bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct OwnedFrame {
    bytes: Bytes,
    spans: Vec<Span>,
    noted: Noted,
    kind: FrameKind,
    body: Option<(u32, u32)>,
}

impl std::fmt::Debug for OwnedFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.frame().fmt(f)
    }
}

impl OwnedFrame {
    /// The borrowed view.
    pub fn frame(&self) -> Frame<'_> {
        Frame {
            buf: &self.bytes,
            spans: &self.spans,
            noted: &self.noted,
            kind: self.kind,
            body: self.body,
        }
    }

    /// The bytes the frame was parsed from.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Known::slot` (hashed, branch-free) answers as `Known::of` (the plain match) for every
    /// key of the real recordings, the known names in any case, near misses, and keys at either
    /// end of the buffer.
    #[test]
    fn the_hashed_slot_agrees_with_the_plain_match() {
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for name in [
            "tests/fixtures/asterisk22-events.ami",
            "tests/fixtures/asterisk22-actions.ami",
            "tests/fixtures/asterisk13-actions-head.ami",
        ] {
            let path = format!("{}/{name}", env!("CARGO_MANIFEST_DIR"));
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            for line in data.split(|&b| b == b'\n') {
                if let Some(colon) = line.iter().position(|&b| b == b':') {
                    keys.push(line[..colon].to_vec());
                }
            }
        }
        keys.sort();
        keys.dedup();
        assert!(keys.len() > 300, "{} distinct keys", keys.len());
        let names = [
            "Channel",
            "Uniqueid",
            "Linkedid",
            "ActionID",
            "Privilege",
            "Timestamp",
            "Extension",
            "DestLinkedid",
            "TransfererLinkedid",
            "SecondTransfererLinkedid",
            "xLinkedid",
            // 32 bytes and more: the filter's table is indexed by the length modulo 32.
            "SecondTransfererLocalOneLinkedid",
            "OrigTransfererChannelLocalTwoLinkedid",
        ];
        for name in names {
            for variant in [name.to_owned(), name.to_lowercase(), name.to_uppercase()] {
                let v = variant.into_bytes();
                keys.push(v.clone());
                // Near misses: one byte more, one less, one changed (a letter's case bit, a
                // digit), at either end.
                keys.push([&v[..], b"s"].concat());
                keys.push([b"X", &v[..]].concat());
                keys.push(v[1..].to_vec());
                keys.push(v[..v.len() - 1].to_vec());
                for i in 0..v.len() {
                    for flip in [0x01, 0x40, 0x80] {
                        let mut w = v.clone();
                        w[i] ^= flip;
                        keys.push(w);
                    }
                }
            }
        }
        keys.extend([
            b"".to_vec(),
            b"C".to_vec(),
            b"Event".to_vec(),
            b"channel\0".to_vec(),
        ]);
        for key in &keys {
            let want = Known::of(key).map_or(Known::COUNT, |k| k as usize);
            let maybe_in = |buf: &[u8], start, end| {
                if want != Known::COUNT {
                    assert!(
                        Known::maybe(buf, start, end),
                        "{:?}",
                        key.escape_ascii().to_string()
                    );
                }
            };
            for (before, after) in [
                (&b"Event: X\r\n"[..], &b": value\r\n"[..]),
                (b"", b": v"),
                (b"\n", b":"),
            ] {
                let buf = [before, key, after].concat();
                let (start, end) = (before.len(), before.len() + key.len());
                maybe_in(&buf, start, end);
                assert_eq!(
                    Known::slot(&buf, start, end),
                    want,
                    "{:?} in {:?}",
                    key.escape_ascii().to_string(),
                    buf.escape_ascii().to_string()
                );
            }
        }
    }
}
