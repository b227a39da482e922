//! The socket side of the parser: a `tokio_util::codec::Decoder` over `BytesMut`.
//!
//! Owns: turning read buffers into [`OwnedFrame`]s that share the read buffer's memory
//! (`split_to` + `freeze`, no copy of the frame bytes), and counting what was skipped.
//!
//! Must never: fail the stream on bad input. A parse error is an item ([`Decoded::Error`]), not
//! a codec error, so a `FramedRead` keeps going after it.

use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

use super::frame::OwnedFrame;
use super::parser::{Limits, ParseError, Parsed, Parser};

/// One item from the decoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Frame(OwnedFrame),
    /// Bytes were skipped; the stream continues after them.
    Error(ParseError),
    /// The stream ended inside a frame; these many bytes were left.
    Truncated {
        bytes: usize,
    },
}

/// Running totals of one decoder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CodecStats {
    pub frames: u64,
    /// Bytes handed out inside frames.
    pub frame_bytes: u64,
    /// Bytes dropped: blank lines between frames and skipped oversized frames.
    pub skipped_bytes: u64,
    pub errors: u64,
}

/// An AMI decoder around a resumable [`Parser`].
#[derive(Debug, Default)]
pub struct AmiCodec {
    parser: Parser,
    stats: CodecStats,
}

impl AmiCodec {
    pub fn new(limits: Limits) -> Self {
        AmiCodec {
            parser: Parser::new(limits),
            stats: CodecStats::default(),
        }
    }

    pub fn stats(&self) -> CodecStats {
        self.stats
    }
}

impl Decoder for AmiCodec {
    type Item = Decoded;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Decoded>, std::io::Error> {
        loop {
            match self.parser.parse(src) {
                Parsed::Frame { frame, consumed } => {
                    let parts = frame.detach();
                    let bytes = src.split_to(consumed).freeze();
                    self.stats.frames += 1;
                    self.stats.frame_bytes += consumed as u64;
                    return Ok(Some(Decoded::Frame(parts.attach(bytes))));
                }
                Parsed::Skip { consumed, error } => {
                    src.advance(consumed);
                    self.stats.skipped_bytes += consumed as u64;
                    if let Some(error) = error {
                        self.stats.errors += 1;
                        return Ok(Some(Decoded::Error(error)));
                    }
                }
                Parsed::Partial => return Ok(None),
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Decoded>, std::io::Error> {
        if let Some(item) = self.decode(src)? {
            return Ok(Some(item));
        }
        if src.is_empty() {
            return Ok(None);
        }
        let only_blank = src.iter().all(|&b| b == b'\r' || b == b'\n');
        let bytes = src.len();
        src.clear();
        self.parser.reset();
        self.stats.skipped_bytes += bytes as u64;
        if only_blank {
            return Ok(None);
        }
        self.stats.errors += 1;
        Ok(Some(Decoded::Truncated { bytes }))
    }
}
