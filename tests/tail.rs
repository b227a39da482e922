//! `amibus tail nats` through the binary, against a real nats-server (see `support/nats.rs`):
//! records published by `amibus run` (simulator → pipeline → spool → JetStream) read back with
//! and without filters, and a core subject carrying envelopes, JSON and garbage.
//! Timeouts only keep a broken test from hanging; no assertion is about timing.

#[path = "support/nats.rs"]
mod nats_support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amibus::ami::{Parsed, Parser, Record as AmiRecord, Stamp, Stamped};
use amibus::broker::nats::NatsConnection;
use amibus::model::PayloadFormat;
use amibus::pipeline::Pipeline;
use amibus::sink::Sink;
use amibus::sink::nats::{NatsMode, NatsSink, NatsSinkConfig};
use amibus::spool::{Spool, SpoolConfig};
use async_nats::HeaderMap;
use bytes::Bytes;
use nats_support::NatsServer;
use serde_json::Value;

fn amibus() -> Command {
    Command::new(env!("CARGO_BIN_EXE_amibus"))
}

/// Run to completion, at most 60 s (output is read meanwhile, so a full pipe cannot block it).
fn finish(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn amibus");
    finish_child(child)
}

/// Wait for a started child, at most 60 s.
fn finish_child(child: std::process::Child) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.expect("output"),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("amibus (pid {pid}) did not finish in 60 s");
        }
    }
}

fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8(out.stdout.clone())
        .expect("UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn tail_stream(server: &NatsServer, stream: &str, extra: &[&str]) -> Output {
    let mut cmd = amibus();
    cmd.args([
        "tail",
        "nats",
        "--servers",
        &server.url(),
        "--stream",
        stream,
    ])
    .args(["--from", "first"])
    .args(extra);
    let out = finish(cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_reads_back_what_amibus_run_published_and_filters_by_server_and_event() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("amibus.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            [sim]
            servers = 2
            rate = 0
            count = 400
            exit_when_done = true
            [spool]
            dir = "{}"
            fsync = "never"
            [sink]
            kind = "nats"
            [sink.nats]
            servers = ["{}"]
            subject = "tail1.{{server}}.{{event}}"
            [sink.nats.stream]
            name = "TAIL1"
            "#,
            dir.path().join("spool").display(),
            server.url()
        ),
    )
    .expect("write config");
    let mut run = amibus();
    run.arg("run").arg("--config").arg(&config);
    let out = finish(run);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("0 left in the spool"), "{stderr}");

    let client = async_nats::connect(server.url()).await.expect("connect");
    let held = async_nats::jetstream::new(client)
        .get_stream("TAIL1")
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .state
        .messages;
    assert!(
        held > 800,
        "both servers' events and their connection records: {held}"
    );

    // Everything, decoded.
    let all = lines(&tail_stream(
        &server,
        "TAIL1",
        &["--limit", &held.to_string()],
    ));
    assert_eq!(all.len() as u64, held);
    assert!(
        all.iter()
            .all(|v| v["server"] == "sim-1" || v["server"] == "sim-2")
    );
    let ups = all.iter().filter(|v| v["kind"] == "connection_up").count();
    assert_eq!(ups, 2);

    // One server, two event names (one given in another case): exactly the matching subset of
    // the full read, in the same order.
    let want = |v: &&Value| {
        v["server"] == "sim-2" && (v["name"] == "Newchannel" || v["kind"] == "connection_up")
    };
    let expected: Vec<&Value> = all.iter().filter(want).collect();
    assert!(expected.len() > 10, "the simulator makes channels");
    let out = tail_stream(
        &server,
        "TAIL1",
        &[
            "--server",
            "sim-2",
            "--event",
            "newchannel",
            "--event",
            "connection_up",
            "--limit",
            &expected.len().to_string(),
        ],
    );
    let got = lines(&out);
    assert_eq!(got.iter().collect::<Vec<_>>(), expected);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("0 undecodable"), "{stderr}");

    // Without --limit, --from first ends at the end of the stream, filtered or not, and
    // prints its summary.
    let out = tail_stream(&server, "TAIL1", &[]);
    assert_eq!(lines(&out), all);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("amibus tail: {held} read, {held} printed")),
        "{stderr}"
    );
    let out = tail_stream(
        &server,
        "TAIL1",
        &[
            "--server",
            "sim-2",
            "--event",
            "newchannel",
            "--event",
            "connection_up",
        ],
    );
    assert_eq!(lines(&out).iter().collect::<Vec<_>>(), expected);
    // A filter that matches nothing: the end is reached before any message.
    let out = tail_stream(&server, "TAIL1", &["--subject", "nothing.here.>"]);
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("amibus tail: 0 read, 0 printed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // --follow waits at the end; SIGTERM ends it like Ctrl-C, with the summary.
    let mut follow = amibus()
        .args([
            "tail",
            "nats",
            "--servers",
            &server.url(),
            "--stream",
            "TAIL1",
        ])
        .args(["--from", "first", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn amibus tail");
    let mut reader = std::io::BufReader::new(follow.stdout.take().expect("stdout"));
    for _ in 0..held {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).expect("a line");
        assert!(!line.is_empty(), "tail --follow ended early");
    }
    let pid = follow.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let out = finish_child(follow);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("amibus tail: {held} read, {held} printed")),
        "{stderr}"
    );

    // A subject filter on the stream, and --raw: the bus headers as published.
    let out = tail_stream(
        &server,
        "TAIL1",
        &["--subject", "tail1.sim-1.>", "--raw", "--limit", "3"],
    );
    for v in lines(&out) {
        assert!(
            v["subject"]
                .as_str()
                .expect("subject")
                .starts_with("tail1.sim-1.")
        );
        let headers = v["headers"].as_array().expect("headers");
        assert!(
            headers.contains(&serde_json::json!(["server", "sim-1"])),
            "{v}"
        );
        assert!(
            headers.contains(&serde_json::json!(["schema", "amibus.v1"])),
            "{v}"
        );
    }
}

fn stamped(server: &str, seq: u64, frame: &[u8]) -> Stamped {
    let mut p = Parser::default();
    let Parsed::Frame { frame, .. } = p.parse(frame) else {
        panic!("frame")
    };
    Stamped {
        stamp: Stamp {
            server: Arc::from(server),
            epoch: 1,
            seq,
            received_at_ns: 1_700_000_000_000_000_000 + seq as i64,
        },
        record: AmiRecord::Frame(frame.to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_of_a_core_subject_passes_json_through_and_counts_garbage() {
    let server = NatsServer::start();
    let mut child = amibus()
        .args([
            "tail",
            "nats",
            "--servers",
            &server.url(),
            "--subject",
            "core.>",
        ])
        .args(["--server", "pbx1", "--limit", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tail");
    // Core NATS delivers only what is published after the subscription: wait for it.
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut seen = String::new();
    while !seen.contains("subscribed to core.>") {
        let before = seen.len();
        stderr.read_line(&mut seen).expect("stderr line");
        assert!(seen.len() > before, "tail ended before subscribing: {seen}");
    }

    // Records made by the real pipeline, published by the real sink.
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(SpoolConfig::new(dir.path())).expect("spool");
    let mut pipeline = Pipeline::new(spool, PayloadFormat::Proto);
    let frame = b"Event: Hangup\r\nPrivilege: call,all\r\nUniqueid: 1.2\r\nLinkedid: 1.1\r\n\r\n";
    let mut sink = NatsSink::connect(NatsSinkConfig {
        connection: NatsConnection {
            servers: vec![server.url()],
            ..NatsConnection::default()
        },
        subject: "core.{server}.{event}".into(),
        mode: NatsMode::Core,
        ..NatsSinkConfig::default()
    })
    .await
    .expect("sink");
    let client = async_nats::connect(server.url()).await.expect("connect");
    // The server has handed a message to every subscriber (tail's included) once our own
    // subscription sees it, so waiting for it orders messages across connections.
    let mut watch = client.subscribe("core.>").await.expect("subscribe");
    client.flush().await.expect("flush");

    let with = |pairs: &[(&str, &str)]| {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, *v);
        }
        h
    };
    // 1. garbage with amibus headers: passes the header filter, cannot be decoded.
    client
        .publish_with_headers(
            "core.pbx1.Hangup",
            with(&[("server", "pbx1"), ("event", "Hangup")]),
            Bytes::from_static(b"\xff\x00not an envelope"),
        )
        .await
        .expect("publish");
    // Two connections publish: wait until the server has each one, so it sees them in order.
    server_has(&mut watch, "a message").await;
    // 2. another server's record: filtered out on its headers.
    let other = pipeline.to_spool_record(&stamped("pbx2", 1, frame));
    sink.send(&other)
        .await
        .expect("send")
        .await
        .expect("flushed");
    server_has(&mut watch, "the other server's record").await;
    // 3. a JSON payload (pipeline format json), passed through as it is.
    let json = "{\"kind\":\"event\",\"name\":\"Hangup\",\"server\":\"pbx1\",\"seq\":2}";
    client
        .publish_with_headers(
            "core.pbx1.Hangup",
            with(&[("server", "pbx1"), ("event", "Hangup")]),
            Bytes::from(format!("{json}\n")),
        )
        .await
        .expect("publish");
    // Two connections publish: wait until the server has each one, so it sees them in order.
    server_has(&mut watch, "a message").await;
    // 4. an envelope without headers: filtered on its decoded server.
    let bare = pipeline.to_spool_record(&stamped("pbx1", 3, frame));
    client
        .publish("core.bare", bare.payload.clone())
        .await
        .expect("publish");
    // Two connections publish: wait until the server has each one, so it sees them in order.
    server_has(&mut watch, "a message").await;
    // 5. a record from the pipeline and the sink.
    let mine = pipeline.to_spool_record(&stamped("pbx1", 4, frame));
    sink.send(&mine)
        .await
        .expect("send")
        .await
        .expect("flushed");

    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "tail did not stop at its limit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).expect("stderr");
    let out = child.wait_with_output().expect("output");
    assert!(out.status.success(), "{rest}");
    let got = lines(&out);
    assert_eq!(got.len(), 3, "{got:?}");
    // The messages come from two connections (the test's client and the sink's), and a client
    // flush does not wait for the server, so only the set of printed records is certain, not
    // their order across connections.
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == json),
        "JSON passes through byte for byte"
    );
    let mut envelopes: Vec<&serde_json::Value> = got
        .iter()
        .filter(|v| v.get("partition_key").is_some())
        .collect();
    envelopes.sort_by_key(|v| v["seq"].as_str().and_then(|s| s.parse::<u64>().ok()));
    let seen: Vec<_> = envelopes
        .iter()
        .map(|v| {
            (
                v["server"].as_str(),
                v["seq"].as_str().and_then(|s| s.parse::<u64>().ok()),
            )
        })
        .collect();
    assert_eq!(seen, [(Some("pbx1"), Some(3)), (Some("pbx1"), Some(4))]);
    assert_eq!(envelopes[1]["partition_key"], "pbx1/1.1");
    assert!(rest.contains("undecodable payload skipped"), "{rest}");
    assert!(
        rest.contains("5 read, 3 printed, 1 filtered out, 1 undecodable"),
        "{rest}"
    );
}

/// Wait until `watch` receives the next message: the server has then handed it to every
/// subscriber.
async fn server_has(watch: &mut async_nats::Subscriber, what: &str) {
    use futures_util::StreamExt as _;
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap_or_else(|_| panic!("{what} never reached the server"))
        .expect("subscription open");
}
