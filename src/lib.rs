//! amibus: a bridge from Asterisk AMI to message buses.
//!
//! ```text
//! Asterisk ×N ──TCP/TLS──▶ ami (parser, codec)      bytes → borrowed frames, no copy per header
//!                              ▼
//!                          model::normalize          frame → typed fields, legacy names mapped
//!                              ▼
//!                          model::encode             → amibus.v1.Envelope bytes + partition key
//!                              ▼
//!                          spool → sink              (Kafka, NATS, file; acknowledged delivery)
//! ```
//!
//! Dependencies point one way: `ami` knows nothing of protobuf or brokers; `model` knows nothing
//! of sockets.

pub mod ami;
pub mod app;
pub mod config;
pub mod control;
pub mod model;
pub mod secret;
pub mod shard;
pub mod sim;
pub mod sink;
pub mod spool;
pub mod telemetry;
