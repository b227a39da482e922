//! `/metrics`, `/healthz` and `/readyz` of a running `amibus run`, scraped over HTTP, and a
//! graceful stop (SIGTERM) that leaves nothing undelivered.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/child.rs"]
mod child;
use child::KillOnDrop;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.get(9..12)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// The value of the first series of `metric` whose labels contain `labels`.
fn value(body: &str, metric: &str, labels: &str) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(metric) && l.contains(labels))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn metrics_move_health_answers_and_sigterm_delivers_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let out = dir.path().join("out.jsonl");
    let config = dir.path().join("amibus.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            [sim]
            servers = 2
            rate = 500
            [pipeline]
            format = "json"
            [spool]
            dir = "{spool}"
            [sink]
            kind = "file"
            [sink.file]
            path = "{out}"
            [metrics]
            listen = "127.0.0.1:{port}"
            ready_min_connected = 1.0
            "#,
            spool = dir.path().join("spool").display(),
            out = out.display(),
        ),
    )
    .expect("config");
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_amibus"))
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starts"),
    );

    // Wait until it is ready: both servers connected, the sink healthy.
    let started = Instant::now();
    loop {
        if let Some((200, _)) = get(port, "/readyz") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never became ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(port, "/healthz").map(|r| r.0), Some(200));
    assert_eq!(get(port, "/nope").map(|r| r.0), Some(404));

    let (status, first) = get(port, "/metrics").expect("scrape");
    assert_eq!(status, 200);
    for series in [
        "amibus_ami_connected",
        "amibus_ami_frames_total",
        "amibus_ami_bytes_total",
        "amibus_ami_parse_errors_total",
        "amibus_ami_reconnects_total",
        "amibus_ami_auth_failures_total",
        "amibus_ami_seconds_since_last_byte",
        "amibus_pipeline_records_total",
        "amibus_spool_records",
        "amibus_spool_bytes",
        "amibus_spool_oldest_record_age_seconds",
        "amibus_spool_dropped_records_total",
        "amibus_sink_records_sent_total",
        "amibus_sink_records_acknowledged_total",
        "amibus_sink_records_failed_total",
        "amibus_sink_send_seconds_bucket",
        "amibus_sink_ready",
        "amibus_servers_configured",
    ] {
        assert!(first.contains(series), "{series} missing from:\n{first}");
    }
    assert_eq!(
        value(&first, "amibus_ami_connected", "server=\"sim-1\""),
        Some(1.0)
    );
    assert_eq!(value(&first, "amibus_servers_configured", ""), Some(2.0));
    // The counters move.
    let frames =
        |body: &str| value(body, "amibus_ami_frames_total", "server=\"sim-2\"").unwrap_or(0.0);
    let acked = |body: &str| {
        value(
            body,
            "amibus_sink_records_acknowledged_total",
            "sink=\"file\"",
        )
        .unwrap_or(0.0)
    };
    let started = Instant::now();
    let second = loop {
        std::thread::sleep(Duration::from_millis(200));
        let (_, body) = get(port, "/metrics").expect("scrape");
        if frames(&body) > frames(&first) && acked(&body) > acked(&first) {
            break body;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "metrics do not move:\n{body}"
        );
    };
    assert!(!second.contains("Uniqueid"), "no high-cardinality labels");

    // SIGTERM: stop reading, drain, exit 0, nothing left behind.
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = child.wait().expect("exits");
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("0 left in the spool"), "{stderr}");
    // Every record read is in the file: per connection, seqs 1..N without a hole, ending with
    // the connection_down of the shutdown.
    let text = std::fs::read_to_string(&out).expect("output");
    let mut last: std::collections::HashMap<String, (u64, String)> = Default::default();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
        let server = v["server"].as_str().unwrap_or_default().to_owned();
        let seq = v["seq"].as_u64().unwrap_or(0);
        let prev = last.get(&server).map_or(0, |p| p.0);
        assert_eq!(seq, prev + 1, "hole or duplicate at {line}");
        last.insert(
            server,
            (seq, v["kind"].as_str().unwrap_or_default().to_owned()),
        );
    }
    assert_eq!(last.len(), 2);
    for (server, (_, kind)) in last {
        assert_eq!(
            kind, "connection_down",
            "{server} ends with its shutdown record"
        );
    }
}
