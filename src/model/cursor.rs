//! Protobuf output written by index into room made ahead, for the envelope encoder's hot path.
//!
//! Owns: [`Cursor`], the position in an output `Vec` whose bytes past it are already there
//! (zeroed once per frame), so that a field's framing and a short value go out as fixed-size
//! moves, with the position in a register; a `Vec` written by `push` and `extend_from_slice`
//! stores and reloads its length around every write, and copies a value of run-time length with
//! a call.
//! Must never: leave the output longer than what was written ([`Cursor::finish`] cuts it back).

/// Where the next byte goes in `out`; `out`'s bytes from there on are room, not output.
pub(super) struct Cursor<'v> {
    pub out: &'v mut Vec<u8>,
    pub at: usize,
}

impl<'v> Cursor<'v> {
    /// Write from the end of `out`, with room for `expected` bytes made now.
    #[inline]
    pub fn new(out: &'v mut Vec<u8>, expected: usize) -> Self {
        let at = out.len();
        out.resize(at + expected, 0);
        Cursor { out, at }
    }

    /// At least `n` writable bytes from the position.
    #[inline]
    pub fn room(&mut self, n: usize) -> &mut [u8] {
        if self.out.len() < self.at + n {
            self.grow(n);
        }
        &mut self.out[self.at..]
    }

    #[cold]
    fn grow(&mut self, n: usize) {
        let len = (self.at + n).max(2 * self.out.len());
        self.out.resize(len, 0);
    }

    /// A varint.
    #[inline]
    pub fn varint(&mut self, mut v: u64) {
        let dst = self.room(10);
        let mut i = 0;
        while v >= 0x80 {
            dst[i] = v as u8 | 0x80;
            v >>= 7;
            i += 1;
        }
        dst[i] = v as u8;
        self.at += i + 1;
    }

    /// A field's key (number and wire type), in one byte for the fields below 16.
    #[inline]
    pub fn key(&mut self, field: u32, wire: u32) {
        self.varint(u64::from(field << 3 | wire));
    }

    /// Raw bytes.
    #[inline]
    pub fn bytes(&mut self, v: &[u8]) {
        let dst = self.room(v.len());
        copy_short(&mut dst[..v.len()], v);
        self.at += v.len();
    }

    /// A `bytes`/`string` field with implicit presence: nothing when empty. A field below 16
    /// with a value shorter than 128 bytes (the typed fields of events, as a rule) is two bytes
    /// of framing and the value, written at once.
    #[inline]
    pub fn string(&mut self, field: u32, v: &[u8]) {
        let len = v.len();
        if len == 0 {
            return;
        }
        if field < 16 && len < 128 {
            let dst = self.room(2 + len);
            dst[0] = (field << 3 | super::encode::LEN) as u8;
            dst[1] = len as u8;
            copy_short(&mut dst[2..2 + len], v);
            self.at += 2 + len;
        } else {
            self.long_string(field, v);
        }
    }

    fn long_string(&mut self, field: u32, v: &[u8]) {
        self.key(field, super::encode::LEN);
        self.varint(v.len() as u64);
        self.bytes(v);
    }

    /// A `uint64`/`int64`/enum field with implicit presence: nothing when zero.
    #[inline]
    pub fn uint(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.key(field, super::encode::VARINT);
            self.varint(v);
        }
    }

    /// Cut `out` back to what was written.
    #[inline]
    pub fn finish(self) {
        self.out.truncate(self.at);
    }
}

/// `dst = src` for slices of equal length, short ones without a call: two fixed-size moves
/// that overlap in the middle (the first and the last 4, 8 or 16 bytes).
#[inline]
fn copy_short(dst: &mut [u8], src: &[u8]) {
    fn ends<const N: usize>(dst: &mut [u8], src: &[u8]) {
        if let (Some(d), Some(s)) = (dst.first_chunk_mut::<N>(), src.first_chunk::<N>()) {
            *d = *s;
        }
        if let (Some(d), Some(s)) = (dst.last_chunk_mut::<N>(), src.last_chunk::<N>()) {
            *d = *s;
        }
    }
    match src.len() {
        0 => {}
        1..4 => {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = *s;
            }
        }
        4..8 => ends::<4>(dst, src),
        8..16 => ends::<8>(dst, src),
        16..=32 => ends::<16>(dst, src),
        _ => dst.copy_from_slice(src),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_copies_equal_the_source_at_every_length() {
        let src: Vec<u8> = (1..=80).collect();
        for len in 0..=80 {
            let mut dst = vec![0u8; len];
            copy_short(&mut dst, &src[..len]);
            assert_eq!(dst, &src[..len], "length {len}");
        }
    }

    #[test]
    fn the_cursor_grows_when_the_room_runs_out_and_cuts_back_at_the_end() {
        let mut out = b"kept".to_vec();
        let mut c = Cursor::new(&mut out, 2);
        c.string(1, &[7; 40]);
        c.uint(2, 300);
        c.uint(3, 0);
        c.finish();
        let mut want = b"kept".to_vec();
        want.extend_from_slice(&[0x0a, 40]);
        want.extend_from_slice(&[7; 40]);
        want.extend_from_slice(&[0x10, 0xac, 0x02]);
        assert_eq!(out, want);
    }
}
