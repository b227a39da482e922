//! SIGHUP reloads the server list of a running `amibus run`: new servers connect, removed ones
//! log off, and the others keep their session.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use amibus::sim::{ServerStats, Sim, SimConfig};

#[path = "support/child.rs"]
mod child;
use child::KillOnDrop;

fn server_block(id: &str, port: u16) -> String {
    format!(
        "[[server]]\nid = \"{id}\"\nhost = \"127.0.0.1\"\nport = {port}\nusername = \"admin\"\nsecret = \"amp111\"\n"
    )
}

async fn wait_for(sim: &amibus::sim::SimHandle, what: &str, ok: impl Fn(&[ServerStats]) -> bool) {
    let started = Instant::now();
    while !ok(&sim.stats()) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}: {:?}",
            sim.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_server_list_without_touching_the_rest() {
    let sim = Sim::start(SimConfig {
        servers: 3,
        rate: 50,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let ports: Vec<u16> = sim.addrs().iter().map(|a| a.port()).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("amibus.toml");
    let tail = format!(
        "[spool]\ndir = \"{}\"\n[sink.file]\npath = \"{}\"\n",
        dir.path().join("spool").display(),
        dir.path().join("out.jsonl").display()
    );
    std::fs::write(
        &config,
        format!(
            "{}{}{tail}",
            server_block("a", ports[0]),
            server_block("b", ports[1])
        ),
    )
    .expect("config");
    let log = dir.path().join("amibus.log");
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_amibus"))
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("starts"),
    );
    wait_for(&sim, "a and b to log in", |s| {
        s[0].logins == 1 && s[1].logins == 1
    })
    .await;
    assert_eq!(sim.stats()[2].clients, 0);

    // A broken file changes nothing.
    std::fs::write(&config, "[[server]]\nid = \"broken\"\n").expect("config");
    assert!(
        Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .expect("kill")
            .success()
    );
    // The rejection is logged once the file was read and refused; nothing happens after it.
    let started = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("SIGHUP: configuration rejected")
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the broken file was not rejected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = sim.stats();
    assert_eq!(
        (s[0].clients, s[1].clients, s[2].clients),
        (1, 1, 0),
        "a rejected file must change nothing"
    );

    // Drop a, keep b as it is, add c.
    std::fs::write(
        &config,
        format!(
            "{}{}{tail}",
            server_block("b", ports[1]),
            server_block("c", ports[2])
        ),
    )
    .expect("config");
    assert!(
        Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .expect("kill")
            .success()
    );
    wait_for(&sim, "c to log in and a to log off", |s| {
        s[2].logins == 1 && s[0].disconnects.values().sum::<u64>() >= 1
    })
    .await;
    let s = sim.stats();
    assert_eq!(s[1].clients, 1, "b keeps its one session");
    assert_eq!(s[1].logins, 1);
    assert_eq!(s[0].logins, 1, "a is not reconnected");

    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill")
            .success()
    );
    assert!(child.wait().expect("exits").success());
    sim.shutdown().await;
}
