//! The NATS transport of the action consumer: a queue-group subscription per owned server as
//! the [`Source`], core NATS publishes as the [`Publisher`].
//!
//! Owns: request subjects (`amibus.action.{server}`: one per server, subscribed only by its
//! owner, in a queue group so two instances of one shard share rather than both act), and
//! where results go: the request message's reply subject (request-reply), else the
//! request's `reply_to`, else the result subject template (`amibus.result.{server}`).
//!
//! Results are core NATS publishes: at-most-once, like any NATS request-reply. A request for
//! a server nobody owns has no subscriber, so a NATS request gets "no responders" at once.
//!
//! Must never: let a server id from the bus add a subject level (it is sanitized to
//! `[A-Za-z0-9_-]`).

use std::future::Future;

use async_nats::client::PublishErrorKind;
use async_nats::{Client, Subscriber};
use futures_util::StreamExt;
use futures_util::stream::SelectAll;
use prost::Message;

use super::consumer::{Incoming, PublishError, Publisher, Source};
use crate::model::pb::ActionResult;
use crate::sink::nats::NatsError;

/// `template` with `{server}` replaced by `server`, sanitized to one subject token.
///
/// ```
/// use amibus::control::nats::subject_for;
/// assert_eq!(subject_for("amibus.action.{server}", "pbx1"), "amibus.action.pbx1");
/// assert_eq!(subject_for("r.{server}", "a.b *>"), "r.a_b___");
/// assert_eq!(subject_for("r.{server}", ""), "r.unknown");
/// ```
pub fn subject_for(template: &str, server: &str) -> String {
    let token: String = if server.is_empty() {
        "unknown".into()
    } else {
        server
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    template.replace("{server}", &token)
}

/// Requests from core NATS subscriptions.
pub struct NatsRequestSource {
    subs: SelectAll<Subscriber>,
}

impl NatsRequestSource {
    /// Subscribe to every subject, in `queue_group` if given, and wait until the server has
    /// the subscriptions.
    ///
    /// # Errors
    /// A subject is invalid or the client is closed.
    pub async fn subscribe(
        client: &Client,
        subjects: &[String],
        queue_group: Option<&str>,
    ) -> Result<NatsRequestSource, NatsError> {
        let mut subs = SelectAll::new();
        for subject in subjects {
            let err = |e: &dyn std::fmt::Display| NatsError::Subscribe {
                subject: subject.clone(),
                reason: e.to_string(),
            };
            let sub = match queue_group {
                Some(g) => client.queue_subscribe(subject.clone(), g.to_owned()).await,
                None => client.subscribe(subject.clone()).await,
            }
            .map_err(|e| err(&e))?;
            subs.push(sub);
        }
        client.flush().await.map_err(|e| NatsError::Subscribe {
            subject: subjects.join(","),
            reason: e.to_string(),
        })?;
        Ok(NatsRequestSource { subs })
    }
}

impl Source for NatsRequestSource {
    async fn next(&mut self) -> Option<Incoming> {
        let m = self.subs.next().await?;
        Some(Incoming {
            payload: m.payload,
            reply: m.reply.map(|s| s.to_string()),
            ack: None,
            key: None,
        })
    }
}

/// Results as core NATS messages.
pub struct NatsResultPublisher {
    client: Client,
    result_subject: String,
}

impl NatsResultPublisher {
    /// `result_subject` is a template with `{server}`, used when a request names no reply
    /// address.
    pub fn new(client: Client, result_subject: impl Into<String>) -> Self {
        NatsResultPublisher {
            client,
            result_subject: result_subject.into(),
        }
    }
}

impl Publisher for NatsResultPublisher {
    fn publish(
        &self,
        to: Option<&str>,
        result: &ActionResult,
    ) -> impl Future<Output = Result<(), PublishError>> + Send {
        let subject = match to {
            Some(s) => s.to_owned(),
            None => subject_for(&self.result_subject, &result.server),
        };
        let payload = result.encode_to_vec();
        let client = self.client.clone();
        async move {
            client
                .publish(subject, payload.into())
                .await
                .map_err(|e| match e.kind() {
                    PublishErrorKind::MaxPayloadExceeded | PublishErrorKind::InvalidSubject => {
                        PublishError::Permanent(e.to_string())
                    }
                    PublishErrorKind::Send => PublishError::Retriable(e.to_string()),
                })
        }
    }
}
