//! Chaos for actions (issue #14): the real `amibus run` binary with `[control]` over JetStream
//! (a real nats-server) and over Kafka (a real tansu), the idempotency journal on (the
//! default), SIGKILLed at pseudo-random moments while a client sends hundreds of Originate,
//! Command and Ping requests, and restarted each time; the AMI simulator counts per request id
//! the actions that reached it (`Variable: amibus_request_id=<id>`, see `amibus::sim::tally`).
//!
//! # The promise checked
//! After a final clean start, once every request has an answer and the transport has settled
//! (every message acknowledged / every offset committed), and amibus stopped cleanly:
//! 1. every request id reached the simulator at most once;
//! 2. every request got at least one final answer (anything but a `retriable` rejection, after
//!    which the client sends the same request again, as the contract allows: nothing ran);
//! 3. an id answered more than once (its message redelivered after a kill, before or after
//!    its first result was published) got the same status every time, and at most one of its
//!    final answers is not marked `replayed` (the journal writes a result before it is
//!    published, so a redelivery is answered from it; the first answer after a restart for a
//!    request that was running is `outcome_unknown`, not replayed, and is itself journaled
//!    before it is published). `expired` is exempt from the "one not replayed" part: it is
//!    not journaled (nothing ran), so a redelivery computes it afresh;
//! 4. an id answered `success` or `error` reached the simulator exactly once; `timeout` or
//!    `outcome_unknown`, at most once; `expired` or `rejected`, never.
//!
//! Every rejection seen must be retriable (the requests are valid). Nothing asserted depends
//! on timing: sleeps only pace the client and the kills, waits are on answers, acknowledgements
//! and offsets, each with a generous guard.
//!
//! Longer runs by hand: `AMIBUS_CHAOS_REQUESTS` (default 400), `AMIBUS_CHAOS_KILLS` (default
//! 4) and `AMIBUS_CHAOS_SEED` (default 14; a failure prints its seed and reproduces with it,
//! up to the scheduling of the processes), e.g.
//! `AMIBUS_CHAOS_REQUESTS=5000 AMIBUS_CHAOS_KILLS=20 cargo test --test control_chaos -- --nocapture`.

#[path = "support/child.rs"]
mod child;
#[path = "support/kafka.rs"]
mod kafka_support;
#[path = "support/nats.rs"]
mod nats_support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amibus::model::pb::{ActionHeader, ActionRequest, ActionResult, ActionStatus};
use amibus::sim::{Sim, SimConfig, SimHandle};
use async_nats::jetstream;
use futures_util::StreamExt;
use prost::Message as _;
use rdkafka::Message as _;
use rdkafka::consumer::Consumer as _;
use tokio::sync::mpsc;

/// The guard on every wait.
const GUARD: Duration = Duration::from_secs(90);
const SERVER: &str = "pbx";

/// How big a run is; see the module docs.
#[derive(Clone, Copy, Debug)]
struct Knobs {
    seed: u64,
    requests: usize,
    kills: usize,
}

impl Knobs {
    fn from_env() -> Knobs {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> T {
            match std::env::var(name) {
                Ok(v) => v
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
                Err(_) => default,
            }
        }
        Knobs {
            seed: var("AMIBUS_CHAOS_SEED", 14),
            requests: var("AMIBUS_CHAOS_REQUESTS", 400),
            kills: var("AMIBUS_CHAOS_KILLS", 4),
        }
    }
}

/// A seeded sequence, so a failing run's kill schedule and request mix reproduce.
struct Rng(amibus::mix::SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `lo..hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo).max(1))
    }
}

fn header(key: &str, value: &str) -> ActionHeader {
    ActionHeader {
        key: key.into(),
        value: value.into(),
    }
}

/// Request `i` of the run: an async Originate (two in five), a Command that succeeds or fails
/// (`error`), or a Ping, each marked with its id for the simulator; generous deadline.
fn request(tag: &str, i: usize, rng: &mut Rng) -> ActionRequest {
    let id = format!("{tag}-{i}");
    let mark = header("Variable", &format!("amibus_request_id={id}"));
    let (action, headers) = match rng.next() % 10 {
        0..=3 => (
            "Originate",
            vec![
                header("Channel", "Local/100@default"),
                header("Context", "default"),
                header("Exten", "100"),
                header("Priority", "1"),
                header("Async", "true"),
                mark,
            ],
        ),
        4..=5 => (
            "Command",
            vec![header("Command", "core show version"), mark],
        ),
        6 => ("Command", vec![header("Command", "no such command"), mark]),
        _ => ("Ping", vec![mark]),
    };
    ActionRequest {
        request_id: id,
        server: SERVER.into(),
        action: action.into(),
        headers,
        deadline_ns: amibus::ami::record::now_ns() + 300_000_000_000,
        ..ActionRequest::default()
    }
}

fn status(r: &ActionResult) -> ActionStatus {
    ActionStatus::try_from(r.status).unwrap_or(ActionStatus::Unspecified)
}

/// A rejection after which the client may send the same request again (nothing ran).
fn retriable(r: &ActionResult) -> bool {
    status(r) == ActionStatus::Rejected && r.retriable
}

/// Every answer per request id, in arrival order.
#[derive(Clone, Default)]
struct Answers(Arc<Mutex<HashMap<String, Vec<ActionResult>>>>);

impl Answers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<ActionResult>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Record `r`; returns whether the client should send its request again.
    fn add(&self, r: ActionResult) -> bool {
        let again = retriable(&r);
        self.lock().entry(r.request_id.clone()).or_default().push(r);
        again
    }

    /// Ids among `ids` without a final answer yet.
    fn missing<'a>(&self, ids: impl Iterator<Item = &'a String>) -> Vec<String> {
        let got = self.lock();
        ids.filter(|id| {
            !got.get(*id)
                .is_some_and(|v| v.iter().any(|r| !retriable(r)))
        })
        .cloned()
        .collect()
    }
}

/// Where requests go (the JetStream context is large: boxed).
enum Bus {
    JetStream {
        js: Box<jetstream::Context>,
    },
    Kafka {
        producer: rdkafka::producer::FutureProducer,
    },
}

impl Bus {
    async fn send(&self, req: &ActionRequest) {
        let payload = req.encode_to_vec();
        match self {
            Bus::JetStream { js } => {
                let ack = js
                    .publish(format!("amibus.action.{SERVER}"), payload.into())
                    .await
                    .expect("publish");
                tokio::time::timeout(GUARD, ack)
                    .await
                    .expect("a PubAck in time")
                    .expect("PubAck");
            }
            Bus::Kafka { producer } => {
                producer
                    .send(
                        rdkafka::producer::FutureRecord::to("amibus.actions")
                            .key(SERVER)
                            .payload(&payload),
                        GUARD,
                    )
                    .await
                    .map_err(|(e, _)| e)
                    .expect("request produced");
            }
        }
    }
}

/// One `amibus run` after another on the same configuration (and so the same journal).
struct Amibus {
    config: PathBuf,
    dir: PathBuf,
    runs: usize,
    child: Option<child::KillOnDrop>,
}

impl Amibus {
    fn new(dir: &Path, text: &str) -> Amibus {
        let config = dir.join("amibus.toml");
        std::fs::write(&config, text).expect("write the config");
        Amibus {
            config,
            dir: dir.to_owned(),
            runs: 0,
            child: None,
        }
    }

    fn log_path(&self, run: usize) -> PathBuf {
        self.dir.join(format!("run{run}.log"))
    }

    fn spawn(&mut self) {
        self.runs += 1;
        let log = std::fs::File::create(self.log_path(self.runs)).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_amibus"))
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn amibus");
        self.child = Some(child::KillOnDrop(child));
    }

    /// SIGKILL the running amibus; it must still be running (not died by itself).
    fn kill(&mut self) {
        let mut child = self.child.take().expect("a running amibus");
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "amibus exited by itself ({status}) before its kill:\n{}",
                self.log(self.runs)
            );
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    /// SIGTERM and wait for a clean exit.
    async fn stop(&mut self) {
        let mut child = self.child.take().expect("a running amibus");
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(ok.success());
        let status = tokio::time::timeout(
            GUARD,
            tokio::task::spawn_blocking(move || child.wait().expect("wait")),
        )
        .await
        .expect("amibus exits after SIGTERM")
        .expect("join");
        assert!(status.success(), "{status}\n{}", self.log(self.runs));
    }

    fn log(&self, run: usize) -> String {
        std::fs::read_to_string(self.log_path(run)).unwrap_or_default()
    }

    /// The end of every run's log, for failure messages.
    fn logs(&self) -> String {
        (1..=self.runs)
            .map(|n| {
                let text = self.log(n);
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- run {n} (last lines) ---\n{}\n", tail.join("\n"))
            })
            .collect()
    }
}

fn config(dir: &Path, sim: &SimHandle, control: &str) -> String {
    format!(
        "[[server]]\nid = \"{SERVER}\"\nhost = \"127.0.0.1\"\nport = {}\nusername = \"admin\"\n\
         secret = \"amp111\"\nbackoff_min = \"10ms\"\nbackoff_max = \"100ms\"\n\
         allow_actions = [\"read-only\", \"Originate\", \"Command\"]\n\
         [spool]\ndir = \"{}\"\n[sink]\nkind = \"file\"\n[sink.file]\npath = \"{}\"\n\
         [control]\nrate = 0\ndefault_timeout = \"5s\"\nmax_timeout = \"5s\"\n{control}",
        sim.addrs()[0].port(),
        dir.join("spool").display(),
        dir.join("out.jsonl").display()
    )
}

/// Poll `ok` until it holds (every 50 ms, up to [`GUARD`]); `what` and `ctx()` on failure.
async fn wait_until(what: &str, mut ok: impl AsyncFnMut() -> bool, ctx: impl Fn() -> String) {
    let done = tokio::time::timeout(GUARD, async {
        while !ok().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(done.is_ok(), "timed out waiting until {what}\n{}", ctx());
}

/// What one chaos run saw, for the assertions and the report.
struct Outcome {
    requests: Vec<ActionRequest>,
    answers: HashMap<String, Vec<ActionResult>>,
    seen: amibus::sim::ActionsSeen,
    kills: usize,
    resent: usize,
    logs: String,
}

/// The transport's side of a run.
struct Transport<R, S> {
    bus: Bus,
    /// The results seen so far, filled by a collector task.
    answers: Answers,
    /// Ids the collector saw rejected retriably: the client sends them again.
    retries: mpsc::UnboundedReceiver<String>,
    /// amibus is ready for requests (polled after its first start).
    ready: R,
    /// Every request message is acknowledged or committed (polled at the end).
    settled: S,
}

/// The client, the kills and the restarts; returns once every request has a final answer,
/// the transport has settled and amibus stopped cleanly. The caller reads the last answers.
async fn chaos(
    name: &str,
    knobs: Knobs,
    sim: &SimHandle,
    amibus: &mut Amibus,
    t: Transport<impl AsyncFnMut() -> bool, impl AsyncFnMut() -> bool>,
) -> Outcome {
    let Transport {
        bus,
        answers,
        mut retries,
        ready,
        settled,
    } = t;
    eprintln!("{name}: {knobs:?}");
    // The seed is the generator's state, as when the default seed was chosen. (With the
    // sequence of `SplitMix64::new(14)`, three kills land within one session timeout, and tansu
    // never rebalances the group once the dead members expire: the last run sits on 0
    // partitions. Real Kafka does rebalance; that is tansu's limit, not what this test is for.)
    let mut rng = Rng(amibus::mix::SplitMix64::from_state(knobs.seed));
    let requests: Vec<ActionRequest> = (0..knobs.requests)
        .map(|i| request(&format!("{name}-{}", knobs.seed), i, &mut rng))
        .collect();
    let by_id: HashMap<String, ActionRequest> = requests
        .iter()
        .map(|r| (r.request_id.clone(), r.clone()))
        .collect();
    let bus = Arc::new(bus);
    amibus.spawn();
    wait_until("amibus is ready for requests", ready, || amibus.logs()).await;
    // The client: bursts of requests sent at once (so a kill finds several in flight), at a
    // steady average pace; each retriable rejection is sent again as it comes.
    let burst = 32;
    let pace = Duration::from_millis(25);
    let client = {
        let bus = bus.clone();
        let requests = requests.clone();
        tokio::spawn(async move {
            for chunk in requests.chunks(burst) {
                futures_util::future::join_all(chunk.iter().map(|r| bus.send(r))).await;
                tokio::time::sleep(pace * burst as u32).await;
            }
        })
    };
    let resent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let resender = {
        let bus = bus.clone();
        let resent = resent.clone();
        tokio::spawn(async move {
            while let Some(id) = retries.recv().await {
                if let Some(r) = by_id.get(&id) {
                    resent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    bus.send(r).await;
                }
            }
        })
    };
    // The kills: each after a seeded while up, at the next sign of work (an action reaching
    // the simulator, or a second without one) plus a seeded fraction of a burst's run time
    // (a few milliseconds), so that most land among requests in flight; then a seeded while
    // down.
    let span = pace.as_millis() as u64 * knobs.requests as u64;
    let up_max = (span / knobs.kills.max(1) as u64).max(400);
    let reached = || -> u64 { sim.actions_seen().by_id.values().sum() };
    for _ in 0..knobs.kills {
        tokio::time::sleep(rng.millis(200, up_max)).await;
        let before = reached();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while reached() == before {
                tokio::task::yield_now().await;
            }
        })
        .await;
        std::thread::sleep(Duration::from_micros(rng.next() % 4000));
        amibus.kill();
        tokio::time::sleep(rng.millis(0, 500)).await;
        amibus.spawn();
    }
    // The final run stays up until everything is answered and settled.
    tokio::time::timeout(GUARD, client)
        .await
        .expect("the client publishes everything in time")
        .expect("client");
    let ids: Vec<String> = requests.iter().map(|r| r.request_id.clone()).collect();
    wait_until(
        "every request has a final answer",
        async || answers.missing(ids.iter()).is_empty(),
        || {
            let missing = answers.missing(ids.iter());
            format!(
                "{} missing, e.g. {:?}\n{}",
                missing.len(),
                &missing[..missing.len().min(5)],
                amibus.logs()
            )
        },
    )
    .await;
    wait_until("the transport has settled", settled, || amibus.logs()).await;
    amibus.stop().await;
    resender.abort();
    Outcome {
        requests,
        answers: HashMap::new(),
        seen: sim.actions_seen(),
        kills: knobs.kills,
        resent: resent.load(std::sync::atomic::Ordering::Relaxed),
        logs: amibus.logs(),
    }
}

/// The promise of the module docs; prints what was seen.
fn check(name: &str, o: &Outcome) {
    let ctx = || o.logs.clone();
    assert_eq!(o.seen.untracked, 0);
    let mut finals: BTreeMap<&'static str, usize> = BTreeMap::new();
    let (mut replayed, mut repeated, mut rejections) = (0, 0, 0);
    for r in &o.requests {
        let id = &r.request_id;
        let all = o.answers.get(id).map(Vec::as_slice).unwrap_or_default();
        let reached = o.seen.by_id.get(id).copied().unwrap_or(0);
        assert!(
            reached <= 1,
            "{id} reached the simulator {reached} times\n{}",
            ctx()
        );
        for a in all.iter().filter(|a| status(a) == ActionStatus::Rejected) {
            assert!(
                a.retriable,
                "{id}: a rejection that is not retriable: {a:?}"
            );
            rejections += 1;
        }
        let fin: Vec<&ActionResult> = all.iter().filter(|a| !retriable(a)).collect();
        let first = fin
            .first()
            .unwrap_or_else(|| panic!("{id}: no final answer: {all:?}"));
        let st = status(first);
        assert!(
            fin.iter().all(|a| status(a) == st),
            "{id}: answers differ: {fin:?}"
        );
        let fresh = fin.iter().filter(|a| !a.replayed).count();
        assert!(
            fresh <= 1 || st == ActionStatus::Expired,
            "{id}: {fresh} answers not marked replayed: {fin:?}"
        );
        replayed += fin.iter().filter(|a| a.replayed).count();
        repeated += usize::from(fin.len() > 1);
        let want: &[u64] = match st {
            ActionStatus::Success | ActionStatus::Error => &[1],
            ActionStatus::Timeout | ActionStatus::OutcomeUnknown => &[0, 1],
            _ => &[0],
        };
        assert!(
            want.contains(&reached),
            "{id}: answered {st:?} but reached the simulator {reached} times: {fin:?}\n{}",
            ctx()
        );
        *finals.entry(st.as_str_name()).or_default() += 1;
    }
    let ours: std::collections::HashSet<&String> =
        o.requests.iter().map(|r| &r.request_id).collect();
    for id in o.seen.by_id.keys() {
        assert!(ours.contains(id), "the simulator saw an unknown id {id}");
    }
    eprintln!(
        "{name}: {} requests, {} kills; final outcomes {finals:?}; {} reached the simulator; \
         {rejections} retriable rejections ({} requests sent again); {repeated} ids answered \
         more than once; {replayed} answers marked replayed",
        o.requests.len(),
        o.kills,
        o.seen.by_id.len(),
        o.resent
    );
}

fn sim_config() -> SimConfig {
    SimConfig {
        rate: 100,
        concurrent_calls: 2,
        ..SimConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_amibus_over_jetstream_runs_each_request_at_most_once_and_answers_all() {
    let knobs = Knobs::from_env();
    let nats = nats_support::NatsServer::start();
    let sim = Sim::start(sim_config()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let control = format!(
        "nats_servers = [\"{}\"]\n[control.jetstream]\nstream = \"CHAOS\"\ndurable = \"chaos\"\n\
         ack_wait = \"8s\"\n",
        nats.url()
    );
    let mut amibus = Amibus::new(dir.path(), &config(dir.path(), &sim, &control));
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    let answers = Answers::default();
    let (retry_tx, retries) = mpsc::unbounded_channel();
    let mut results = client
        .subscribe("amibus.result.>")
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    let collector = {
        let answers = answers.clone();
        tokio::spawn(async move {
            while let Some(m) = results.next().await {
                let r = ActionResult::decode(m.payload).expect("an ActionResult");
                let id = r.request_id.clone();
                if answers.add(r) {
                    let _ = retry_tx.send(id);
                }
            }
        })
    };
    let settled = async || {
        let Ok(stream) = js.get_stream("CHAOS").await else {
            return false;
        };
        let Ok(mut consumer) = stream
            .get_consumer::<jetstream::consumer::pull::Config>("chaos")
            .await
        else {
            return false;
        };
        consumer
            .info()
            .await
            .is_ok_and(|i| i.num_ack_pending == 0 && i.num_pending == 0)
    };
    let transport = Transport {
        bus: Bus::JetStream {
            js: Box::new(js.clone()),
        },
        answers: answers.clone(),
        retries,
        // amibus creates the stream at its first start.
        ready: async || js.get_stream("CHAOS").await.is_ok(),
        settled,
    };
    let outcome = chaos("js", knobs, &sim, &mut amibus, transport).await;
    // Results published before the acknowledgements are in: one round trip brings the rest.
    client.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(200)).await;
    collector.abort();
    let outcome = Outcome {
        answers: answers.lock().clone(),
        ..outcome
    };
    check("jetstream", &outcome);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_amibus_over_kafka_runs_each_request_at_most_once_and_answers_all() {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, StreamConsumer};
    use rdkafka::{Offset, TopicPartitionList};

    let knobs = Knobs::from_env();
    let broker = kafka_support::Broker::start().await;
    broker.create_topic("amibus.actions", 2).await;
    broker.create_topic("amibus.results", 1).await;
    let sim = Sim::start(sim_config()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    // `earliest`: the topic is new, and requests may be produced before the group has joined.
    // A short session timeout: a restart after a kill waits that long for the partitions the
    // killed member held (45 s by default).
    let control = format!(
        "transport = \"kafka\"\n[control.kafka]\nbrokers = \"{}\"\ngroup = \"chaos\"\n\
         start = \"earliest\"\nsession_timeout = \"6s\"\n",
        broker.bootstrap()
    );
    let mut amibus = Amibus::new(dir.path(), &config(dir.path(), &sim, &control));
    let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("acks", "all")
        .set("message.timeout.ms", "90000")
        .create()
        .expect("producer");
    // Results read by offset from the start of their one partition, so the end is known.
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", "chaos-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("amibus.results", 0, Offset::Beginning)
        .expect("partition");
    reader.assign(&tpl).expect("assign");
    let reader = Arc::new(reader);
    let answers = Answers::default();
    let read_upto = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let (retry_tx, retries) = mpsc::unbounded_channel();
    let collector = {
        let answers = answers.clone();
        let reader = reader.clone();
        let read_upto = read_upto.clone();
        tokio::spawn(async move {
            loop {
                let m = reader.recv().await.expect("a result record");
                let r =
                    ActionResult::decode(m.payload().unwrap_or_default()).expect("an ActionResult");
                assert_eq!(
                    m.key(),
                    Some(r.request_id.as_bytes()),
                    "keyed by request id"
                );
                let id = r.request_id.clone();
                if answers.add(r) {
                    let _ = retry_tx.send(id);
                }
                read_upto.store(m.offset() + 1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    // The group's committed offsets, read without joining it.
    let group: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", "chaos")
        .create()
        .expect("offsets reader");
    let group = Arc::new(group);
    let settled = async || {
        let group = group.clone();
        tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for p in 0..2 {
                tpl.add_partition("amibus.actions", p);
            }
            let Ok(committed) = group.committed_offsets(tpl, Duration::from_secs(5)) else {
                return false;
            };
            committed.elements().iter().all(|e| {
                let Ok((_, high)) =
                    group.fetch_watermarks("amibus.actions", e.partition(), Duration::from_secs(5))
                else {
                    return false;
                };
                high == 0 || e.offset() == Offset::Offset(high)
            })
        })
        .await
        .unwrap_or(false)
    };
    let transport = Transport {
        bus: Bus::Kafka { producer },
        answers: answers.clone(),
        retries,
        ready: async || true,
        settled,
    };
    let outcome = chaos("kafka", knobs, &sim, &mut amibus, transport).await;
    // Read the result topic to its end: nothing more is published after the clean stop.
    let (_, end) = reader
        .fetch_watermarks("amibus.results", 0, Duration::from_secs(10))
        .expect("watermarks");
    wait_until(
        "every result is read",
        async || read_upto.load(std::sync::atomic::Ordering::SeqCst) >= end,
        String::new,
    )
    .await;
    collector.abort();
    let outcome = Outcome {
        answers: answers.lock().clone(),
        ..outcome
    };
    check("kafka", &outcome);
    sim.shutdown().await;
}
