//! The on-disk record format of spool segments, and sequential reading of a segment file.
//!
//! A segment is a file of records, each `[u32 body_len][u32 crc32(body)][body]` (little endian),
//! with `body = [u64 id][u32 key_len][key][u16 header_count]{[u16 name_len][name]
//! [u32 value_len][value]}*[payload to the end]`. A file is named after the id of its first
//! record (`00000000000000000042.seg`).
//!
//! Must never: trust a length read from disk without bounds (a torn write or a corrupt byte is
//! reported as [`Torn`], and the reader stops there).

use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};

use bytes::{Buf, BufMut, Bytes};

use super::Record;

/// The largest record body accepted when reading back; anything larger is corruption.
pub const MAX_RECORD_BYTES: usize = 256 << 20;
const FRAME_HEADER: usize = 8;

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

/// The bytes `record` takes in a segment, framing included.
pub fn encoded_len(record: &Record) -> usize {
    FRAME_HEADER + body_len(record)
}

fn body_len(record: &Record) -> usize {
    8 + 4
        + record.key.len()
        + 2
        + record
            .headers
            .iter()
            .map(|(k, v)| 2 + k.len() + 4 + v.len())
            .sum::<usize>()
        + record.payload.len()
}

/// Append `record` with `id` to `out`.
pub fn encode(id: u64, record: &Record, out: &mut Vec<u8>) {
    let start = out.len();
    out.put_u32_le(0);
    out.put_u32_le(0);
    out.put_u64_le(id);
    out.put_u32_le(record.key.len() as u32);
    out.put_slice(&record.key);
    out.put_u16_le(record.headers.len().min(u16::MAX as usize) as u16);
    for (name, value) in record.headers.iter().take(u16::MAX as usize) {
        let name = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
        out.put_u16_le(name.len() as u16);
        out.put_slice(name);
        out.put_u32_le(value.len() as u32);
        out.put_slice(value);
    }
    out.put_slice(&record.payload);
    let body_len = out.len() - start - FRAME_HEADER;
    let crc = crc32fast::hash(&out[start + FRAME_HEADER..]);
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A record could not be read whole: the file ends inside it, or it fails its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Torn {
    /// Where the bad record starts.
    pub offset: u64,
}

/// The names the pipeline writes, shared instead of allocated when read back.
const KNOWN_NAMES: [&str; 10] = [
    "server",
    "event",
    "kind",
    "class",
    "schema",
    "epoch",
    "seq",
    "gap_epoch",
    "gap_first_seq",
    "gap_last_seq",
];

fn header_name(bytes: &[u8]) -> Option<super::HeaderName> {
    if let Some(&known) = KNOWN_NAMES.iter().find(|k| k.as_bytes() == bytes) {
        return Some(known.into());
    }
    std::str::from_utf8(bytes).ok().map(|s| s.to_owned().into())
}

/// Decode one body.
fn decode_body(mut body: Bytes) -> Option<(u64, Record)> {
    if body.remaining() < 8 + 4 {
        return None;
    }
    let id = body.get_u64_le();
    let key_len = body.get_u32_le() as usize;
    if body.remaining() < key_len + 2 {
        return None;
    }
    let key = body.split_to(key_len);
    let count = body.get_u16_le() as usize;
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        if body.remaining() < 2 {
            return None;
        }
        let name_len = body.get_u16_le() as usize;
        if body.remaining() < name_len + 4 {
            return None;
        }
        let name = header_name(&body[..name_len])?;
        body.advance(name_len);
        let value_len = body.get_u32_le() as usize;
        if body.remaining() < value_len {
            return None;
        }
        headers.push((name, body.split_to(value_len)));
    }
    Some((
        id,
        Record {
            key,
            headers,
            payload: body,
        },
    ))
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
        let head = &self.chunk[..FRAME_HEADER];
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len > MAX_RECORD_BYTES || !self.fill(FRAME_HEADER + len).map_err(Err)? {
            self.forget().map_err(Err)?;
            return Err(Ok(torn));
        }
        let body = self.chunk.slice(FRAME_HEADER..FRAME_HEADER + len);
        let record = if crc32fast::hash(&body) == crc {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, payload: &str) -> Record {
        Record {
            key: Bytes::copy_from_slice(key.as_bytes()),
            headers: vec![
                ("server".into(), Bytes::from_static(b"pbx1")),
                ("event".into(), Bytes::from_static(b"Newchannel")),
            ],
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        }
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(file_name(7));
        assert_eq!(parse_file_name(&path), Some(7));
        let mut bytes = Vec::new();
        encode(7, &record("pbx1/1.1", "a"), &mut bytes);
        encode(8, &record("pbx1/1.2", "bb"), &mut bytes);
        assert_eq!(bytes.len(), 2 * encoded_len(&record("pbx1/1.1", "a")) + 1);
        let whole = bytes.len();
        encode(9, &record("pbx1/1.3", "ccc"), &mut bytes);
        bytes.truncate(bytes.len() - 2);
        std::fs::write(&path, &bytes).expect("write");
        let mut r = SegmentReader::open(&path).expect("open");
        let (id, rec) = r.read_next().expect("ok").expect("record");
        assert_eq!((id, rec), (7, record("pbx1/1.1", "a")));
        assert_eq!(r.read_next().expect("ok").map(|r| r.0), Some(8));
        assert_eq!(r.offset(), whole as u64);
        assert!(matches!(r.read_next(), Err(Ok(Torn { offset })) if offset == whole as u64));
    }

    #[test]
    fn records_across_chunks_and_a_tail_that_grows_while_read() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(file_name(0));
        // Small records spanning several chunk boundaries, one larger than a chunk.
        let mut bytes = Vec::new();
        let mut want = Vec::new();
        for id in 0..2_000u64 {
            let payload = if id == 700 {
                "x".repeat(CHUNK + 10)
            } else {
                format!("payload {id} {}", "y".repeat((id % 300) as usize))
            };
            let rec = record(&format!("k{id}"), &payload);
            encode(id, &rec, &mut bytes);
            want.push(rec);
        }
        assert!(bytes.len() > 2 * CHUNK);
        // The last record arrives in two writes, as an append being flushed would.
        let last = record("last", "z");
        let mut tail = Vec::new();
        encode(2_000, &last, &mut tail);
        let (first_half, second_half) = tail.split_at(tail.len() / 2);
        let mut file = std::fs::File::create(&path).expect("create");
        file.write_all(&bytes).expect("write");
        file.write_all(first_half).expect("write");
        let mut r = SegmentReader::open(&path).expect("open");
        for (id, rec) in want.iter().enumerate() {
            assert_eq!(r.read_next().expect("ok"), Some((id as u64, rec.clone())));
        }
        let whole = bytes.len() as u64;
        assert!(matches!(r.read_next(), Err(Ok(Torn { offset })) if offset == whole));
        assert_eq!(r.offset(), whole);
        file.write_all(second_half).expect("write");
        assert_eq!(r.read_next().expect("ok"), Some((2_000, last)));
        assert_eq!(r.read_next().expect("ok"), None);
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(file_name(1));
        let mut bytes = Vec::new();
        encode(1, &record("k", "payload"), &mut bytes);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        let mut r = SegmentReader::open(&path).expect("open");
        assert!(matches!(r.read_next(), Err(Ok(Torn { offset: 0 }))));
    }
}
