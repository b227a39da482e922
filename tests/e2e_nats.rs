//! The main job end to end against a real nats-server (see `support/nats.rs`): the AMI simulator
//! → `amibus run` → JetStream, checked by what a consumer reads back from the stream.
//!
//! Every test runs its own nats-server, simulator and spool. What is checked is always the
//! consumer's view: for each (server, epoch) the seqs that arrived, the gap records that name
//! what was lost, duplicates (counted by (server, epoch, seq)) and order. Sleeps and timeouts only
//! pace the test or keep a broken one from hanging; no assertion is about timing.
//!
//! The simulator's write timeout is raised from Asterisk's 100 ms to 2 s: the tests share two
//! cores, and a reader starved by the scheduler for 100 ms is not what they look for. A reader
//! that waits on the bus stalls for the whole outage (30 s), far past it.

#[path = "support/child.rs"]
mod child;
#[path = "support/ledger.rs"]
mod ledger;
#[path = "support/nats.rs"]
mod nats_support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use amibus::app::run::{Report, run_until};
use amibus::config::{Config, ProcessEnv};
use amibus::sim::{Sim, SimConfig, SimHandle};
use ledger::*;
use nats_support::{NatsServer, ServerOptions};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

fn config(toml: &str) -> Config {
    Config::parse(toml, &ProcessEnv).unwrap_or_else(|e| panic!("config: {e}\n{toml}"))
}

/// `run_until` on its own task; cancel `stop` and await the handle for the report.
fn spawn_run(
    mut cfg: Config,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<Report>>,
) {
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { run_until(&mut cfg, token).await });
    (stop, task)
}

async fn finish(
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<Report>>,
) -> Report {
    stop.cancel();
    within("amibus stops", task)
        .await
        .expect("run task")
        .expect("run_until")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_arrives_whole_once_and_in_order() {
    let nats = NatsServer::start();
    let sim = Sim::start(sim_config("E2E1", 3, 0, Some(3000)))
        .await
        .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let (stop, run) = spawn_run(config(&config_toml(&sim, dir.path(), &nats, "E2E1", "")));
    within("the sim generates", sim.wait_generated()).await;
    let sent = sim_events(&sim);
    let mut reader = StreamReader::new(&nats, "E2E1").await;
    reader
        .wait_for("every simulated event", |got| View::of(got).events == sent)
        .await;
    let report = finish(stop, run).await;
    let sim_stats = sim.shutdown().await;
    assert!(reader.catch_up().await);
    let view = View::of(&reader.got);
    let ctx = format!("{}\nreport: {report}", view.summary());

    assert_eq!(view.events, sent, "{ctx}");
    assert_eq!(view.duplicates, 0, "{ctx}");
    assert!(view.gaps.is_empty(), "{ctx}");
    assert_eq!(
        (report.failed_permanent, report.left_in_spool),
        (0, 0),
        "{ctx}"
    );
    assert_eq!(report.delivered, report.pipeline.stored, "{ctx}");
    assert_eq!(reader.got.len() as u64, report.pipeline.stored, "{ctx}");
    for s in &sim_stats {
        let id = server_id(s.server);
        assert_eq!(s.logins, 1, "{id}: {s:?}");
        assert_eq!(report.connections[&id].reconnects, 0, "{id}");
        // Every broadcast event the pipeline saw is one the simulator sent (the per-session
        // FullyBooted is not counted on either side).
        assert_eq!(report.events_by_server[&id], s.events, "{id}");
        let epochs = view.epochs(&id);
        assert_eq!(epochs.len(), 1, "{id}: one connection, one epoch: {ctx}");
        let key = (id.clone(), epochs[0]);
        // seqs are exactly 1..=N: ConnectionUp, FullyBooted, the events, the login
        // snapshot (begin, items, end), ConnectionDown.
        let n = view.cover(&key).unwrap_or_else(|e| panic!("{e}\n{ctx}"));
        assert!(view.snapshot_records(&key) >= 2, "{ctx}");
        assert_eq!(n, s.events + 3 + view.snapshot_records(&key), "{ctx}");
        assert_eq!(view.down.get(&key), Some(&n), "{ctx}");
        // No reconnect of the sink either: each connection's records are stored in seq order.
        let seqs = &view.seqs[&key];
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{id}: stored out of seq order"
        );
    }
    // Per call, events arrive in seq order (the property consumers rely on).
    assert!(view.calls.len() > 100, "{} calls", view.calls.len());
    for ((server, linkedid), seqs) in &view.calls {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{server} call {linkedid}: {seqs:?}"
        );
    }
    // Stream order is the consumer's order: stream sequences are 1.. without holes.
    assert!(
        reader
            .got
            .iter()
            .enumerate()
            .all(|(i, g)| g.stream_seq == i as u64 + 1)
    );
}

/// The spool's cap is reached while the broker is down: `when_full` is applied, the loss is
/// published as gap records once the broker is back, and the accounting is exact.
/// Once both simulated servers flow, stop the broker and let far more than a small spool's cap
/// arrive (2,000 events; a record is a few hundred bytes).
async fn fill_the_spool_with_the_broker_down(
    sim: &SimHandle,
    reader: &mut StreamReader,
    nats: &mut NatsServer,
    quiet: bool,
) {
    reader
        .wait_for("events from every server", |got| {
            View::of(got).events.values().filter(|&&n| n > 20).count() == 2
        })
        .await;
    // `quiet`: stop the broker while the simulator pauses and the sink has caught up, so that
    // no record is in flight when it goes; otherwise mid-stream.
    if quiet {
        quiesce(sim, reader, 2).await;
    }
    broker(|| nats.stop());
    if quiet {
        resume(sim, 2);
    }
    let before = total(&sim_events(sim));
    within("the storm fills the spool", async {
        while total(&sim_events(sim)) < before + 2000 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// `quiet`: the broker stops and restarts while the simulator pauses and the sink has caught
/// up. Otherwise both happen mid-stream, and the driver keeps trying the oldest record while
/// the broker is away, so drop_oldest deletes records the sink has sent: in doubt, they must
/// be sent again, not named by a gap.
async fn spool_cap_while_the_broker_is_down(when_full: &str, name: &str, quiet: bool) {
    let mut nats = NatsServer::start();
    // Rate-limited and endless: records keep arriving through the outage and after it.
    let sim = Sim::start(sim_config(name, 2, 300, None))
        .await
        .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let spool =
        format!("max_bytes = \"64KiB\"\nsegment_bytes = \"8KiB\"\nwhen_full = \"{when_full}\"");
    let (stop, run) = spawn_run(config(&config_toml(&sim, dir.path(), &nats, name, &spool)));
    let mut reader = StreamReader::new(&nats, name).await;
    fill_the_spool_with_the_broker_down(&sim, &mut reader, &mut nats, quiet).await;
    if quiet {
        for i in 0..2 {
            sim.set_unresponsive(i, true);
        }
    }
    broker(|| nats.restart());
    reader
        .wait_for("a gap record for every server", |got| {
            View::of(got).gaps.len() == 2
        })
        .await;
    resume(&sim, 2);
    // The simulator ends its sessions after flushing what they had: amibus reads to EOF and
    // appends ConnectionDown, the last record of each epoch.
    let sim_stats = sim.shutdown().await;
    reader
        .wait_for("every ConnectionDown", |got| View::of(got).down.len() == 2)
        .await;
    let report = finish(stop, run).await;
    assert!(reader.catch_up().await);
    let view = View::of(&reader.got);
    let ctx = format!(
        "{}\nreport: {report}\n{:?}",
        view.summary(),
        report.pipeline
    );

    let dropped = report.pipeline.dropped_oldest + report.pipeline.dropped_newest;
    match when_full {
        "drop_oldest" => assert!(
            report.pipeline.dropped_oldest > 0 && report.pipeline.dropped_newest == 0,
            "{ctx}"
        ),
        _ => assert!(
            report.pipeline.dropped_newest > 0 && report.pipeline.dropped_oldest == 0,
            "{ctx}"
        ),
    }
    let mut named = 0;
    for s in &sim_stats {
        let id = server_id(s.server);
        assert_eq!(report.connections[&id].dropped_records, 0, "{id}: {ctx}");
        // Every event the simulator sent was read.
        assert_eq!(report.events_by_server[&id], s.events, "{id}: {ctx}");
        let epochs = view.epochs(&id);
        assert_eq!(epochs.len(), 1, "{id}: {ctx}");
        let key = (id.clone(), epochs[0]);
        let n = view.cover(&key).unwrap_or_else(|e| panic!("{e}\n{ctx}"));
        assert_eq!(view.down.get(&key), Some(&n), "{id}: {ctx}");
        assert_eq!(n, s.events + 3 + view.snapshot_records(&key), "{id}: {ctx}");
        named += view.gaps[&key].iter().map(|(a, b)| b - a + 1).sum::<u64>();
    }
    // Exact: the gaps name every record the spool dropped, each once, and nothing else. Gap
    // records the spool dropped are not AMI records; what they named was named again.
    let p = &report.pipeline;
    assert_eq!(named, dropped - p.dropped_gap_records, "{ctx}");
    assert_eq!(
        view.gap_records,
        p.gap_records - p.dropped_gap_records,
        "{ctx}"
    );
    assert_eq!(view.duplicates, 0, "{ctx}");
    assert_eq!(report.left_in_spool, 0, "{ctx}");
    if !quiet && when_full == "drop_oldest" {
        assert!(report.in_doubt_resent > 0, "nothing was in doubt: {ctx}");
        assert!(
            view.in_doubt_gaps.values().all(Vec::is_empty),
            "in-doubt records are sent again, never gapped: {ctx}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_full_drop_oldest_publishes_exact_gaps() {
    spool_cap_while_the_broker_is_down("drop_oldest", "E2E4A", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_full_drop_newest_publishes_exact_gaps() {
    spool_cap_while_the_broker_is_down("drop_newest", "E2E4B", true).await;
}

/// The broker goes away and comes back mid-stream, records in flight: what drop_oldest deletes
/// after the sink sent it is sent again from memory; only records never sent are gapped, and
/// the ledger is exact (JetStream drops a copy it already had).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_full_drop_oldest_mid_stream_sends_the_records_in_doubt_again() {
    spool_cap_while_the_broker_is_down("drop_oldest", "E2E4C", false).await;
}

/// A record larger than the whole spool (here the cap is set below the frame limit behind
/// validation's back: `check-config` refuses a cap under two frames, so in production only an
/// envelope much larger than its frame gets here) becomes a `parse_error` record with its own
/// (server, epoch, seq); its pipeline and every server on it go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_the_spool_becomes_a_parse_error_and_the_rest_goes_on() {
    let nats = NatsServer::start();
    // Every 40th event of each server carries ~100 KiB of filler: under the frame limit
    // (128 KiB), over the spool's cap (96 KiB).
    let sim = Sim::start(SimConfig {
        oversized_every: Some(40),
        oversized_bytes: 100_000,
        ..sim_config("E2E8", 2, 300, Some(1200))
    })
    .await
    .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = config_toml(
        &sim,
        dir.path(),
        &nats,
        "E2E8",
        "max_bytes = \"256KiB\"\nsegment_bytes = \"16KiB\"",
    )
    .replace(
        "max_frame_bytes = \"16KiB\"",
        "max_frame_bytes = \"128KiB\"",
    );
    let mut cfg = config(&toml);
    cfg.pipeline.workers = 1; // both servers on one pipeline
    cfg.spool.max_bytes = 96 << 10;
    let (stop, run) = spawn_run(cfg);
    within("the sim generates", sim.wait_generated()).await;
    let sent = sim_events(&sim);
    let oversized: u64 = sent.values().map(|n| n / 40).sum();
    let mut reader = StreamReader::new(&nats, "E2E8").await;
    reader
        .wait_for("every event, or its parse_error", |got| {
            let v = View::of(got);
            total(&v.events) + v.parse_errors.len() as u64 >= total(&sent)
        })
        .await;
    let report = finish(stop, run).await;
    let sim_stats = sim.shutdown().await;
    assert!(reader.catch_up().await);
    let view = View::of(&reader.got);
    let ctx = format!(
        "{}\nreport: {report}\n{:?}",
        view.summary(),
        report.pipeline
    );
    assert_eq!(report.pipeline.too_large, oversized, "{ctx}");
    assert_eq!(view.parse_errors.len() as u64, oversized, "{ctx}");
    assert!(
        view.parse_errors.values().all(|r| r == "record_too_large"),
        "{ctx}"
    );
    assert_eq!(total(&view.events) + oversized, total(&sent), "{ctx}");
    assert_eq!(view.duplicates, 0, "{ctx}");
    for s in &sim_stats {
        let id = server_id(s.server);
        let epochs = view.epochs(&id);
        assert_eq!(epochs.len(), 1, "{id}: {ctx}");
        let key = (id.clone(), epochs[0]);
        // Every seq arrived (the too-large ones as parse_error), up to the ConnectionDown.
        let n = view.cover(&key).unwrap_or_else(|e| panic!("{e}\n{ctx}"));
        assert_eq!(n, s.events + 3 + view.snapshot_records(&key), "{id}: {ctx}");
        assert!(!view.gaps.contains_key(&key), "{id}: {ctx}");
        assert_eq!(view.down.get(&key), Some(&n), "{id}: {ctx}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_the_broker_is_reported_and_skipped() {
    let nats = NatsServer::start_with(ServerOptions {
        max_payload: Some(2048),
        ..ServerOptions::default()
    });
    // Every 50th event carries ~4 KiB of filler: above max_payload, far below the parser's limit.
    let sim = Sim::start(SimConfig {
        oversized_every: Some(50),
        oversized_bytes: 4096,
        ..sim_config("E2E5", 2, 0, Some(1000))
    })
    .await
    .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let (stop, run) = spawn_run(config(&config_toml(&sim, dir.path(), &nats, "E2E5", "")));
    within("the sim generates", sim.wait_generated()).await;
    let sent = sim_events(&sim);
    let oversized: u64 = sent.values().map(|n| n / 50).sum();
    let mut reader = StreamReader::new(&nats, "E2E5").await;
    reader
        .wait_for("every event that fits", |got| {
            total(&View::of(got).events) + oversized >= total(&sent)
        })
        .await;
    let report = finish(stop, run).await;
    let sim_stats = sim.shutdown().await;
    assert!(reader.catch_up().await);
    let view = View::of(&reader.got);
    let ctx = format!("{}\nreport: {report}", view.summary());

    assert_eq!(report.failed_permanent, oversized, "{ctx}");
    assert_eq!(report.left_in_spool, 0, "{ctx}");
    assert_eq!(
        report.delivered + report.failed_permanent,
        report.pipeline.stored,
        "{ctx}"
    );
    assert_eq!(total(&view.events) + oversized, total(&sent), "{ctx}");
    assert!(reader.got.iter().all(|g| g.env.encoded_len() < 2048));
    let mut holes = 0;
    for s in &sim_stats {
        let id = server_id(s.server);
        let epochs = view.epochs(&id);
        assert_eq!(epochs.len(), 1, "{id}: {ctx}");
        let key = (id.clone(), epochs[0]);
        let seqs: BTreeSet<u64> = view.seqs[&key].iter().copied().collect();
        let n = s.events + 3 + view.snapshot_records(&key);
        assert_eq!(
            view.down.get(&key),
            Some(&n),
            "{id}: the last record arrived: {ctx}"
        );
        holes += (1..=n).filter(|q| !seqs.contains(q)).count() as u64;
    }
    // The only records missing are the undeliverable ones; everything behind them arrived.
    assert_eq!(holes, report.failed_permanent, "{ctx}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30s_broker_outage_mid_storm_loses_nothing_and_drops_no_ami_session() {
    let mut nats = NatsServer::start();
    // About 25 s of events at 1000/s per server: the storm goes on through most of the outage.
    let sim = Sim::start(sim_config("E2E2", 2, 1000, Some(25_000)))
        .await
        .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let (stop, run) = spawn_run(config(&config_toml(&sim, dir.path(), &nats, "E2E2", "")));
    let mut reader = StreamReader::new(&nats, "E2E2").await;
    reader
        .wait_for("the storm reaches the stream", |got| {
            View::of(got).events.values().filter(|&&n| n > 1000).count() == 2
        })
        .await;
    broker(|| nats.stop());
    let at_stop = total(&sim_events(&sim));
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during = total(&sim_events(&sim)) - at_stop;
    broker(|| nats.restart());
    within("the sim generates", sim.wait_generated()).await;
    let sent = sim_events(&sim);
    reader
        .wait_for("every simulated event after the outage", |got| {
            View::of(got).events == sent
        })
        .await;
    let report = finish(stop, run).await;
    let sim_stats = sim.shutdown().await;
    assert!(reader.catch_up().await);
    let view = View::of(&reader.got);
    let ctx = format!(
        "{}\nreport: {report}\n{:?}\nsim: {sim_stats:?}",
        view.summary(),
        report.connections
    );

    assert!(
        during > 10_000,
        "the storm went on during the outage: {ctx}"
    );
    assert_eq!(view.events, sent, "{ctx}");
    assert!(view.gaps.is_empty(), "nothing was dropped: {ctx}");
    assert_eq!(
        report.pipeline.dropped_newest + report.pipeline.dropped_oldest,
        0,
        "{ctx}"
    );
    assert_eq!(
        (report.failed_permanent, report.left_in_spool),
        (0, 0),
        "{ctx}"
    );
    for s in &sim_stats {
        let id = server_id(s.server);
        // No AMI session was dropped: one login, no reconnect, no disconnect but the Logoff
        // at the end, one epoch.
        assert_eq!(s.logins, 1, "{id}: {ctx}");
        assert_eq!(report.connections[&id].reconnects, 0, "{id}: {ctx}");
        assert_eq!(report.connections[&id].dropped_records, 0, "{id}: {ctx}");
        // (`auth_failed`: another test's amibus, see `sim_config`.)
        assert!(
            s.disconnects
                .keys()
                .all(|r| *r == "logoff" || *r == "auth_failed"),
            "{id}: {:?}",
            s.disconnects
        );
        let epochs = view.epochs(&id);
        assert_eq!(epochs.len(), 1, "{id}: {ctx}");
        let key = (id.clone(), epochs[0]);
        // Complete by set (JetStream may store one block out of order around the reconnect,
        // see sink/driver.rs): sorted, the seqs are exactly 1..=N.
        let n = view.cover(&key).unwrap_or_else(|e| panic!("{e}\n{ctx}"));
        assert_eq!(n, s.events + 3 + view.snapshot_records(&key), "{id}: {ctx}");
        assert_eq!(view.down.get(&key), Some(&n), "{id}: {ctx}");
    }
    // Resends after the outage carry the same Nats-Msg-Id; the stream's duplicate window
    // drops them. Any that got through are counted here.
    assert_eq!(view.duplicates, 0, "duplicates stored: {ctx}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_storm_then_restart_delivers_everything_that_was_spooled() {
    let nats = NatsServer::start();
    let sim = Sim::start(sim_config("E2E3", 2, 2000, Some(12_000)))
        .await
        .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let spool_dir = dir.path().join("spool");
    let cfg_path = dir.path().join("amibus.toml");
    std::fs::write(&cfg_path, config_toml(&sim, &spool_dir, &nats, "E2E3", "")).expect("config");
    let mut reader = StreamReader::new(&nats, "E2E3").await;

    let mut first = spawn_amibus(&cfg_path, &dir.path().join("run1.log"));
    reader
        .wait_for("the storm reaches the stream", |got| {
            View::of(got).events.values().filter(|&&n| n > 1500).count() == 2
        })
        .await;
    first.kill().expect("SIGKILL");
    let status = first.wait().expect("wait");
    assert!(!status.success());
    // What a consumer had, and what the spool still holds, at the kill.
    assert!(reader.catch_up().await);
    let before: BTreeSet<(String, u64, u64)> = reader
        .got
        .iter()
        .map(|g| (g.env.server.clone(), g.env.epoch, g.env.seq))
        .collect();
    let pending = pending_in_spool(&spool_dir);
    assert!(!pending.is_empty(), "the kill came mid-storm");
    let resent = pending.intersection(&before).count();

    let mut second = spawn_amibus(&cfg_path, &dir.path().join("run2.log"));
    within("the sim generates", sim.wait_generated()).await;
    reader
        .wait_for("everything that was in the spool", |got| {
            let have: BTreeSet<_> = got
                .iter()
                .map(|g| (g.env.server.clone(), g.env.epoch, g.env.seq))
                .collect();
            pending.is_subset(&have)
        })
        .await;
    // A clean stop: the second run delivers what it holds and reports it.
    let term = Command::new("kill")
        .arg("-TERM")
        .arg(second.id().to_string())
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    let status = tokio::task::spawn_blocking(move || second.wait())
        .await
        .expect("join")
        .expect("wait");
    let log2 = std::fs::read_to_string(dir.path().join("run2.log")).unwrap_or_default();
    assert!(status.success(), "second run: {status}\n{log2}");
    assert!(log2.contains(", 0 left in the spool"), "{log2}");
    let sim_stats = sim.shutdown().await;
    assert!(reader.catch_up().await);
    let view = View::of(&reader.got);
    let ctx = format!(
        "{}\n{} records pending in the spool at the kill, {resent} of them already in the stream \
         (sent again after the restart)\nsim: {sim_stats:?}\nsecond run: {}",
        view.summary(),
        pending.len(),
        log2.lines().last().unwrap_or_default()
    );

    let delivered: BTreeSet<(String, u64, u64)> = reader
        .got
        .iter()
        .map(|g| (g.env.server.clone(), g.env.epoch, g.env.seq))
        .collect();
    let missing: Vec<_> = pending.difference(&delivered).take(10).collect();
    assert!(
        missing.is_empty(),
        "spooled but not delivered: {missing:?}\n{ctx}"
    );
    for s in &sim_stats {
        let id = server_id(s.server);
        assert_eq!(s.logins, 2, "{id}: one login per run: {ctx}");
        let epochs = view.epochs(&id);
        assert_eq!(epochs.len(), 2, "{id}: {ctx}");
        // The killed run's epoch: a contiguous prefix 1..=K (the hand-off queue's tail may be
        // lost with the process, nothing before it), and no ConnectionDown.
        let killed = (id.clone(), epochs[0]);
        assert!(!view.gaps.contains_key(&killed), "{id}: {ctx}");
        let k = view.cover(&killed).unwrap_or_else(|e| panic!("{e}\n{ctx}"));
        let spooled_max = pending
            .iter()
            .filter(|(sv, e, _)| *sv == killed.0 && *e == killed.1)
            .map(|(_, _, q)| *q)
            .max()
            .unwrap_or(0);
        assert!(k >= spooled_max, "{id}: {ctx}");
        assert!(!view.down.contains_key(&killed), "{id}: {ctx}");
        // The second run's epoch: whole, ending with the ConnectionDown of the clean stop.
        let second = (id.clone(), epochs[1]);
        let n = view.cover(&second).unwrap_or_else(|e| panic!("{e}\n{ctx}"));
        assert_eq!(view.down.get(&second), Some(&n), "{id}: {ctx}");
        assert!(!view.gaps.contains_key(&second), "{id}: {ctx}");
    }
    // Resent records carry the Nats-Msg-Id of their first send; the stream drops them.
    assert_eq!(view.duplicates, 0, "duplicates stored: {ctx}");
}

/// A graceful stop while the broker is down leaves the undelivered records in the spool; the
/// next start delivers them: nothing read is lost across a graceful restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_across_a_graceful_restart_with_the_broker_down() {
    let mut nats = NatsServer::start();
    let sim = Sim::start(sim_config("E2E6", 2, 500, None))
        .await
        .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = config_toml(&sim, dir.path(), &nats, "E2E6", "")
        .replace("drain_timeout = \"20s\"", "drain_timeout = \"1s\"");
    let (stop, run) = spawn_run(config(&toml));
    let mut reader = StreamReader::new(&nats, "E2E6").await;
    reader
        .wait_for("the first records", |got| got.len() > 100)
        .await;
    broker(|| nats.stop());
    // Records keep arriving while the broker is down; then a graceful stop gives up on
    // delivering them after the drain timeout and keeps them in the spool.
    wait_sent(&sim, 100, "events while the broker is down").await;
    let first = finish(stop, run).await;
    assert!(
        first.left_in_spool > 0,
        "records wait in the spool: {first}"
    );
    broker(|| nats.restart());
    // The restart has no simulator traffic to add for the first epoch: its records come only
    // from the spool.
    let (stop, run) = spawn_run(config(&toml));
    let first_epochs: BTreeMap<String, u64> = {
        reader
            .wait_for("the spooled records", |got| {
                let v = View::of(got);
                (0..2).all(|i| {
                    let id = server_id(i);
                    v.epochs(&id)
                        .first()
                        .is_some_and(|e| v.down.contains_key(&(id.clone(), *e)))
                })
            })
            .await;
        let v = View::of(&reader.got);
        (0..2)
            .map(|i| (server_id(i), v.epochs(&server_id(i))[0]))
            .collect()
    };
    let second = finish(stop, run).await;
    sim.shutdown().await;
    assert!(reader.catch_up().await);
    let view = View::of(&reader.got);
    let ctx = format!(
        "{}\nfirst run: {first}\nsecond run: {second}",
        view.summary()
    );
    for (id, epoch) in first_epochs {
        let key = (id.clone(), epoch);
        // The first run's epoch is whole: 1..N without a hole, ending with its shutdown.
        let n = view.cover(&key).unwrap_or_else(|e| panic!("{e}\n{ctx}"));
        assert_eq!(view.down.get(&key), Some(&n), "{id}: {ctx}");
    }
    assert_eq!(second.left_in_spool, 0, "{ctx}");
}

/// What a run that stopped with the spool full and the broker away left for the next start,
/// and what the next start then published.
struct Carried {
    /// `unreported-gaps` after the first run.
    text: String,
    first: amibus::app::run::Report,
    view: View,
    ctx: String,
}

/// Fill a small spool (`when_full`) with the broker down (`quiet`: see
/// [`fill_the_spool_with_the_broker_down`]), stop amibus while the broker is still away, then
/// start it again with the broker back. Checks what must hold in every case: over both runs,
/// each seq of the first epochs is delivered or named by a gap, once; nothing is duplicated;
/// the carried loss is published and no longer carried.
async fn stop_with_the_broker_away_then_start_again(
    name: &str,
    when_full: &str,
    quiet: bool,
) -> Carried {
    let mut nats = NatsServer::start();
    let sim = Sim::start(sim_config(name, 2, 500, None))
        .await
        .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let spool =
        format!("max_bytes = \"64KiB\"\nsegment_bytes = \"8KiB\"\nwhen_full = \"{when_full}\"");
    let toml = config_toml(&sim, dir.path(), &nats, name, &spool)
        .replace("drain_timeout = \"20s\"", "drain_timeout = \"1s\"");
    let (stop, run) = spawn_run(config(&toml));
    let mut reader = StreamReader::new(&nats, name).await;
    fill_the_spool_with_the_broker_down(&sim, &mut reader, &mut nats, quiet).await;
    let first = finish(stop, run).await;
    let text = std::fs::read_to_string(dir.path().join("unreported-gaps")).unwrap_or_default();
    for i in 0..2 {
        sim.set_unresponsive(i, true);
    }
    broker(|| nats.restart());
    let (stop, run) = spawn_run(config(&toml));
    let first_epochs: BTreeMap<String, u64> = {
        reader
            .wait_for("the first epochs, whole", |got| {
                let v = View::of(got);
                (0..2).all(|i| {
                    let id = server_id(i);
                    // The epoch's last records (its ConnectionDown among them) were lost
                    // to the full spool: a gap names them.
                    v.epochs(&id).first().is_some_and(|e| {
                        let key = (id.clone(), *e);
                        v.gaps.get(&key).is_some_and(|g| !g.is_empty()) && v.cover(&key).is_ok()
                    })
                })
            })
            .await;
        let v = View::of(&reader.got);
        (0..2)
            .map(|i| (server_id(i), v.epochs(&server_id(i))[0]))
            .collect()
    };
    resume(&sim, 2);
    let second = finish(stop, run).await;
    sim.shutdown().await;
    assert!(reader.catch_up().await);
    let view = View::of(&reader.got);
    let ctx = format!(
        "{}\nfirst run: {first}\nsecond run: {second}\ncarried: {text:?}",
        view.summary()
    );
    for (id, epoch) in first_epochs {
        let key = (id.clone(), epoch);
        // 1..N, each seq delivered or in a gap, once; N is the last seq the first run read.
        let n = view.cover(&key).unwrap_or_else(|e| panic!("{e}\n{ctx}"));
        assert!(n > 2000 / 2, "{id}: {ctx}");
        assert!(
            view.gaps.get(&key).is_some_and(|g| !g.is_empty()),
            "{id}: {ctx}"
        );
    }
    assert_eq!(view.duplicates, 0, "{ctx}");
    assert!(
        !dir.path().join("unreported-gaps").exists(),
        "reported, so no longer carried: {ctx}"
    );
    Carried {
        text,
        first,
        view,
        ctx,
    }
}

/// amibus stops while the broker is still away and records it sent are in doubt (deleted by
/// drop_oldest, held in memory only): the next start reports them as `spool full (in doubt)`,
/// so every seq is delivered or named by a gap. Before, they went without a trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_in_doubt_at_shutdown_are_reported_by_the_next_start() {
    let c = stop_with_the_broker_away_then_start_again("E2E7B", "drop_oldest", false).await;
    assert!(
        c.text.contains("spool-full-in-doubt"),
        "the records in doubt waited in the spool directory: {}",
        c.ctx
    );
    // The driver kept trying the oldest record: whichever server's it was is in doubt.
    assert!(
        c.view.in_doubt_gaps.values().any(|g| !g.is_empty()),
        "{}",
        c.ctx
    );
}

/// The spool is full to the stop (broker down, drop_newest): the loss cannot be reported
/// then, so it is written to the spool directory and the next start reports it first. The
/// first run's epoch ends whole: every seq delivered or named by a gap, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_the_full_spool_could_not_report_is_reported_by_the_next_start() {
    let c = stop_with_the_broker_away_then_start_again("E2E7", "drop_newest", true).await;
    assert!(
        c.first.pipeline.dropped_newest > 0 && !c.text.is_empty(),
        "the loss waited in the spool directory: {}",
        c.ctx
    );
}
