//! Everything that speaks AMI: the frame parser and its codec, login, the per-server connection
//! task, actions and the handle to send them.
//!
//! Knows nothing of protobuf, Kafka or NATS.

pub mod action;
pub mod codec;
pub mod connection;
pub mod frame;
pub mod handle;
pub mod login;
pub mod parser;
pub mod record;

pub use action::{Action, EncodeError};
pub use codec::{AmiCodec, CodecStats, Decoded};
pub use connection::{Connection, Options, Stats, StatsSnapshot};
pub use frame::{Frame, FrameKind, Header, OwnedFrame};
pub use handle::{ActionError, ActionReply, Handle, Request};
pub use login::LoginError;
pub use parser::{Limits, ParseError, Parsed, Parser};
pub use record::{ParseErrorRecord, Record, Stamp, Stamped};
