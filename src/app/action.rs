//! `amibus action`: send one `amibus.v1.ActionRequest` and print its `ActionResult` as JSON.
//!
//! Owns: building the request from the command line (`ACTION Key=Value ...`, a request id, a
//! deadline and a reply wait), the round trip over one transport, and the JSON form of a
//! result. Transports: core NATS request-reply (`--nats`), a JetStream stream (`--nats
//! --jetstream`: published with a PubAck, the result comes back on a fresh inbox named in
//! `reply_to`), or Kafka (`--kafka`: produced keyed by server id, `acks=all`; the result is read
//! from the result topic, every partition from its end as it was before the request left).
//!
//! Exit status: 0 when the result is `success`, 2 when a result came back with any other
//! status (printed all the same), 1 when no result came back (transport error, nobody
//! answered before `--wait` ran out).
//!
//! Must never: send a request twice. A request is sent once; waiting longer never re-sends
//! it. To retry, run the command again with the same `--request-id`: amibus answers a known
//! id from its memory (`replayed`) instead of running the action again.

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use prost::Message;

use crate::broker::nats::{NatsConnection, connect};
use crate::model::pb::{ActionHeader, ActionRequest, ActionResult, ActionStatus, ReplyFrame};

/// Arguments of `amibus action`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("transport").required(true).args(["nats", "kafka"])))]
pub struct Args {
    /// NATS server URL(s), comma-separated: core NATS request-reply (or JetStream with
    /// `--jetstream`).
    #[arg(long, value_delimiter = ',')]
    pub nats: Vec<String>,
    /// NATS authentication (`--creds FILE` or `--token-env VAR`).
    #[command(flatten)]
    pub nats_auth: super::NatsAuthArgs,
    /// Publish to the JetStream stream that stores the request subjects instead of a core
    /// NATS request.
    #[arg(long, requires = "nats")]
    pub jetstream: bool,
    /// The request subject template (as `[control] subject`).
    #[arg(long, default_value = "amibus.action.{server}")]
    pub subject: String,
    /// Kafka bootstrap brokers, `host:port[,host:port...]`.
    #[arg(long)]
    pub kafka: Option<String>,
    /// Kafka: the request topic (as `[control.kafka] request_topic`).
    #[arg(long, default_value = "amibus.actions")]
    pub request_topic: String,
    /// Kafka: where the result is read (as `[control.kafka] result_topic`).
    #[arg(long, default_value = "amibus.results")]
    pub result_topic: String,
    /// The target server id.
    #[arg(long)]
    pub server: String,
    /// The idempotency key; default: a new one. Reuse it to ask again without running again.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Past this (from now) the action is not sent any more (`expired`), e.g. `30s`.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub deadline: Duration,
    /// The reply wait once sent (`timeout_ms`); default: amibus's `default_timeout`.
    #[arg(long, value_parser = duration)]
    pub timeout: Option<Duration>,
    /// How long this command waits for the result; default: the deadline and 5 s.
    #[arg(long, value_parser = duration)]
    pub wait: Option<Duration>,
    /// The action name, e.g. `CoreShowChannels`, `Originate`.
    pub action: String,
    /// Headers in order, `Key=Value` (repeat a key for several lines, e.g. `Variable=A=1`).
    #[arg(value_parser = header)]
    pub headers: Vec<(String, String)>,
}

fn duration(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s).ok_or_else(|| format!("{s:?}: use e.g. 500ms, 10s, 2m"))
}

fn header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?}: a header is Key=Value")),
    }
}

/// A fresh request id: the process, the time and a counter (unique enough for a CLI).
fn new_request_id() -> String {
    format!(
        "cli-{}-{}",
        std::process::id(),
        crate::ami::record::now_ns()
    )
}

/// The request the arguments describe.
pub fn build_request(args: &Args) -> ActionRequest {
    let deadline = i64::try_from(args.deadline.as_nanos()).unwrap_or(i64::MAX);
    ActionRequest {
        request_id: args.request_id.clone().unwrap_or_else(new_request_id),
        server: args.server.clone(),
        action: args.action.clone(),
        headers: args
            .headers
            .iter()
            .map(|(k, v)| ActionHeader {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        deadline_ns: crate::ami::record::now_ns().saturating_add(deadline),
        timeout_ms: args
            .timeout
            .map_or(0, |t| u32::try_from(t.as_millis()).unwrap_or(u32::MAX)),
        ..ActionRequest::default()
    }
}

fn frame_json(f: &ReplyFrame) -> serde_json::Value {
    serde_json::Value::Array(
        f.headers
            .iter()
            .map(|h| {
                serde_json::json!([
                    String::from_utf8_lossy(&h.key),
                    h.value.as_deref().map(String::from_utf8_lossy)
                ])
            })
            .collect(),
    )
}

/// The status as its lower-case label (`success`, `outcome_unknown`, ...).
pub fn status_label(status: i32) -> &'static str {
    crate::control::stats::STATUS_LABELS
        .get(usize::try_from(status).unwrap_or(0))
        .copied()
        .unwrap_or("unspecified")
}

/// An `ActionResult` as JSON: frames as `[[key, value], ...]` in wire order, text lossily
/// decoded.
pub fn result_json(r: &ActionResult) -> serde_json::Value {
    let t = r.timings.unwrap_or_default();
    serde_json::json!({
        "request_id": r.request_id,
        "server": r.server,
        "action": r.action,
        "status": status_label(r.status),
        "reason": r.reason,
        "reject_code": r.reject_code,
        "retriable": r.retriable,
        "replayed": r.replayed,
        "action_id": r.action_id,
        "response": r.response.as_ref().map(frame_json),
        "events": r.events.iter().map(frame_json).collect::<Vec<_>>(),
        "events_truncated": r.events_truncated,
        "originate_response": r.originate_response.as_ref().map(frame_json),
        "correlation": String::from_utf8_lossy(&r.correlation),
        "timings": {"received_ns": t.received_ns, "sent_ns": t.sent_ns, "completed_ns": t.completed_ns},
    })
}

async fn via_nats(
    args: &Args,
    req: &ActionRequest,
    wait: Duration,
) -> anyhow::Result<ActionResult> {
    let conn = NatsConnection {
        servers: args.nats.clone(),
        auth: args.nats_auth.auth()?,
        name: Some("amibus-action".into()),
        ..NatsConnection::default()
    };
    let client = connect(&conn).await.context("cannot connect to NATS")?;
    let subject = crate::control::nats::subject_for(&args.subject, &req.server);
    if !args.jetstream {
        let m = tokio::time::timeout(wait, client.request(subject, req.encode_to_vec().into()))
            .await
            .context("no result before --wait ran out")?
            .context("the NATS request failed (no amibus serves this server?)")?;
        return ActionResult::decode(m.payload).context("the answer is not an ActionResult");
    }
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    client.flush().await?;
    let mut req = req.clone();
    req.reply_to = inbox;
    let js = async_nats::jetstream::new(client.clone());
    js.publish(subject, req.encode_to_vec().into())
        .await
        .context("cannot publish to JetStream")?
        .await
        .context("JetStream did not store the request (no stream for the subject?)")?;
    tokio::time::timeout(wait, async {
        while let Some(m) = replies.next().await {
            if let Ok(r) = ActionResult::decode(m.payload)
                && r.request_id == req.request_id
            {
                return Ok(r);
            }
        }
        bail!("the NATS connection closed")
    })
    .await
    .context("no result before --wait ran out")?
}

async fn via_kafka(
    brokers: &str,
    args: &Args,
    req: &ActionRequest,
    wait: Duration,
) -> anyhow::Result<ActionResult> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::{Message as _, Offset, TopicPartitionList};

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("amibus-action-{}", req.request_id))
        .set("enable.auto.commit", "false")
        .create()
        .context("cannot create the Kafka result reader")?;
    // Every partition of the result topic from its end as it is now, before the request
    // leaves: the result cannot be missed.
    let topic = args.result_topic.clone();
    let tpl = tokio::task::block_in_place(|| -> anyhow::Result<TopicPartitionList> {
        let md = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .context("cannot read the result topic's metadata")?;
        let parts = md
            .topics()
            .first()
            .map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())
            .unwrap_or_default();
        if parts.is_empty() {
            bail!("the result topic {topic:?} has no partitions (does it exist?)");
        }
        let mut tpl = TopicPartitionList::new();
        for p in parts {
            let (_, high) = consumer
                .fetch_watermarks(&topic, p, Duration::from_secs(10))
                .context("cannot read the result topic's end")?;
            tpl.add_partition_offset(&topic, p, Offset::Offset(high))?;
        }
        Ok(tpl)
    })?;
    consumer.assign(&tpl)?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create()
        .context("cannot create the Kafka producer")?;
    let payload = req.encode_to_vec();
    producer
        .send(
            FutureRecord::to(&args.request_topic)
                .key(&req.server)
                .payload(&payload),
            wait,
        )
        .await
        .map_err(|(e, _)| e)
        .context("the request was not stored")?;
    tokio::time::timeout(wait, async {
        loop {
            let m = consumer.recv().await?;
            if m.key() != Some(req.request_id.as_bytes()) {
                continue;
            }
            if let Some(r) = m.payload().and_then(|p| ActionResult::decode(p).ok()) {
                return Ok(r);
            }
        }
    })
    .await
    .context("no result before --wait ran out")?
}

/// Send the request, print the result; the exit status (see the module docs).
pub fn run(args: Args) -> anyhow::Result<std::process::ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let req = build_request(&args);
    let wait = args.wait.unwrap_or(args.deadline + Duration::from_secs(5));
    let result = rt.block_on(async {
        match &args.kafka {
            Some(brokers) => via_kafka(brokers, &args, &req, wait).await,
            None => via_nats(&args, &req, wait).await,
        }
    })?;
    println!("{}", result_json(&result));
    Ok(if result.status == ActionStatus::Success as i32 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(2)
    })
}
