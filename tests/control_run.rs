//! `amibus run` with a `[control]` section, end to end: `run_with` on simulator servers and a
//! real nats-server (or tansu, for the Kafka transport), requests from a client, results read
//! back; then a reload of the server list (what SIGHUP hands to the running job) and requests
//! for the added and the removed servers.
//!
//! No assertion depends on timing: waits only guard against hangs (a retried request is a
//! new request id, so a retry never counts as a duplicate).

#[path = "support/in_process.rs"]
mod in_process;
#[path = "support/kafka.rs"]
mod kafka_support;
#[path = "support/nats.rs"]
mod nats_support;

use in_process::Running;
use std::path::Path;
use std::time::Duration;

use amibus::config::{Config, ProcessEnv};
use amibus::model::pb::{ActionRequest, ActionResult, ActionStatus, ReplyFrame};
use amibus::sim::{Sim, SimConfig, SimHandle};
use async_nats::client::RequestErrorKind;
use async_nats::jetstream;
use futures_util::StreamExt;
use nats_support::NatsServer;
use prost::Message;

const T: Duration = Duration::from_secs(30);

fn request(id: &str, server: &str, action: &str) -> ActionRequest {
    ActionRequest {
        request_id: id.into(),
        server: server.into(),
        action: action.into(),
        deadline_ns: amibus::ami::record::now_ns() + 30_000_000_000,
        ..ActionRequest::default()
    }
}

fn status(r: &ActionResult) -> ActionStatus {
    ActionStatus::try_from(r.status).unwrap_or(ActionStatus::Unspecified)
}

fn get<'a>(f: &'a ReplyFrame, key: &str) -> Option<&'a [u8]> {
    f.headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(key.as_bytes()))
        .and_then(|h| h.value.as_deref())
}

fn server_block(id: &str, sim: &SimHandle, i: usize) -> String {
    format!(
        "[[server]]\nid = \"{id}\"\nhost = \"127.0.0.1\"\nport = {}\nusername = \"admin\"\nsecret = \"amp111\"\nbackoff_min = \"10ms\"\nbackoff_max = \"50ms\"\n",
        sim.addrs()[i].port()
    )
}

fn config(dir: &Path, servers: &str, control: &str) -> Config {
    let text = format!(
        "{servers}[spool]\ndir = \"{}\"\n[sink]\nkind = \"file\"\n[sink.file]\npath = \"{}\"\n{control}",
        dir.join("spool").display(),
        dir.join("out.jsonl").display()
    );
    Config::parse(&text, &ProcessEnv).expect("config")
}

/// A NATS request to `server`'s request subject; `None` for "no responders" (nobody
/// subscribes to it).
async fn ask(client: &async_nats::Client, req: &ActionRequest) -> Option<ActionResult> {
    let subject = format!("amibus.action.{}", req.server);
    match tokio::time::timeout(T, client.request(subject, req.encode_to_vec().into()))
        .await
        .expect("an answer in time")
    {
        Ok(m) => Some(ActionResult::decode(m.payload).expect("an ActionResult")),
        Err(e) if e.kind() == RequestErrorKind::NoResponders => None,
        Err(e) => panic!("request failed: {e}"),
    }
}

/// Ask until `ok` holds for the answer (each try a new request id).
async fn ask_until(
    client: &async_nats::Client,
    server: &str,
    what: &str,
    ok: impl Fn(&Option<ActionResult>) -> bool,
) -> Option<ActionResult> {
    tokio::time::timeout(T, async {
        for n in 0.. {
            let r = ask(client, &request(&format!("{what}-{n}"), server, "Ping")).await;
            if ok(&r) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        unreachable!()
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn success(r: &Option<ActionResult>) -> bool {
    r.as_ref()
        .is_some_and(|r| status(r) == ActionStatus::Success)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amibus_run_answers_actions_over_nats_and_follows_a_reload() {
    let nats = NatsServer::start();
    let sim = Sim::start(SimConfig {
        servers: 3,
        rate: 200,
        concurrent_calls: 4,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let control = format!("[control]\nnats_servers = [\"{}\"]\nrate = 0\n", nats.url());
    let cfg = config(
        dir.path(),
        &format!(
            "{}{}",
            server_block("a", &sim, 0),
            server_block("b", &sim, 1)
        ),
        &control,
    );
    let amibus = Running::start(cfg);
    let client = async_nats::connect(nats.url()).await.expect("connect");

    // Ping and CoreShowChannels through NATS request-reply.
    ask_until(&client, "a", "ready-a", success).await;
    let r = ask(&client, &request("ping-b", "b", "Ping"))
        .await
        .expect("b answers");
    assert_eq!(status(&r), ActionStatus::Success, "{r:?}");
    assert_eq!(
        get(r.response.as_ref().expect("response"), "Ping"),
        Some(&b"Pong"[..])
    );
    let r = ask(&client, &request("csc-a", "a", "CoreShowChannels"))
        .await
        .expect("a answers");
    assert_eq!(status(&r), ActionStatus::Success, "{r:?}");
    let (complete, items) = r.events.split_last().expect("the completion event");
    assert_eq!(
        get(complete, "Event"),
        Some(&b"CoreShowChannelsComplete"[..])
    );
    assert_eq!(
        get(complete, "ListItems"),
        Some(items.len().to_string().as_bytes())
    );
    assert_eq!(ask(&client, &request("none-c", "c", "Ping")).await, None);

    // Reload: a goes, b stays, c comes.
    let reloaded = config(
        dir.path(),
        &format!(
            "{}{}",
            server_block("b", &sim, 1),
            server_block("c", &sim, 2)
        ),
        &control,
    );
    amibus
        .reloads
        .send(reloaded.servers)
        .await
        .expect("reload sent");
    ask_until(&client, "c", "ready-c", success).await;
    // The subscriptions changed in one step: a is unsubscribed by now.
    assert_eq!(
        ask(&client, &request("gone-a", "a", "Ping")).await,
        None,
        "a removed server's subject has no subscriber"
    );
    let r = ask(&client, &request("still-b", "b", "Ping"))
        .await
        .expect("b answers");
    assert_eq!(status(&r), ActionStatus::Success, "{r:?}");
    assert_eq!(sim.stats()[1].logins, 1, "b kept its session");
    amibus.stop().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reload_jetstream_requests_for_a_removed_server_are_unknown_server() {
    let nats = NatsServer::start();
    let sim = Sim::start(SimConfig {
        servers: 2,
        rate: 100,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let control = format!(
        "[control]\nnats_servers = [\"{}\"]\nrate = 0\n[control.jetstream]\nstream = \"ACTIONS\"\n",
        nats.url()
    );
    let amibus = Running::start(config(dir.path(), &server_block("a", &sim, 0), &control));
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    let mut replies = client.subscribe("t.reply.>").await.expect("sub");
    client.flush().await.expect("flush");
    tokio::time::timeout(T, async {
        while js.get_stream("ACTIONS").await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("amibus creates the stream");

    // Ask through the stream; the reply comes on reply_to.
    let mut n = 0;
    let mut ask_js = async |server: &str| -> ActionResult {
        n += 1;
        let mut req = request(&format!("{server}-{n}"), server, "Ping");
        req.reply_to = format!("t.reply.{n}");
        js.publish(
            format!("amibus.action.{server}"),
            req.encode_to_vec().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("PubAck");
        let m = tokio::time::timeout(T, replies.next())
            .await
            .expect("a result in time")
            .expect("open");
        let r = ActionResult::decode(m.payload).expect("an ActionResult");
        assert_eq!(r.request_id, req.request_id);
        r
    };
    let r = ask_js("a").await;
    assert_eq!(status(&r), ActionStatus::Success, "{r:?}");
    let r = ask_js("b").await;
    assert_eq!(
        (status(&r), r.reject_code.as_str()),
        (ActionStatus::Rejected, "unknown_server")
    );

    amibus
        .reloads
        .send(config(dir.path(), &server_block("b", &sim, 1), &control).servers)
        .await
        .expect("reload sent");
    tokio::time::timeout(T, async {
        loop {
            if status(&ask_js("b").await) == ActionStatus::Success {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("b becomes controllable");
    let r = ask_js("a").await;
    assert_eq!(
        (status(&r), r.reject_code.as_str()),
        (ActionStatus::Rejected, "unknown_server"),
        "a removed server"
    );
    amibus.stop().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amibus_run_answers_actions_from_a_kafka_topic() {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let broker = kafka_support::Broker::start().await;
    broker.create_topic("amibus.actions", 2).await;
    broker.create_topic("amibus.results", 1).await;
    let sim = Sim::start(SimConfig {
        servers: 1,
        rate: 100,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let control = format!(
        "[control]\ntransport = \"kafka\"\nrate = 0\n[control.kafka]\nbrokers = \"{}\"\nstart = \"earliest\"\n",
        broker.bootstrap()
    );
    let amibus = Running::start(config(dir.path(), &server_block("a", &sim, 0), &control));
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .create()
        .expect("producer");
    for (id, server, action) in [
        ("k-ping", "a", "Ping"),
        ("k-csc", "a", "CoreShowChannels"),
        ("k-unknown", "zz", "Ping"),
    ] {
        let payload = request(id, server, action).encode_to_vec();
        producer
            .send(
                FutureRecord::to("amibus.actions")
                    .key(server)
                    .payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produced");
    }
    let mut reader = amibus::broker::kafka::KafkaReaderConfig::new(broker.bootstrap(), "reader");
    reader.topics = vec!["amibus.results".into()];
    let reader = amibus::broker::kafka::KafkaReader::new(&reader).expect("reader");
    let mut got = std::collections::HashMap::new();
    while got.len() < 3 {
        let r = tokio::time::timeout(T, reader.recv())
            .await
            .expect("a result in time")
            .expect("a result");
        let result = ActionResult::decode(r.payload.clone()).expect("an ActionResult");
        assert_eq!(r.key.as_ref(), result.request_id.as_bytes());
        assert!(
            got.insert(result.request_id.clone(), result).is_none(),
            "one result per request"
        );
    }
    assert_eq!(status(&got["k-ping"]), ActionStatus::Success);
    let csc = &got["k-csc"];
    assert_eq!(status(csc), ActionStatus::Success, "{csc:?}");
    assert_eq!(
        get(csc.events.last().expect("completion"), "Event"),
        Some(&b"CoreShowChannelsComplete"[..])
    );
    assert_eq!(got["k-unknown"].reject_code, "unknown_server");
    amibus.stop().await;
    sim.shutdown().await;
}
