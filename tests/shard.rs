//! Three replicas over 300 simulated servers: every server is read by exactly one replica.

use std::time::{Duration, Instant};

use amibus::app::run::run_until;
use amibus::config::{Config, ProcessEnv};
use amibus::sim::{Sim, SimConfig};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_split_300_servers_without_overlap() {
    let sim = Sim::start(SimConfig {
        servers: 300,
        rate: 1,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut servers = String::new();
    for (i, addr) in sim.addrs().iter().enumerate() {
        servers.push_str(&format!(
            "[[server]]\nid = \"pbx-{i:03}\"\nhost = \"127.0.0.1\"\nport = {}\nusername = \"admin\"\nsecret = \"amp111\"\n",
            addr.port()
        ));
    }
    let mut runs = Vec::new();
    let stop = CancellationToken::new();
    for replica in 0..3 {
        let text = format!(
            "{servers}\n[shard]\nindex = {replica}\ncount = 3\n[spool]\ndir = \"{spool}\"\n[sink.file]\npath = \"{out}\"\n",
            spool = dir.path().join(format!("spool-{replica}")).display(),
            out = dir.path().join(format!("out-{replica}")).display(),
        );
        let mut cfg = Config::parse(&text, &ProcessEnv).expect("config");
        let stop = stop.clone();
        runs.push(tokio::spawn(async move { run_until(&mut cfg, stop).await }));
    }
    // Wait until every server has a session.
    let started = Instant::now();
    loop {
        let stats = sim.stats();
        if stats.iter().all(|s| s.logins >= 1) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} of 300 servers have a session",
            stats.iter().filter(|s| s.logins >= 1).count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One session per server now; that no server has a second owner that is merely slower
    // is proven by the replicas' reports below (each counts the servers it owns).
    let stats = sim.stats();
    let doubled: Vec<_> = stats
        .iter()
        .filter(|s| s.logins != 1)
        .map(|s| s.server)
        .collect();
    assert!(
        doubled.is_empty(),
        "servers with other than one session: {doubled:?}"
    );
    for (i, s) in stats.iter().enumerate() {
        assert_eq!(s.clients, 1, "server {i}");
    }
    stop.cancel();
    let mut owned = 0;
    for run in runs {
        let report = run.await.expect("join").expect("run");
        owned += report.servers;
        assert!(
            (70..=130).contains(&report.servers),
            "uneven: {} servers",
            report.servers
        );
    }
    assert_eq!(owned, 300, "every server is owned by exactly one replica");
    sim.shutdown().await;
}
