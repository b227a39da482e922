//! The AMI frame parser: a resumable, zero-copy scanner over `&[u8]`.
//!
//! Owns: splitting an AMI byte stream into frames (the banner line, header blocks ended by an empty
//! line, and Asterisk 13 `Response: Follows` bodies ended by `--END COMMAND--`), and enforcing the
//! frame size and header count limits.
//!
//! Must never: allocate per header, copy a key or value, panic on any input, rescan a byte it has
//! already classified when the next chunk of the same frame arrives, or stall on garbage. An
//! oversized frame is skipped up to the next empty line, reported once, and parsing goes on.
//!
//! # How
//! Header blocks are read with [`super::lines`]: 64 bytes at a time are classified into a `\n`
//! mask and a `:` mask (SIMD where the CPU has it, see [`super::scan`]), and lines and first
//! colons come from walking those bits, not from a search call per line. The headers that
//! normalization types ([`Known`]) are noted as they are read. Bodies use a
//! `memchr::memmem::Finder` for the marker; a discard steps through line starts only.
//!
//! # Contract
//! [`Parser::parse`] takes the unconsumed bytes of a stream. It returns
//! - [`Parsed::Frame`] with a view borrowed from the buffer and the number of bytes it used (the
//!   caller drops them before the next call),
//! - [`Parsed::Skip`] for bytes that are discarded (blank lines, an oversized frame), with the
//!   error to report the first time a frame is abandoned,
//! - [`Parsed::Partial`] when more bytes are needed: the next call must pass the same bytes with
//!   more appended. "Incomplete" is never an error.
//!
//! # Wire rules (see `shared/ami/WIRE.md`)
//! - A line ends in `\r\n` or a bare `\n`. A bare `\n` after content directly followed by `\r\n`
//!   belongs to the line (Asterisk's `Message: Park successful\n\r\n`), so such values keep
//!   their byte exactly; an empty line is never continued this way. These rules split lines
//!   everywhere, also while an oversized frame is being discarded.
//! - A header is `Key: value`. The key is everything before the first `:`; one space after the
//!   colon is the separator and is not part of the value, so `Key:x` and `Key: x` both give `x`
//!   and `Key:  x` gives ` x`. A line without a colon is kept as a header without a value.
//! - An empty line ends a frame; empty lines between frames are skipped and are no part of any
//!   frame: they come back as `Skip { error: None }` before the frame.
//! - A first line that starts with `Asterisk Call Manager/` and has no `:` is the banner: one
//!   line, no empty line after it.
//! - A frame whose first header is `Response: Follows` (ASCII case ignored; Asterisk 13 and
//!   older `Command`) takes `Privilege:` and `ActionID:` headers, then a raw body. The first
//!   `\n` of each line after the headers decides: those two headers stay headers, any other line
//!   (an empty one too) begins the body. The body runs up to `--END COMMAND--`, which may be glued
//!   to the last output line, and the frame ends at the first `\n` after the marker. Only the
//!   marker ends it: CLI output can hold blank lines, `\r\n\r\n` included, and they are body
//!   bytes. A body without a marker is caught by the frame limit like any oversized frame.
//!
//! # Limits
//! - A frame spans at most [`Limits::max_frame_bytes`] bytes (clamped to at least 2), its
//!   terminator included; bytes past that window are only looked at to decide whether a line
//!   ending just inside it goes on. A frame is given up as soon as a byte past its window is
//!   known and the frame cannot end inside it; a frame is also given up at its header line
//!   number `max_headers + 1`.
//! - A frame given up yields one `Skip` with its error; then bytes are discarded through the
//!   first empty line that ends after the point where it was given up, and parsing goes on.
//!
//! Every call makes progress (a frame, a skip of at least one byte, or an error) or says
//! `Partial`; after `Partial` the caller holds at most `max_frame_bytes + 2` bytes.

use memchr::memchr;
use memchr::memmem::Finder;

use super::frame::{Frame, FrameKind, Known, Noted, Span};
use super::lines::{Lines, Step, Walk};
use super::scan::Classifier;

/// The first bytes of the line Asterisk sends on connect, before any frame.
pub const BANNER_PREFIX: &[u8] = b"Asterisk Call Manager/";
/// The end of a `Response: Follows` body (Asterisk 13 and older).
pub const END_COMMAND: &[u8] = b"--END COMMAND--";

/// Bounds that protect the process from runaway input. The defaults fit real traffic with room to
/// spare: a `Command` response carries one `Output:` header per CLI line (hundreds of KB and
/// thousands of headers on a big system) and the real recordings hold a 109 KB `UserEvent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The most bytes one frame may span, its terminating empty line included.
    pub max_frame_bytes: usize,
    /// The most header lines one frame may have.
    pub max_headers: usize,
}

impl Limits {
    /// 8 MiB per frame: twenty times the largest `Command` output we have seen.
    pub const DEFAULT_MAX_FRAME_BYTES: usize = 8 << 20;
    /// 65,536 header lines: a `Command` output of that many lines is still accepted.
    pub const DEFAULT_MAX_HEADERS: usize = 1 << 16;
    /// Frames address their bytes with `u32` offsets.
    pub const MAX_FRAME_BYTES_CEILING: usize = u32::MAX as usize - 8;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: Self::DEFAULT_MAX_FRAME_BYTES,
            max_headers: Self::DEFAULT_MAX_HEADERS,
        }
    }
}

/// Why bytes were skipped. Small and `Copy`: it is made on the hot path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A frame grew past [`Limits::max_frame_bytes`] before it ended.
    #[error("frame larger than {limit} bytes; skipped to the next empty line")]
    FrameTooLarge { limit: usize },
    /// A frame had more than [`Limits::max_headers`] header lines.
    #[error("frame with more than {limit} header lines; skipped to the next empty line")]
    TooManyHeaders { limit: usize },
}

impl ParseError {
    /// A short stable label for metrics and records.
    pub fn reason(&self) -> &'static str {
        match self {
            ParseError::FrameTooLarge { .. } => "frame_too_large",
            ParseError::TooManyHeaders { .. } => "too_many_headers",
        }
    }
}

/// What one call to [`Parser::parse`] found.
#[derive(Debug)]
pub enum Parsed<'a> {
    /// A whole frame, and how many bytes of the buffer it used (leading blank lines included).
    Frame { frame: Frame<'a>, consumed: usize },
    /// Bytes to drop without a frame. `error` is set once per abandoned frame.
    Skip {
        consumed: usize,
        error: Option<ParseError>,
    },
    /// Every byte has been looked at; call again with more bytes appended.
    Partial,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Between frames: skipping blank lines.
    Start,
    /// Inside a header block. `follows` is set after a first header `Response: Follows`.
    Headers { follows: bool },
    /// Inside a `Response: Follows` body that began at `body_start`; the marker search resumes at
    /// `search_from`.
    Body {
        body_start: usize,
        search_from: usize,
    },
    /// Discarding an oversized frame up to the next empty line. `line` is what the discarded part
    /// of the current line held so far.
    Discard { line: LineSoFar },
    /// A frame of `consumed` bytes was returned; the next call starts on the bytes after it.
    Done { consumed: usize },
}

/// Where a discard stands in the current line. Lines split exactly as they do inside a frame: a
/// bare `\n` after content that is followed by `\r\n` does not end the line, so the `\r\n` is no
/// empty line either.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineSoFar {
    /// At the start of a line.
    Nothing,
    /// The line so far is `\r`; a `\n` next makes it an empty line.
    Cr,
    /// The line has content and does not end in `\r`.
    Content,
    /// The line has content and ends in `\r`; a `\n` next ends it.
    ContentCr,
    /// A line with content just ended in a bare `\n`; `\r\n` next would still belong to it.
    BareLf,
    /// `BareLf`, then `\r`.
    BareLfCr,
}

impl LineSoFar {
    /// Read on from this state over `bytes`: the index just past the first empty line, or the
    /// state after all of `bytes`. Content is skipped with `memchr`; only line starts are
    /// stepped through byte by byte.
    fn scan(mut self, bytes: &[u8]) -> Result<usize, LineSoFar> {
        use LineSoFar::*;
        let mut at = 0;
        while let Some(&c) = bytes.get(at) {
            self = match (self, c) {
                (Nothing | Cr | BareLf, b'\n') => return Ok(at + 1),
                (BareLfCr, b'\n') => Nothing,
                (Nothing, b'\r') => Cr,
                (BareLf, b'\r') => BareLfCr,
                (Cr | BareLfCr, b'\r') => ContentCr,
                (Nothing | Cr | BareLf | BareLfCr, _) => Content,
                (Content | ContentCr, _) => {
                    let Some(i) = memchr(b'\n', &bytes[at..]) else {
                        return Err(if bytes.last() == Some(&b'\r') {
                            ContentCr
                        } else {
                            Content
                        });
                    };
                    let nl = at + i;
                    let crlf = if i == 0 {
                        self == ContentCr
                    } else {
                        bytes.get(nl - 1) == Some(&b'\r')
                    };
                    at = nl;
                    if crlf { Nothing } else { BareLf }
                }
            };
            at += 1;
        }
        Err(self)
    }

    /// The state after `part`, which holds no `\n`.
    fn after(self, part: &[u8]) -> LineSoFar {
        match self.scan(part) {
            Err(state) => state,
            // Unreachable without a `\n` in `part`; a fresh line is the safe answer.
            Ok(_) => LineSoFar::Nothing,
        }
    }
}

/// A resumable AMI parser. Keep one per stream; it holds only offsets and a reusable span list.
pub struct Parser {
    limits: Limits,
    /// The current frame's spans are `spans[..count]`. Every slot is initialized (the list only
    /// grows), so the hot path writes by index with the count in a register, instead of pushing
    /// through the vector's length in memory.
    spans: Vec<Span>,
    count: usize,
    noted: Noted,
    lines: Lines,
    mode: Mode,
    /// Where the current frame's first line starts (after skipped blank lines).
    frame_start: usize,
    /// Where scanning resumes: the start of the first line not yet classified.
    pos: usize,
    end_command: Finder<'static>,
}

impl std::fmt::Debug for Parser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parser")
            .field("limits", &self.limits)
            .field("mode", &self.mode)
            .field("pos", &self.pos)
            .field("classifier", &self.lines.classifier().name())
            .finish_non_exhaustive()
    }
}

impl Default for Parser {
    fn default() -> Self {
        Parser::new(Limits::default())
    }
}

impl Parser {
    /// A parser with these limits. `max_frame_bytes` is clamped to what `u32` offsets address,
    /// and to at least 2 so that a `\r\n` between frames, which is no part of a frame, always
    /// fits the window it is looked for in.
    pub fn new(limits: Limits) -> Self {
        Parser::with_classifier(limits, Classifier::detect())
    }

    /// A parser that classifies bytes with `classifier` rather than the fastest one the CPU has
    /// (every classifier gives the same frames; tests and benchmarks compare them).
    pub fn with_classifier(limits: Limits, classifier: Classifier) -> Self {
        let limits = Limits {
            max_frame_bytes: limits
                .max_frame_bytes
                .clamp(2, Limits::MAX_FRAME_BYTES_CEILING),
            max_headers: limits.max_headers.max(1),
        };
        Parser {
            limits,
            spans: vec![Span::EMPTY; 64],
            count: 0,
            noted: Noted::default(),
            lines: Lines::new(classifier),
            mode: Mode::Start,
            frame_start: 0,
            pos: 0,
            end_command: Finder::new(END_COMMAND).into_owned(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The classifier in use.
    pub fn classifier(&self) -> Classifier {
        self.lines.classifier()
    }

    /// Forget any partial frame, e.g. after the connection was replaced.
    pub fn reset(&mut self) {
        self.begin_frame();
        self.lines.reset();
    }

    /// Start the next frame at the start of the buffer.
    fn begin_frame(&mut self) {
        self.count = 0;
        self.noted = Noted::default();
        self.mode = Mode::Start;
        self.frame_start = 0;
        self.pos = 0;
    }

    /// Parse the next frame from `buf`, the stream's unconsumed bytes. See the module docs for
    /// the contract between calls.
    pub fn parse<'a>(&'a mut self, buf: &'a [u8]) -> Parsed<'a> {
        if let Mode::Done { consumed } = self.mode {
            self.begin_frame();
            self.lines.advance(consumed);
            self.lines.start_line(0);
        }
        if let Mode::Discard { line } = self.mode {
            return self.discard(buf, line);
        }
        loop {
            if let Mode::Body {
                body_start,
                search_from,
            } = self.mode
            {
                return self.parse_body(buf, body_start, search_from);
            }
            // The frame may not reach past this point; bytes beyond it only decide a lookahead.
            let window_end = (self.frame_start + self.limits.max_frame_bytes).min(buf.len());
            let plain = match self.mode {
                Mode::Headers { follows } => !follows,
                Mode::Start => self.frame_start == 0,
                _ => false,
            };
            if plain {
                match self.crlf_headers(buf, window_end) {
                    Walk::Blank { lf, .. } if self.count > 0 => {
                        self.pos = lf + 1;
                        return self.complete(buf, FrameKind::Message, None);
                    }
                    Walk::Blank { at, .. } | Walk::Stopped(at) => self.pos = at,
                }
            }
            let Some(nl) = self.lines.find(buf, window_end) else {
                return self.incomplete(buf, false);
            };
            let line_start = self.pos;
            if self.mode == (Mode::Headers { follows: true }) {
                // After `Response: Follows`, the line's first `\n` decides whether the body begins
                // here (anything but `Privilege:`/`ActionID:`). The lookahead a header value needs
                // must not hold back, nor oversize, a body whose marker line has already ended.
                if !is_follows_header(buf.get(line_start..nl).unwrap_or_default()) {
                    self.mode = Mode::Body {
                        body_start: line_start,
                        search_from: line_start,
                    };
                    continue;
                }
            }
            // A bare LF followed by CRLF belongs to the value; decide only once those bytes exist.
            let (content_end, next) = if nl > line_start && buf.get(nl - 1) == Some(&b'\r') {
                (nl - 1, nl + 1)
            } else if nl == line_start {
                (nl, nl + 1)
            } else {
                match buf.get(nl + 1..nl + 3) {
                    Some(b"\r\n") => (nl + 1, nl + 3),
                    Some(_) => (nl, nl + 1),
                    None if buf.get(nl + 1).is_some_and(|&b| b != b'\r') => (nl, nl + 1),
                    None => return self.incomplete(buf, true),
                }
            };
            if next - self.frame_start > self.limits.max_frame_bytes {
                // Only a CRLF-continued value can step over the window; it is too large.
                return self.start_discard(next, LineSoFar::Nothing, too_large(self.limits));
            }
            let colon = self.lines.colon();
            self.pos = next;
            self.lines.start_line(next);
            let empty = content_end == line_start;
            match self.mode {
                Mode::Start if empty => {
                    self.frame_start = next;
                }
                Mode::Start if self.frame_start > 0 => {
                    // Hand the skipped blank lines back first, so a frame's bytes are its own.
                    let consumed = self.frame_start;
                    self.frame_start = 0;
                    self.pos = 0;
                    self.lines.advance(consumed);
                    self.lines.start_line(0);
                    return Parsed::Skip {
                        consumed,
                        error: None,
                    };
                }
                Mode::Start
                    if colon.is_none()
                        && buf
                            .get(line_start..content_end)
                            .is_some_and(|l| l.starts_with(BANNER_PREFIX)) =>
                {
                    self.push(Span::no_colon(line_start, content_end));
                    return self.complete(buf, FrameKind::Banner, None);
                }
                Mode::Headers { .. } if empty => {
                    return self.complete(buf, FrameKind::Message, None);
                }
                Mode::Start | Mode::Headers { .. } => {
                    let index = self.count;
                    if index == self.limits.max_headers {
                        return self.start_discard(
                            next,
                            LineSoFar::Nothing,
                            ParseError::TooManyHeaders {
                                limit: self.limits.max_headers,
                            },
                        );
                    }
                    let span = match colon {
                        // The colon lies before the line's `\n`, so before `content_end`.
                        Some(key_end) => {
                            let mut value_start = key_end + 1;
                            if buf.get(value_start) == Some(&b' ') && value_start < content_end {
                                value_start += 1;
                            }
                            if index > 0 {
                                self.noted
                                    .note_slot(Known::slot(buf, line_start, key_end), index);
                            }
                            Span::header(line_start, key_end, value_start, content_end)
                        }
                        None => Span::no_colon(line_start, content_end),
                    };
                    self.push(span);
                    let follows = if index == 0 {
                        span.is_follows(buf)
                    } else {
                        matches!(self.mode, Mode::Headers { follows: true })
                    };
                    self.mode = Mode::Headers { follows };
                }
                Mode::Body { .. } | Mode::Discard { .. } | Mode::Done { .. } => {
                    unreachable!("handled before the line loop")
                }
            }
        }
    }

    /// Take plain header lines (content, then `\r\n`, inside the window) straight from the
    /// block masks, with none of the general loop's cases: the first line of a frame when no
    /// blank line precedes it (unless it has no colon: it may be the banner), then every header
    /// line until one is not plain, the first line is `Response: Follows`, or the frame ends.
    /// Returns where it stopped; the general loop goes on from there.
    #[inline]
    fn crlf_headers(&mut self, buf: &[u8], window_end: usize) -> Walk {
        // The fields the walk's closure writes, borrowed apart from `self.lines`, which walks;
        // the walk takes no more lines than the header limit, or the slab's room.
        let room = self.spans.len().min(self.limits.max_headers);
        let spans = &mut self.spans[..room];
        // The count in a local, not through `&mut self.count`: it stays in a register across
        // the walk instead of being stored at every line.
        let noted = &mut self.noted;
        let mut taken = self.count;
        let count = &mut taken;
        let mut follows = false;
        // Every line handed over ends before `window_end`: reading it from a slice that ends
        // there lets the compiler drop the bounds checks of the bytes read around the colon.
        let lines = buf.get(..window_end).unwrap_or(buf);
        let walk = self
            .lines
            .crlf_lines(buf, self.pos, window_end, |line_start, colon, nl| {
                let buf = lines;
                let index = *count;
                let Some(slot) = spans.get_mut(index) else {
                    // The limit, or room to grow: the general path's business.
                    return Step::Leave;
                };
                let content_end = nl - 1;
                if colon < nl {
                    // The line ends in `\r\n`, so the byte after the colon is a space only
                    // when the value is not empty.
                    let value_start = colon + 1 + usize::from(buf.get(colon + 1) == Some(&b' '));
                    let span = Span::header(line_start, colon, value_start, content_end);
                    *slot = span;
                    *count = index + 1;
                    if index > 0 {
                        if Known::maybe(buf, line_start, colon) {
                            noted.note_slot(Known::slot(buf, line_start, colon), index);
                        }
                    } else if span.is_follows(buf) {
                        follows = true;
                        return Step::TakeLast;
                    }
                } else if index > 0 {
                    *slot = Span::no_colon(line_start, content_end);
                    *count = index + 1;
                } else {
                    // A first line without a colon may be the banner.
                    return Step::Leave;
                }
                Step::Take
            });
        self.count = taken;
        if self.count > 0 {
            self.mode = Mode::Headers { follows };
        }
        walk
    }

    /// Append a span to the current frame's list, growing it when full.
    fn push(&mut self, span: Span) {
        if self.count == self.spans.len() {
            self.spans.resize(2 * self.count.max(32), Span::EMPTY);
        }
        self.spans[self.count] = span;
        self.count += 1;
    }

    /// No complete line is available yet. `lookahead` says the line is complete but its end
    /// waits on one more byte; the buffer then reaches at most one byte past the window.
    fn incomplete<'a>(&mut self, buf: &[u8], lookahead: bool) -> Parsed<'a> {
        if self.mode == Mode::Start && self.frame_start > 0 {
            // Drop skipped blank lines now, so a flood of them cannot grow the caller's buffer.
            let consumed = self.frame_start;
            self.pos -= consumed;
            self.frame_start = 0;
            self.lines.advance(consumed);
            return Parsed::Skip {
                consumed,
                error: None,
            };
        }
        if !lookahead && buf.len() - self.frame_start > self.limits.max_frame_bytes {
            let window_end = self.frame_start + self.limits.max_frame_bytes;
            return self.start_discard(
                window_end,
                LineSoFar::Nothing.after(&buf[self.pos..window_end]),
                too_large(self.limits),
            );
        }
        Parsed::Partial
    }

    fn parse_body<'a>(
        &'a mut self,
        buf: &'a [u8],
        body_start: usize,
        search_from: usize,
    ) -> Parsed<'a> {
        let window_end = (self.frame_start + self.limits.max_frame_bytes).min(buf.len());
        let hay = buf.get(search_from..window_end).unwrap_or_default();
        match self.end_command.find(hay).map(|i| search_from + i) {
            Some(m) => {
                let after = m + END_COMMAND.len();
                match memchr(b'\n', buf.get(after..window_end).unwrap_or_default()) {
                    Some(nl) => {
                        self.pos = after + nl + 1;
                        self.complete(buf, FrameKind::Message, Some((body_start, m)))
                    }
                    None => {
                        self.mode = Mode::Body {
                            body_start,
                            search_from: m,
                        };
                        self.body_incomplete(buf)
                    }
                }
            }
            None => {
                // Resume so that a marker split across reads is still found.
                let resume = window_end
                    .saturating_sub(END_COMMAND.len() - 1)
                    .max(search_from);
                self.mode = Mode::Body {
                    body_start,
                    search_from: resume,
                };
                self.body_incomplete(buf)
            }
        }
    }

    fn body_incomplete<'a>(&mut self, buf: &[u8]) -> Parsed<'a> {
        if buf.len() - self.frame_start > self.limits.max_frame_bytes {
            let window_end = self.frame_start + self.limits.max_frame_bytes;
            // The state where the window cuts the body: after its last `\n`, which ended either a
            // line with content (a bare `\n` that `\r\n` may still continue) or nothing.
            let (line_start, state) =
                match memchr::memrchr(b'\n', &buf[self.frame_start..window_end]) {
                    None => (self.frame_start, LineSoFar::Nothing),
                    Some(i) => {
                        let nl = self.frame_start + i;
                        let before = nl.checked_sub(1).and_then(|p| buf.get(p));
                        let state = match before {
                            Some(b'\r' | b'\n') | None => LineSoFar::Nothing,
                            Some(_) => LineSoFar::BareLf,
                        };
                        (nl + 1, state)
                    }
                };
            return self.start_discard(
                window_end,
                state.after(&buf[line_start..window_end]),
                too_large(self.limits),
            );
        }
        Parsed::Partial
    }

    fn complete<'a>(
        &'a mut self,
        buf: &'a [u8],
        kind: FrameKind,
        body: Option<(usize, usize)>,
    ) -> Parsed<'a> {
        let consumed = self.pos;
        self.mode = Mode::Done { consumed };
        Parsed::Frame {
            frame: Frame::new(
                &buf[..consumed],
                &self.spans[..self.count],
                &self.noted,
                kind,
                body,
            ),
            consumed,
        }
    }

    fn start_discard<'a>(
        &mut self,
        consumed: usize,
        line: LineSoFar,
        error: ParseError,
    ) -> Parsed<'a> {
        self.begin_frame();
        self.lines.reset();
        self.mode = Mode::Discard { line };
        Parsed::Skip {
            consumed,
            error: Some(error),
        }
    }

    fn discard<'a>(&mut self, buf: &[u8], line: LineSoFar) -> Parsed<'a> {
        if buf.is_empty() {
            return Parsed::Partial;
        }
        match line.scan(buf) {
            Ok(end) => {
                self.mode = Mode::Start;
                Parsed::Skip {
                    consumed: end,
                    error: None,
                }
            }
            Err(line) => {
                self.mode = Mode::Discard { line };
                Parsed::Skip {
                    consumed: buf.len(),
                    error: None,
                }
            }
        }
    }
}

fn too_large(limits: Limits) -> ParseError {
    ParseError::FrameTooLarge {
        limit: limits.max_frame_bytes,
    }
}

/// The headers Asterisk 13 writes between `Response: Follows` and the command output.
fn is_follows_header(line: &[u8]) -> bool {
    const PRIVILEGE: &[u8] = b"privilege:";
    const ACTION_ID: &[u8] = b"actionid:";
    starts_with_ignore_case(line, PRIVILEGE) || starts_with_ignore_case(line, ACTION_ID)
}

fn starts_with_ignore_case(line: &[u8], prefix: &[u8]) -> bool {
    line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

#[cfg(test)]
#[path = "parser_tests.rs"]
mod tests;
