//! The `amibus.v1` contract and everything that turns AMI frames into it.
//!
//! Owns: the generated protobuf types ([`pb`]), normalization of frames (typed fields, legacy
//! names), the partition key, the fast envelope encoder, and the JSON form.
//! Knows nothing of sockets or brokers.

mod cursor;
pub mod encode;
pub mod json;
pub mod legacy;
pub mod normalize;
mod snapshot_json;

/// Types generated from `proto/amibus/v1/*.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/amibus.v1.rs"));
}

pub use encode::{encode_frame, encode_record, encoded_frame_len, record_envelope, to_envelope};
pub use normalize::{Normalized, normalize, partition_key};

/// The schema version carried next to every envelope (e.g. as a Kafka header).
pub const SCHEMA_VERSION: &str = "amibus.v1";

/// What goes into a record's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PayloadFormat {
    /// An encoded `amibus.v1.Envelope`.
    #[default]
    Proto,
    /// The envelope as one JSON object and a newline.
    Json,
}
