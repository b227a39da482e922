//! Line ends and first colons from block masks: the parser's cursor over [`super::scan`].
//!
//! Owns: [`Lines`], which classifies the unconsumed bytes 64 at a time and answers "where does
//! the current line end, and where is its first colon" by walking the masks' bits. A block's
//! masks stay valid while the caller keeps the parser's contract (it drops consumed bytes from
//! the front and appends new ones at the back), so they follow the buffer across calls.
//!
//! Must never: classify a byte twice for the same line (a line arriving in pieces resumes where
//! the search stopped), index outside the buffer, or report a colon past the line's end.

use super::scan::{BLOCK, Classifier, Masks};

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

    /// The hot path: walk the lines of the classified block from the current line, which starts
    /// at `line_start` and has not been searched yet, while each has content, ends in `\r\n`
    /// before `end`, and `each(line_start, first_colon, lf)` takes it. The first other line is
    /// left to [`Lines::find`]; the current line is then the one after the last taken, and its
    /// start is returned.
    #[inline]
    pub(crate) fn crlf_lines(
        &mut self,
        buf: &[u8],
        line_start: usize,
        end: usize,
        mut each: impl FnMut(usize, Option<usize>, usize) -> bool,
    ) -> usize {
        let mut at = line_start;
        if self.searched != at || at < self.start || at >= self.start + self.len {
            return line_start;
        }
        let base = self.start;
        // Bits below `at` belong to lines already taken.
        let mut lf = self.masks.lf & (!0u64 << (at - base));
        while lf != 0 {
            let i = lf.trailing_zeros() as usize;
            let nl = base + i;
            // `nl > at + 1`: the line has content before its `\r`.
            if nl >= end || nl <= at + 1 || buf.get(nl - 1) != Some(&b'\r') {
                break;
            }
            // `at - base <= i < 64`: the colons of `at..nl`.
            let between = self.masks.colon & ((1u64 << i) - 1) & (!0u64 << (at - base));
            let colon = (between != 0).then(|| base + between.trailing_zeros() as usize);
            if !each(at, colon, nl) {
                break;
            }
            at = nl + 1;
            lf &= lf - 1;
        }
        self.searched = at;
        at
    }

    /// Classify the block starting at `at`: 64 bytes at once, or the buffer's last bytes.
    #[inline]
    fn fill(&mut self, buf: &[u8], at: usize) -> Option<()> {
        let rest = buf.get(at..).filter(|r| !r.is_empty())?;
        let (masks, len) = match rest.first_chunk::<BLOCK>() {
            Some(block) => (self.classifier.classify(block), BLOCK),
            None => (self.classifier.classify_tail(rest), rest.len()),
        };
        self.masks = masks;
        self.start = at;
        self.len = len;
        Some(())
    }
}
