//! `amibus run` end to end with the file sink, and `amibus check-config`, through the binary.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;

fn amibus() -> Command {
    Command::new(env!("CARGO_BIN_EXE_amibus"))
}

#[test]
fn the_embedded_demo_delivers_every_simulated_event_in_order() {
    check_demo_output(amibus().arg("run").output().expect("runs"));
}

/// The demo again on a runtime of one thread (`pipeline.threads = 1`): nothing in amibus may
/// need a second thread to make progress (a blocking call on a runtime thread would hang it).
#[test]
fn one_runtime_thread_is_enough() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("amibus.toml");
    let demo = amibus::app::run::EMBEDDED_DEFAULT
        .replace("[pipeline]\n", "[pipeline]\nthreads = 1\n")
        + &format!(
            "\n[spool]\ndir = {:?}\n",
            dir.path().join("spool").display().to_string()
        );
    std::fs::write(&config, &demo).expect("config");
    check_demo_output(
        amibus()
            .args(["run", "--config"])
            .arg(&config)
            .output()
            .expect("runs"),
    );
}

/// The demo's output: every simulated event of both servers, in order, with its snapshots.
fn check_demo_output(out: std::process::Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the simulator sent 10000 events"),
        "{stderr}"
    );
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_seq: HashMap<(String, u64), u64> = HashMap::new();
    let mut sim_events = 0;
    for line in String::from_utf8(out.stdout).expect("UTF-8").lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        let kind = v["kind"].as_str().expect("kind").to_owned();
        let server = v["server"].as_str().expect("server").to_owned();
        let epoch: u64 = v["epoch"].as_str().expect("epoch").parse().expect("epoch");
        let seq: u64 = v["seq"].as_str().expect("seq").parse().expect("seq");
        // Every record of one connection arrives once, in order, with no hole.
        let prev = last_seq.insert((server, epoch), seq).unwrap_or(0);
        assert_eq!(seq, prev + 1, "{line}");
        // A snapshot's list items are events too, tagged with their snapshot.
        if kind == "event" && v["name"] != "FullyBooted" && v["snapshot_id"].is_null() {
            sim_events += 1;
        }
        *kinds.entry(kind).or_default() += 1;
    }
    assert_eq!(sim_events, 10_000);
    assert_eq!(kinds.get("connection_up"), Some(&2));
    assert_eq!(kinds.get("connection_down"), Some(&2));
    assert_eq!(kinds.get("gap"), None);
    // Each login is followed by a snapshot of the server's state, begun and ended.
    assert_eq!(kinds.get("snapshot_begin"), Some(&2));
    assert_eq!(kinds.get("snapshot_end"), Some(&2));
}

#[test]
fn check_config_accepts_a_good_file_and_lists_every_problem_of_a_bad_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        r#"
        [[server]]
        id = "pbx1"
        host = "127.0.0.1"
        username = "amibus"
        secret = "x"
        [spool]
        dir = "/var/lib/amibus/spool"
        max_bytes = "2GiB"
        [sink]
        kind = "nats"
        [sink.nats]
        servers = ["nats://127.0.0.1:4222"]
        [sink.nats.stream]
        name = "AMI"
        "#,
    )
    .expect("write");
    let out = amibus()
        .arg("check-config")
        .arg(&good)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid (1 servers, sink nats"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"
        [[server]]
        id = "pbx 1"
        host = "127.0.0.1"
        username = "amibus"
        [spool]
        max_bytes = "lots"
        when_full = "panic"
        [sink]
        kind = "carrier-pigeon"
        "#,
    )
    .expect("write");
    let out = amibus()
        .arg("check-config")
        .arg(&bad)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for path in [
        "server[0].id",
        "server[0].secret",
        "spool.max_bytes",
        "spool.when_full",
        "sink.kind",
    ] {
        assert!(stderr.contains(path), "{path} missing from: {stderr}");
    }

    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[spool]\nmax_byte = 10\n").expect("write");
    let out = amibus()
        .arg("check-config")
        .arg(&typo)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_byte"));
}

#[test]
fn the_reference_and_every_example_config_validate() {
    struct Env;
    impl amibus::config::Env for Env {
        fn var(&self, name: &str) -> Option<String> {
            name.ends_with("_SECRET")
                .then(|| "secret".to_owned())
                .or_else(|| name.ends_with("_PASSWORD").then(|| "pw".to_owned()))
        }
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files = vec![format!("{root}/config/reference.toml")];
    for entry in std::fs::read_dir(format!("{root}/config/examples")).expect("examples") {
        files.push(entry.expect("entry").path().display().to_string());
    }
    assert!(files.len() >= 3);
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        if let Err(e) = amibus::config::Config::parse(&text, &Env) {
            panic!("{file}: {e}");
        }
    }
}
