//! Everything that speaks AMI: the frame parser and its codec.
//!
//! Knows nothing of protobuf, Kafka or NATS.

pub mod codec;
pub mod frame;
pub mod parser;
pub mod record;

pub use codec::{AmiCodec, CodecStats, Decoded};
pub use frame::{Frame, FrameKind, Header, OwnedFrame};
pub use parser::{Limits, ParseError, Parsed, Parser};
pub use record::{ParseErrorRecord, Record, Stamp, Stamped};
