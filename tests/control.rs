//! The action consumer end to end: requests as NATS request-reply messages on a real
//! `nats-server`, actions on the built-in AMI simulator (or a scripted fake where the test must
//! see every byte the client sent), results read back as `amibus.v1.ActionResult`.
//!
//! No assertion depends on timing: waits only guard against hangs.

#[path = "support/nats.rs"]
mod nats_support;
mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use amibus::ami::handoff;
use amibus::ami::server::ServerConfig;
use amibus::ami::{Connection, Options};
use amibus::control::nats::{NatsRequestSource, NatsResultPublisher, subject_for};
use amibus::control::{
    AllowList, ControlConfig, ControlStats, Controller, Owns, RejectCode, Target,
};
use amibus::model::pb::{ActionHeader, ActionRequest, ActionResult, ActionStatus, ReplyFrame};
use amibus::secret::Secret;
use amibus::sim::{Sim, SimConfig, SimHandle};
use futures_util::StreamExt;
use nats_support::NatsServer;
use prost::Message;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(20);
const SUBJECT: &str = "t.action.{server}";

fn now_ns() -> i64 {
    amibus::ami::record::now_ns()
}

fn request(id: &str, server: &str, action: &str, headers: &[(&str, &str)]) -> ActionRequest {
    ActionRequest {
        request_id: id.into(),
        server: server.into(),
        action: action.into(),
        headers: headers
            .iter()
            .map(|(k, v)| ActionHeader {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect(),
        deadline_ns: now_ns() + 15_000_000_000,
        correlation: format!("corr-{id}").into_bytes(),
        ..ActionRequest::default()
    }
}

fn get<'a>(f: &'a ReplyFrame, key: &str) -> Option<&'a [u8]> {
    f.headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(key.as_bytes()))
        .and_then(|h| h.value.as_deref())
}

fn status(r: &ActionResult) -> ActionStatus {
    ActionStatus::try_from(r.status).unwrap_or(ActionStatus::Unspecified)
}

/// nats-server, the servers, their connections and a running consumer.
struct Rig {
    _nats: NatsServer,
    client: async_nats::Client,
    stats: Arc<ControlStats>,
    stop: CancellationToken,
    consumer: tokio::task::JoinHandle<()>,
    conns: Vec<(Connection, CancellationToken)>,
    _records: Vec<handoff::Receiver>,
}

struct RigConfig {
    /// (address, allow list) per server; ids are `sim-<i>`.
    servers: Vec<(std::net::SocketAddr, Vec<&'static str>)>,
    owns: Owns,
    control: ControlConfig,
    /// Extra subjects the consumer listens on (for misrouted requests).
    extra_subjects: Vec<String>,
    secret: &'static str,
    username: &'static str,
}

impl RigConfig {
    fn sim(sim: &SimHandle, allow: &[Vec<&'static str>]) -> Self {
        RigConfig {
            servers: sim
                .addrs()
                .into_iter()
                .enumerate()
                .map(|(i, a)| {
                    (
                        a,
                        allow.get(i).cloned().unwrap_or_else(|| vec!["read-only"]),
                    )
                })
                .collect(),
            owns: Arc::new(|_: &str| true),
            control: ControlConfig {
                rate: 0.0,
                ..ControlConfig::default()
            },
            extra_subjects: Vec::new(),
            secret: "amp111",
            username: "admin",
        }
    }
}

impl Rig {
    async fn start(rc: RigConfig) -> Rig {
        let nats = NatsServer::start();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let mut targets = HashMap::new();
        let mut conns = Vec::new();
        let mut records = Vec::new();
        let mut subjects = rc.extra_subjects.clone();
        for (i, (addr, allow)) in rc.servers.iter().enumerate() {
            let id = format!("sim-{i}");
            let mut c = ServerConfig::new(
                &id,
                "127.0.0.1",
                addr.port(),
                rc.username,
                Secret::new(rc.secret),
            );
            c.backoff_min = Duration::from_millis(10);
            c.backoff_max = Duration::from_millis(50);
            let (tx, rx) = handoff::channel(1 << 16);
            let shutdown = CancellationToken::new();
            let conn = Connection::spawn(Arc::new(c), tx, shutdown.clone(), Options::default());
            targets.insert(
                id.clone(),
                Target {
                    handle: conn.handle.clone(),
                    allow: AllowList::new(allow.iter().copied()),
                },
            );
            subjects.push(subject_for(SUBJECT, &id));
            conns.push((conn, shutdown));
            records.push(rx);
        }
        // Every connection logged in before the first request.
        for (c, _) in &conns {
            tokio::time::timeout(T, async {
                while !c.stats.snapshot().connected {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("connected");
        }
        let source = NatsRequestSource::subscribe(&client, &subjects, Some("amibus-control"))
            .await
            .unwrap()
            .with_template(SUBJECT);
        let publisher = NatsResultPublisher::new(client.clone(), "t.result.{server}");
        let controller = Controller::new(targets, rc.owns, rc.control, publisher);
        let stats = controller.stats();
        let stop = CancellationToken::new();
        let consumer = tokio::spawn(controller.run(source, stop.clone()));
        Rig {
            _nats: nats,
            client,
            stats,
            stop,
            consumer,
            conns,
            _records: records,
        }
    }

    /// Send raw bytes as a NATS request to the subject of `server`; decode the result.
    async fn ask_raw(&self, server: &str, payload: Vec<u8>) -> ActionResult {
        let msg = tokio::time::timeout(
            T,
            self.client
                .request(subject_for(SUBJECT, server), payload.into()),
        )
        .await
        .expect("a result in time")
        .expect("a result");
        ActionResult::decode(msg.payload).expect("an ActionResult")
    }

    async fn ask(&self, req: &ActionRequest) -> ActionResult {
        let r = self.ask_raw(&req.server, req.encode_to_vec()).await;
        assert_eq!(r.request_id, req.request_id);
        assert_eq!(r.correlation, req.correlation, "correlation is echoed");
        r
    }

    async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(T, self.consumer)
            .await
            .unwrap()
            .unwrap();
        for (c, s) in self.conns {
            s.cancel();
            let _ = tokio::time::timeout(T, c.task).await;
        }
    }
}

fn sim_cfg(servers: usize) -> SimConfig {
    SimConfig {
        servers,
        rate: 2000,
        concurrent_calls: 6,
        auth_fail_delay: Duration::from_millis(10),
        epoch: Some(1_795_671_272),
        ..SimConfig::default()
    }
}

async fn wait_events(sim: &SimHandle, n: u64) {
    tokio::time::timeout(T, async {
        while sim.stats().iter().map(|s| s.events).min().unwrap_or(0) < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the simulator generates calls");
}

#[tokio::test]
async fn async_originate_succeeds_with_its_originate_response() {
    let sim = Sim::start(sim_cfg(1)).await.unwrap();
    let rig = Rig::start(RigConfig::sim(&sim, &[vec!["read-only", "Originate"]])).await;
    let req = request(
        "orig-1",
        "sim-0",
        "Originate",
        &[
            ("Channel", "Local/abandon@bench-entry"),
            ("Context", "bench-entry"),
            ("Exten", "sink"),
            ("Priority", "1"),
            ("Async", "true"),
            ("Variable", "A=1"),
            ("Variable", "B=2"),
        ],
    );
    let r = rig.ask(&req).await;
    assert_eq!(status(&r), ActionStatus::Success, "{r:?}");
    assert_eq!(r.server, "sim-0");
    assert!(r.action_id.contains("-sim-0-"), "{}", r.action_id);
    let resp = r.response.as_ref().unwrap();
    assert_eq!(
        get(resp, "Message"),
        Some(&b"Originate successfully queued"[..])
    );
    let ev = r
        .originate_response
        .as_ref()
        .expect("the OriginateResponse");
    assert_eq!(get(ev, "Event"), Some(&b"OriginateResponse"[..]));
    assert_eq!(get(ev, "ActionID"), Some(r.action_id.as_bytes()));
    assert_eq!(get(ev, "Response"), Some(&b"Success"[..]));
    let t = r.timings.unwrap();
    assert!(t.received_ns > 0 && t.sent_ns >= t.received_ns && t.completed_ns >= t.sent_ns);

    // An unknown technology fails in the OriginateResponse: the action ran, the call did not.
    let mut bad = request(
        "orig-2",
        "sim-0",
        "Originate",
        &[("Channel", "Bogus/1"), ("Async", "yes")],
    );
    bad.headers.push(ActionHeader {
        key: "Application".into(),
        value: "Echo".into(),
    });
    let r = rig.ask(&bad).await;
    assert_eq!(status(&r), ActionStatus::Error, "{r:?}");
    assert!(
        r.reason.starts_with("OriginateResponse: Failure"),
        "{}",
        r.reason
    );
    assert_eq!(rig.stats.snapshot().count("sim-0", "success"), 1);
    assert_eq!(rig.stats.snapshot().count("sim-0", "error"), 1);
    rig.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn core_show_channels_returns_every_item_and_the_completion() {
    let sim = Sim::start(sim_cfg(1)).await.unwrap();
    let rig = Rig::start(RigConfig::sim(&sim, &[])).await;
    wait_events(&sim, 200).await;
    let r = rig
        .ask(&request("csc-1", "sim-0", "CoreShowChannels", &[]))
        .await;
    assert_eq!(status(&r), ActionStatus::Success, "{r:?}");
    assert_eq!(
        get(r.response.as_ref().unwrap(), "EventList"),
        Some(&b"start"[..])
    );
    let (complete, items) = r.events.split_last().expect("a completion event");
    assert_eq!(
        get(complete, "Event"),
        Some(&b"CoreShowChannelsComplete"[..])
    );
    assert_eq!(
        get(complete, "ListItems"),
        Some(items.len().to_string().as_bytes())
    );
    assert!(!items.is_empty());
    for item in items {
        assert_eq!(get(item, "Event"), Some(&b"CoreShowChannel"[..]));
        assert_eq!(get(item, "ActionID"), Some(r.action_id.as_bytes()));
    }
    assert!(!r.events_truncated);
    rig.shutdown().await;
    sim.shutdown().await;
}

/// A live channel name from a CoreShowChannels result.
async fn some_channel(rig: &Rig, server: &str, n: u32) -> String {
    let r = rig
        .ask(&request(
            &format!("csc-{server}-{n}"),
            server,
            "CoreShowChannels",
            &[],
        ))
        .await;
    let item = r
        .events
        .first()
        .filter(|_| r.events.len() > 1)
        .expect("a channel");
    String::from_utf8(get(item, "Channel").unwrap().to_vec()).unwrap()
}

#[tokio::test]
async fn redirect_and_hangup_run_when_allowed_and_are_rejected_when_not() {
    let sim = Sim::start(sim_cfg(2)).await.unwrap();
    let rig = Rig::start(RigConfig::sim(
        &sim,
        &[vec!["read-only", "Redirect", "Hangup"], vec!["read-only"]],
    ))
    .await;
    wait_events(&sim, 200).await;
    for (i, action) in ["Redirect", "Hangup"].into_iter().enumerate() {
        let ch = some_channel(&rig, "sim-0", i as u32).await;
        let headers: &[(&str, &str)] = if action == "Redirect" {
            &[
                ("Channel", ch.as_str()),
                ("Context", "bench-entry"),
                ("Exten", "sink"),
                ("Priority", "1"),
            ]
        } else {
            &[("Channel", ch.as_str())]
        };
        // Allowed: it ran (the channel may have ended meanwhile: then Asterisk says so).
        let r = rig
            .ask(&request(&format!("{action}-ok"), "sim-0", action, headers))
            .await;
        assert!(
            matches!(status(&r), ActionStatus::Success | ActionStatus::Error),
            "{r:?}"
        );
        assert!(r.response.is_some(), "{action} reached the server");
        // Not allowed on sim-1: rejected with the reason, nothing sent.
        let ch1 = some_channel(&rig, "sim-1", i as u32).await;
        let headers1: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| {
                if *k == "Channel" {
                    (*k, ch1.as_str())
                } else {
                    (*k, *v)
                }
            })
            .collect();
        let r = rig
            .ask(&request(
                &format!("{action}-no"),
                "sim-1",
                action,
                &headers1,
            ))
            .await;
        assert_eq!(status(&r), ActionStatus::Rejected);
        assert_eq!(r.reject_code, "not_allowed");
        assert_eq!(
            r.reason,
            format!("{action} is not in allow_actions of server sim-1")
        );
        assert!(!r.retriable);
        assert!(r.response.is_none() && r.timings.unwrap().sent_ns == 0);
    }
    let s = rig.stats.snapshot();
    assert_eq!(s.rejected(RejectCode::NotAllowed), 2);
    assert_eq!(s.count("sim-1", "rejected"), 2);
    rig.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn expired_requests_are_answered_and_never_sent() {
    let sim = Sim::start(sim_cfg(1)).await.unwrap();
    let rig = Rig::start(RigConfig::sim(&sim, &[])).await;
    let mut req = request("late-1", "sim-0", "Ping", &[]);
    req.deadline_ns = now_ns() - 1;
    let r = rig.ask(&req).await;
    assert_eq!(status(&r), ActionStatus::Expired);
    assert!(r.response.is_none() && r.action_id.is_empty());
    assert_eq!(r.timings.unwrap().sent_ns, 0);
    // Expiry is remembered like any outcome: a redelivery gets it again.
    let again = rig.ask(&req).await;
    assert!(again.replayed && status(&again) == ActionStatus::Expired);
    rig.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_duplicate_request_id_is_answered_from_the_first_run() {
    let sim = Sim::start(sim_cfg(1)).await.unwrap();
    let rig = Rig::start(RigConfig::sim(&sim, &[vec!["read-only", "Originate"]])).await;
    let req = request(
        "dup-1",
        "sim-0",
        "Originate",
        &[
            ("Channel", "Local/abandon@bench-entry"),
            ("Context", "bench-entry"),
            ("Exten", "sink"),
            ("Priority", "1"),
            ("Async", "true"),
        ],
    );
    // Twice at once (the second joins the first while it runs), then once more later.
    let (a, b) = tokio::join!(rig.ask(&req), rig.ask(&req));
    let c = rig.ask(&req).await;
    for r in [&a, &b, &c] {
        assert_eq!(status(r), ActionStatus::Success, "{r:?}");
        assert_eq!(r.action_id, a.action_id, "one AMI action for all three");
        assert_eq!(r.originate_response, a.originate_response);
    }
    assert_eq!([&a, &b, &c].iter().filter(|r| r.replayed).count(), 2);
    let s = rig.stats.snapshot();
    assert_eq!(s.count("sim-0", "success"), 1, "executed once");
    assert_eq!(s.replayed, 2);
    // The same id on another request still gets the first result (the id is the key).
    let mut other = req.clone();
    other.action = "Ping".into();
    other.headers.clear();
    assert_eq!(rig.ask(&other).await.action_id, a.action_id);
    rig.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn malformed_requests_are_rejected_counted_and_the_consumer_goes_on() {
    let sim = Sim::start(sim_cfg(1)).await.unwrap();
    let rig = Rig::start(RigConfig::sim(&sim, &[vec!["read-only", "Setvar"]])).await;
    // Not protobuf at all.
    let r = rig
        .ask_raw("sim-0", b"\xff\xff\xff\xff not a request".to_vec())
        .await;
    assert_eq!(status(&r), ActionStatus::Rejected);
    assert_eq!(r.reject_code, "malformed");
    // Fields missing.
    let mut req = request("m-1", "sim-0", "Ping", &[]);
    req.deadline_ns = 0;
    let r = rig.ask(&req).await;
    assert_eq!(
        (r.reject_code.as_str(), r.reason.as_str()),
        ("missing_field", "deadline_ns is required")
    );
    // Header injection: a CR/LF in a value would start a second action.
    for (i, v) in ["x\r\n\r\nAction: Logoff", "x\nAction: Originate", "x\r"]
        .iter()
        .enumerate()
    {
        let r = rig
            .ask(&request(
                &format!("inj-{i}"),
                "sim-0",
                "Setvar",
                &[("Variable", "V"), ("Value", v)],
            ))
            .await;
        assert_eq!(status(&r), ActionStatus::Rejected);
        assert_eq!(r.reject_code, "invalid_header", "{}", r.reason);
        assert!(r.reason.contains("CR or LF"), "{}", r.reason);
    }
    // A NUL would cut the value where Asterisk reads it (issue 14).
    let r = rig
        .ask(&request(
            "nul-1",
            "sim-0",
            "Setvar",
            &[("Variable", "V"), ("Value", "a\0b")],
        ))
        .await;
    assert_eq!(r.reject_code, "invalid_header");
    assert!(r.reason.contains("control character 0x00"), "{}", r.reason);
    // A line Asterisk would refuse (over 1024 bytes with CRLF).
    let long = "v".repeat(1100);
    let r = rig
        .ask(&request(
            "long-1",
            "sim-0",
            "Setvar",
            &[("Variable", "V"), ("Value", &long)],
        ))
        .await;
    assert_eq!(r.reject_code, "invalid_header");
    assert!(r.reason.contains("longer than 1022"), "{}", r.reason);
    // Logoff can never be allowed.
    let r = rig.ask(&request("bye", "sim-0", "Logoff", &[])).await;
    assert_eq!(r.reject_code, "not_allowed");
    // The consumer is still there and the session untouched.
    let r = rig.ask(&request("ping-after", "sim-0", "Ping", &[])).await;
    assert_eq!(status(&r), ActionStatus::Success);
    let s = rig.stats.snapshot();
    assert_eq!(s.rejected(RejectCode::Malformed), 1);
    assert_eq!(s.rejected(RejectCode::MissingField), 1);
    assert_eq!(s.rejected(RejectCode::InvalidHeader), 5);
    assert_eq!(
        s.count("-", "rejected"),
        1,
        "the undecodable one has no server"
    );
    assert_eq!(sim.stats()[0].logins, 1);
    rig.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn requests_run_only_on_their_servers_connection() {
    let sim = Sim::start(sim_cfg(3)).await.unwrap();
    let mut rc = RigConfig::sim(&sim, &[]);
    // This replica owns sim-0, sim-1 and any unknown id, but not sim-2.
    rc.owns = Arc::new(|s: &str| s != "sim-2");
    rc.extra_subjects = vec![subject_for(SUBJECT, "ghost")];
    let rig = Rig::start(rc).await;
    for server in ["sim-0", "sim-1"] {
        let r = rig
            .ask(&request(&format!("p-{server}"), server, "Ping", &[]))
            .await;
        assert_eq!(status(&r), ActionStatus::Success);
        assert!(
            r.action_id.contains(&format!("-{server}-")),
            "{}",
            r.action_id
        );
        assert_eq!(
            get(r.response.as_ref().unwrap(), "Ping"),
            Some(&b"Pong"[..])
        );
    }
    let r = rig.ask(&request("p-2", "sim-2", "Ping", &[])).await;
    assert_eq!(
        (status(&r), r.reject_code.as_str()),
        (ActionStatus::Rejected, "not_owned")
    );
    let r = rig.ask(&request("p-ghost", "ghost", "Ping", &[])).await;
    assert_eq!(
        (status(&r), r.reject_code.as_str()),
        (ActionStatus::Rejected, "unknown_server")
    );
    // A request published on sim-0's subject naming sim-1 in its body is refused: a client
    // allowed to publish on sim-0's subject only must not reach sim-1 (issue 14).
    let req = request("p-cross", "sim-1", "Ping", &[]);
    let r = rig.ask_raw("sim-0", req.encode_to_vec()).await;
    assert_eq!(
        (status(&r), r.reject_code.as_str(), r.retriable),
        (ActionStatus::Rejected, "server_mismatch", false),
        "{r:?}"
    );
    assert!(r.action_id.is_empty(), "nothing was sent");
    let s = rig.stats.snapshot();
    assert_eq!(s.rejected(RejectCode::ServerMismatch), 1);
    assert_eq!(s.count("sim-2", "rejected"), 1);
    assert_eq!(s.count("-", "rejected"), 1, "an unknown id is not a label");
    rig.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn rate_limit_per_server_and_per_action_timeout() {
    let sim = Sim::start(sim_cfg(2)).await.unwrap();
    let mut rc = RigConfig::sim(&sim, &[]);
    rc.control.rate = 0.001;
    rc.control.burst = 2;
    let rig = Rig::start(rc).await;
    let mut codes = Vec::new();
    for i in 0..3 {
        let r = rig
            .ask(&request(&format!("rl-{i}"), "sim-0", "Ping", &[]))
            .await;
        codes.push((status(&r), r.reject_code.clone(), r.retriable));
    }
    assert_eq!(
        codes,
        [
            (ActionStatus::Success, String::new(), false),
            (ActionStatus::Success, String::new(), false),
            (ActionStatus::Rejected, "rate_limited".to_owned(), true),
        ]
    );
    // Another server has its own bucket.
    let r = rig.ask(&request("rl-other", "sim-1", "Ping", &[])).await;
    assert_eq!(status(&r), ActionStatus::Success);
    // A silent server: the action is sent, no reply comes, the per-action timeout answers.
    sim.set_unresponsive(1, true);
    let mut req = request("slow", "sim-1", "Ping", &[]);
    req.timeout_ms = 200;
    let r = rig.ask(&req).await;
    assert_eq!(status(&r), ActionStatus::Timeout, "{r:?}");
    assert!(r.timings.unwrap().sent_ns > 0);
    rig.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_connection_dropped_mid_action_is_outcome_unknown_and_never_resent() {
    let mut fake = support::Fake::start(support::Behaviour::default()).await;
    let rc = RigConfig {
        servers: vec![(fake.addr, vec!["read-only", "Swallow"])],
        owns: Arc::new(|_: &str| true),
        control: ControlConfig::default(),
        extra_subjects: Vec::new(),
        secret: "s3cret",
        username: "amibus",
    };
    let rig_task = tokio::spawn(Rig::start(rc));
    let mut conn = fake.next_conn().await;
    conn.until_action("Login").await;
    let rig = rig_task.await.unwrap();
    // The fake never answers `Swallow`: the action is on the wire when the session drops.
    let req = request("drop-1", "sim-0", "Swallow", &[("Channel", "Local/1@ctx")]);
    let client = rig.client.clone();
    let payload = req.encode_to_vec();
    let ask = tokio::spawn(async move {
        client
            .request(subject_for(SUBJECT, "sim-0"), payload.into())
            .await
            .map(|m| ActionResult::decode(m.payload).unwrap())
    });
    let sent = conn.until_action("Swallow").await;
    assert_eq!(sent.last().unwrap().get("Channel"), Some("Local/1@ctx"));
    conn.close();
    let r = tokio::time::timeout(T, ask)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(status(&r), ActionStatus::OutcomeUnknown, "{r:?}");
    assert!(!r.retriable);
    // The connection comes back; the Originate is not sent again, and a redelivery of the
    // same request gets the same answer without running.
    let mut conn2 = fake.next_conn().await;
    conn2.until_action("Login").await;
    let again = rig.ask(&req).await;
    assert!(again.replayed && status(&again) == ActionStatus::OutcomeUnknown);
    let list = tokio::spawn({
        let client = rig.client.clone();
        let payload = request("after", "sim-0", "CoreShowChannels", &[]).encode_to_vec();
        async move {
            client
                .request(subject_for(SUBJECT, "sim-0"), payload.into())
                .await
        }
    });
    let next = conn2.until_action("CoreShowChannels").await;
    assert!(
        next.iter()
            .all(|a| !a.action().eq_ignore_ascii_case("Swallow")),
        "resent: {next:?}"
    );
    let after = tokio::time::timeout(T, list)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let after = ActionResult::decode(after.payload).unwrap();
    assert_eq!(status(&after), ActionStatus::Success);
    assert_eq!(after.events.len(), 4, "three items and the completion");
    assert_eq!(rig.stats.snapshot().count("sim-0", "outcome_unknown"), 1);
    rig.shutdown().await;
    fake.stop();
}

#[tokio::test]
async fn ten_thousand_requests_across_fifty_servers_each_answered_once() {
    const SERVERS: usize = 50;
    const N: usize = 10_000;
    let sim = Sim::start(SimConfig {
        servers: SERVERS,
        count: Some(0),
        ..sim_cfg(SERVERS)
    })
    .await
    .unwrap();
    let rig = Rig::start(RigConfig::sim(&sim, &[])).await;
    let inbox = "t.inbox.bulk";
    let mut results = rig.client.subscribe(inbox).await.unwrap();
    rig.client.flush().await.unwrap();
    let publisher = rig.client.clone();
    let send = tokio::spawn(async move {
        for i in 0..N {
            let server = format!("sim-{}", i % SERVERS);
            let req = request(&format!("bulk-{i}"), &server, "Ping", &[]);
            publisher
                .publish_with_reply(
                    subject_for(SUBJECT, &server),
                    inbox,
                    req.encode_to_vec().into(),
                )
                .await
                .unwrap();
        }
        publisher.flush().await.unwrap();
    });
    let mut seen = HashSet::new();
    let mut per_server: HashMap<String, usize> = HashMap::new();
    while seen.len() < N {
        let m = tokio::time::timeout(T, results.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "stalled at {} results: {:?}",
                    seen.len(),
                    rig.stats.snapshot()
                )
            })
            .unwrap();
        let r = ActionResult::decode(m.payload).unwrap();
        assert_eq!(status(&r), ActionStatus::Success, "{r:?}");
        assert!(r.action_id.contains(&format!("-{}-", r.server)));
        assert!(
            seen.insert(r.request_id.clone()),
            "{} answered twice",
            r.request_id
        );
        *per_server.entry(r.server).or_default() += 1;
    }
    send.await.unwrap();
    // Nothing more arrives.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), results.next())
            .await
            .is_err()
    );
    assert_eq!(per_server.len(), SERVERS);
    assert!(per_server.values().all(|n| *n == N / SERVERS));
    assert_eq!(rig.stats.snapshot().total("success"), N as u64);
    rig.shutdown().await;
    sim.shutdown().await;
}
