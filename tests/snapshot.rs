//! State snapshots (issue 17): after every login and after a gap, the server's state is asked
//! with list actions and published between `snapshot_begin` and `snapshot_end`.
//!
//! Against the simulator (whose lists answer from the calls it has up, consistent with the
//! events it sent), against the real Asterisk 22 recording's list responses replayed by a
//! scripted server, and end to end through `amibus run` and a real nats-server. No assertion
//! depends on timing: waits are on observable records and only guard against hangs.

#[path = "support/child.rs"]
mod child;
#[path = "support/ledger.rs"]
mod ledger;
#[path = "support/live_state.rs"]
mod live_state;
#[path = "support/nats.rs"]
mod nats_support;
mod support;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use amibus::ami::connection::{Connection, DownstreamGaps, Options};
use amibus::ami::server::ServerConfig;
use amibus::ami::snapshot::{End, Trigger};
use amibus::ami::{Parsed, Parser, Record, Stamped, handoff};
use amibus::config::{Config, ProcessEnv};
use amibus::model::pb::{self, envelope::Detail};
use amibus::secret::Secret;
use amibus::sim::{Sim, SimConfig, SimHandle};
use ledger::{StreamReader, View, broker, config_toml, sim_config, wait_sent, within};
use live_state::LiveState;
use nats_support::NatsServer;
use prost::Message as _;

const T: Duration = Duration::from_secs(30);

fn sim_cfg(f: impl FnOnce(&mut SimConfig)) -> SimConfig {
    let mut c = SimConfig {
        auth_fail_delay: Duration::from_millis(10),
        epoch: Some(1_795_671_272),
        write_timeout: Duration::from_secs(2),
        ..SimConfig::default()
    };
    f(&mut c);
    c
}

fn server(port: u16, user: &str, secret: &str) -> ServerConfig {
    let mut c = ServerConfig::new("pbx-1", "127.0.0.1", port, user, Secret::new(secret));
    c.backoff_min = Duration::from_millis(10);
    c.backoff_max = Duration::from_millis(50);
    c.keepalive_interval = Duration::from_secs(60);
    c
}

fn sim_server(sim: &SimHandle) -> ServerConfig {
    server(sim.addrs()[0].port(), "admin", "amp111")
}

/// The next record, or a panic naming what was awaited.
async fn next(rx: &mut handoff::Receiver, what: &str) -> Stamped {
    tokio::time::timeout(T, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {T:?}"))
        .expect("downstream open")
}

/// Records up to and including the first `SnapshotEnd` matching `pred`.
async fn until_end(rx: &mut handoff::Receiver, pred: impl Fn(&End) -> bool) -> (Vec<Stamped>, End) {
    let mut got = Vec::new();
    loop {
        let r = next(rx, "a snapshot_end").await;
        if let Record::SnapshotEnd(e) = &r.record
            && pred(e)
        {
            let e = (**e).clone();
            got.push(r);
            return (got, e);
        }
        got.push(r);
    }
}

fn event_name(r: &Stamped) -> Option<String> {
    let f = match &r.record {
        Record::Frame(f) => f,
        Record::SnapshotItem { frame, .. } => &**frame,
        _ => return None,
    };
    f.frame()
        .get("Event")
        .map(|e| String::from_utf8_lossy(e).into_owned())
}

/// The records of the snapshot `end` closes: its begin, items and end, in stream order, and
/// everything else read between begin and end.
fn split_snapshot<'a>(got: &'a [Stamped], end: &End) -> (Vec<&'a Stamped>, Vec<&'a Stamped>) {
    let begin = got
        .iter()
        .position(|r| matches!(&r.record, Record::SnapshotBegin(b) if b.id == end.id))
        .expect("the snapshot's begin");
    let mut items = Vec::new();
    let mut live = Vec::new();
    for r in &got[begin + 1..got.len() - 1] {
        match &r.record {
            Record::SnapshotItem { snapshot_id, .. } => {
                assert_eq!(snapshot_id, &end.id, "an item of another snapshot");
                items.push(r);
            }
            _ => live.push(r),
        }
    }
    (items, live)
}

/// Thousands of channels up: the snapshot after a reconnect lists them all, and the reader
/// keeps publishing live events while it runs (they arrive between begin and end, in wire
/// order), with nothing dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_channels_snapshot_while_live_events_keep_flowing() {
    let sim = Sim::start(sim_cfg(|c| {
        c.concurrent_calls = 3000;
        c.rate = 5000;
    }))
    .await
    .unwrap();
    let mut c = sim_server(&sim);
    c.snapshot.lists = vec!["CoreShowChannels".into(), "BridgeList".into()];
    let (conn, mut rx, shutdown) = support::start(c, 1 << 20);
    // Let every call start (each call's first event creates its first channel).
    let mut first_epoch = Vec::new();
    while sim.stats()[0].events < 30_000 {
        first_epoch.push(next(&mut rx, "events of the first session").await);
    }
    sim.disconnect_all(0);
    let (got, end) = until_end(&mut rx, |e| {
        e.trigger == Trigger::Login && {
            // The reconnect's snapshot, not the first login's.
            !first_epoch
                .iter()
                .any(|r| matches!(&r.record, Record::SnapshotBegin(b) if b.id == e.id))
        }
    })
    .await;
    assert!(end.complete, "{end:?}");
    let (items, live) = split_snapshot(&got, &end);
    let channels = end.lists[0].items;
    assert!(channels >= 2000, "thousands of channels: {end:?}");
    assert_eq!(
        items.len() as u64,
        end.lists.iter().map(|l| l.items).sum::<u64>()
    );
    let live_events = live.iter().filter(|r| event_name(r).is_some()).count();
    assert!(
        live_events > 0,
        "live events arrive while the snapshot runs: {} items, {live_events} live",
        items.len()
    );
    // One epoch, every seq in order, nothing dropped.
    let epoch = got.last().unwrap().stamp.epoch;
    let mine: Vec<&Stamped> = got.iter().filter(|r| r.stamp.epoch == epoch).collect();
    for w in mine.windows(2) {
        assert_eq!(w[1].stamp.seq, w[0].stamp.seq + 1);
    }
    let st = conn.stats.snapshot();
    assert_eq!(st.dropped_records, 0);
    assert!(st.snapshot.login >= 2 && st.snapshot.items >= channels);
    support::stop(conn, shutdown).await;
    sim.shutdown().await;
}

/// A consumer that does not read makes the hand-off queue overflow: once the gap record is
/// published, a snapshot with trigger `gap` follows it and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_triggers_a_snapshot_after_its_gap_record() {
    const N: u64 = 20_000;
    let sim = Sim::start(sim_cfg(|c| c.count = Some(N))).await.unwrap();
    let mut c = sim_server(&sim);
    c.snapshot.gap_interval = Duration::from_millis(1);
    let (conn, mut rx, shutdown) = support::start(c, 16);
    tokio::time::timeout(T, sim.wait_generated()).await.unwrap();
    while conn.stats.snapshot().frames < N {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        conn.stats.snapshot().dropped_records > 0,
        "the queue overflowed"
    );
    // The overflow may drop a snapshot's begin too (a loss like any, named by a gap record,
    // which starts another snapshot): the first gap snapshot whose begin arrived is checked.
    let mut got = Vec::new();
    let (begin, end) = loop {
        let (more, end) = until_end(&mut rx, |e| e.trigger == Trigger::Gap).await;
        got.extend(more);
        if let Some(begin) = got
            .iter()
            .position(|r| matches!(&r.record, Record::SnapshotBegin(b) if b.id == end.id))
        {
            break (begin, end);
        }
    };
    let gap = got
        .iter()
        .position(|r| matches!(r.record, Record::Gap { .. }))
        .expect("a gap record");
    assert!(gap < begin, "the snapshot follows the gap record");
    assert!(end.complete, "{end:?}");
    assert_eq!(
        end.lists
            .iter()
            .map(|l| l.action.as_str())
            .collect::<Vec<_>>(),
        [
            "CoreShowChannels",
            "QueueStatus",
            "DeviceStateList",
            "BridgeList"
        ]
    );
    assert!(conn.stats.snapshot().snapshot.gap >= 1);
    support::stop(conn, shutdown).await;
    sim.shutdown().await;
}

/// A gap record made downstream (the pipeline's, for what the spool dropped) is counted for
/// the server in `Options::downstream_gaps`; its connection then takes a snapshot with
/// trigger `gap`, as after its own gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_made_downstream_triggers_a_snapshot_too() {
    let sim = Sim::start(sim_cfg(|c| c.rate = 200)).await.unwrap();
    let mut c = sim_server(&sim);
    c.snapshot.gap_interval = Duration::from_millis(1);
    let gaps = Arc::new(DownstreamGaps::default());
    let (tx, mut rx) = handoff::channel(100_000);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let conn = Connection::spawn(
        Arc::new(c),
        tx,
        shutdown.clone(),
        Options {
            downstream_gaps: gaps.clone(),
            ..Options::default()
        },
    );
    let (_, login) = until_end(&mut rx, |e| e.trigger == Trigger::Login).await;
    assert!(login.complete, "{login:?}");
    // Events flow; no further snapshot while nothing is lost.
    for _ in 0..20 {
        let r = next(&mut rx, "an event").await;
        assert!(
            !matches!(r.record, Record::SnapshotBegin(_)),
            "a snapshot without a gap"
        );
    }
    gaps.note("another-server");
    gaps.note("pbx-1");
    let (got, end) = until_end(&mut rx, |e| e.trigger == Trigger::Gap).await;
    assert!(end.complete, "{end:?}");
    assert!(
        got.iter()
            .any(|r| matches!(&r.record, Record::SnapshotBegin(b) if b.id == end.id)),
        "its begin"
    );
    assert_eq!(conn.stats.snapshot().snapshot.gap, 1);
    support::stop(conn, shutdown).await;
    sim.shutdown().await;
}

/// The frames of the first answer of `action` in the real Asterisk 22 recording that has
/// items: the response, the items and the completion event, each as its raw bytes.
fn recorded_list(action: &str) -> Vec<Vec<u8>> {
    let sent = std::fs::read("tests/fixtures/asterisk22-actions.sent").expect("fixture");
    let got = std::fs::read("tests/fixtures/asterisk22-actions.ami").expect("fixture");
    let frames = |bytes: &[u8]| -> Vec<Vec<u8>> {
        let mut p = Parser::default();
        let mut rest = bytes;
        let mut out = Vec::new();
        loop {
            match p.parse(rest) {
                Parsed::Frame { consumed, .. } => {
                    out.push(rest[..consumed].to_vec());
                    rest = &rest[consumed..];
                }
                // A stray blank line between frames (after some responses).
                Parsed::Skip { consumed, .. } => rest = &rest[consumed..],
                Parsed::Partial => return out,
            }
        }
    };
    let field = |f: &[u8], key: &str| -> Option<String> {
        let text = String::from_utf8_lossy(f);
        text.split("\r\n").find_map(|l| {
            l.strip_prefix(key)
                .and_then(|v| v.strip_prefix(": "))
                .map(str::to_owned)
        })
    };
    let ids: BTreeSet<String> = frames(&sent)
        .iter()
        .filter(|f| field(f, "Action").as_deref() == Some(action))
        .filter_map(|f| field(f, "ActionID"))
        .collect();
    let all = frames(&got);
    for id in &ids {
        let mine: Vec<Vec<u8>> = all
            .iter()
            .filter(|f| field(f, "ActionID").as_deref() == Some(id))
            .cloned()
            .collect();
        let listed = mine.len() > 2
            && field(&mine[0], "EventList").as_deref() == Some("start")
            && field(mine.last().unwrap(), "EventList").as_deref() == Some("Complete");
        if listed {
            return mine
                .into_iter()
                .map(|f| {
                    let text = String::from_utf8_lossy(&f).into_owned();
                    let text = text.trim_start_matches("\r\n");
                    text.replace(&format!("ActionID: {id}\r\n"), "ActionID: {ID}\r\n")
                        .into_bytes()
                })
                .collect();
        }
    }
    panic!("no {action} list with items in the recording");
}

/// The real Asterisk 22 recording's list responses, replayed by a scripted server to the
/// ActionIDs amibus sent: every item is published as an item of the snapshot (the recorded
/// frame, byte for byte, as an event envelope carrying the snapshot id), the counts match the
/// recording's `ListItems`, and an action the manager user may not run is reported, not
/// retried, while the session stays up.
#[tokio::test]
async fn the_real_asterisk_list_responses_become_the_snapshots_items() {
    let lists = [
        "CoreShowChannels",
        "QueueStatus",
        "DeviceStateList",
        "BridgeList",
    ];
    let mut leave: Vec<String> = lists.iter().map(|l| l.to_lowercase()).collect();
    leave.push("extensionstatelist".into());
    let mut fake = support::Fake::start(support::Behaviour {
        leave_to_test: leave,
        ..Default::default()
    })
    .await;
    let mut c = server(fake.addr.port(), "amibus", "s3cret");
    c.snapshot.lists = lists.iter().map(|s| (*s).to_owned()).collect();
    c.snapshot.lists.push("ExtensionStateList".into());
    let (conn, mut rx, shutdown) = support::start(c, 1 << 16);
    let mut server = fake.next_conn().await;
    let asked = server.until_action("ExtensionStateList").await;
    let id_of = |name: &str| {
        asked
            .iter()
            .find(|a| a.action() == name)
            .unwrap_or_else(|| panic!("{name} not asked"))
            .id()
            .to_owned()
    };
    let mut expected: Vec<Vec<u8>> = Vec::new();
    for l in lists {
        let id = id_of(l);
        let frames = recorded_list(l);
        let mut bytes = Vec::new();
        for f in &frames {
            let f = String::from_utf8_lossy(f).replace("{ID}", &id).into_bytes();
            bytes.extend_from_slice(&f);
        }
        expected.extend(
            frames[1..frames.len() - 1]
                .iter()
                .map(|f| String::from_utf8_lossy(f).replace("{ID}", &id).into_bytes()),
        );
        server.send(bytes);
    }
    server.send(format!(
        "Response: Error\r\nActionID: {}\r\nMessage: Permission denied\r\n\r\n",
        id_of("ExtensionStateList")
    ));
    let (got, end) = until_end(&mut rx, |_| true).await;
    let (items, live) = split_snapshot(&got, &end);
    assert!(live.is_empty(), "{live:?}");
    assert_eq!(items.len(), expected.len());
    for (r, want) in items.iter().zip(&expected) {
        let Record::SnapshotItem { frame, .. } = &r.record else {
            unreachable!()
        };
        assert_eq!(&frame.bytes()[..], &want[..], "the recorded frame, as read");
        let mut out = Vec::new();
        amibus::model::encode_record(r, &mut out);
        let env = pb::Envelope::decode(&out[..]).expect("decodes");
        assert_eq!(env.kind(), pb::Kind::Event);
        assert_eq!(env.snapshot_id, &*end.id);
        assert_eq!(Some(env.name.clone()), event_name(r));
        assert!(!env.action_id.is_empty());
    }
    // Items per list as the recording's completion event counts them.
    for (i, l) in lists.iter().enumerate() {
        let frames = recorded_list(l);
        let complete = String::from_utf8_lossy(frames.last().unwrap()).into_owned();
        let n: u64 = complete
            .split("\r\n")
            .find_map(|h| h.strip_prefix("ListItems: "))
            .and_then(|v| v.parse().ok())
            .expect("ListItems");
        assert_eq!(end.lists[i].action, *l);
        assert_eq!(
            (end.lists[i].items, end.lists[i].complete),
            (n, true),
            "{l}"
        );
    }
    let names: BTreeSet<String> = items.iter().filter_map(|r| event_name(r)).collect();
    for n in [
        "CoreShowChannel",
        "QueueParams",
        "QueueMember",
        "DeviceStateChange",
        "BridgeListItem",
    ] {
        assert!(names.contains(n), "{n} in {names:?}");
    }
    assert!(!end.complete);
    assert_eq!(end.reason, "refused: ExtensionStateList");
    assert_eq!(end.lists[4].error, "Permission denied");
    // The session is up and the refused action is not sent again.
    let reply = conn
        .handle
        .send(amibus::ami::Action::new("Ping"), T)
        .await
        .expect("the session is up");
    assert!(reply.is_success());
    let later: Vec<String> = std::iter::from_fn(|| server.actions.try_recv().ok())
        .map(|a| a.action().to_owned())
        .collect();
    assert!(
        !later.iter().any(|a| a == "ExtensionStateList"),
        "{later:?}"
    );
    support::stop(conn, shutdown).await;
    fake.stop();
}

/// A connection that drops while the lists are being answered ends the snapshot incomplete,
/// in the same epoch, right before its `connection_down`.
#[tokio::test]
async fn a_connection_dropped_during_a_snapshot_ends_it_incomplete() {
    let mut fake = support::Fake::start(support::Behaviour {
        leave_to_test: vec!["coreshowchannels".into()],
        ..Default::default()
    })
    .await;
    let mut c = server(fake.addr.port(), "amibus", "s3cret");
    c.snapshot.lists = vec!["CoreShowChannels".into()];
    let (conn, mut rx, shutdown) = support::start(c, 1 << 10);
    let mut server = fake.next_conn().await;
    let a = server.until_action("CoreShowChannels").await;
    let id = a.last().unwrap().id().to_owned();
    server.send(format!(
        "Response: Success\r\nActionID: {id}\r\nEventList: start\r\nMessage: Channels will follow\r\n\r\n\
         Event: CoreShowChannel\r\nActionID: {id}\r\nChannel: PJSIP/1-00000001\r\n\r\n"
    ));
    server.close();
    let (got, end) = until_end(&mut rx, |_| true).await;
    assert!(!end.complete);
    assert_eq!(end.reason, "connection ended: eof");
    assert_eq!((end.lists[0].items, end.lists[0].complete), (1, false));
    let down = next(&mut rx, "connection_down").await;
    assert!(matches!(down.record, Record::ConnectionDown { .. }));
    let end_rec = got.last().unwrap();
    assert_eq!(end_rec.stamp.epoch, down.stamp.epoch);
    assert_eq!(end_rec.stamp.seq + 1, down.stamp.seq);
    assert_eq!(conn.stats.snapshot().snapshot.incomplete, 1);
    support::stop(conn, shutdown).await;
    fake.stop();
}

/// `amibus run` is restarted while calls are up (the simulator has stopped generating, its
/// calls in progress stay up): the new run's login snapshot, read back from JetStream, lists
/// exactly the channels, bridges and device states a consumer of the first run's stream holds
/// (each rebuilt the way the README says).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_calls_gives_a_snapshot_of_the_calls_up_then() {
    const NAME: &str = "SNAP1";
    const EVENTS: u64 = 3000;
    let nats = NatsServer::start();
    let sim = Sim::start(sim_config(NAME, 1, 0, Some(EVENTS)))
        .await
        .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = config_toml(&sim, dir.path(), &nats, NAME, "");
    let config = || Config::parse(&toml, &ProcessEnv).expect("config");
    let mut reader = StreamReader::new(&nats, NAME).await;
    let run = |mut cfg: Config| {
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move { amibus::app::run::run_until(&mut cfg, token).await });
        (stop, task)
    };
    let (stop, task) = run(config());
    reader
        .wait_for("every simulated event", |got| {
            View::of(got).events.values().sum::<u64>() == EVENTS
        })
        .await;
    stop.cancel();
    within("the first run stops", task).await.unwrap().unwrap();
    let first = reader.got.len();
    let (stop, task) = run(config());
    reader
        .wait_for("the second run's snapshot_end", |got| {
            got[first..]
                .iter()
                .any(|g| g.env.kind() == pb::Kind::SnapshotEnd)
        })
        .await;
    stop.cancel();
    within("the second run stops", task).await.unwrap().unwrap();
    sim.shutdown().await;

    let mut before = LiveState::default();
    for g in &reader.got[..first] {
        before.apply(&g.env, true);
    }
    assert!(!before.channels.is_empty(), "calls were up at the restart");
    let mut after = LiveState::default();
    let mut seqs: HashMap<&str, Vec<u64>> = HashMap::new();
    let mut end = None;
    for g in &reader.got[first..] {
        let e = &g.env;
        if !e.snapshot_id.is_empty() {
            seqs.entry(e.snapshot_id.as_str()).or_default().push(e.seq);
            after.apply(e, true);
        }
        if let Some(Detail::SnapshotEnd(d)) = &e.detail {
            end = Some(d.clone());
            break;
        }
    }
    let end = end.expect("snapshot_end");
    assert!(end.complete, "{end:?}");
    assert_eq!(end.trigger(), pb::SnapshotTrigger::Login);
    // Begin, items, end: one snapshot, in seq order.
    let ids: Vec<&&str> = seqs.keys().collect();
    assert_eq!(ids, [&end.snapshot_id.as_str()]);
    let s = &seqs[end.snapshot_id.as_str()];
    assert!(s.windows(2).all(|w| w[0] < w[1]), "{s:?}");
    assert_eq!(after.channels, before.channels);
    assert_eq!(after.bridges, before.bridges);
    assert_eq!(after.devices, before.devices);
    let items: u64 = end.lists.iter().map(|l| l.items).sum();
    assert_eq!(s.len() as u64, items + 2);
}

/// End to end: the broker goes away, the spool's cap drops the oldest records, and the
/// pipeline's `spool full` gap records name them. Each is followed by a snapshot of the server
/// (trigger `gap`), so a consumer rebuilding state from the bus recovers after a loss the spool
/// made as after one the connection made: once the broker is back, the last such gap record is
/// followed by a complete snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_the_spool_made_is_followed_by_a_snapshot() {
    const NAME: &str = "SNAP2";
    let mut nats = NatsServer::start();
    let sim = Sim::start(sim_config(NAME, 1, 2000, None))
        .await
        .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = config_toml(
        &sim,
        dir.path(),
        &nats,
        NAME,
        "max_bytes = \"256KiB\"\nsegment_bytes = \"32KiB\"\nwhen_full = \"drop_oldest\"",
    )
    .replace(
        "backoff_max = \"200ms\"\n",
        "backoff_max = \"200ms\"\nsnapshot_gap_interval = \"200ms\"\n",
    );
    let mut cfg = Config::parse(&toml, &ProcessEnv).expect("config");
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { amibus::app::run::run_until(&mut cfg, token).await });
    let mut reader = StreamReader::new(&nats, NAME).await;
    reader
        .wait_for("events and the login snapshot", |got| {
            got.iter().any(|g| g.env.kind() == pb::Kind::SnapshotEnd)
                && View::of(got).events.values().sum::<u64>() > 500
        })
        .await;
    // The broker goes away while the simulator sends ~20 times the spool's cap.
    broker(|| nats.stop());
    wait_sent(&sim, 8000, "the simulator outruns the spool").await;
    broker(|| nats.restart());
    let spool_gap = |g: &ledger::Got| {
        matches!(&g.env.detail, Some(Detail::Gap(d))
            if d.reason == "spool full" || d.reason == ledger::IN_DOUBT)
    };
    // After the last spool gap: a snapshot (begin and end) with trigger `gap`.
    let followed = |got: &[ledger::Got]| -> Option<pb::SnapshotEnd> {
        let last_gap = got.iter().rposition(spool_gap)?;
        let after = &got[last_gap + 1..];
        after.iter().find_map(|g| match &g.env.detail {
            Some(Detail::SnapshotEnd(e))
                if e.trigger() == pb::SnapshotTrigger::Gap
                    && after.iter().any(|b| {
                        b.env.kind() == pb::Kind::SnapshotBegin
                            && b.env.snapshot_id == e.snapshot_id
                    }) =>
            {
                Some(e.clone())
            }
            _ => None,
        })
    };
    reader
        .wait_for("a snapshot after the last spool gap", |got| {
            followed(got).is_some()
        })
        .await;
    stop.cancel();
    within("amibus stops", task).await.unwrap().unwrap();
    sim.shutdown().await;
    let view = View::of(&reader.got);
    assert!(view.gap_records > 0, "{}", view.summary());
    // Records in flight when the broker went away may be gapped in doubt.
    let spools = BTreeSet::from(["spool full".to_owned(), ledger::IN_DOUBT.to_owned()]);
    assert!(
        view.gap_reasons.contains("spool full") && view.gap_reasons.is_subset(&spools),
        "every gap is the spool's, none the connection's: the snapshot answers the spool's: {:?}",
        view.gap_reasons
    );
    let end = followed(&reader.got).expect("the snapshot");
    assert!(end.complete, "{end:?}");
}
