//! What a transport implements to bring requests in and take results out: [`RequestSource`]
//! and [`Publisher`], and what flows between them and the consumer ([`Incoming`], [`Ack`],
//! [`PublishError`]).
//!
//! Must never: depend on a broker client; NATS and Kafka implement these in their own modules.

use std::future::Future;

use bytes::Bytes;

use crate::model::pb::ActionResult;

/// Called once the result for a message was published: acknowledge it to the transport.
pub type Ack = Box<dyn FnOnce() + Send>;

/// One message taken off the bus.
pub struct Incoming {
    /// The encoded `ActionRequest`.
    pub payload: Bytes,
    /// The transport's own reply address (the NATS reply subject of a request), which wins
    /// over the request's `reply_to`.
    pub reply: Option<String>,
    /// Run after the result was published (or could never be: see [`PublishError::Permanent`]).
    pub ack: Option<Ack>,
    /// The transport's routing key (a Kafka record key: by convention the target server id).
    /// Where every replica sees every request, it decides which one answers a payload that
    /// does not decode (the owner of this id, or of `""` without a key), so exactly one does.
    pub key: Option<String>,
}

/// Where requests come from (a NATS subscription, a Kafka consumer).
pub trait RequestSource: Send {
    /// The next message; `None` when the source has ended.
    fn next(&mut self) -> impl Future<Output = Option<Incoming>> + Send;

    /// Called once, after the last result was published (or the drain gave up): settle what
    /// the acknowledgements left to do (commit the final Kafka offsets).
    fn close(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Why a result could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The bus may take it later.
    #[error("cannot publish the result now: {0}")]
    Retriable(String),
    /// It never will (bad subject or topic, too large). The message is acknowledged anyway:
    /// leaving it unacknowledged would stall the Kafka partition's offsets (or have JetStream
    /// redeliver it) for a result that can never be published, and would run the requests
    /// behind it again after a restart.
    #[error("cannot publish the result: {0}")]
    Permanent(String),
}

impl PublishError {
    pub fn is_retriable(&self) -> bool {
        matches!(self, PublishError::Retriable(_))
    }
}

/// Where results go.
pub trait Publisher: Send + Sync + 'static {
    /// Publish `result` to `to`, or, when `to` is `None`, to the configured result address
    /// for `result.server`.
    fn publish(
        &self,
        to: Option<&str>,
        result: &ActionResult,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
}
