//! What consumers in other languages read: the file sink's protobuf output and single bus
//! messages, decoded by Python code generated from `proto/amibus/v1`, and loaded into the
//! embedded ClickHouse (chdb) with the README's SQL.
//!
//! Needs `python3` with `grpcio-tools`, `protobuf` and `chdb` (scripts/test installs them) and
//! the `tansu` broker (as tests/e2e_kafka.rs).

#[path = "support/kafka.rs"]
mod kafka_support;
#[path = "support/live_state.rs"]
mod live_state;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use amibus::broker::kafka::{KafkaReader, KafkaReaderConfig};
use amibus::pipeline::decode_payload;
use kafka_support::Broker;
use live_state::LiveState;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const AMIBUS: &str = env!("CARGO_BIN_EXE_amibus");

fn python(args: &[&std::ffi::OsStr]) -> Output {
    Command::new("python3")
        .args(args)
        .output()
        .expect("python3 runs (scripts/test installs what these tests need)")
}

fn ok(what: &str, out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stderr.into_owned()
}

/// `python3 -m grpc_tools.protoc` over the contract, as the README says; the generated package
/// is `amibus.v1`.
fn generate_python(dir: &Path) -> PathBuf {
    let gen_dir = dir.join("gen");
    std::fs::create_dir_all(&gen_dir).expect("gen dir");
    let proto = Path::new(ROOT).join("proto");
    let out = python(&[
        "-m".as_ref(),
        "grpc_tools.protoc".as_ref(),
        format!("-I{}", proto.display()).as_ref(),
        format!("--python_out={}", gen_dir.display()).as_ref(),
        proto.join("amibus/v1/envelope.proto").as_os_str(),
    ]);
    ok("grpc_tools.protoc", &out);
    gen_dir
}

/// Run `amibus run` on an embedded simulator (2 servers, `count` events each, stopping when
/// all are delivered) with `sink`; returns the number of records it says it delivered.
fn run_amibus(dir: &Path, name: &str, sink: &str, count: u64) -> u64 {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[sim]\nservers = 2\nrate = 0\ncount = {count}\nexit_when_done = true\n\
             [spool]\ndir = {:?}\n[pipeline]\nformat = \"proto\"\n{sink}",
            dir.join(format!("spool-{name}")).display().to_string()
        ),
    )
    .expect("config");
    let out = Command::new(AMIBUS)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("amibus runs");
    let stderr = ok("amibus run", &out);
    // "amibus: 606 records (600 events from 2 servers) stored, 606 delivered, ..."
    let summary = stderr
        .lines()
        .find(|l| l.starts_with("amibus: "))
        .unwrap_or_else(|| panic!("no summary line:\n{stderr}"));
    let delivered: u64 = summary
        .split(", ")
        .find_map(|p| p.strip_suffix(" delivered"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no delivered count in {summary:?}"));
    assert!(
        summary.contains(" 0 dropped by the spool, 0 left in the spool"),
        "{summary}"
    );
    delivered
}

/// (server, epoch, seq) of every envelope of a length-delimited file, decoded by amibus itself.
fn delimited_ids(path: &Path) -> Vec<(String, u64, u64)> {
    let (envelopes, whole) = delimited(path);
    assert!(whole, "a record runs past the end of the file");
    envelopes
        .into_iter()
        .map(|env| (env.server, env.epoch, env.seq))
        .collect()
}

/// Run the Python example with the generated code in `gen_dir` and `args`; its output.
fn python_example(gen_dir: &Path, args: &[&std::ffi::OsStr]) -> Output {
    let script = Path::new(ROOT).join("examples/python/amibus_consumer.py");
    let mut all: Vec<&std::ffi::OsStr> =
        vec![script.as_os_str(), "--gen".as_ref(), gen_dir.as_os_str()];
    all.extend_from_slice(args);
    python(&all)
}

#[test]
fn python_reads_the_file_sink_with_generated_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gen_dir = generate_python(dir.path());
    let events = dir.path().join("events.bin");
    let delivered = run_amibus(
        dir.path(),
        "file",
        &format!(
            "[sink]\nkind = \"file\"\n[sink.file]\npath = {:?}\n",
            events.display().to_string()
        ),
        200,
    );
    let ids = delimited_ids(&events);
    assert_eq!(
        ids.len() as u64,
        delivered,
        "one delimited envelope per record"
    );

    let out = python_example(&gen_dir, &["file".as_ref(), events.as_os_str()]);
    let stderr = ok("examples/python/amibus_consumer.py", &out);
    // connection_up, event, connection_down, and the login snapshot's begin and end.
    assert!(
        stderr.contains(&format!(
            "amibus_consumer: {delivered} envelopes, 5 kinds, 0 holes"
        )),
        "{stderr}"
    );
    // Python's proto3 JSON of each envelope: 64-bit integers as strings, the same records in
    // the same order as amibus decodes them.
    let from_python: Vec<(String, u64, u64)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            let int = |k: &str| -> u64 {
                v[k].as_str()
                    .unwrap_or_else(|| panic!("{k} is a string in proto3 JSON: {l}"))
                    .parse()
                    .expect("a number")
            };
            (
                v["server"].as_str().expect("server").to_owned(),
                int("epoch"),
                int("seq"),
            )
        })
        .collect();
    assert_eq!(from_python, ids);
    let servers: BTreeSet<&str> = ids.iter().map(|(s, _, _)| s.as_str()).collect();
    assert_eq!(servers.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_runs_the_readme_sql_on_the_file_sink_and_on_bus_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gen_dir = generate_python(dir.path());

    // The file sink's output.
    let events = dir.path().join("events.bin");
    let path = events.display().to_string();
    tokio::task::spawn_blocking({
        let d = dir.path().to_owned();
        move || {
            run_amibus(
                &d,
                "file",
                &format!("[sink]\nkind = \"file\"\n[sink.file]\npath = {path:?}\n"),
                300,
            )
        }
    })
    .await
    .expect("amibus run");

    // A recording with the header shapes a warehouse must keep: a line without a colon
    // (NULL value) and legacy keys with their modern name.
    let recording = dir.path().join("quirks.ami");
    std::fs::write(
        &recording,
        "Asterisk Call Manager/2.10.6\r\nEvent: UserEvent\r\nPrivilege: user,all\r\n\
         UserEvent: Note\r\nA line without a colon\r\nUniqueid: 1.1\r\nLinkedid: 1.1\r\n\r\n\
         Event: Dial\r\nPrivilege: call,all\r\nSubEvent: Begin\r\nChannel: SIP/1-0001\r\n\
         Destination: SIP/2-0002\r\nUniqueID: 1.1\r\n\r\n",
    )
    .expect("recording");
    let out = Command::new(AMIBUS)
        .args(["decode", "--format", "proto"])
        .arg(&recording)
        .output()
        .expect("amibus decode");
    ok("amibus decode", &out);
    let quirks = dir.path().join("quirks.bin");
    std::fs::write(&quirks, &out.stdout).expect("quirks.bin");

    // Single messages as a Kafka consumer reads them.
    let broker = Broker::start().await;
    let sink = format!(
        "[sink]\nkind = \"kafka\"\n[sink.kafka]\nbrokers = \"{}\"\ntopic = \"ami.events\"\n\
         message_timeout = \"60s\"\n[sink.kafka.create_topics]\npartitions = 2\n",
        broker.bootstrap()
    );
    let delivered = tokio::task::spawn_blocking({
        let d = dir.path().to_owned();
        move || run_amibus(&d, "kafka", &sink, 40)
    })
    .await
    .expect("amibus run");
    let messages = dir.path().join("messages");
    std::fs::create_dir_all(&messages).expect("messages dir");
    let mut cfg = KafkaReaderConfig::new(broker.bootstrap(), "warehouse-test");
    cfg.topics = vec!["ami.events".into()];
    let source = KafkaReader::new(&cfg).expect("consumer");
    let started = Instant::now();
    let mut read = 0;
    while read < delivered {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "read {read} of {delivered} messages; broker log:\n{}",
            broker.log()
        );
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(5), source.recv()).await else {
            continue;
        };
        std::fs::write(messages.join(format!("{read:06}.bin")), &m.payload[..])
            .expect("message file");
        read += 1;
    }

    let out = python(&[
        Path::new(ROOT)
            .join("tests/consumers/warehouse.py")
            .as_os_str(),
        "--readme".as_ref(),
        Path::new(ROOT).join("README.md").as_os_str(),
        "--proto".as_ref(),
        Path::new(ROOT).join("proto").as_os_str(),
        "--gen".as_ref(),
        gen_dir.as_os_str(),
        "--events".as_ref(),
        events.as_os_str(),
        "--quirks".as_ref(),
        quirks.as_os_str(),
        "--messages".as_ref(),
        messages.as_os_str(),
    ]);
    println!("{}", String::from_utf8_lossy(&out.stdout));
    ok("tests/consumers/warehouse.py", &out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("warehouse: all checks passed"));
}

/// Every envelope of a length-delimited file, in order, and whether the file ends on a record
/// boundary (not while one is still being written).
fn delimited(path: &Path) -> (Vec<amibus::model::pb::Envelope>, bool) {
    let bytes = std::fs::read(path).unwrap_or_default();
    let mut buf = &bytes[..];
    let mut out = Vec::new();
    while !buf.is_empty() {
        let Ok(len) = prost::encoding::decode_varint(&mut buf) else {
            return (out, false);
        };
        let len = len as usize;
        if len > buf.len() {
            return (out, false);
        }
        out.push(decode_payload(&buf[..len]).expect("an envelope"));
        buf = &buf[len..];
    }
    (out, true)
}

/// A simulated event, as the simulator counts them (not its login's FullyBooted, not a
/// snapshot's list item).
fn is_sim_event(e: &amibus::model::pb::Envelope) -> bool {
    e.kind() == amibus::model::pb::Kind::Event
        && e.snapshot_id.is_empty()
        && e.name != "FullyBooted"
}

/// A consumer that starts reading at a restart rebuilds the state from amibus's login snapshot:
/// the Python example, given only the second run's output, ends with the state that every live
/// event of both runs gives. The simulator (in process, so its calls outlive the first run)
/// pauses generating before each stop and amibus reads all it sent before it logs off, so no
/// event is missed between the runs and the replay of both is the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_rebuilds_state_from_the_snapshot_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gen_dir = generate_python(dir.path());
    let sim = amibus::sim::Sim::start(amibus::sim::SimConfig {
        servers: 1,
        rate: 400,
        concurrent_calls: 30,
        ..amibus::sim::SimConfig::default()
    })
    .await
    .expect("sim");
    let port = sim.addrs()[0].port();
    let sent = || sim.stats().iter().map(|s| s.events).sum::<u64>();
    let mut files = Vec::new();
    for run in 1..=2 {
        let out = dir.path().join(format!("run{run}.bin"));
        let config = dir.path().join(format!("run{run}.toml"));
        std::fs::write(
            &config,
            format!(
                "[[server]]\nid = \"pbx1\"\nhost = \"127.0.0.1\"\nport = {port}\nusername = \"admin\"\n\
                 secret = \"amp111\"\n[spool]\ndir = {:?}\n[pipeline]\nformat = \"proto\"\n\
                 [sink]\nkind = \"file\"\n[sink.file]\npath = {:?}\n",
                dir.path().join(format!("spool{run}")).display().to_string(),
                out.display().to_string()
            ),
        )
        .expect("config");
        sim.set_paused(0, false);
        let mut child = Command::new(AMIBUS)
            .args(["run", "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("amibus run");
        let started = Instant::now();
        let in_file = |files: &[PathBuf], out: &Path| {
            files
                .iter()
                .map(PathBuf::as_path)
                .chain([out])
                .flat_map(|f| delimited(f).0)
                .filter(is_sim_event)
                .count() as u64
        };
        // Events flow, and calls are up; then the simulator pauses and amibus reads the rest.
        while in_file(&[], &out) < 600 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "run {run}: no events"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sim.set_paused(0, true);
        while in_file(&files, &out) < sent() {
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "run {run}: {} of {} events in the files",
                in_file(&files, &out),
                sent()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        let status = child.wait().expect("amibus exits");
        assert!(status.success(), "run {run}: {status}");
        assert_eq!(
            in_file(&files, &out),
            sent(),
            "run {run}: every event written"
        );
        files.push(out);
    }
    sim.shutdown().await;

    let mut truth = LiveState::default();
    for f in &files {
        for e in delimited(f).0 {
            truth.apply(&e, false);
        }
    }
    let second = delimited(&files[1]).0;
    let first_channels: BTreeSet<String> = delimited(&files[0])
        .0
        .iter()
        .filter(|e| e.name == "Newchannel")
        .map(|e| e.channel.clone())
        .collect();
    assert!(
        truth.channels.iter().any(|c| first_channels.contains(c)),
        "a call up at the end began in the first run: only the snapshot tells the second run's reader"
    );
    assert!(
        second
            .iter()
            .any(|e| e.name == "CoreShowChannel" && !e.snapshot_id.is_empty()),
        "the second run's login snapshot lists the calls up"
    );

    let state = dir.path().join("state.json");
    let out = python_example(
        &gen_dir,
        &[
            "--state".as_ref(),
            state.as_os_str(),
            "file".as_ref(),
            files[1].as_os_str(),
        ],
    );
    ok("examples/python/amibus_consumer.py --state", &out);
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).expect("state file")).expect("JSON");
    let want = serde_json::json!({ "pbx1": truth });
    assert_eq!(got, want);
}
