//! Files a crash leaves whole or recognisably torn: checksummed `[len][crc][body]` frames (spool
//! segments, the control journal) and whole-file replacement (tmp + rename).
//!
//! A frame is a 4-byte little-endian body length, the body's CRC-32 (little-endian), then the
//! body. A reader that finds a length past the end of what it holds, or a checksum that does not
//! match, has found a torn or damaged frame; what it does then (stop, skip, scan on) is the
//! caller's.
//!
//! Must never: leave a replaced file half-written under its own name.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Bytes before a frame's body: its length and its checksum.
pub const FRAME_HEADER: usize = 8;

/// Start a frame at the end of `out`; returns where it starts, for [`end_frame`].
pub fn begin_frame(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    start
}

/// Finish the frame begun at `start`: everything written after its header is its body.
pub fn end_frame(out: &mut [u8], start: usize) {
    let body = &out[start + FRAME_HEADER..];
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + FRAME_HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// A frame's header, read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHead {
    /// The body's length, as written (not yet checked against anything).
    pub len: usize,
    crc: u32,
}

impl FrameHead {
    /// The header in the first [`FRAME_HEADER`] bytes of `bytes` (`None` if it holds fewer).
    pub fn read(bytes: &[u8]) -> Option<FrameHead> {
        let head = bytes.get(..FRAME_HEADER)?;
        Some(FrameHead {
            len: u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize,
            crc: u32::from_le_bytes([head[4], head[5], head[6], head[7]]),
        })
    }

    /// Whether `body` is the body this header was written for.
    pub fn matches(&self, body: &[u8]) -> bool {
        body.len() == self.len && crc32fast::hash(body) == self.crc
    }
}

/// `path` with `.tmp` appended: where a replacement is written before it is renamed.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Replace `path` with `bytes`, whole or not at all: write a tmp file beside it (synced first if
/// `sync`), rename it over `path`, and (if `sync`) sync the directory, so the rename is durable.
///
/// # Errors
/// Writing, syncing or renaming fails; `path` is then unchanged.
pub fn replace(path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes)?;
    if sync {
        File::open(&tmp)?.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if sync {
        sync_dir(path);
    }
    Ok(())
}

/// Sync the directory holding `path`, so a rename or a new file in it survives a power loss.
/// Best effort: some file systems refuse to sync a directory, and nothing better can be done.
pub fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_reads_back_and_any_damage_shows() {
        let mut out = b"before".to_vec();
        let start = begin_frame(&mut out);
        out.extend_from_slice(b"the body");
        end_frame(&mut out, start);
        let head = FrameHead::read(&out[start..]).unwrap();
        assert_eq!(head.len, 8);
        let body = &out[start + FRAME_HEADER..];
        assert!(head.matches(body));
        for i in 0..body.len() {
            let mut bad = body.to_vec();
            bad[i] ^= 0x20;
            assert!(!head.matches(&bad), "flipped byte {i} went unnoticed");
        }
        assert!(!head.matches(&body[..7]));
        assert_eq!(FrameHead::read(&out[start..start + 7]), None);
    }

    #[test]
    fn replace_leaves_the_new_bytes_and_no_tmp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        std::fs::write(&path, b"old").unwrap();
        replace(&path, b"new", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!tmp_path(&path).exists());
        replace(&path, b"newer", false).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"newer");
    }
}
