//! The connection task against the built-in AMI simulator (`amibus::sim`) on 127.0.0.1:0:
//! floods, lists, async originates, silence and a consumer that does not read.
//!
//! No assertion depends on timing: waits only guard against hangs.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use amibus::ami::server::ServerConfig;
use amibus::ami::{Action, Record, Request, Stamped};
use amibus::secret::Secret;
use amibus::sim::{Sim, SimConfig, SimHandle};

use support::{down_reason, event_name, is_up, next, start, stop, until};

const T: Duration = Duration::from_secs(20);

fn sim_cfg() -> SimConfig {
    SimConfig {
        auth_fail_delay: Duration::from_millis(10),
        epoch: Some(1_795_671_272),
        ..SimConfig::default()
    }
}

fn cfg(sim: &SimHandle) -> ServerConfig {
    let addr = sim.addrs()[0];
    let mut c = ServerConfig::new(
        "sim-0",
        "127.0.0.1",
        addr.port(),
        "admin",
        Secret::new("amp111"),
    );
    c.backoff_min = Duration::from_millis(10);
    c.backoff_max = Duration::from_millis(50);
    // These tests count what the simulator generated; snapshots have their own tests
    // (tests/snapshot.rs).
    c.snapshot.lists.clear();
    c
}

fn is_generated_event(r: &Stamped) -> bool {
    event_name(r).is_some_and(|n| n != "FullyBooted")
}

#[tokio::test]
async fn a_simulated_flood_arrives_complete_and_in_order_with_pings_answered() {
    const N: u64 = 5000;
    let sim = Sim::start(SimConfig {
        count: Some(N),
        ..sim_cfg()
    })
    .await
    .unwrap();
    let mut c = cfg(&sim);
    // Pings go out during the flood; their responses must not leak downstream.
    c.keepalive_interval = Duration::from_millis(20);
    c.keepalive_timeout = Duration::from_secs(10);
    // Room for every record: this test is about order and completeness, not overflow.
    let (conn, mut rx, shutdown) = start(c, N as usize + 16);
    let mut got = Vec::new();
    let mut events = 0;
    let mut event_bytes = 0;
    while events < N {
        let r = match tokio::time::timeout(T, rx.recv()).await {
            Ok(r) => r.unwrap(),
            Err(_) => panic!(
                "stalled after {events} events; last {:?}; sim {:?}; conn {:?}",
                got.last(),
                sim.stats(),
                conn.stats.snapshot()
            ),
        };
        if is_generated_event(&r) {
            events += 1;
            if let Record::Frame(f) = &r.record {
                event_bytes += f.bytes().len() as u64;
            }
        }
        got.push(r);
    }
    assert!(is_up(&got[0]));
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.stamp.seq, i as u64 + 1, "no hole, no reordering");
        assert_eq!(r.stamp.epoch, got[0].stamp.epoch);
        if let Record::Frame(f) = &r.record {
            let first = f.frame().header(0).map(|h| h.key.to_vec());
            assert_eq!(
                first.as_deref(),
                Some(&b"Event"[..]),
                "a response leaked: {f:?}"
            );
        }
        assert!(!matches!(
            r.record,
            Record::Gap { .. } | Record::ConnectionDown { .. }
        ));
    }
    let stats = sim.stats();
    assert_eq!(stats[0].events, N);
    assert_eq!(event_bytes, stats[0].event_bytes);
    assert_eq!(conn.stats.snapshot().dropped_records, 0);
    stop(conn, shutdown).await;
    let stats = sim.shutdown().await;
    assert_eq!(stats[0].disconnects.get("logoff"), Some(&1));
}

#[tokio::test]
async fn a_consumer_that_does_not_read_never_stalls_the_socket() {
    // The consumer reads nothing until the sim is done. If the reader waited on the queue,
    // the sim would disconnect it for the write timeout, as Asterisk does.
    const N: u64 = 20_000;
    let sim = Sim::start(SimConfig {
        count: Some(N),
        write_timeout: Duration::from_secs(1),
        ..sim_cfg()
    })
    .await
    .unwrap();
    let (conn, mut rx, shutdown) = start(cfg(&sim), 16);
    tokio::time::timeout(T, sim.wait_generated()).await.unwrap();
    // N events and the FullyBooted behind the Login response.
    while conn.stats.snapshot().frames < N + 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let st = conn.stats.snapshot();
    assert!(st.connected);
    assert!(st.dropped_records > 0);
    // Now read: the gap arrives, then a marker proves the session is still alive.
    let mut got = Vec::new();
    while let Ok(r) = rx.try_recv() {
        got.push(r);
    }
    got.extend(until(&mut rx, |r| matches!(r.record, Record::Gap { .. })).await);
    let reply = conn.handle.send(Action::new("Ping"), T).await.unwrap();
    assert!(reply.is_success());
    let mut delivered = BTreeSet::new();
    let mut dropped = BTreeSet::new();
    let mut events = 0;
    for r in &got {
        assert!(delivered.insert(r.stamp.seq));
        match &r.record {
            Record::Gap {
                first_seq,
                last_seq,
                ..
            } => dropped.extend(*first_seq..=*last_seq),
            _ if is_generated_event(r) => events += 1,
            _ => {}
        }
    }
    let max = *delivered.iter().max().unwrap();
    assert!(delivered.is_disjoint(&dropped));
    assert_eq!(
        delivered.union(&dropped).count() as u64,
        max,
        "every seq delivered or in a gap"
    );
    // ConnectionUp, FullyBooted and N events: each delivered or inside a gap.
    let gaps = got
        .iter()
        .filter(|r| matches!(r.record, Record::Gap { .. }))
        .count();
    assert_eq!(delivered.len() - gaps + dropped.len(), N as usize + 2);
    assert!(events > 0);
    assert_eq!(conn.stats.snapshot().dropped_records, dropped.len() as u64);
    stop(conn, shutdown).await;
    let stats = sim.shutdown().await;
    assert_eq!(stats[0].disconnects.get("write_timeout"), None);
    assert_eq!(stats[0].logins, 1);
}

#[tokio::test]
async fn lists_and_async_originate_through_the_handle() {
    let sim = Sim::start(SimConfig {
        rate: 2000,
        concurrent_calls: 6,
        ..sim_cfg()
    })
    .await
    .unwrap();
    let (conn, mut rx, shutdown) = start(cfg(&sim), 100_000);
    assert!(is_up(&next(&mut rx).await));
    while sim.stats()[0].events < 200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reply = conn
        .handle
        .send(Action::new("CoreShowChannels"), T)
        .await
        .unwrap();
    assert!(reply.is_success());
    let (complete, items) = reply.events.split_last().expect("a completion event");
    assert_eq!(
        complete.frame().get("Event"),
        Some(&b"CoreShowChannelsComplete"[..])
    );
    assert_eq!(
        complete.frame().get("ListItems"),
        Some(items.len().to_string().as_bytes())
    );
    assert!(
        items
            .iter()
            .all(|f| f.frame().get("Event") == Some(&b"CoreShowChannel"[..]))
    );

    let req = Request::new(
        Action::new("Originate")
            .header("Channel", "Local/abandon@bench-entry")
            .header("Context", "bench-entry")
            .header("Exten", "sink")
            .header("Priority", "1")
            .header("Async", "true"),
        T,
    )
    .await_event("OriginateResponse");
    let reply = conn.handle.request(req).await.unwrap();
    assert!(reply.is_success());
    let awaited = reply.awaited.expect("OriginateResponse");
    let id = awaited.frame().get("ActionID").unwrap().to_vec();
    assert_eq!(awaited.frame().get("Response"), Some(&b"Success"[..]));
    // The same event also went downstream, among the generated traffic.
    let down = until(
        &mut rx,
        |r| matches!(&r.record, Record::Frame(f) if f.frame().get("ActionID") == Some(&id[..])),
    )
    .await;
    assert_eq!(
        event_name(down.last().unwrap()).as_deref(),
        Some("OriginateResponse")
    );
    // No list item or response of ours went downstream (OriginateResponse is an event that
    // carries a `Response:` header, so "response" means a frame that starts with one).
    assert!(down.iter().all(|r| match &r.record {
        Record::Frame(f) => {
            f.frame().header(0).is_some_and(|h| h.is("Event"))
                && f.frame().get("Event") != Some(&b"CoreShowChannel"[..])
        }
        _ => true,
    }));
    stop(conn, shutdown).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_silent_simulator_is_detected_by_keepalive_and_rejoined() {
    let sim = Sim::start(SimConfig {
        count: Some(0),
        ..sim_cfg()
    })
    .await
    .unwrap();
    let mut c = cfg(&sim);
    c.keepalive_interval = Duration::from_millis(50);
    c.keepalive_timeout = Duration::from_millis(150);
    let (conn, mut rx, shutdown) = start(c, 64);
    let up = next(&mut rx).await;
    assert!(is_up(&up));
    sim.set_unresponsive(0, true);
    let down = until(&mut rx, support::is_down).await;
    assert_eq!(down_reason(down.last().unwrap()), Some("keepalive timeout"));
    sim.set_unresponsive(0, false);
    let again = until(&mut rx, is_up).await;
    assert!(again.last().unwrap().stamp.epoch > up.stamp.epoch);
    stop(conn, shutdown).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_simulator_restart_is_followed_by_a_new_epoch() {
    let sim = Sim::start(SimConfig {
        count: Some(0),
        ..sim_cfg()
    })
    .await
    .unwrap();
    let (conn, mut rx, shutdown) = start(cfg(&sim), 64);
    let up = until(&mut rx, is_up).await;
    sim.stop_server(0).await;
    let down = until(&mut rx, support::is_down).await;
    assert_eq!(down_reason(down.last().unwrap()), Some("eof"));
    sim.start_server(0).await.unwrap();
    let up2 = until(&mut rx, is_up).await;
    let (a, b) = (up.last().unwrap(), up2.last().unwrap());
    assert!(b.stamp.epoch > a.stamp.epoch);
    assert_eq!(b.stamp.seq, 1);
    stop(conn, shutdown).await;
    sim.shutdown().await;
}
