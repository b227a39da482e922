//! Everything that speaks AMI: the frame parser and its codec, login, the per-server connection
//! task and its hand-off queue to a pipeline, actions and the handle to send them.
//!
//! Knows nothing of protobuf, Kafka or NATS.

pub mod action;
pub mod codec;
pub mod connection;
pub mod frame;
pub mod handle;
pub mod handoff;
mod lines;
pub mod login;
pub mod parser;
pub mod record;
pub mod scan;
pub mod server;
pub mod snapshot;

pub use action::{Action, EncodeError};
pub use codec::{AmiCodec, CodecStats, Decoded};
pub use connection::{Connection, Options, Stats, StatsSnapshot};
pub use frame::{Frame, FrameKind, Header, Known, OwnedFrame};
pub use handle::{ActionError, ActionReply, Handle, Request};
pub use login::LoginError;
pub use parser::{Limits, ParseError, Parsed, Parser};
pub use record::{ParseErrorRecord, Record, Stamp, Stamped};
pub use scan::Classifier;
