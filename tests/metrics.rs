//! `/metrics`, `/healthz` and `/readyz` of a running `amibus run`, scraped over HTTP, and a
//! graceful stop (SIGTERM) that leaves nothing undelivered.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/child.rs"]
mod child;
use child::{KillOnDrop, metrics_addr};

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
            listen = "127.0.0.1:0"
            ready_min_connected = 1.0
            "#,
            spool = dir.path().join("spool").display(),
            out = out.display(),
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
    let port = metrics_addr(&log, &mut child).port();

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
        "amibus_spool_damaged_records_total",
        "amibus_spool_damaged_bytes_total",
        "amibus_spool_damaged_unattributed_records_total",
        "amibus_sink_records_sent_total",
        "amibus_sink_records_acknowledged_total",
        "amibus_sink_records_failed_total",
        "amibus_sink_send_seconds_bucket",
        "amibus_sink_ready",
        "amibus_servers_configured",
        // The login snapshot of each simulated server.
        "amibus_snapshots_total",
        "amibus_snapshot_items_total",
        "amibus_snapshots_incomplete_total",
        "amibus_snapshot_duration_seconds_bucket",
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
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("0 left in the spool"), "{stderr}");
    // Every record read is in the file: per connection, seqs 1..N without a hole, ending with
    // the connection_down of the shutdown.
    let text = std::fs::read_to_string(&out).expect("output");
    let mut last: std::collections::HashMap<String, (u64, String)> = Default::default();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
        let server = v["server"].as_str().unwrap_or_default().to_owned();
        let seq = v["seq"]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
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

/// Run `promtool` (Debian's `prometheus` package; scripts/test installs it) with `args`, the
/// given standard input; returns (success, stdout + stderr).
fn promtool(args: &[&str], stdin: &[u8]) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (scripts/test installs the prometheus package)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    let out = child.wait_with_output().expect("promtool exits");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Every PromQL expression of the dashboard: panel targets' `expr`, and the metric selector of
/// each `label_values(selector, label)` variable query, with Grafana's variables replaced by
/// what Prometheus would see.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/helm/amibus/dashboards/amibus.json"
    ))
    .expect("dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(o) => {
                for (k, v) in o {
                    match (k.as_str(), v.as_str()) {
                        ("expr", Some(e)) => out.push(e.to_owned()),
                        ("query" | "definition", Some(q)) if q.starts_with("label_values(") => {
                            let inner = &q["label_values(".len()..q.rfind(',').unwrap_or(q.len())];
                            out.push(inner.to_owned());
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dash, &mut out);
    out.sort();
    out.dedup();
    out.into_iter()
        .map(|e| {
            e.replace("$__rate_interval", "1m")
                .replace("$__interval", "1m")
                .replace("${pod}", ".*")
                .replace("$pod", ".*")
                .replace("${server}", ".*")
                .replace("$server", ".*")
        })
        .collect()
}

fn rules_file(exprs: &[String]) -> Vec<u8> {
    let rules: Vec<serde_json::Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": e}))
        .collect();
    // JSON is YAML: promtool reads it as a rule file.
    serde_json::to_vec(&serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]}))
        .expect("rules")
}

#[test]
fn promtool_accepts_a_real_scrape_and_every_dashboard_query() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("amibus.toml");
    std::fs::write(
        &config,
        format!(
            "[sim]\nservers = 2\nrate = 500\n[pipeline]\nformat = \"json\"\n[spool]\ndir = {:?}\n\
             [sink]\nkind = \"file\"\n[sink.file]\npath = {:?}\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("spool").display().to_string(),
            dir.path().join("out.jsonl").display().to_string(),
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
    let port = metrics_addr(&log, &mut child).port();
    let started = Instant::now();
    let body = loop {
        // Ready, a delivery was timed and a login snapshot finished (a histogram appears in the
        // scrape with its first sample; the snapshot's may come after the first delivery).
        if let Some((200, _)) = get(port, "/readyz")
            && let Some((200, body)) = get(port, "/metrics")
            && value(&body, "amibus_sink_send_seconds_count", "").unwrap_or(0.0) > 0.0
            && value(&body, "amibus_snapshot_duration_seconds_count", "").unwrap_or(0.0) > 0.0
        {
            break body;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never ready");
        std::thread::sleep(Duration::from_millis(50));
    };

    // The exposition format and Prometheus's naming rules (units, _total on counters, ...).
    let (ok, out) = promtool(&["check", "metrics"], body.as_bytes());
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics:\n{out}"
    );

    // Every dashboard query parses as PromQL ...
    let exprs = dashboard_queries();
    assert!(exprs.len() > 40, "{} queries", exprs.len());
    let rules = dir.path().join("dashboard-rules.yml");
    std::fs::write(&rules, rules_file(&exprs)).expect("rules");
    let (ok, out) = promtool(&["check", "rules", &rules.display().to_string()], b"");
    assert!(
        ok && out.contains(&format!("{} rules found", exprs.len())),
        "{out}"
    );
    // ... and the check would see a broken one.
    let broken = dir.path().join("broken-rules.yml");
    std::fs::write(
        &broken,
        rules_file(&["sum(rate(amibus_ami_frames_total[1m])".into()]),
    )
    .expect("rules");
    let (ok, out) = promtool(&["check", "rules", &broken.display().to_string()], b"");
    assert!(!ok, "promtool accepted an unbalanced query: {out}");

    // ... and names only metrics amibus exports. The control metrics are exported only by a
    // run with [control], the NATS connection's only by a run with a NATS sink (this one has a
    // file sink); every other one must be in this scrape under that exact name (a histogram by
    // its _bucket, _sum and _count series).
    let exported: std::collections::HashSet<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let mut named = std::collections::BTreeSet::new();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("amibus_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            named.insert(name);
        }
    }
    let unknown: Vec<&String> = named
        .iter()
        .filter(|n| !n.starts_with("amibus_control_") && !n.starts_with("amibus_nats_"))
        .filter(|n| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .filter(|b| body.contains(&format!("# TYPE {b} histogram")));
            !exported.contains(n.as_str()) && base.is_none()
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "dashboard queries name metrics the scrape does not have: {unknown:?}"
    );
    assert!(named.len() > 30, "{named:?}");
}
