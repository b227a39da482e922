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
//!
//! No `unsafe` outside `ami::scan`, the one module that holds the SIMD loads; each of its
//! `unsafe` blocks says why it is sound.
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod ami;
pub mod app;
pub mod broker;
pub mod config;
pub mod control;
pub mod durable;
pub mod mix;
pub mod model;
pub mod pipeline;
pub mod secret;
pub mod shard;
pub mod sim;
pub mod sink;
pub mod spool;
pub mod supervise;
pub mod telemetry;
pub mod tls;
