//! The on-disk record format of spool segments, and sequential reading of a segment file.
//!
//! A segment is a file of records, each `[u32 body_len][u32 crc32(body)][body]` (little endian).
//! A file is named after the id of its first record (`00000000000000000042.seg`). The body,
//! format 2 (written since typed metadata; every integer little endian):
//!
//! ```text
//! [u64 id][u32 key_len][key][u16 0xFFFF]
//! [u8 kind][u8 flags][u64 epoch][u64 seq]
//! [u32 len][server][u32 len][event][u32 len][class]
//! flags & 1: [u32 len][snapshot]    flags & 2: [u64 gap epoch][u64 first seq][u64 last seq]
//! [payload to the end]
//! ```
//!
//! Format 1 (before) had a header list where format 2 has `0xFFFF` and the metadata:
//! `[u16 header_count]{[u16 name_len][name][u32 value_len][value]}*`. The pipeline never wrote
//! more than 10 headers, so the tag cannot be mistaken for a count. Both are read, record by
//! record, so a spool written by an older amibus drains after an upgrade; format 1's headers
//! are turned into [`Meta`] once, when read ([`super::format_v1`]).
//!
//! Damage: a record that fails its checksum, has an impossible length or a body that does not
//! decode is reported as [`Torn`], and the reader stops there; [`SegmentReader::resync`] then
//! scans forward byte by byte for the next whole valid record, so that one bad byte costs the
//! records it is in, not the rest of the segment.
//!
//! Must never: trust a length read from disk without bounds, or hand out a record that is not
//! whole and valid.

use std::fs::File;
use std::io::{self, Read, Seek};
use std::ops::Range;
use std::path::{Path, PathBuf};

use bytes::{Buf, BufMut, Bytes};

use super::format_v1;
use super::{GapRange, Kind, Meta, Record};
use crate::durable::{self, FRAME_HEADER, FrameHead};

/// The largest record body accepted when reading back; anything larger is corruption.
pub const MAX_RECORD_BYTES: usize = 256 << 20;
/// The smallest body: an id, a key length and a header count (format 1 with no headers).
const MIN_BODY: usize = 8 + 4 + 2;
/// Where format 1 had its header count: format 2's metadata follows.
const META_V2: u16 = 0xFFFF;
const HAS_SNAPSHOT: u8 = 1;
const HAS_GAP: u8 = 2;

/// The file name of the segment whose first record has `first_id`.
pub fn file_name(first_id: u64) -> String {
    format!("{first_id:020}.seg")
}

/// The first id encoded in a segment file name.
pub fn parse_file_name(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 {
        return None;
    }
    digits.parse().ok()
}

/// The segment files in `dir`, by first id, oldest first (other files are left out).
///
/// # Errors
/// The directory cannot be read.
pub fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut paths: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| parse_file_name(&p).map(|id| (id, p)))
        .collect();
    paths.sort();
    Ok(paths)
}

/// The bytes `record` takes in a segment, framing included.
pub fn encoded_len(record: &Record) -> usize {
    FRAME_HEADER + body_len(record)
}

fn body_len(record: &Record) -> usize {
    let m = &record.meta;
    8 + 4
        + record.key.len()
        + 2
        + 1
        + 1
        + 8
        + 8
        + 4
        + m.server.len()
        + 4
        + m.event.len()
        + 4
        + m.class.len()
        + m.snapshot.as_ref().map_or(0, |s| 4 + s.len())
        + m.gap.map_or(0, |_| 3 * 8)
        + record.payload.len()
}

/// Append `record` with `id` to `out` (format 2).
pub fn encode(id: u64, record: &Record, out: &mut Vec<u8>) {
    let m = &record.meta;
    let start = durable::begin_frame(out);
    out.reserve(body_len(record));
    out.put_u64_le(id);
    put_bytes(out, &record.key);
    out.put_u16_le(META_V2);
    out.put_u8(m.kind as i32 as u8);
    let flags = if m.snapshot.is_some() {
        HAS_SNAPSHOT
    } else {
        0
    } | if m.gap.is_some() { HAS_GAP } else { 0 };
    out.put_u8(flags);
    out.put_u64_le(m.epoch);
    out.put_u64_le(m.seq);
    for part in [&m.server, &m.event, &m.class] {
        put_bytes(out, part);
    }
    if let Some(id) = &m.snapshot {
        put_bytes(out, id);
    }
    if let Some(g) = m.gap {
        out.put_u64_le(g.epoch);
        out.put_u64_le(g.first_seq);
        out.put_u64_le(g.last_seq);
    }
    out.put_slice(&record.payload);
    durable::end_frame(out, start);
}

/// `[u32 len][bytes]`.
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.put_u32_le(bytes.len() as u32);
    out.put_slice(bytes);
}

/// A record could not be read whole: the file ends inside it, or it fails its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Torn {
    /// Where the bad record starts.
    pub offset: u64,
}

/// Where [`SegmentReader::resync`] found a whole valid record again after a bad one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resynced {
    /// Where the skipped bytes start (the bad record).
    pub offset: u64,
    /// How many bytes were skipped.
    pub bytes: u64,
    /// The id of the record found after them (the next [`SegmentReader::read_next`] returns it).
    pub next_id: u64,
}

/// Decode one body (format 2, or format 1 by its header count).
fn decode_body(mut body: Bytes) -> Option<(u64, Record)> {
    if body.remaining() < 8 + 4 {
        return None;
    }
    let id = body.get_u64_le();
    let key = take_bytes(&mut body)?;
    if body.remaining() < 2 {
        return None;
    }
    let meta = match body.get_u16_le() {
        META_V2 => decode_meta(&mut body)?,
        count => format_v1::decode_headers(&mut body, count)?,
    };
    Some((
        id,
        Record {
            key,
            meta,
            payload: body,
        },
    ))
}

/// Format 2's metadata. A kind this build does not know (written by a newer amibus) is read
/// as `Unspecified`: the record is still delivered.
fn decode_meta(body: &mut Bytes) -> Option<Meta> {
    if body.remaining() < 1 + 1 + 8 + 8 {
        return None;
    }
    let kind = Kind::try_from(i32::from(body.get_u8())).unwrap_or(Kind::Unspecified);
    let flags = body.get_u8();
    let epoch = body.get_u64_le();
    let seq = body.get_u64_le();
    let server = take_bytes(body)?;
    let event = take_bytes(body)?;
    let class = take_bytes(body)?;
    let snapshot = if flags & HAS_SNAPSHOT != 0 {
        Some(take_bytes(body)?)
    } else {
        None
    };
    let gap = if flags & HAS_GAP != 0 {
        if body.remaining() < 3 * 8 {
            return None;
        }
        Some(GapRange {
            epoch: body.get_u64_le(),
            first_seq: body.get_u64_le(),
            last_seq: body.get_u64_le(),
        })
    } else {
        None
    };
    Some(Meta {
        server,
        event,
        kind,
        class,
        epoch,
        seq,
        snapshot,
        gap,
    })
}

/// `[u32 len][bytes]`, bounds checked.
fn take_bytes(body: &mut Bytes) -> Option<Bytes> {
    if body.remaining() < 4 {
        return None;
    }
    let len = body.get_u32_le() as usize;
    (body.remaining() >= len).then(|| body.split_to(len))
}

/// Hand each record [`encode`] wrote into `bytes` to `each`, in order; stops at the first that
/// is not whole (the buffer is the spool's own, never read from disk).
pub fn decode_all(mut bytes: Bytes, mut each: impl FnMut(u64, Record)) {
    while bytes.len() >= FRAME_HEADER {
        let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        if bytes.len() < FRAME_HEADER + len {
            return;
        }
        let body = bytes.slice(FRAME_HEADER..FRAME_HEADER + len);
        bytes.advance(FRAME_HEADER + len);
        match decode_body(body) {
            Some((id, record)) => each(id, record),
            None => return,
        }
    }
}

/// How much a [`SegmentReader`] reads at a time.
const CHUNK: usize = 256 << 10;

/// Reads a segment's records in order. Reads the file a chunk at a time and hands out records
/// whose key, header values and payload are slices of that chunk: one allocation and one copy
/// per chunk, where a buffered reader copied each record again into a buffer of its own.
pub struct SegmentReader {
    path: PathBuf,
    file: File,
    /// Read from the file and not yet handed out; starts at `offset`.
    chunk: Bytes,
    offset: u64,
}

impl SegmentReader {
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(SegmentReader {
            path: path.to_owned(),
            file: File::open(path)?,
            chunk: Bytes::new(),
            offset: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of whole records read so far: where a torn tail starts.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next record; `Ok(None)` at a clean end; `Err(Ok(Torn))` where the file ends inside
    /// a record or a record fails its checksum. Either way nothing is consumed: the next call
    /// reads the file again from the same place (the active segment may have grown since).
    pub fn read_next(&mut self) -> Result<Option<(u64, Record)>, Result<Torn, io::Error>> {
        let torn = Torn {
            offset: self.offset,
        };
        if !self.fill(FRAME_HEADER).map_err(Err)? {
            return if self.chunk.is_empty() {
                Ok(None)
            } else {
                self.forget().map_err(Err)?;
                Err(Ok(torn))
            };
        }
        let head = FrameHead::read(&self.chunk).expect("filled to a frame header");
        let len = head.len;
        if len > MAX_RECORD_BYTES || !self.fill(FRAME_HEADER + len).map_err(Err)? {
            self.forget().map_err(Err)?;
            return Err(Ok(torn));
        }
        let body = self.chunk.slice(FRAME_HEADER..FRAME_HEADER + len);
        let record = if head.matches(&body) {
            decode_body(body)
        } else {
            None
        };
        let Some(record) = record else {
            self.forget().map_err(Err)?;
            return Err(Ok(torn));
        };
        self.chunk.advance(FRAME_HEADER + len);
        self.offset += (FRAME_HEADER + len) as u64;
        Ok(Some(record))
    }

    /// Skip a bad record: scan forward from one byte past [`SegmentReader::offset`] for the first
    /// position that holds a whole valid record (a length within bounds, a matching checksum, a
    /// body that decodes) whose id is in `ids`, and go on reading from there.
    ///
    /// Looks only at what the file holds now. `Ok(None)` when no such record follows: nothing is
    /// consumed, and a later call (the active segment may have grown) scans again.
    ///
    /// The scan keeps a window of at most a chunk plus the candidate being checked; a candidate
    /// costs a checksum only when its length fits in the file and its id is in `ids`, which
    /// almost no byte position inside other records passes.
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn resync(&mut self, ids: Range<u64>) -> io::Result<Option<Resynced>> {
        let start = self.offset;
        let end = self.file.metadata()?.len();
        self.forget()?;
        let mut window = Window {
            base: start,
            buf: Vec::new(),
        };
        let mut at = start + 1;
        let found = loop {
            if at + (FRAME_HEADER + MIN_BODY) as u64 > end {
                break None;
            }
            if at - window.base >= CHUNK as u64 {
                window.advance_to(at);
            }
            let Some(head) = window.get(&mut self.file, at, FRAME_HEADER + 8)? else {
                break None;
            };
            let frame_head = FrameHead::read(head).expect("read a frame header and an id");
            let len = frame_head.len;
            let mut id = [0u8; 8];
            id.copy_from_slice(&head[8..16]);
            let id = u64::from_le_bytes(id);
            if !(MIN_BODY..=MAX_RECORD_BYTES).contains(&len)
                || at + (FRAME_HEADER + len) as u64 > end
                || !ids.contains(&id)
            {
                at += 1;
                continue;
            }
            let Some(frame) = window.get(&mut self.file, at, FRAME_HEADER + len)? else {
                break None;
            };
            let body = &frame[FRAME_HEADER..];
            if frame_head.matches(body)
                && decode_body(Bytes::copy_from_slice(body)).is_some_and(|(i, _)| i == id)
            {
                break Some((at, id));
            }
            at += 1;
        };
        let Some((at, next_id)) = found else {
            self.forget()?;
            return Ok(None);
        };
        self.offset = at;
        self.forget()?;
        Ok(Some(Resynced {
            offset: start,
            bytes: at - start,
            next_id,
        }))
    }

    /// Make `chunk` hold at least `need` bytes if the file has them; false if it ends first.
    fn fill(&mut self, need: usize) -> io::Result<bool> {
        if self.chunk.len() >= need {
            return Ok(true);
        }
        let want = need.max(CHUNK);
        let mut buf = Vec::with_capacity(want);
        buf.extend_from_slice(&self.chunk);
        // Reads into the spare capacity without zeroing it first; stops at `want` or the end.
        (&mut self.file)
            .take((want - buf.len()) as u64)
            .read_to_end(&mut buf)?;
        self.chunk = Bytes::from(buf);
        Ok(self.chunk.len() >= need)
    }

    /// Drop what was read past `offset`, so the next read sees the file as it is then.
    fn forget(&mut self) -> io::Result<()> {
        self.chunk = Bytes::new();
        self.file.seek(io::SeekFrom::Start(self.offset)).map(|_| ())
    }
}

/// The bytes of a file from `base` on, read sequentially as a scan needs them (the file's
/// position is always `base + buf.len()`).
struct Window {
    base: u64,
    buf: Vec<u8>,
}

impl Window {
    /// `len` bytes from file offset `at` (not before `base`); `None` if the file ends first.
    fn get(&mut self, file: &mut File, at: u64, len: usize) -> io::Result<Option<&[u8]>> {
        let Some(from) = at.checked_sub(self.base).map(|d| d as usize) else {
            return Ok(None);
        };
        let need = from + len;
        if self.buf.len() < need {
            let want = (need - self.buf.len()).max(CHUNK);
            (&mut *file).take(want as u64).read_to_end(&mut self.buf)?;
        }
        Ok(self.buf.get(from..need))
    }

    /// Forget the bytes before `at`.
    fn advance_to(&mut self, at: u64) {
        let n = ((at - self.base) as usize).min(self.buf.len());
        self.buf.drain(..n);
        self.base += n as u64;
    }
}

#[cfg(test)]
#[path = "segment_tests.rs"]
mod tests;
