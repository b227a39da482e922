//! Sinks: where records go, behind one trait that takes a key, typed metadata and payload bytes.
//!
//! Owns: the [`Sink`] trait, its error type, and the [`driver`] that moves records from the
//! spool to a sink and acknowledges them in the spool only when the sink confirms them.
//! Knows nothing of AMI frames or protobuf types: a record is a key, its [`crate::spool::Meta`]
//! (rendered as bus headers here, by [`crate::spool::Meta::each_header`]) and payload bytes.
//!
//! "Sent" means acknowledged: a Kafka delivery report, a JetStream PubAck, a flushed write.

pub mod driver;
pub mod file;
pub mod kafka;
pub mod nats;
mod nats_publisher;
mod slots;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use crate::spool::Record;

/// Resolves when the broker has acknowledged one record (or failed to).
pub type Delivery = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send>>;

/// A destination for records.
pub trait Sink: Send + 'static {
    /// A short label for logs and metrics (`kafka`, `nats`, `file`).
    fn name(&self) -> &'static str;

    /// Hand one record to the client. Resolves once the record is queued (waiting for room in
    /// the client's own queue if needed); the returned [`Delivery`] resolves on acknowledgement.
    fn send(&mut self, record: &Record)
    -> impl Future<Output = Result<Delivery, SinkError>> + Send;

    /// How long after its hand-off a delivery may stay unconfirmed before the driver fails it
    /// (retriable), unless the driver's configuration says otherwise; `None` leaves it to the
    /// client (librdkafka times `message.timeout.ms` from the enqueue itself).
    fn ack_deadline(&self) -> Option<Duration> {
        None
    }

    /// Push out whatever the client buffers, waiting at most `deadline`.
    fn flush(&mut self, deadline: Duration) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// Why a record was not delivered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The broker is unreachable, slow or refused for now: send again later.
    #[error("retriable: {0}")]
    Retriable(String),
    /// This record can never be delivered (too large, invalid topic, not authorized): report it
    /// and move on, so it does not block the rest.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl SinkError {
    pub fn is_retriable(&self) -> bool {
        matches!(self, SinkError::Retriable(_))
    }
}

/// `tokio::time::timeout`, with the timer made only when the future is not done on its first
/// poll. Handing a record to a client almost always is, and a timeout reads the clock and
/// clones the runtime's handle as soon as it is made: per record, that was 4 % of the NATS
/// path's CPU.
///
/// # Errors
/// [`tokio::time::error::Elapsed`] when `limit` passes first.
pub async fn within<F: Future>(
    limit: Duration,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut fut = std::pin::pin!(fut);
    if let Some(out) = std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        std::task::Poll::Ready(out) => std::task::Poll::Ready(Some(out)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
    {
        return Ok(out);
    }
    tokio::time::timeout(limit, fut).await
}

/// Expand a template like `ami.{server}.{event}` with a record's bus headers (any name of
/// [`crate::spool::HEADER_NAMES`]); a header the record lacks or an unknown name expands to
/// `unknown`. Characters outside `[A-Za-z0-9_-]` in a value are replaced by `_`, so a
/// value can never add a level to a NATS subject or make a Kafka topic invalid.
pub fn expand_template(template: &str, record: &Record) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        let name = &rest[open + 1..open + close];
        match record.meta.header(name) {
            Some(v) if !v.is_empty() => out.extend(v.iter().map(|&b| {
                if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                    b as char
                } else {
                    '_'
                }
            })),
            _ => out.push_str("unknown"),
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn templates_expand_and_sanitize() {
        let r = Record {
            key: Bytes::new(),
            meta: crate::spool::Meta {
                server: Bytes::from_static(b"pbx.1"),
                event: Bytes::from_static(b"Newchannel"),
                ..Default::default()
            },
            payload: Bytes::new(),
        };
        assert_eq!(
            expand_template("ami.{server}.{event}", &r),
            "ami.pbx_1.Newchannel"
        );
        assert_eq!(expand_template("ami.events", &r), "ami.events");
        assert_eq!(expand_template("x.{class}", &r), "x.unknown");
        assert_eq!(expand_template("x.{server", &r), "x.{server");
    }
}
