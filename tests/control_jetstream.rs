//! The action consumer reading requests from JetStream (a durable pull consumer) on a real
//! `nats-server`, with a scripted AMI server whose `Swallow` action is never answered, so a
//! request can be held in flight for as long as a test needs.
//!
//! Each consumer runs in a runtime of its own with its own NATS connection, so a "crash" is
//! the runtime shut down: every task of that amibus dies at once and nothing more is
//! published or acknowledged.
//!
//! No assertion depends on timing: waits only guard against hangs.
//!
//! Without a journal the idempotency memory dies with the process; with one
//! ([`Controller::with_journal`]) a request redelivered after the crash is answered from it.

#[path = "support/nats.rs"]
mod nats_support;
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use amibus::control::journal::{JournalConfig, JournalFsync, RESTARTED_REASON};
use amibus::control::nats::{JetStreamRequestSource, JetStreamRequests, NatsResultPublisher};
use amibus::control::{
    AllowList, ControlConfig, ControlStats, Controller, PublishError, Publisher, Target,
};
use amibus::model::pb::{ActionRequest, ActionResult, ActionStatus};
use async_nats::jetstream;
use futures_util::StreamExt;
use nats_support::NatsServer;
use prost::Message;
use support::{Behaviour, Fake, FakeConn};

const T: Duration = Duration::from_secs(30);
const SUBJECT: &str = "t.action.{server}";
const STREAM: &str = "REQUESTS";
const DURABLE: &str = "amibus-control-0";

fn request(id: &str, action: &str, timeout_ms: u32) -> ActionRequest {
    ActionRequest {
        request_id: id.into(),
        server: "fake".into(),
        action: action.into(),
        deadline_ns: amibus::ami::record::now_ns() + 60_000_000_000,
        reply_to: format!("t.reply.{id}"),
        timeout_ms,
        ..ActionRequest::default()
    }
}

fn status(r: &ActionResult) -> ActionStatus {
    ActionStatus::try_from(r.status).unwrap_or(ActionStatus::Unspecified)
}

/// Publishes through `inner`; for the request id `stall`, then waits forever.
struct Stalling {
    inner: NatsResultPublisher,
    stall: Option<&'static str>,
}

impl Publisher for Stalling {
    async fn publish(&self, to: Option<&str>, result: &ActionResult) -> Result<(), PublishError> {
        self.inner.publish(to, result).await?;
        if self.stall == Some(result.request_id.as_str()) {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

/// One amibus consumer in a runtime of its own.
struct Amibus {
    rt: tokio::runtime::Runtime,
    stats: Arc<ControlStats>,
}

impl Amibus {
    async fn start(url: &str, targets: HashMap<String, Target>, ack_wait: Duration) -> Amibus {
        Amibus::start_with(url, targets, ack_wait, None, None).await
    }

    /// With `journal`, the controller keeps its idempotency memory in that file; with
    /// `stall`, publishing a result for that request id never returns once the result is on
    /// the bus, so that message is never acknowledged (an acknowledgement lost to a crash).
    async fn start_with(
        url: &str,
        targets: HashMap<String, Target>,
        ack_wait: Duration,
        journal: Option<&Path>,
        stall: Option<&'static str>,
    ) -> Amibus {
        let journal = journal.map(|path| JournalConfig {
            path: path.to_owned(),
            fsync: JournalFsync::Never,
            max_bytes: 1 << 20,
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let url = url.to_owned();
        let stats = rt
            .spawn(async move {
                let client = async_nats::connect(url).await.expect("connect");
                let control = ControlConfig {
                    rate: 0.0,
                    answer_not_owned: false,
                    ..ControlConfig::default()
                };
                let publisher = Stalling {
                    inner: NatsResultPublisher::new(client.clone(), "t.result.{server}"),
                    stall,
                };
                let mut controller =
                    Controller::new(targets, Arc::new(|_: &str| true), control, publisher);
                if let Some(j) = &journal {
                    controller = controller.with_journal(j).expect("journal");
                }
                let stats = controller.stats();
                let cfg = JetStreamRequests {
                    stream: STREAM.into(),
                    durable: DURABLE.into(),
                    create_stream: true,
                    max_age: Duration::from_secs(3600),
                    ack_wait,
                    max_ack_pending: 100,
                };
                let source = JetStreamRequestSource::new(&client, SUBJECT, &cfg, stats.clone())
                    .await
                    .expect("jetstream source");
                tokio::spawn(controller.run(source, tokio_util::sync::CancellationToken::new()));
                stats
            })
            .await
            .expect("started");
        Amibus { rt, stats }
    }

    /// Every task of this amibus stops where it is.
    fn crash(self) {
        self.rt.shutdown_background();
    }
}

/// The fake AMI server, its one session, and the target for it.
type Conn = (
    amibus::ami::connection::Connection,
    amibus::ami::handoff::Receiver,
    tokio_util::sync::CancellationToken,
);

async fn fake() -> (Fake, FakeConn, HashMap<String, Target>, Conn) {
    let mut fake = Fake::start(Behaviour::default()).await;
    let cfg = amibus::ami::server::ServerConfig::new(
        "fake",
        "127.0.0.1",
        fake.addr.port(),
        "admin",
        amibus::secret::Secret::new("s3cret"),
    );
    let (conn, rx, stop) = support::start(cfg, 1 << 16);
    let session = fake.next_conn().await;
    tokio::time::timeout(T, async {
        while !conn.stats.snapshot().connected {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("connected");
    let targets = HashMap::from([(
        "fake".to_owned(),
        Target {
            handle: conn.handle.clone(),
            allow: AllowList::new(["read-only", "Swallow", "Marker"]),
        },
    )]);
    (fake, session, targets, (conn, rx, stop))
}

async fn publish(js: &jetstream::Context, subject: &str, payload: Vec<u8>) {
    js.publish(subject.to_owned(), payload.into())
        .await
        .expect("publish")
        .await
        .expect("PubAck");
}

async fn next_result(sub: &mut async_nats::Subscriber) -> ActionResult {
    let m = tokio::time::timeout(T, sub.next())
        .await
        .expect("a result in time")
        .expect("subscription open");
    ActionResult::decode(m.payload).expect("an ActionResult")
}

async fn consumer_info(js: &jetstream::Context) -> jetstream::consumer::Info {
    let mut c: jetstream::consumer::PullConsumer = js
        .get_stream(STREAM)
        .await
        .expect("stream")
        .get_consumer(DURABLE)
        .await
        .expect("consumer");
    c.info().await.expect("info").clone()
}

/// Until the durable consumer has nothing delivered and unacknowledged, and its ack floor is
/// at `seq`.
async fn wait_acked(js: &jetstream::Context, seq: u64) {
    tokio::time::timeout(T, async {
        loop {
            let i = consumer_info(js).await;
            if i.num_ack_pending == 0 && i.ack_floor.stream_sequence == seq {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not acknowledged up to {seq}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_requests_are_acknowledged_only_once_their_result_is_published() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    let (fake, mut session, targets, conn) = fake().await;
    let amibus = Amibus::start(&nats.url(), targets, Duration::from_secs(30)).await;
    let mut replies = client.subscribe("t.reply.>").await.expect("sub");
    let mut results = client.subscribe("t.result.>").await.expect("sub");
    client.flush().await.expect("flush");

    publish(
        &js,
        "t.action.fake",
        request("p1", "Ping", 0).encode_to_vec(),
    )
    .await;
    let r = next_result(&mut replies).await;
    assert_eq!(
        (r.request_id.as_str(), status(&r)),
        ("p1", ActionStatus::Success)
    );
    wait_acked(&js, 1).await;

    // A request held in flight stays unacknowledged; the one behind it does not wait.
    publish(
        &js,
        "t.action.fake",
        request("held", "Swallow", 20_000).encode_to_vec(),
    )
    .await;
    session.until_action("Swallow").await;
    publish(&js, "t.action.fake", vec![0xff, 0xff, 0xff]).await;
    let r = next_result(&mut results).await;
    assert_eq!(
        (status(&r), r.reject_code.as_str()),
        (ActionStatus::Rejected, "malformed"),
        "a bad payload is answered (on the result subject) and acknowledged"
    );
    tokio::time::timeout(T, async {
        loop {
            let i = consumer_info(&js).await;
            if i.num_ack_pending == 1 && i.ack_floor.stream_sequence == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("only the held request is unacknowledged");
    assert_eq!(amibus.stats.snapshot().ack_failures, 0);
    amibus.crash();
    support::stop(conn.0, conn.2).await;
    fake.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_joins_the_running_attempt_and_a_crash_before_the_result_redelivers() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    let (fake, mut session, targets, conn) = fake().await;
    let ack_wait = Duration::from_millis(500);
    let amibus = Amibus::start(&nats.url(), targets.clone(), ack_wait).await;
    let mut replies = client.subscribe("t.reply.>").await.expect("sub");
    client.flush().await.expect("flush");

    // Held for 3 s while JetStream redelivers it every 0.5 s: one attempt, one result per
    // delivery, all acknowledged together.
    publish(
        &js,
        "t.action.fake",
        request("slow", "Swallow", 3_000).encode_to_vec(),
    )
    .await;
    session.until_action("Swallow").await;
    let first = next_result(&mut replies).await;
    assert_eq!(
        (first.request_id.as_str(), status(&first), first.replayed),
        ("slow", ActionStatus::Timeout, false)
    );
    wait_acked(&js, 1).await;
    let snap = amibus.stats.snapshot();
    assert!(snap.replayed >= 1, "redeliveries joined the run: {snap:?}");
    for _ in 0..snap.replayed {
        let again = next_result(&mut replies).await;
        assert_eq!((again.request_id.as_str(), again.replayed), ("slow", true));
    }
    // Nothing but the one Swallow reached Asterisk: the next action it sees is this Ping.
    publish(
        &js,
        "t.action.fake",
        request("after-slow", "Ping", 0).encode_to_vec(),
    )
    .await;
    let next = session.next_action().await;
    assert_eq!(next.action(), "Ping", "no second Swallow: {next:?}");
    let r = next_result(&mut replies).await;
    assert_eq!(r.request_id, "after-slow");
    wait_acked(&js, 2).await;

    // A crash while `lost` runs: its result is never published, so JetStream delivers it
    // again to the next amibus, which runs it (without a journal, its memory died with the process;
    // see the last test for the journal).
    publish(
        &js,
        "t.action.fake",
        request("lost", "Swallow", 30_000).encode_to_vec(),
    )
    .await;
    session.until_action("Swallow").await;
    amibus.crash();
    let amibus = Amibus::start(&nats.url(), targets, ack_wait).await;
    let again = session.next_action().await;
    assert_eq!(again.action(), "Swallow", "redelivered after the crash");
    // What was acknowledged before the crash is not delivered again: behind a marker, the
    // new amibus has run only the marker and `lost`.
    publish(
        &js,
        "t.action.fake",
        request("marker", "Ping", 0).encode_to_vec(),
    )
    .await;
    let r = next_result(&mut replies).await;
    assert_eq!(r.request_id, "marker");
    let snap = amibus.stats.snapshot();
    assert_eq!(snap.total("success"), 1, "{snap:?}");
    assert_eq!(snap.total("timeout"), 0, "{snap:?}");
    assert_eq!(snap.replayed, 0, "{snap:?}");
    amibus.crash();
    support::stop(conn.0, conn.2).await;
    fake.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_the_journal_answers_redeliveries_and_nothing_is_sent_twice() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    let (fake, mut session, targets, conn) = fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let journal: PathBuf = dir.path().join("control-journal");
    let ack_wait = Duration::from_millis(500);
    // The first amibus publishes the result of `listed` but never acknowledges it.
    let amibus = Amibus::start_with(
        &nats.url(),
        targets.clone(),
        ack_wait,
        Some(&journal),
        Some("listed"),
    )
    .await;
    let mut replies = client.subscribe("t.reply.>").await.expect("sub");
    client.flush().await.expect("flush");

    // `listed` completes (its ack is lost); `lost` is running when amibus crashes.
    publish(
        &js,
        "t.action.fake",
        request("listed", "CoreShowChannels", 0).encode_to_vec(),
    )
    .await;
    let first = next_result(&mut replies).await;
    assert_eq!(
        (first.request_id.as_str(), status(&first), first.replayed),
        ("listed", ActionStatus::Success, false)
    );
    publish(
        &js,
        "t.action.fake",
        request("lost", "Swallow", 30_000).encode_to_vec(),
    )
    .await;
    let before = session.until_action("Swallow").await;
    assert!(
        before
            .iter()
            .any(|a| a.action().eq_ignore_ascii_case("CoreShowChannels")),
        "{before:?}"
    );
    amibus.crash();
    let i = consumer_info(&js).await;
    assert_eq!(
        i.ack_floor.stream_sequence, 0,
        "neither request was acknowledged before the crash"
    );

    // The new amibus reads the journal; JetStream delivers both again. Neither is sent:
    // `lost` is answered outcome_unknown, `listed` gets its earlier result.
    let amibus = Amibus::start_with(&nats.url(), targets, ack_wait, Some(&journal), None).await;
    // Only the new amibus acknowledges them, each only after publishing its answer.
    wait_acked(&js, 2).await;
    // Whatever they made amibus send to Asterisk came before this marker.
    publish(
        &js,
        "t.action.fake",
        request("marker", "Marker", 0).encode_to_vec(),
    )
    .await;
    let after = session.until_action("Marker").await;
    assert!(
        after.iter().all(|a| a.action().eq_ignore_ascii_case("Ping")
            || a.action().eq_ignore_ascii_case("Marker")),
        "only keepalives and the marker reached Asterisk after the crash: {after:?}"
    );
    wait_acked(&js, 3).await;
    let mut seen_lost = false;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), replies.next()).await {
        let r = ActionResult::decode(m.payload).expect("an ActionResult");
        match r.request_id.as_str() {
            "lost" => {
                // Nothing was published for it before the crash: its first answer is not a
                // replay (issue 14).
                assert_eq!(
                    (status(&r), r.reason.as_str(), r.replayed),
                    (ActionStatus::OutcomeUnknown, RESTARTED_REASON, false)
                );
                seen_lost = true;
            }
            "listed" => {
                assert_eq!((status(&r), r.replayed), (ActionStatus::Success, true));
                assert_eq!(r.response, first.response, "the earlier reply, kept whole");
            }
            "marker" => assert_eq!(status(&r), ActionStatus::Error, "Asterisk knows no Marker"),
            other => panic!("unexpected result for {other}"),
        }
    }
    assert!(seen_lost, "the request running at the crash was answered");
    let snap = amibus.stats.snapshot();
    assert_eq!(snap.journal_loaded, 2, "{snap:?}");
    assert!(snap.journal_restart_unknown >= 1, "{snap:?}");
    // Both answered from the journal; the running one's first answer is not a replay.
    assert!(
        snap.replayed + snap.journal_restart_unknown >= 2,
        "both answered from the journal: {snap:?}"
    );
    assert_eq!(snap.journal_write_failures, 0, "{snap:?}");
    assert_eq!(
        snap.total("success"),
        0,
        "nothing ran but the marker: {snap:?}"
    );
    amibus.crash();
    support::stop(conn.0, conn.2).await;
    fake.stop();
}
