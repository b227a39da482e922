//! The NATS transport of the action consumer: a queue-group subscription per owned server as
//! the [`RequestSource`], core NATS publishes as the [`Publisher`].
//!
//! Owns: request subjects (`amibus.action.{server}`: one per server, subscribed only by its
//! owner, in a queue group so two instances of one shard share rather than both act), and
//! where results go: the request message's reply subject (request-reply), else the
//! request's `reply_to`, else the result subject template (`amibus.result.{server}`).
//!
//! Results are core NATS publishes: at-most-once, like any NATS request-reply. A request for
//! a server nobody owns has no subscriber, so a NATS request gets "no responders" at once.
//!
//! JetStream (optional, [`JetStreamRequestSource`]): requests are stored in a stream and read
//! by a durable pull consumer, one per shard, which sees every request subject and acts only
//! on the servers its replica owns (like Kafka: `answer_not_owned = false`). A message is
//! acknowledged only after its result was published, so a request whose result never left
//! (amibus crashed, or the publish failed) is delivered again after `ack_wait`. A redelivery
//! to the same process while the first delivery still runs, or within the dedupe window after
//! it finished, is not executed again (it joins the run, or gets its result replayed); a
//! redelivery to a restarted process can run again (the idempotency memory is per process).
//!
//! Must never: let a server id from the bus add a subject level (it is sanitized to
//! `[A-Za-z0-9_-]`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::client::PublishErrorKind;
use async_nats::jetstream::{self, consumer, stream};
use async_nats::{Client, Subscriber};
use futures_util::StreamExt;
use futures_util::stream::SelectAll;
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::stats::ControlStats;
use super::transport::{Incoming, PublishError, Publisher, RequestSource};
use crate::broker::nats::NatsError;
use crate::model::pb::ActionResult;

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

/// Requests from core NATS subscriptions, one per subject; the subjects can change while it
/// runs (see [`NatsRequestSource::resubscriber`]).
pub struct NatsRequestSource {
    client: Client,
    /// The request subject template: a message's subject names the server it was sent to
    /// ([`Incoming::key`]), which the body must match.
    template: Option<String>,
    queue_group: Option<String>,
    subs: SelectAll<Sub>,
    changes: Option<mpsc::Receiver<Change>>,
}

type Change = (Vec<String>, oneshot::Sender<Result<(), NatsError>>);

/// One subscription and its subject.
struct Sub {
    subject: String,
    inner: Subscriber,
}

impl futures_util::Stream for Sub {
    type Item = async_nats::Message;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// Changes the subjects of a running [`NatsRequestSource`] (a SIGHUP reload).
#[derive(Clone, Debug)]
pub struct Resubscriber(mpsc::Sender<Change>);

impl Resubscriber {
    /// Subscribe to `subjects` and unsubscribe from every other; returns once the server has
    /// the new subscriptions.
    ///
    /// # Errors
    /// A subject cannot be subscribed, or the source has ended.
    pub async fn set(&self, subjects: Vec<String>) -> Result<(), NatsError> {
        let (tx, rx) = oneshot::channel();
        let gone = || NatsError::Subscribe {
            subject: "-".into(),
            reason: "the request source has ended".into(),
        };
        self.0.send((subjects, tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
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
        let mut source = NatsRequestSource {
            client: client.clone(),
            template: None,
            queue_group: queue_group.map(str::to_owned),
            subs: SelectAll::new(),
            changes: None,
        };
        source.apply(subjects.to_vec()).await?;
        Ok(source)
    }

    /// The template the subjects were made from (`amibus.action.{server}`): each request is
    /// then checked against the server its subject names (`server_mismatch`).
    pub fn with_template(mut self, template: impl Into<String>) -> Self {
        self.template = Some(template.into());
        self
    }

    /// A handle that changes the subjects while the source runs. The source then no longer
    /// ends when its last subscription does (it waits for new subjects).
    pub fn resubscriber(&mut self) -> Resubscriber {
        let (tx, rx) = mpsc::channel(4);
        self.changes = Some(rx);
        Resubscriber(tx)
    }

    /// Keep the subscriptions to `subjects` that exist, drop the others (unsubscribing),
    /// add the missing ones, and flush.
    async fn apply(&mut self, subjects: Vec<String>) -> Result<(), NatsError> {
        let mut kept = SelectAll::new();
        let mut have = std::collections::HashSet::new();
        for sub in std::mem::take(&mut self.subs) {
            if subjects.contains(&sub.subject) {
                have.insert(sub.subject.clone());
                kept.push(sub);
            }
        }
        self.subs = kept;
        for subject in subjects {
            if have.contains(&subject) {
                continue;
            }
            let err = |e: &dyn std::fmt::Display| NatsError::Subscribe {
                subject: subject.clone(),
                reason: e.to_string(),
            };
            let inner = match &self.queue_group {
                Some(g) => {
                    self.client
                        .queue_subscribe(subject.clone(), g.clone())
                        .await
                }
                None => self.client.subscribe(subject.clone()).await,
            }
            .map_err(|e| err(&e))?;
            have.insert(subject.clone());
            self.subs.push(Sub { subject, inner });
        }
        self.client.flush().await.map_err(|e| NatsError::Subscribe {
            subject: have.into_iter().collect::<Vec<_>>().join(","),
            reason: e.to_string(),
        })
    }
}

impl RequestSource for NatsRequestSource {
    async fn next(&mut self) -> Option<Incoming> {
        loop {
            let change = match &mut self.changes {
                Some(changes) => {
                    tokio::select! {
                        m = self.subs.next(), if !self.subs.is_empty() => match m {
                            Some(m) => return Some(incoming(m, self.template.as_deref())),
                            None => continue,
                        },
                        c = changes.recv() => c,
                    }
                }
                None => {
                    let template = self.template.as_deref();
                    return self.subs.next().await.map(|m| incoming(m, template));
                }
            };
            match change {
                Some((subjects, done)) => {
                    let r = self.apply(subjects).await;
                    if let Err(e) = &r {
                        tracing::warn!(error = %e, "control: changing the request subscriptions failed");
                    }
                    let _ = done.send(r);
                }
                // Nobody can change the subjects any more.
                None => self.changes = None,
            }
        }
    }
}

fn incoming(m: async_nats::Message, template: Option<&str>) -> Incoming {
    Incoming {
        key: template.and_then(|t| server_of(t, m.subject.as_str())),
        payload: m.payload,
        reply: m.reply.map(|s| s.to_string()),
        ack: None,
    }
}

/// `template` with its `{server}` token replaced by `*`: every server's request subject.
///
/// ```
/// use amibus::control::nats::wildcard_for;
/// assert_eq!(wildcard_for("amibus.action.{server}"), "amibus.action.*");
/// assert_eq!(wildcard_for("a.x{server}y.b"), "a.*.b");
/// ```
pub fn wildcard_for(template: &str) -> String {
    template
        .split('.')
        .map(|t| if t.contains("{server}") { "*" } else { t })
        .collect::<Vec<_>>()
        .join(".")
}

/// The server token of `subject` under `template` (the inverse of [`subject_for`], up to
/// sanitizing); `None` when the subject does not fit the template.
///
/// ```
/// use amibus::control::nats::server_of;
/// assert_eq!(server_of("amibus.action.{server}", "amibus.action.pbx1").as_deref(), Some("pbx1"));
/// assert_eq!(server_of("a.x{server}y", "a.xpbxy").as_deref(), Some("pbx"));
/// assert_eq!(server_of("amibus.action.{server}", "other.pbx1"), None);
/// ```
pub fn server_of(template: &str, subject: &str) -> Option<String> {
    let t: Vec<&str> = template.split('.').collect();
    let s: Vec<&str> = subject.split('.').collect();
    if t.len() != s.len() {
        return None;
    }
    let mut server = None;
    for (tt, st) in t.iter().zip(&s) {
        match tt.split_once("{server}") {
            Some((pre, post)) => {
                server = Some(st.strip_prefix(pre)?.strip_suffix(post)?.to_owned());
            }
            None if tt == st => {}
            None => return None,
        }
    }
    server
}

/// Where JetStream requests are read; see `[control.jetstream]` in the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JetStreamRequests {
    /// The stream that stores the request subjects.
    pub stream: String,
    /// The durable pull consumer (one per shard).
    pub durable: String,
    /// Create the stream (file storage, the request subjects) when it does not exist.
    pub create_stream: bool,
    /// How long a created stream keeps a request (its bound: requests are useless past their
    /// deadline, and every shard's consumer reads the same messages, so none is removed on
    /// acknowledgement).
    pub max_age: Duration,
    /// How long a delivered request may stay unacknowledged before JetStream delivers it
    /// again; longer than the longest action, so only a lost result causes a redelivery.
    pub ack_wait: Duration,
    /// Requests delivered and not yet acknowledged, at most.
    pub max_ack_pending: i64,
}

/// Requests from a durable JetStream pull consumer; see the module docs.
pub struct JetStreamRequestSource {
    messages: consumer::pull::Stream,
    template: String,
    stats: Arc<ControlStats>,
}

impl JetStreamRequestSource {
    /// Find (or create) the stream and the durable consumer on the request subjects of
    /// `template`, and start pulling.
    ///
    /// # Errors
    /// The stream is missing (and not to be created) or the consumer cannot be created.
    pub async fn new(
        client: &Client,
        template: &str,
        cfg: &JetStreamRequests,
        stats: Arc<ControlStats>,
    ) -> Result<JetStreamRequestSource, NatsError> {
        let err = |reason: String| NatsError::Stream {
            name: cfg.stream.clone(),
            reason,
        };
        let js = jetstream::new(client.clone());
        let subjects = wildcard_for(template);
        let handle = if cfg.create_stream {
            js.get_or_create_stream(stream::Config {
                name: cfg.stream.clone(),
                subjects: vec![subjects.clone()],
                storage: stream::StorageType::File,
                max_age: cfg.max_age,
                ..Default::default()
            })
            .await
            .map_err(|e| err(e.to_string()))?
        } else {
            js.get_stream(&cfg.stream)
                .await
                .map_err(|e| err(e.to_string()))?
        };
        let consumer = handle
            .get_or_create_consumer(
                &cfg.durable,
                consumer::pull::Config {
                    durable_name: Some(cfg.durable.clone()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: cfg.ack_wait,
                    max_ack_pending: cfg.max_ack_pending,
                    filter_subject: subjects,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| err(format!("consumer {}: {e}", cfg.durable)))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| err(format!("consumer {}: {e}", cfg.durable)))?;
        Ok(JetStreamRequestSource {
            messages,
            template: template.to_owned(),
            stats,
        })
    }
}

impl RequestSource for JetStreamRequestSource {
    async fn next(&mut self) -> Option<Incoming> {
        loop {
            let m = match self.messages.next().await? {
                Ok(m) => m,
                Err(e) => {
                    self.stats.receive_error();
                    tracing::warn!(error = %e, "control: pulling requests from JetStream failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let (msg, acker) = m.split();
            let key = server_of(&self.template, msg.subject.as_str());
            let stats = self.stats.clone();
            let ack = Box::new(move || {
                tokio::spawn(async move {
                    if let Err(e) = acker.ack().await {
                        stats.ack_failure();
                        tracing::warn!(error = %e, "control: JetStream ack failed; the request will be delivered again");
                    }
                });
            });
            return Some(Incoming {
                payload: msg.payload,
                // The message's reply subject is JetStream's ack subject, not the client's.
                reply: None,
                ack: Some(ack),
                key,
            });
        }
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
