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

/// Where one header line lies in its frame's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    key_start: u32,
    key_end: u32,
    value_start: u32,
    value_end: u32,
}

impl Span {
    pub(crate) fn header(
        key_start: usize,
        key_end: usize,
        value_start: usize,
        value_end: usize,
    ) -> Self {
        Span {
            key_start: key_start as u32,
            key_end: key_end as u32,
            value_start: value_start as u32,
            value_end: value_end as u32,
        }
    }

    pub(crate) fn no_colon(start: usize, end: usize) -> Self {
        Span {
            key_start: start as u32,
            key_end: end as u32,
            value_start: NO_VALUE,
            value_end: NO_VALUE,
        }
    }

    /// Whether this header, read in `buf`, is `Response: Follows`.
    pub(crate) fn is_follows(&self, buf: &[u8]) -> bool {
        let header = self.resolve(buf);
        header.key.eq_ignore_ascii_case(b"Response")
            && header
                .value
                .is_some_and(|v| v.eq_ignore_ascii_case(b"Follows"))
    }

    #[inline]
    fn resolve<'a>(&self, buf: &'a [u8]) -> Header<'a> {
        let key = buf
            .get(self.key_start as usize..self.key_end as usize)
            .unwrap_or_default();
        let value = if self.value_start == NO_VALUE {
            None
        } else {
            Some(
                buf.get(self.value_start as usize..self.value_end as usize)
                    .unwrap_or_default(),
            )
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
        kind: FrameKind,
        body: Option<(usize, usize)>,
    ) -> Self {
        Frame {
            buf,
            spans,
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

    /// The first value of header `name` (ASCII case ignored, as Asterisk does).
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.headers().find(|h| h.is(name)).and_then(|h| h.value)
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
    kind: FrameKind,
    body: Option<(u32, u32)>,
}

impl Detached {
    pub(crate) fn attach(self, bytes: Bytes) -> OwnedFrame {
        OwnedFrame {
            bytes,
            spans: self.spans,
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
            kind: self.kind,
            body: self.body,
        }
    }

    /// The bytes the frame was parsed from.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }
}
