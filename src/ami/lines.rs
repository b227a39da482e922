//! Line ends and first colons from block masks: the parser's cursor over [`super::scan`].
//!
//! Owns: [`Lines`], which classifies the unconsumed bytes 64 at a time and answers "where does
//! the current line end, and where is its first colon" by walking the masks' bits. A block's
//! masks stay valid while the caller keeps the parser's contract (it drops consumed bytes from
//! the front and appends new ones at the back), so they follow the buffer across calls. Blocks
//! start at 64-byte address boundaries where the buffer allows (one cache line per block), so a
//! block may begin with bytes of lines already read; their bits are ignored. The hot path
//! ([`Lines::crlf_lines`]) walks on from block to block, carrying a line's first colon across.
//!
//! Must never: search a byte twice for the same line (a line arriving in pieces resumes where
//! the search stopped), index outside the buffer, or report a colon past the line's end.

use super::scan::{BLOCK, Classifier, Masks};

/// What the caller of [`Lines::crlf_lines`] does with a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Take it and go on.
    Take,
    /// Take it and stop after it.
    TakeLast,
    /// Leave it to the general path.
    Leave,
}

/// Where [`Lines::crlf_lines`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Walk {
    /// At the line starting here, not taken.
    Stopped(usize),
    /// At a blank `\r\n` line starting at `at` and ending in the `\n` at `lf`.
    Blank { at: usize, lf: usize },
}

/// A resumable line finder. Offsets are relative to the buffer the parser is given.
#[derive(Clone, Debug)]
pub(crate) struct Lines {
    classifier: Classifier,
    /// Bytes `start..start + len` are classified into `masks` (`len <= 64`).
    start: usize,
    len: usize,
    masks: Masks,
    /// The current line holds no `\n` before `searched`.
    searched: usize,
    /// The first colon of the current line before `searched`.
    colon: Option<usize>,
}

impl Lines {
    pub(crate) fn new(classifier: Classifier) -> Self {
        Lines {
            classifier,
            start: 0,
            len: 0,
            masks: Masks::default(),
            searched: 0,
            colon: None,
        }
    }

    pub(crate) fn classifier(&self) -> Classifier {
        self.classifier
    }

    /// Forget every classified byte: the buffer is not the one the masks describe.
    pub(crate) fn reset(&mut self) {
        *self = Lines::new(self.classifier);
    }

    /// The next line starts at `at` (after the end of the line found last).
    #[inline]
    pub(crate) fn start_line(&mut self, at: usize) {
        self.searched = at;
        self.colon = None;
    }

    /// The caller dropped `n` bytes from the front of its buffer, none of them past the start of
    /// the current line; offsets move down by `n` and the masks of what is left stay.
    #[inline]
    pub(crate) fn advance(&mut self, n: usize) {
        self.searched = self.searched.saturating_sub(n);
        self.colon = self.colon.and_then(|c| c.checked_sub(n));
        if self.start >= n {
            self.start -= n;
        } else if self.start + self.len > n {
            let k = n - self.start;
            self.masks.lf >>= k;
            self.masks.colon >>= k;
            self.len -= k;
            self.start = 0;
        } else {
            self.len = 0;
            self.start = 0;
        }
    }

    /// The first colon of the line [`Lines::find`] found last, if it has one.
    #[inline]
    pub(crate) fn colon(&self) -> Option<usize> {
        self.colon
    }

    /// The first `\n` of the current line that lies before `end` (at most `buf.len()`), or `None`
    /// when the bytes before `end` hold none; the search resumes there on the next call.
    #[inline]
    pub(crate) fn find(&mut self, buf: &[u8], end: usize) -> Option<usize> {
        loop {
            let at = self.searched;
            if at >= end {
                return None;
            }
            if at < self.start || at >= self.start + self.len {
                self.fill(buf, at)?;
            }
            // `start <= at < start + len <= start + 64`.
            let off = at - self.start;
            let lf = self.masks.lf >> off;
            let colon = self.masks.colon >> off;
            if lf != 0 {
                let i = lf.trailing_zeros() as usize;
                let nl = at + i;
                if nl >= end {
                    // The line does not end inside the window; the caller gives the frame up.
                    self.searched = end;
                    return None;
                }
                if self.colon.is_none() {
                    // `i < 64`: bit `i` of `lf` is set.
                    let before = colon & ((1u64 << i) - 1);
                    if before != 0 {
                        self.colon = Some(at + before.trailing_zeros() as usize);
                    }
                }
                self.searched = nl;
                return Some(nl);
            }
            if self.colon.is_none() && colon != 0 {
                let c = at + colon.trailing_zeros() as usize;
                self.colon = (c < end).then_some(c);
            }
            self.searched = self.start + self.len;
        }
    }

    /// The hot path: walk plain lines (content, then `\r\n`, ending before `end`) from the
    /// current line, which starts at `line_start` and has not been searched yet, handing each to
    /// `each(line_start, first_colon, lf)`; `first_colon >= lf` means the line has none. Lines
    /// that run past a block go on in the next one, classified here while 64 bytes of the buffer
    /// remain. The walk stops at a blank `\r\n` line (reported, not handed over), at the first
    /// line that is not plain or that `each` leaves, after one that `each` takes as the last, or
    /// where the classified bytes run out; [`Lines::find`] then resumes without searching a
    /// byte of the current line twice.
    #[inline]
    pub(crate) fn crlf_lines(
        &mut self,
        buf: &[u8],
        line_start: usize,
        end: usize,
        mut each: impl FnMut(usize, usize, usize) -> Step,
    ) -> Walk {
        let window = buf.get(..end).unwrap_or(buf);
        let mut at = line_start;
        if self.searched != at || at < self.start || at >= self.start + self.len {
            return Walk::Stopped(at);
        }
        let mut base = self.start;
        let mut len = self.len;
        let mut masks = self.masks;
        // Bits below `at` belong to lines already taken.
        let mut lf = masks.lf & (!0u64 << (at - base));
        let mut colons = masks.colon & (!0u64 << (at - base));
        // The first colon of the current line in the blocks before `base`, or `usize::MAX`.
        let mut carried = usize::MAX;
        let walk = loop {
            if lf == 0 {
                // The current line goes on past this block: carry its first colon, if the block
                // held one, into the next block.
                if colons != 0 {
                    carried = carried.min(base + colons.trailing_zeros() as usize);
                }
                // The next block starts where this one ends, also when this one is shorter
                // than 64 bytes: its front went with the frame before (every frame's first
                // block), or the buffer ended there when it was classified.
                let next = base + len;
                match buf.get(next..).and_then(<[u8]>::first_chunk::<BLOCK>) {
                    Some(block) if next < end => {
                        masks = self.classifier.classify(block);
                        (base, len, lf, colons) = (next, BLOCK, masks.lf, masks.colon);
                        continue;
                    }
                    _ => break Walk::Stopped(at),
                }
            }
            let i = lf.trailing_zeros() as usize;
            let nl = base + i;
            // In this order, the checks prove `nl - 1` lies inside `window`.
            if nl <= at || nl >= window.len() || window[nl - 1] != b'\r' {
                break Walk::Stopped(at);
            }
            if nl == at + 1 {
                break Walk::Blank { at, lf: nl };
            }
            // No colon in this block's part of the line gives `base + 64`, past `nl`; one carried
            // from an earlier block lies before `base`.
            let colon = carried.min(base + colons.trailing_zeros() as usize);
            let step = each(at, colon, nl);
            if step == Step::Leave {
                break Walk::Stopped(at);
            }
            at = nl + 1;
            carried = usize::MAX;
            // Clear the colons before `nl`: `lf - 1` holds bits `0..i` and the later line ends,
            // and no colon lies at a line end (`nl`'s bit `i` included).
            let below = lf - 1;
            colons &= !below;
            lf &= below;
            if step == Step::TakeLast {
                break Walk::Stopped(at);
            }
        };
        self.start = base;
        self.len = len;
        self.masks = masks;
        // `[at, searched)` holds no `\n` and `colon` is its first colon: a line that began in an
        // earlier block was searched up to this block (and, when its end is not classified yet,
        // through it).
        let stopped_at = match walk {
            Walk::Stopped(at) | Walk::Blank { at, .. } => at,
        };
        if stopped_at < base || lf == 0 {
            if lf == 0 && colons != 0 {
                carried = carried.min(base + colons.trailing_zeros() as usize);
            }
            self.searched = if lf == 0 { base + len } else { base };
            self.colon = (carried != usize::MAX).then_some(carried);
        } else {
            self.searched = stopped_at;
            self.colon = None;
        }
        walk
    }

    /// Classify the block that holds `at`: the 64 bytes from the last 64-byte address boundary
    /// at or before it (one cache line; vector loads that straddle two lines are slower, most
    /// of all from memory), or from `at` itself near the ends of the buffer.
    #[inline]
    fn fill(&mut self, buf: &[u8], at: usize) -> Option<()> {
        buf.get(at..).filter(|r| !r.is_empty())?;
        let back = (buf.as_ptr() as usize).wrapping_add(at) % BLOCK;
        let aligned = at
            .checked_sub(back)
            .and_then(|start| Some((start, buf.get(start..)?.first_chunk::<BLOCK>()?)));
        let (start, masks, len) = match aligned {
            Some((start, block)) => (start, self.classifier.classify(block), BLOCK),
            None => match buf[at..].first_chunk::<BLOCK>() {
                Some(block) => (at, self.classifier.classify(block), BLOCK),
                None => (
                    at,
                    self.classifier.classify_tail(&buf[at..]),
                    buf.len() - at,
                ),
            },
        };
        self.masks = masks;
        self.start = start;
        self.len = len;
        Some(())
    }
}
