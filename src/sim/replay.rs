//! Replay of a raw AMI recording: its events, in order, to every logged-in session.
//!
//! Owns: splitting the recording into events once at load, and each event's `Timestamp:` for
//! pacing. The banner and every `Response:` frame (the recorded Login answer, action answers) are
//! skipped: the sim does its own login handshake.
//!
//! Must never: re-parse or re-format the recorded bytes; an event goes out exactly as recorded.

use std::path::Path;

use super::SimError;
use super::filter::class;
use super::source::BatchBuilder;
use crate::ami::{FrameKind, Parsed, Parser};

/// A loaded recording.
#[derive(Debug)]
pub struct Replay {
    data: Vec<u8>,
    /// `(start, end, class, timestamp µs)` per event.
    events: Vec<(usize, usize, u32, u64)>,
}

fn parse_ts(v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?;
    let (sec, usec) = s.split_once('.').unwrap_or((s, "0"));
    let sec: u64 = sec.trim().parse().ok()?;
    let mut us: u64 = 0;
    let mut digits = 0;
    for c in usec.trim().bytes().take(6) {
        if !c.is_ascii_digit() {
            return None;
        }
        us = us * 10 + u64::from(c - b'0');
        digits += 1;
    }
    for _ in digits..6 {
        us *= 10;
    }
    Some(sec * 1_000_000 + us)
}

impl Replay {
    /// Read and index a recording.
    ///
    /// # Errors
    /// [`SimError::Replay`] if the file cannot be read.
    pub fn load(path: &Path) -> Result<Replay, SimError> {
        let data = std::fs::read(path).map_err(|source| SimError::Replay {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self::from_bytes(data))
    }

    pub fn from_bytes(data: Vec<u8>) -> Replay {
        let mut parser = Parser::default();
        let mut events = Vec::new();
        let mut pos = 0;
        let mut last_ts = 0;
        while pos < data.len() {
            match parser.parse(&data[pos..]) {
                Parsed::Frame { frame, consumed } => {
                    let raw = frame.raw();
                    // Skip blank lines before the frame so the replayed bytes start at `Event:`.
                    let lead = raw
                        .iter()
                        .position(|&b| b != b'\r' && b != b'\n')
                        .unwrap_or(0);
                    if frame.kind() == FrameKind::Message && frame.get("Event").is_some() {
                        let cl = frame
                            .get("Privilege")
                            .map(class::from_privilege)
                            .unwrap_or(0);
                        if let Some(ts) = frame.get("Timestamp").and_then(parse_ts) {
                            last_ts = ts;
                        }
                        events.push((pos + lead, pos + consumed, cl, last_ts));
                    }
                    pos += consumed;
                }
                Parsed::Skip { consumed, .. } => pos += consumed,
                Parsed::Partial => break,
            }
        }
        Replay { data, events }
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// The timestamp of event `i` (the last one for `i` past the end).
    pub fn ts_us(&self, i: usize) -> u64 {
        self.events
            .get(i)
            .or(self.events.last())
            .map(|e| e.3)
            .unwrap_or(0)
    }

    /// Copy up to `n` events from `from` into `out`; returns how many.
    pub fn copy_into(&self, from: usize, n: usize, out: &mut BatchBuilder) -> usize {
        let end = (from + n).min(self.events.len());
        for &(s, e, cl, _) in self.events.get(from..end).unwrap_or_default() {
            out.push_event(&self.data[s..e], cl);
        }
        end.saturating_sub(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_banner_and_responses() {
        let rec = b"Asterisk Call Manager/11.0.0\r\nResponse: Success\r\nMessage: Authentication accepted\r\n\r\nEvent: A\r\nPrivilege: call,all\r\nTimestamp: 10.5\r\n\r\nEvent: B\r\nPrivilege: dialplan,all\r\nTimestamp: 11.000001\r\n\r\n".to_vec();
        let r = Replay::from_bytes(rec);
        assert_eq!(r.len(), 2);
        assert!(!r.events.is_empty());
        assert_eq!(r.ts_us(0), 10_500_000);
        assert_eq!(r.ts_us(1), 11_000_001);
        let mut out = BatchBuilder::default();
        assert_eq!(r.copy_into(0, 10, &mut out), 2);
        assert!(out.buf.starts_with(b"Event: A\r\n"));
        assert_eq!(out.events[0].1, class::CALL);
    }
}
