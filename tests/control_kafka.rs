//! The action consumer over Kafka, against a real Kafka-protocol broker (tansu): requests
//! produced to a request topic, actions on the simulator (or a scripted fake where a request
//! must hang), results read back from the result topic, offsets checked by restarting the
//! consumer in the same group.
//!
//! No assertion depends on timing: waits only guard against hangs. "Nothing more arrives" is
//! asserted behind a marker request produced after the restart to the same partition, whose
//! result can only come once everything before it was read.

#[path = "support/kafka.rs"]
mod kafka_support;
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use amibus::ami::Connection;
use amibus::ami::server::ServerConfig;
use amibus::broker::kafka::{KafkaReader, KafkaReaderConfig};
use amibus::control::kafka::{
    GroupStart, KafkaControlConfig, KafkaRequestSource, KafkaResultPublisher,
};
use amibus::control::{
    AllowList, ControlConfig, ControlStats, Controller, Owns, RejectCode, Target,
};
use amibus::model::pb::{ActionRequest, ActionResult, ActionStatus};
use amibus::secret::Secret;
use amibus::sim::{Sim, SimConfig};
use kafka_support::Broker;
use prost::Message;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::{Behaviour, Fake};
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(60);
const REQUESTS: &str = "req";
const RESULTS: &str = "res";

fn request(id: &str, server: &str, action: &str) -> ActionRequest {
    ActionRequest {
        request_id: id.into(),
        server: server.into(),
        action: action.into(),
        deadline_ns: amibus::ami::record::now_ns() + 60_000_000_000,
        correlation: id.as_bytes().to_vec(),
        ..ActionRequest::default()
    }
}

fn status(r: &ActionResult) -> ActionStatus {
    ActionStatus::try_from(r.status).unwrap_or(ActionStatus::Unspecified)
}

fn producer(broker: &Broker) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("acks", "all")
        .set("message.timeout.ms", "60000")
        .create()
        .expect("producer")
}

/// Produce `payload` to the request topic with `key` (the server id, as clients should).
async fn produce(p: &FutureProducer, key: &str, payload: Vec<u8>) {
    p.send(
        FutureRecord::to(REQUESTS).key(key).payload(&payload),
        Duration::from_secs(30),
    )
    .await
    .map_err(|(e, _)| e)
    .expect("request produced");
}

/// The first offset `group` has committed on partition 0 of the request topic, read without
/// joining the group; waits (up to `T`) until there is one.
async fn committed_offset(broker: &Broker, group: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", group)
        .create()
        .expect("offset reader");
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(REQUESTS, 0);
    tokio::time::timeout(T, async {
        loop {
            let committed = tokio::task::block_in_place(|| {
                probe.committed_offsets(tpl.clone(), Duration::from_secs(5))
            });
            if let Ok(c) = committed
                && let rdkafka::Offset::Offset(o) = c.elements()[0].offset()
            {
                return o;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("group {group} committed nothing within {T:?}"))
}

/// Results read from a topic, each with its record key.
struct Results {
    source: KafkaReader,
}

impl Results {
    fn new(broker: &Broker, topic: &str) -> Results {
        let mut cfg = KafkaReaderConfig::new(broker.bootstrap(), format!("reader-{topic}"));
        cfg.topics = vec![topic.to_owned()];
        Results {
            source: KafkaReader::new(&cfg).expect("reader"),
        }
    }

    /// The next result; its key must be its request id.
    async fn next(&self) -> ActionResult {
        let r = tokio::time::timeout(T, self.source.recv())
            .await
            .expect("a result in time")
            .expect("a result");
        let result = ActionResult::decode(r.payload.clone()).expect("an ActionResult");
        assert_eq!(
            r.key.as_ref(),
            result.request_id.as_bytes(),
            "results are keyed by request id"
        );
        result
    }

    /// Results until the one for `id` (included), by request id (in arrival order per id).
    async fn until(&self, id: &str) -> HashMap<String, Vec<ActionResult>> {
        let mut out: HashMap<String, Vec<ActionResult>> = HashMap::new();
        loop {
            let r = self.next().await;
            let done = r.request_id == id;
            out.entry(r.request_id.clone()).or_default().push(r);
            if done {
                return out;
            }
        }
    }
}

fn server(id: &str, port: u16, username: &str, secret: &str) -> ServerConfig {
    let mut c = ServerConfig::new(id, "127.0.0.1", port, username, Secret::new(secret));
    c.backoff_min = Duration::from_millis(10);
    c.backoff_max = Duration::from_millis(50);
    c
}

/// The AMI connections every consumer of a test uses.
struct Servers {
    targets: HashMap<String, Target>,
    conns: Vec<(Connection, CancellationToken)>,
    _records: Vec<amibus::ami::handoff::Receiver>,
}

impl Servers {
    async fn start(list: Vec<(ServerConfig, Vec<&str>)>) -> Servers {
        let mut s = Servers {
            targets: HashMap::new(),
            conns: Vec::new(),
            _records: Vec::new(),
        };
        for (cfg, allow) in list {
            let id = cfg.id.clone();
            let (conn, rx, stop) = support::start(cfg, 1 << 16);
            tokio::time::timeout(T, async {
                while !conn.stats.snapshot().connected {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("connected");
            s.targets.insert(
                id,
                Target {
                    handle: conn.handle.clone(),
                    allow: AllowList::new(allow),
                },
            );
            s.conns.push((conn, stop));
            s._records.push(rx);
        }
        s
    }

    async fn stop(self) {
        for (c, stop) in self.conns {
            support::stop(c, stop).await;
        }
    }
}

/// One running consumer in group `group`.
struct Consumer {
    stats: Arc<ControlStats>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn kafka_cfg(broker: &Broker, group: &str) -> KafkaControlConfig {
    KafkaControlConfig {
        request_topic: REQUESTS.into(),
        result_topic: RESULTS.into(),
        group_id: group.into(),
        // These tests produce right after the consumer starts, before its group has joined.
        start: GroupStart::Earliest,
        ..KafkaControlConfig::new(broker.bootstrap())
    }
}

impl Consumer {
    fn start(broker: &Broker, servers: &Servers, group: &str, owns: Owns) -> Consumer {
        Consumer::start_at(broker, servers, group, owns, GroupStart::Earliest)
    }

    fn start_at(
        broker: &Broker,
        servers: &Servers,
        group: &str,
        owns: Owns,
        start: GroupStart,
    ) -> Consumer {
        let cfg = KafkaControlConfig {
            start,
            ..kafka_cfg(broker, group)
        };
        let control = ControlConfig {
            rate: 0.0,
            answer_not_owned: false,
            max_timeout: Duration::from_secs(120),
            ..ControlConfig::default()
        };
        let publisher = KafkaResultPublisher::new(&cfg).expect("publisher");
        let controller = Controller::new(servers.targets.clone(), owns, control, publisher);
        let stats = controller.stats();
        let source = KafkaRequestSource::new(&cfg, stats.clone()).expect("source");
        let stop = CancellationToken::new();
        let task = tokio::spawn(controller.run(source, stop.clone()));
        Consumer { stats, stop, task }
    }

    /// A graceful stop: answer what is in flight, commit, leave the group.
    async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(T, self.task)
            .await
            .expect("the consumer stops")
            .expect("no panic");
    }

    /// A crash: the task is gone mid-flight, nothing more is published or committed.
    async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn wait_until(what: &str, ok: impl Fn() -> bool) {
    tokio::time::timeout(T, async {
        while !ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

fn everything() -> Owns {
    Arc::new(|_: &str| true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_keyed_by_request_id_bad_input_never_stalls_and_a_restart_reruns_nothing() {
    let broker = Broker::start().await;
    broker.create_topic(REQUESTS, 2).await;
    broker.create_topic(RESULTS, 2).await;
    broker.create_topic("other-replies", 1).await;
    let sim = Sim::start(SimConfig {
        servers: 2,
        rate: 200,
        concurrent_calls: 4,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let addrs = sim.addrs();
    let servers = Servers::start(vec![
        (
            server("sim-0", addrs[0].port(), "admin", "amp111"),
            vec!["read-only"],
        ),
        (
            server("sim-1", addrs[1].port(), "admin", "amp111"),
            vec!["read-only"],
        ),
    ])
    .await;
    let results = Results::new(&broker, RESULTS);
    let other = Results::new(&broker, "other-replies");
    let p = producer(&broker);
    let consumer = Consumer::start(&broker, &servers, "amibus-control-0", everything());

    // Bad input first on sim-0's partition, good requests behind it.
    produce(&p, "sim-0", vec![0xff, 0xff, 0xff, 0xff]).await;
    let mut bad_reply = request("bad-reply", "sim-0", "Ping");
    bad_reply.reply_to = "no such topic!".into();
    produce(&p, "sim-0", bad_reply.encode_to_vec()).await;
    let mut looping = request("loop", "sim-0", "Ping");
    looping.reply_to = REQUESTS.into();
    produce(&p, "sim-0", looping.encode_to_vec()).await;
    let mut missing_reply = request("missing-reply", "sim-0", "Ping");
    missing_reply.reply_to = "no-such-topic".into();
    produce(&p, "sim-0", missing_reply.encode_to_vec()).await;
    produce(
        &p,
        "sim-0",
        request("not-allowed", "sim-0", "Hangup").encode_to_vec(),
    )
    .await;
    produce(
        &p,
        "nope",
        request("unknown", "nope", "Ping").encode_to_vec(),
    )
    .await;
    let mut elsewhere = request("elsewhere", "sim-1", "Ping");
    elsewhere.reply_to = "other-replies".into();
    produce(&p, "sim-1", elsewhere.encode_to_vec()).await;
    produce(
        &p,
        "sim-1",
        request("csc", "sim-1", "CoreShowChannels").encode_to_vec(),
    )
    .await;
    produce(
        &p,
        "sim-0",
        request("ping", "sim-0", "Ping").encode_to_vec(),
    )
    .await;

    let mut got: HashMap<String, Vec<ActionResult>> = HashMap::new();
    while !["", "not-allowed", "unknown", "csc", "ping"]
        .iter()
        .all(|id| got.contains_key(*id))
    {
        let r = results.next().await;
        got.entry(r.request_id.clone()).or_default().push(r);
    }
    let one = |id: &str| {
        let v = &got[id];
        assert_eq!(v.len(), 1, "{id}: {v:?}");
        v[0].clone()
    };
    let malformed = one("");
    assert_eq!(status(&malformed), ActionStatus::Rejected);
    assert_eq!(malformed.reject_code, "malformed", "{malformed:?}");
    let r = one("not-allowed");
    assert_eq!(
        (status(&r), r.reject_code.as_str()),
        (ActionStatus::Rejected, "not_allowed")
    );
    let r = one("unknown");
    assert_eq!(
        (status(&r), r.reject_code.as_str()),
        (ActionStatus::Rejected, "unknown_server")
    );
    let r = one("ping");
    assert_eq!(status(&r), ActionStatus::Success, "{r:?}");
    assert_eq!(r.correlation, b"ping");
    let r = one("csc");
    assert_eq!(status(&r), ActionStatus::Success, "{r:?}");
    assert!(!r.events.is_empty(), "the list's completion at least");
    let r = other.next().await;
    assert_eq!(
        (r.request_id.as_str(), status(&r)),
        ("elsewhere", ActionStatus::Success),
        "reply_to naming a topic wins over the result topic"
    );
    // Reply topics that are not there (or are the request topic) can never be published to:
    // counted, and settled so the partition moves on (the ping behind them was answered and
    // is committed below).
    for id in ["bad-reply", "loop", "missing-reply"] {
        assert!(!got.contains_key(id), "{id}");
    }
    wait_until("the unpublishable results are counted", || {
        consumer.stats.snapshot().publish_failures == 3
    })
    .await;
    let snap = consumer.stats.snapshot();
    for code in [
        RejectCode::Malformed,
        RejectCode::NotAllowed,
        RejectCode::UnknownServer,
    ] {
        assert_eq!(snap.rejected(code), 1, "{code:?}: {snap:?}");
    }
    consumer.shutdown().await;

    // The same group again: nothing before the marker is read (or run) again.
    let consumer = Consumer::start(&broker, &servers, "amibus-control-0", everything());
    produce(
        &p,
        "sim-0",
        request("after-0", "sim-0", "Ping").encode_to_vec(),
    )
    .await;
    produce(
        &p,
        "sim-1",
        request("after-1", "sim-1", "Ping").encode_to_vec(),
    )
    .await;
    let mut again = results.until("after-0").await;
    if !again.contains_key("after-1") {
        again.extend(results.until("after-1").await);
    }
    let mut ids: Vec<_> = again.keys().cloned().collect();
    ids.sort();
    assert_eq!(
        ids,
        ["after-0", "after-1"],
        "committed requests are not re-run"
    );
    let snap = consumer.stats.snapshot();
    assert_eq!(snap.total("success"), 2, "{snap:?}");
    assert!(
        snap.rejected.is_empty(),
        "nothing bad is read again: {snap:?}"
    );
    assert_eq!(snap.publish_failures, 0, "{snap:?}");
    assert_eq!(snap.ack_failures, 0);
    consumer.shutdown().await;
    servers.stop().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_never_passes_a_request_whose_result_is_not_published() {
    let broker = Broker::start().await;
    broker.create_topic(REQUESTS, 1).await;
    broker.create_topic(RESULTS, 1).await;
    let mut fake = Fake::start(Behaviour::default()).await;
    let servers = Servers::start(vec![(
        server("fake", fake.addr.port(), "admin", "s3cret"),
        vec!["read-only", "Swallow"],
    )])
    .await;
    let mut conn = fake.next_conn().await;
    let results = Results::new(&broker, RESULTS);
    let p = producer(&broker);
    let consumer = Consumer::start(&broker, &servers, "g-order", everything());

    // `hang` is never answered; `fast` behind it on the same partition is.
    let mut hang = request("hang", "fake", "Swallow");
    hang.timeout_ms = 120_000;
    produce(&p, "fake", hang.encode_to_vec()).await;
    produce(&p, "fake", request("fast", "fake", "Ping").encode_to_vec()).await;
    conn.until_action("Swallow").await;
    let r = results.next().await;
    assert_eq!(
        (r.request_id.as_str(), status(&r)),
        ("fast", ActionStatus::Success)
    );
    // Once `fast` is done the partition's floor is committed for the first time: `hang`'s
    // offset (0), where a wrong implementation would commit past `fast` (2).
    assert_eq!(
        committed_offset(&broker, "g-order").await,
        0,
        "the commit stays at the unanswered request"
    );
    consumer.crash().await;

    // Restarted in the same group, both are read again: the commit stayed at `hang`.
    let consumer = Consumer::start(&broker, &servers, "g-order", everything());
    conn.until_action("Swallow").await;
    let r = results.next().await;
    assert_eq!(
        (r.request_id.as_str(), status(&r), r.replayed),
        ("fast", ActionStatus::Success, false),
        "the request after the unpublished one is read again"
    );
    consumer.crash().await;
    servers.stop().await;
    fake.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_each_answer_only_their_servers_and_anything_else_once() {
    let broker = Broker::start().await;
    broker.create_topic(REQUESTS, 3).await;
    broker.create_topic(RESULTS, 1).await;
    let sim = Sim::start(SimConfig {
        servers: 4,
        rate: 50,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let ids: Vec<String> = (0..4).map(|i| format!("sim-{i}")).collect();
    let shard = |i: u32| amibus::shard::Shard { index: i, count: 2 };
    let mut consumers = Vec::new();
    let mut servers = Vec::new();
    for i in 0..2 {
        // Each replica connects only to its own servers, as `amibus run` does.
        let own: Vec<_> = sim
            .addrs()
            .iter()
            .zip(&ids)
            .filter(|(_, id)| shard(i).owns(id))
            .map(|(a, id)| (server(id, a.port(), "admin", "amp111"), vec!["read-only"]))
            .collect();
        let s = Servers::start(own).await;
        let owns: Owns = Arc::new(move |id: &str| shard(i).owns(id));
        consumers.push(Consumer::start(
            &broker,
            &s,
            &format!("amibus-control-{i}"),
            owns,
        ));
        servers.push(s);
    }
    let p = producer(&broker);
    let mut expect = Vec::new();
    for id in &ids {
        for k in 0..5 {
            let rid = format!("{id}-{k}");
            produce(&p, id, request(&rid, id, "Ping").encode_to_vec()).await;
            expect.push(rid);
        }
    }
    produce(
        &p,
        "ghost",
        request("ghost", "ghost", "Ping").encode_to_vec(),
    )
    .await;
    produce(&p, "sim-0", vec![0xff, 0xff]).await;
    produce(&p, "", request("marker", "sim-1", "Ping").encode_to_vec()).await;

    let results = Results::new(&broker, RESULTS);
    let mut got: HashMap<String, Vec<ActionResult>> = HashMap::new();
    let wanted = expect.len() + 3;
    while got.values().map(Vec::len).sum::<usize>() < wanted {
        let r = results.next().await;
        got.entry(r.request_id.clone()).or_default().push(r);
    }
    for rid in &expect {
        let v = &got[rid];
        assert_eq!(v.len(), 1, "{rid} answered once: {v:?}");
        assert_eq!(status(&v[0]), ActionStatus::Success, "{v:?}");
    }
    assert_eq!(
        got["ghost"].len(),
        1,
        "an unknown server is answered by one replica"
    );
    assert_eq!(got["ghost"][0].reject_code, "unknown_server");
    assert_eq!(
        got[""].len(),
        1,
        "a malformed payload is answered by one replica"
    );
    assert_eq!(got[""][0].reject_code, "malformed");
    // Every replica reads everything and skips what the other owns.
    wait_until("each replica skips what the other owns", || {
        consumers
            .iter()
            .map(|c| c.stats.snapshot().skipped_not_owned)
            .sum::<u64>()
            == wanted as u64
    })
    .await;
    for c in consumers {
        c.shutdown().await;
    }
    for s in servers {
        s.stop().await;
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_requests_across_ten_servers_each_answered_once_and_committed() {
    let broker = Broker::start().await;
    broker.create_topic(REQUESTS, 4).await;
    broker.create_topic(RESULTS, 2).await;
    let sim = Sim::start(SimConfig {
        servers: 10,
        rate: 20,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let list = sim
        .addrs()
        .iter()
        .enumerate()
        .map(|(i, a)| {
            (
                server(&format!("sim-{i}"), a.port(), "admin", "amp111"),
                vec!["read-only"],
            )
        })
        .collect();
    let servers = Servers::start(list).await;
    let results = Results::new(&broker, RESULTS);
    let consumer = Consumer::start(&broker, &servers, "g-load", everything());
    let p = producer(&broker);
    let n = 2000;
    let sends = (0..n).map(|i| {
        let server = format!("sim-{}", i % 10);
        let payload = request(&format!("r{i}"), &server, "Ping").encode_to_vec();
        let p = p.clone();
        async move { produce(&p, &server, payload).await }
    });
    futures_util::future::join_all(sends).await;
    let mut seen = std::collections::HashSet::new();
    while seen.len() < n {
        let r = results.next().await;
        assert_eq!(status(&r), ActionStatus::Success, "{r:?}");
        assert!(seen.insert(r.request_id.clone()), "{} twice", r.request_id);
    }
    consumer.shutdown().await;

    // Everything was committed: after a restart only the marker is read.
    let consumer = Consumer::start(&broker, &servers, "g-load", everything());
    for i in 0..10 {
        let server = format!("sim-{i}");
        let id = format!("marker-{i}");
        produce(&p, &server, request(&id, &server, "Ping").encode_to_vec()).await;
    }
    for _ in 0..10 {
        let r = results.next().await;
        assert!(
            r.request_id.starts_with("marker-"),
            "{} read again",
            r.request_id
        );
    }
    assert_eq!(consumer.stats.snapshot().total("success"), 10);
    consumer.shutdown().await;
    servers.stop().await;
    sim.shutdown().await;
}

/// Issue 14: a new group (a shard added later) must not run old, unexpired requests, and that
/// start is pinned at the group's first assignment: requests published while amibus is down
/// (even before it ever answered anything) are read after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_group_starts_at_the_end_and_keeps_that_start_across_a_crash() {
    let broker = Broker::start().await;
    broker.create_topic(REQUESTS, 1).await;
    broker.create_topic(RESULTS, 1).await;
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let servers = Servers::start(vec![(
        server("sim-0", sim.addrs()[0].port(), "admin", "amp111"),
        vec!["read-only"],
    )])
    .await;
    let results = Results::new(&broker, RESULTS);
    let p = producer(&broker);
    produce(&p, "sim-0", request("old", "sim-0", "Ping").encode_to_vec()).await;

    let group = "amibus-control-new";
    let consumer = Consumer::start_at(&broker, &servers, group, everything(), GroupStart::Latest);
    // The group's start is committed at its first assignment: after "old".
    assert_eq!(
        committed_offset(&broker, group).await,
        1,
        "the start is pinned at the end"
    );
    consumer.crash().await;

    produce(
        &p,
        "sim-0",
        request("while-down", "sim-0", "Ping").encode_to_vec(),
    )
    .await;
    let consumer = Consumer::start_at(&broker, &servers, group, everything(), GroupStart::Latest);
    let got = results.until("while-down").await;
    assert_eq!(status(&got["while-down"][0]), ActionStatus::Success);
    produce(
        &p,
        "sim-0",
        request("last", "sim-0", "Ping").encode_to_vec(),
    )
    .await;
    let more = results.until("last").await;
    assert!(
        !got.contains_key("old") && !more.contains_key("old"),
        "a request older than the group never runs"
    );
    consumer.shutdown().await;
    servers.stop().await;
    sim.shutdown().await;
}
