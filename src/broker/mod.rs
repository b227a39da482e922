//! Broker clients: how amibus connects to NATS and Kafka (servers, TLS, authentication) and
//! reads messages back. The sinks (publishing), the action consumer, `amibus tail`,
//! `amibus action` and the tests all connect through here, so a setting such as TLS or a
//! credentials file means the same thing everywhere.
//!
//! Must never: publish (that is a sink's job, with its delivery promise), or depend on the
//! pipeline, the spool or the sinks: this module sits below them.

pub mod kafka;
pub mod nats;
pub mod nats_wire;
