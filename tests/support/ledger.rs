//! The consumer's ledger for end-to-end and fault tests against a real nats-server: the
//! simulator's servers, an `amibus run` configuration for them, a reader of the JetStream
//! stream that keeps every message it saw, and a view of it that accounts for each
//! (server, epoch, seq): delivered, named by a gap record, or missing.
//!
//! Include it with its two neighbours, under these names:
//! `#[path = "support/child.rs"] mod child;`, `#[path = "support/nats.rs"] mod nats_support;`,
//! `#[path = "support/ledger.rs"] mod ledger;`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use amibus::broker::nats::{NatsReader, StreamStart};
use amibus::model::pb::{self, Envelope, envelope::Detail};
use amibus::pipeline::decode_payload;
use amibus::sim::{SimConfig, SimHandle};
use amibus::spool::{Spool, SpoolConfig};
use async_nats::jetstream;

use super::child;
use super::nats_support::NatsServer;

pub const GUARD: Duration = Duration::from_secs(120);

/// The reason of a gap record naming records dropped by the spool's cap while in flight and
/// never confirmed: the broker may have stored them all the same.
pub const IN_DOUBT: &str = "spool full (in doubt)";

pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {GUARD:?}"))
}

/// The id amibus gives simulator server `i`.
/// How long a fault lasts: `default` in the suite, `AMIBUS_CHAOS_SECONDS` when `scripts/chaos`
/// runs the longer versions by hand.
pub fn fault_seconds(default: u64) -> Duration {
    Duration::from_secs(
        std::env::var("AMIBUS_CHAOS_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default),
    )
}

pub fn server_id(i: usize) -> String {
    format!("pbx{}", i + 1)
}

/// The simulator of the test `name`. Its secret is the test's own: an amibus of another test
/// still reconnecting to a port this simulator got after that test's simulator released it
/// fails its login here instead of reading this test's events (and is counted as
/// `auth_failed`, never as a login).
pub fn sim_config(name: &str, servers: usize, rate: u64, count: Option<u64>) -> SimConfig {
    SimConfig {
        secret: secret(name),
        servers,
        rate,
        count,
        seed: 7,
        concurrent_calls: 16,
        write_timeout: Duration::from_secs(2),
        auth_fail_delay: Duration::from_millis(10),
        ..SimConfig::default()
    }
}

pub fn secret(name: &str) -> String {
    format!("amp111-{name}")
}

/// An `amibus run` configuration: the simulator's servers → spool in `spool_dir` → JetStream
/// stream `stream` (created by the sink) on subjects `<prefix>.<server>.<event>`.
pub fn config_toml(
    sim: &SimHandle,
    spool_dir: &Path,
    nats: &NatsServer,
    name: &str,
    spool: &str,
) -> String {
    let mut toml = String::new();
    for (i, addr) in sim.addrs().iter().enumerate() {
        toml.push_str(&format!(
            "[[server]]\nid = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\nusername = \"admin\"\n\
             secret = \"{}\"\nbackoff_min = \"50ms\"\nbackoff_max = \"200ms\"\n\n",
            server_id(i),
            addr.port(),
            secret(name)
        ));
    }
    toml.push_str(&format!(
        "[spool]\ndir = {:?}\nfsync = \"never\"\n{spool}\n\n\
         [pipeline]\ndrain_timeout = \"20s\"\nmax_frame_bytes = \"16KiB\"\n\n\
         [sink]\nkind = \"nats\"\n[sink.nats]\nservers = [\"{}\"]\nsubject = \"{}.{{server}}.{{event}}\"\n\
         mode = \"jetstream\"\nack_timeout = \"2s\"\n[sink.nats.stream]\nname = \"{}\"\nstorage = \"file\"\n",
        spool_dir.display().to_string(),
        nats.url(),
        name.to_lowercase(),
        name.to_uppercase(),
    ));
    toml
}

/// One message as a consumer reads it.
#[derive(Clone, Debug)]
pub struct Got {
    pub env: Envelope,
    pub msg_id: String,
    pub stream_seq: u64,
}

/// The bus headers say what the envelope says, so a consumer that routes on headers alone
/// sees the same record: server, kind, epoch, seq and schema always; the event name of an
/// event; the snapshot id and the gap range exactly when the envelope has them.
pub fn headers_agree<'a>(
    header: impl Fn(&str) -> Option<&'a str>,
    env: &Envelope,
) -> Result<(), String> {
    let kind = amibus::model::json::kind_name(env.kind());
    let mut want: Vec<(&str, Option<String>)> = vec![
        ("server", Some(env.server.clone())),
        ("kind", Some(kind.to_owned())),
        ("epoch", Some(env.epoch.to_string())),
        ("seq", Some(env.seq.to_string())),
        ("schema", Some("amibus.v1".to_owned())),
        (
            "snapshot",
            (!env.snapshot_id.is_empty()).then(|| env.snapshot_id.clone()),
        ),
    ];
    if env.kind() == pb::Kind::Event {
        want.push(("event", Some(env.name.clone())));
    }
    let gap = match &env.detail {
        Some(Detail::Gap(g)) => Some(g),
        _ => None,
    };
    want.push(("gap_epoch", gap.map(|g| g.epoch.to_string())));
    want.push(("gap_first_seq", gap.map(|g| g.first_seq.to_string())));
    want.push(("gap_last_seq", gap.map(|g| g.last_seq.to_string())));
    for (name, value) in want {
        if header(name) != value.as_deref() {
            return Err(format!(
                "header {name} is {:?}, the envelope says {value:?}",
                header(name)
            ));
        }
    }
    Ok(())
}

/// Reads a stream from the start, a little more on each `catch_up` (a new ordered consumer each
/// time, so it works across broker restarts).
pub struct StreamReader {
    pub client: async_nats::Client,
    pub stream: String,
    pub next: u64,
    pub got: Vec<Got>,
}

impl StreamReader {
    pub async fn new(nats: &NatsServer, stream: &str) -> StreamReader {
        let client = within("connect the reader", async_nats::connect(nats.url()))
            .await
            .expect("connect");
        StreamReader {
            client,
            stream: stream.into(),
            next: 1,
            got: Vec::new(),
        }
    }

    /// Read everything the stream holds now; false if the stream does not exist (yet) or the
    /// broker is not answering.
    pub async fn catch_up(&mut self) -> bool {
        let js = jetstream::new(self.client.clone());
        let Ok(mut handle) = js.get_stream(&self.stream).await else {
            return false;
        };
        let Ok(info) = handle.info().await else {
            return false;
        };
        let last = info.state.last_sequence;
        if last < self.next {
            return true;
        }
        let Ok(mut source) = NatsReader::jetstream(
            &self.client,
            &self.stream,
            None,
            StreamStart::Sequence(self.next),
        )
        .await
        else {
            return false;
        };
        while self.next <= last {
            let m = within("read the stream", source.next())
                .await
                .expect("consumer open")
                .expect("message");
            let stream_seq = m.stream_sequence.expect("a JetStream message");
            let env = decode_payload(&m.payload)
                .unwrap_or_else(|e| panic!("stream seq {stream_seq}: not an envelope: {e}"));
            if let Err(e) = headers_agree(|name| m.header(name), &env) {
                panic!("stream seq {stream_seq}: {e}\n{:?}", m.headers);
            }
            self.got.push(Got {
                env,
                msg_id: m.header("Nats-Msg-Id").unwrap_or_default().to_owned(),
                stream_seq,
            });
            self.next = stream_seq + 1;
        }
        true
    }

    /// Read until `done` holds for what was read.
    pub async fn wait_for(&mut self, what: &str, done: impl Fn(&[Got]) -> bool) {
        let deadline = tokio::time::Instant::now() + GUARD;
        loop {
            if self.catch_up().await && done(&self.got) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{what}: not seen within {GUARD:?}; read so far: {}",
                    View::of(&self.got).summary()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What a consumer makes of the messages read.
#[derive(Debug, Default)]
pub struct View {
    /// (server, epoch) → the seqs of the records of that connection, in stream order.
    pub seqs: BTreeMap<(String, u64), Vec<u64>>,
    /// (server, lost epoch) → the ranges gap records name.
    pub gaps: BTreeMap<(String, u64), Vec<(u64, u64)>>,
    /// The ranges of `gaps` whose reason is `spool full (in doubt)`: dropped while in flight
    /// and never confirmed, so the broker may have them too.
    pub in_doubt_gaps: BTreeMap<(String, u64), Vec<(u64, u64)>>,
    /// Gap records read.
    pub gap_records: u64,
    /// Records read more than once, by (server, epoch, seq) or by message id for seq 0.
    pub duplicates: u64,
    /// Simulated events (FullyBooted, sent by the simulator at login, is not one, nor is a
    /// snapshot's list item), counted once.
    pub events: BTreeMap<String, u64>,
    /// Per (server, epoch), records of snapshots (begin, items, end): numbered in the epoch
    /// like every record, but not simulated events.
    pub snapshot_records: BTreeMap<(String, u64), u64>,
    /// The seq of each epoch's ConnectionDown.
    pub down: BTreeMap<(String, u64), u64>,
    /// The `reason` of every gap record read (`spool full`, `spool damaged`, ...).
    pub gap_reasons: BTreeSet<String>,
    /// (server, epoch, seq) of each parse_error record, with its reason.
    pub parse_errors: BTreeMap<(String, u64, u64), String>,
    /// Epochs closed by a later start (a seq-0 `connection_down`: the run that had them was
    /// killed), with the reason.
    pub closed_later: BTreeMap<(String, u64), String>,
    /// Per call (server, Linkedid), the seqs of its events in stream order.
    pub calls: HashMap<(String, String), Vec<u64>>,
}

impl View {
    pub fn of(got: &[Got]) -> View {
        let mut v = View::default();
        let mut seen = BTreeSet::new();
        let mut seen_ids = BTreeSet::new();
        for g in got {
            let e = &g.env;
            let first = if e.seq == 0 {
                seen_ids.insert(g.msg_id.clone())
            } else {
                seen.insert((e.server.clone(), e.epoch, e.seq))
            };
            if !first {
                v.duplicates += 1;
                continue;
            }
            if let Some(Detail::Gap(gap)) = &e.detail {
                v.gap_records += 1;
                v.gap_reasons.insert(gap.reason.clone());
                v.gaps
                    .entry((e.server.clone(), gap.epoch))
                    .or_default()
                    .push((gap.first_seq, gap.last_seq));
                if gap.reason == IN_DOUBT {
                    v.in_doubt_gaps
                        .entry((e.server.clone(), gap.epoch))
                        .or_default()
                        .push((gap.first_seq, gap.last_seq));
                }
            }
            if e.seq == 0 {
                if let Some(Detail::ConnectionDown(d)) = &e.detail {
                    v.closed_later
                        .insert((e.server.clone(), e.epoch), d.reason.clone());
                }
                continue;
            }
            v.seqs
                .entry((e.server.clone(), e.epoch))
                .or_default()
                .push(e.seq);
            if !e.snapshot_id.is_empty() {
                *v.snapshot_records
                    .entry((e.server.clone(), e.epoch))
                    .or_default() += 1;
                continue;
            }
            match e.kind() {
                pb::Kind::Event if e.name != "FullyBooted" => {
                    *v.events.entry(e.server.clone()).or_default() += 1;
                    if !e.linkedid.is_empty() {
                        v.calls
                            .entry((e.server.clone(), e.linkedid.clone()))
                            .or_default()
                            .push(e.seq);
                    }
                }
                pb::Kind::ConnectionDown => {
                    v.down.insert((e.server.clone(), e.epoch), e.seq);
                }
                pb::Kind::ParseError => {
                    let reason = match &e.detail {
                        Some(Detail::ParseError(p)) => p.reason.clone(),
                        _ => String::new(),
                    };
                    v.parse_errors
                        .insert((e.server.clone(), e.epoch, e.seq), reason);
                }
                _ => {}
            }
        }
        v
    }

    /// Records of snapshots delivered in epoch `key`.
    pub fn snapshot_records(&self, key: &(String, u64)) -> u64 {
        self.snapshot_records.get(key).copied().unwrap_or(0)
    }

    /// (server, epoch, seq) of every record delivered.
    pub fn delivered(&self) -> BTreeSet<(String, u64, u64)> {
        self.seqs
            .iter()
            .flat_map(|((s, e), seqs)| seqs.iter().map(move |q| (s.clone(), *e, *q)))
            .collect()
    }

    /// Every (server, epoch, seq) a gap record names, with how many name it.
    pub fn named(&self) -> BTreeMap<(String, u64, u64), u64> {
        let mut out = BTreeMap::new();
        for ((s, e), ranges) in &self.gaps {
            for &(first, last) in ranges {
                for q in first..=last {
                    *out.entry((s.clone(), *e, q)).or_default() += 1;
                }
            }
        }
        out
    }

    /// Every (server, epoch) seen, by its records or by a gap naming it.
    pub fn all_epochs(&self) -> BTreeSet<(String, u64)> {
        self.seqs.keys().chain(self.gaps.keys()).cloned().collect()
    }

    pub fn epochs(&self, server: &str) -> Vec<u64> {
        self.seqs
            .keys()
            .chain(self.gaps.keys())
            .filter(|(s, _)| s == server)
            .map(|(_, e)| *e)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Check that the delivered seqs of (server, epoch) and the gap ranges together are exactly
    /// 1..=N without overlap; returns N.
    pub fn cover(&self, key: &(String, u64)) -> Result<u64, String> {
        let delivered: BTreeSet<u64> = self.seqs.get(key).into_iter().flatten().copied().collect();
        let mut covered = delivered.clone();
        // Gaps in doubt may name records that arrived after all (or a range a delivered gap
        // record named): they go last and may overlap; every other gap names each seq alone.
        let mut doubtful = self.in_doubt_gaps.get(key).cloned().unwrap_or_default();
        let (mut strict, mut tolerant) = (Vec::new(), Vec::new());
        for &range in self.gaps.get(key).into_iter().flatten() {
            match doubtful.iter().position(|&d| d == range) {
                Some(i) => {
                    doubtful.swap_remove(i);
                    tolerant.push(range);
                }
                None => strict.push(range),
            }
        }
        for &(first, last) in strict.iter().chain(&tolerant) {
            if first == 0 || first > last {
                return Err(format!("{key:?}: bad gap range {first}..={last}"));
            }
        }
        for &(first, last) in &tolerant {
            covered.extend(first..=last);
        }
        let mut covered_strict = delivered.clone();
        for &(first, last) in &strict {
            for s in first..=last {
                covered.insert(s);
                if !covered_strict.insert(s) {
                    let what = if delivered.contains(&s) {
                        "delivered"
                    } else {
                        "named by another gap"
                    };
                    return Err(format!(
                        "{key:?}: seq {s} is in gap {first}..={last} and also {what}"
                    ));
                }
            }
        }
        let n = covered.last().copied().unwrap_or(0);
        if covered.len() as u64 != n {
            let missing: Vec<u64> = (1..=n).filter(|s| !covered.contains(s)).take(20).collect();
            return Err(format!(
                "{key:?}: {} of 1..={n} neither delivered nor in a gap, first: {missing:?}",
                n - covered.len() as u64
            ));
        }
        Ok(n)
    }

    /// One line per (server, epoch): seqs delivered, seqs named by gaps, the highest seq, and
    /// how the epoch ended. What `scripts/chaos` prints per scenario.
    pub fn ledger(&self) -> String {
        let keys: BTreeSet<&(String, u64)> = self
            .seqs
            .keys()
            .chain(self.gaps.keys())
            .chain(self.closed_later.keys())
            .collect();
        let mut out = String::from("server epoch: delivered + in gaps = 1..N, closed by\n");
        for key in keys {
            let delivered = self.seqs.get(key).map_or(0, Vec::len);
            let named: u64 = self
                .gaps
                .get(key)
                .into_iter()
                .flatten()
                .map(|(a, b)| b - a + 1)
                .sum();
            let n = match self.cover(key) {
                Ok(n) => n.to_string(),
                Err(e) => format!("NOT COVERED ({e})"),
            };
            let end = match (self.down.get(key), self.closed_later.get(key)) {
                (Some(seq), _) => format!("its connection_down (seq {seq})"),
                (None, Some(_)) => "the next start (the run was killed)".to_owned(),
                (None, None) => "nothing yet".to_owned(),
            };
            out.push_str(&format!(
                "  {} {}: {delivered} + {named} = {n}, {end}\n",
                key.0, key.1
            ));
        }
        out.push_str(&format!(
            "  gap records {}, duplicates {}\n",
            self.gap_records, self.duplicates
        ));
        out
    }

    pub fn summary(&self) -> String {
        let seqs: Vec<String> = self
            .seqs
            .iter()
            .map(|((s, e), v)| {
                format!(
                    "{s}/{e}: {} records, max seq {}",
                    v.len(),
                    v.iter().max().unwrap_or(&0)
                )
            })
            .collect();
        format!(
            "[{}]; events {:?}; gap records {} {:?}; duplicates {}; downs {:?}; closed later {:?}",
            seqs.join(", "),
            self.events,
            self.gap_records,
            self.gaps,
            self.duplicates,
            self.down,
            self.closed_later.keys().collect::<Vec<_>>()
        )
    }
}

pub fn sim_events(sim: &SimHandle) -> BTreeMap<String, u64> {
    sim.stats()
        .iter()
        .map(|s| (server_id(s.server), s.events))
        .collect()
}

/// Wait until the simulator has sent `more` events beyond what it had sent when called.
pub async fn wait_sent(sim: &SimHandle, more: u64, what: &str) {
    let before = total(&sim_events(sim));
    within(what, async {
        while total(&sim_events(sim)) < before + more {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

pub fn total(m: &BTreeMap<String, u64>) -> u64 {
    m.values().sum()
}

/// Pause the simulator's servers and wait until the stream stops growing (pacing only).
pub async fn quiesce(sim: &SimHandle, reader: &mut StreamReader, servers: usize) {
    for i in 0..servers {
        sim.set_unresponsive(i, true);
    }
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(reader.catch_up().await, "the broker is up");
        if reader.got.len() == last {
            return;
        }
        last = reader.got.len();
    }
}

pub fn resume(sim: &SimHandle, servers: usize) {
    for i in 0..servers {
        sim.set_unresponsive(i, false);
    }
}

/// Stop or restart the broker from async code (the harness waits synchronously).
pub fn broker(f: impl FnOnce()) {
    tokio::task::block_in_place(f);
}

/// `amibus run --config <file>` as a child, its log in `log`.
pub fn spawn_amibus(config: &Path, log: &Path) -> child::KillOnDrop {
    child::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_amibus"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("spawn amibus"),
    )
}

/// What the spool left by a killed amibus holds: (server, epoch, seq) of each record not yet
/// acknowledged, read the way the next start reads it.
pub fn pending_in_spool(dir: &Path) -> BTreeSet<(String, u64, u64)> {
    let (spool, recovery) = Spool::open(SpoolConfig::new(dir)).expect("open the spool");
    let mut reader = spool.reader();
    let mut out = BTreeSet::new();
    while let Some((_, r)) = reader.try_next().expect("read the spool") {
        let env = decode_payload(&r.payload).expect("envelope");
        out.insert((env.server, env.epoch, env.seq));
    }
    assert_eq!(out.len() as u64, recovery.pending);
    out
}
