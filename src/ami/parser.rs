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
//! - A line ends in `\r\n` or a bare `\n`. A bare `\n` directly followed by `\r\n` belongs to the
//!   value (Asterisk's `Message: Park successful\n\r\n`), so such values keep their byte exactly.
//! - A header is `Key: value`. The key is everything before the first `:`; one space after the
//!   colon is the separator and is not part of the value, so `Key:x` and `Key: x` both give `x`
//!   and `Key:  x` gives ` x`. A line without a colon is kept as a header without a value.
//! - An empty line ends a frame; empty lines between frames are skipped.
//! - `Asterisk Call Manager/<version>` at the start of a frame is the banner: one line, no empty
//!   line after it.
//! - A frame whose first header is `Response: Follows` (Asterisk 13 and older `Command`) takes
//!   `Privilege:` and `ActionID:` headers, then a raw body up to `--END COMMAND--`, which may be
//!   glued to the last output line. The frame ends with the marker's line. A CRLF empty line
//!   before any marker also ends it, so a body without a marker cannot swallow the stream.

use memchr::memchr;
use memchr::memmem::Finder;

use super::frame::{Frame, FrameKind, Span};

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
    /// A frame was returned; the next call starts afresh.
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineSoFar {
    Nothing,
    Cr,
    Content,
}

/// A resumable AMI parser. Keep one per stream; it holds only offsets and a reusable span list.
pub struct Parser {
    limits: Limits,
    spans: Vec<Span>,
    mode: Mode,
    /// Where the current frame's first line starts (after skipped blank lines).
    frame_start: usize,
    /// Where scanning resumes: the start of the first line not yet classified.
    pos: usize,
    end_command: Finder<'static>,
    blank_crlf: Finder<'static>,
}

impl std::fmt::Debug for Parser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parser")
            .field("limits", &self.limits)
            .field("mode", &self.mode)
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

impl Default for Parser {
    fn default() -> Self {
        Parser::new(Limits::default())
    }
}

impl Parser {
    /// A parser with these limits. `max_frame_bytes` is clamped to what `u32` offsets address.
    pub fn new(limits: Limits) -> Self {
        let limits = Limits {
            max_frame_bytes: limits
                .max_frame_bytes
                .clamp(1, Limits::MAX_FRAME_BYTES_CEILING),
            max_headers: limits.max_headers.max(1),
        };
        Parser {
            limits,
            spans: Vec::with_capacity(64),
            mode: Mode::Start,
            frame_start: 0,
            pos: 0,
            end_command: Finder::new(END_COMMAND).into_owned(),
            blank_crlf: Finder::new(b"\r\n\r\n").into_owned(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Forget any partial frame, e.g. after the connection was replaced.
    pub fn reset(&mut self) {
        self.spans.clear();
        self.mode = Mode::Start;
        self.frame_start = 0;
        self.pos = 0;
    }

    /// Parse the next frame from `buf`, the stream's unconsumed bytes. See the module docs for
    /// the contract between calls.
    pub fn parse<'a>(&'a mut self, buf: &'a [u8]) -> Parsed<'a> {
        if self.mode == Mode::Done {
            self.reset();
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
            let Some(nl) = memchr(b'\n', &buf[self.pos..window_end]) else {
                return self.incomplete(buf, false);
            };
            let nl = self.pos + nl;
            // A bare LF followed by CRLF belongs to the value; decide only once those bytes exist.
            let (content_end, next) = if nl > self.pos && buf[nl - 1] == b'\r' {
                (nl - 1, nl + 1)
            } else if nl == self.pos {
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
            let line_start = self.pos;
            let line = &buf[line_start..content_end];
            self.pos = next;
            match self.mode {
                Mode::Start if line.is_empty() => {
                    self.frame_start = next;
                }
                Mode::Start if line.starts_with(BANNER_PREFIX) && memchr(b':', line).is_none() => {
                    self.spans.push(Span::no_colon(line_start, content_end));
                    return self.complete(buf, FrameKind::Banner, None);
                }
                Mode::Headers { follows: true } if line.is_empty() && nl - line_start == 0 => {
                    // A bare-LF empty line after a Follows header block is the body's first line.
                    self.mode = Mode::Body {
                        body_start: line_start,
                        search_from: line_start,
                    };
                }
                Mode::Headers { .. } if line.is_empty() => {
                    return self.complete(buf, FrameKind::Message, None);
                }
                Mode::Headers { follows: true } if !is_follows_header(line) => {
                    self.mode = Mode::Body {
                        body_start: line_start,
                        search_from: line_start,
                    };
                }
                Mode::Start | Mode::Headers { .. } => {
                    let first = self.mode == Mode::Start;
                    if self.spans.len() == self.limits.max_headers {
                        return self.start_discard(
                            next,
                            LineSoFar::Nothing,
                            ParseError::TooManyHeaders {
                                limit: self.limits.max_headers,
                            },
                        );
                    }
                    let span = match memchr(b':', line) {
                        Some(colon) => {
                            let key_end = line_start + colon;
                            let mut value_start = key_end + 1;
                            if buf.get(value_start) == Some(&b' ') && value_start < content_end {
                                value_start += 1;
                            }
                            Span::header(line_start, key_end, value_start, content_end)
                        }
                        None => Span::no_colon(line_start, content_end),
                    };
                    self.spans.push(span);
                    let follows = if first {
                        span.is_follows(buf)
                    } else {
                        matches!(self.mode, Mode::Headers { follows: true })
                    };
                    self.mode = Mode::Headers { follows };
                }
                Mode::Body { .. } | Mode::Discard { .. } | Mode::Done => {
                    unreachable!("handled before the line loop")
                }
            }
        }
    }

    /// No complete line is available yet. `lookahead` says the line is complete but its end
    /// waits on one more byte; the buffer then reaches at most one byte past the window.
    fn incomplete<'a>(&mut self, buf: &[u8], lookahead: bool) -> Parsed<'a> {
        if self.mode == Mode::Start && self.frame_start > 0 {
            // Drop skipped blank lines now, so a flood of them cannot grow the caller's buffer.
            let consumed = self.frame_start;
            self.pos -= consumed;
            self.frame_start = 0;
            return Parsed::Skip {
                consumed,
                error: None,
            };
        }
        if !lookahead && buf.len() - self.frame_start > self.limits.max_frame_bytes {
            let window_end = self.frame_start + self.limits.max_frame_bytes;
            return self.start_discard(
                window_end,
                line_so_far(&buf[self.pos..window_end]),
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
        let hay = &buf[search_from..window_end];
        let marker = self.end_command.find(hay).map(|i| search_from + i);
        // A CRLF empty line also ends the body; CLI output itself uses bare LF. The search starts
        // three bytes early so a blank line split across reads is still found.
        let blank_from = search_from.saturating_sub(3).max(body_start);
        let blank = self
            .blank_crlf
            .find(&buf[blank_from..marker.map_or(window_end, |m| m + 2).min(window_end)])
            .map(|i| blank_from + i);
        match (marker, blank) {
            (_, Some(b)) if marker.is_none_or(|m| b + 2 <= m) => {
                let body_end = (b + 2).max(body_start);
                self.pos = b + 4;
                self.complete(buf, FrameKind::Message, Some((body_start, body_end)))
            }
            (Some(m), _) => {
                let after = m + END_COMMAND.len();
                match memchr(b'\n', &buf[after..window_end]) {
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
            _ => {
                // Resume so that a marker or blank line split across reads is still found.
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
            let line_start = memchr::memrchr(b'\n', &buf[self.frame_start..window_end])
                .map_or(self.frame_start, |i| self.frame_start + i + 1);
            return self.start_discard(
                window_end,
                line_so_far(&buf[line_start..window_end]),
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
        self.mode = Mode::Done;
        let consumed = self.pos;
        Parsed::Frame {
            frame: Frame::new(&buf[..consumed], &self.spans, kind, body),
            consumed,
        }
    }

    fn start_discard<'a>(
        &mut self,
        consumed: usize,
        line: LineSoFar,
        error: ParseError,
    ) -> Parsed<'a> {
        self.spans.clear();
        self.frame_start = 0;
        self.pos = 0;
        self.mode = Mode::Discard { line };
        Parsed::Skip {
            consumed,
            error: Some(error),
        }
    }

    fn discard<'a>(&mut self, buf: &[u8], mut line: LineSoFar) -> Parsed<'a> {
        let mut at = 0;
        while let Some(i) = memchr(b'\n', &buf[at..]) {
            let nl = at + i;
            let content = &buf[at..nl];
            let blank = match line {
                LineSoFar::Nothing => content.is_empty() || content == b"\r",
                LineSoFar::Cr => content.is_empty(),
                LineSoFar::Content => false,
            };
            if blank {
                self.mode = Mode::Start;
                return Parsed::Skip {
                    consumed: nl + 1,
                    error: None,
                };
            }
            line = LineSoFar::Nothing;
            at = nl + 1;
        }
        if buf.is_empty() {
            return Parsed::Partial;
        }
        // `buf[at..]` is not empty: no newline was left after `at`, and `buf` is not empty.
        let line = match line {
            LineSoFar::Nothing => line_so_far(&buf[at..]),
            LineSoFar::Cr | LineSoFar::Content => LineSoFar::Content,
        };
        self.mode = Mode::Discard { line };
        Parsed::Skip {
            consumed: buf.len(),
            error: None,
        }
    }
}

fn too_large(limits: Limits) -> ParseError {
    ParseError::FrameTooLarge {
        limit: limits.max_frame_bytes,
    }
}

/// What a line holds when only `part` of it (with no `\n`) has been seen.
fn line_so_far(part: &[u8]) -> LineSoFar {
    match part {
        [] => LineSoFar::Nothing,
        b"\r" => LineSoFar::Cr,
        _ => LineSoFar::Content,
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
