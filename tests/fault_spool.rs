//! Fault injection on the spool, end to end: the AMI simulator → `amibus run` (the real
//! binary) → a real nats-server, with spool segments damaged on disk between two runs.
//!
//! Checked from a consumer's view of the stream: every (server, epoch, seq) is delivered
//! exactly once or named by exactly one gap record, the gap records name exactly the damaged
//! records (reason `spool damaged`), and delivery goes on past the damage. Sleeps only pace
//! the test; waits are on what the stream shows, with a generous guard; nothing is timed.
//!
//! The consumer's side (a stream reader and what it makes of the stream) is
//! `tests/support/ledger.rs`, shared with the other end-to-end and fault tests.

#[path = "support/child.rs"]
mod child;
#[path = "support/ledger.rs"]
mod ledger;
#[path = "support/nats.rs"]
mod nats_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use amibus::pipeline::decode_payload;
use amibus::sim::Sim;
use amibus::spool::segment::{self, SegmentReader};
use ledger::*;
use nats_support::NatsServer;

const NAME: &str = "FAULT1";

/// (server, epoch, seq): one record of one connection, for good.
type Key = (String, u64, u64);

/// An `amibus run` configuration with a spool of small segments.
fn config(
    sim: &amibus::sim::SimHandle,
    spool_dir: &Path,
    nats: &NatsServer,
    drain: &str,
) -> String {
    config_toml(sim, spool_dir, nats, NAME, "segment_bytes = \"8KiB\"").replace(
        "drain_timeout = \"20s\"",
        &format!("drain_timeout = \"{drain}\""),
    )
}

/// SIGTERM, and wait for a clean exit; the run's log.
async fn stop_gracefully(mut run: child::KillOnDrop, log: &Path) -> String {
    let term = Command::new("kill")
        .arg("-TERM")
        .arg(run.id().to_string())
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    let status = within(
        "amibus stops",
        tokio::task::spawn_blocking(move || {
            let status = run.wait();
            (run, status)
        }),
    )
    .await
    .expect("join")
    .1
    .expect("wait");
    let log = std::fs::read_to_string(log).unwrap_or_default();
    assert!(status.success(), "amibus: {status}\n{log}");
    log
}

/// One record in a segment file: where it is, and whose it is.
#[derive(Clone, Debug)]
struct OnDisk {
    offset: u64,
    len: u64,
    id: u64,
    key: Key,
}

/// Every segment of the spool in `dir`, oldest first, with its records.
fn read_spool(dir: &Path) -> Vec<(PathBuf, Vec<OnDisk>)> {
    segment::list(dir)
        .expect("spool dir")
        .into_iter()
        .map(|(_, path)| {
            let mut reader = SegmentReader::open(&path).expect("open a segment");
            let mut records = Vec::new();
            loop {
                let offset = reader.offset();
                match reader.read_next() {
                    Ok(Some((id, r))) => {
                        let env = decode_payload(&r.payload).expect("envelope");
                        records.push(OnDisk {
                            offset,
                            len: reader.offset() - offset,
                            id,
                            key: (env.server, env.epoch, env.seq),
                        });
                    }
                    Ok(None) => break,
                    Err(e) => panic!("{}: {e:?} before any damage", path.display()),
                }
            }
            (path, records)
        })
        .collect()
}

/// A spool of many small segments is filled while the broker is down and amibus stops
/// gracefully with it full. Between the runs, a byte is flipped in a record of one middle
/// segment and another middle segment is cut short inside a record. The next run delivers
/// everything else, names exactly the damaged records in `spool damaged` gap records, and goes
/// on delivering; the accounting of every epoch is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_spool_is_skipped_and_exactly_its_damage_is_reported() {
    let mut nats = NatsServer::start();
    let sim = Sim::start(sim_config(NAME, 2, 400, None))
        .await
        .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let spool_dir = dir.path().join("spool");
    let cfg_path = dir.path().join("amibus.toml");
    let (log1, log2) = (dir.path().join("run1.log"), dir.path().join("run2.log"));
    std::fs::write(&cfg_path, config(&sim, &spool_dir, &nats, "1s")).expect("config");
    let mut reader = StreamReader::new(&nats, NAME).await;

    // Run 1: records flow, then the broker goes away (while the simulator pauses and the sink
    // has caught up, so that no record is in doubt) and the spool fills.
    let first = spawn_amibus(&cfg_path, &log1);
    reader
        .wait_for("events from every server", |got| {
            View::of(got).events.values().filter(|&&n| n > 20).count() == 2
        })
        .await;
    quiesce(&sim, &mut reader, 2).await;
    broker(|| nats.stop());
    resume(&sim, 2);
    wait_sent(&sim, 1500, "the simulator fills the spool").await;
    let run1 = stop_gracefully(first, &log1).await;
    assert!(!run1.contains(", 0 left in the spool"), "{run1}");

    // The damage, on the spool as run 1 left it.
    let floor: u64 = std::fs::read_to_string(spool_dir.join("ack"))
        .expect("ack file")
        .trim()
        .parse()
        .expect("the floor");
    let segments = read_spool(&spool_dir);
    let pending: BTreeSet<Key> = segments
        .iter()
        .flat_map(|(_, r)| r.iter().filter(|r| r.id >= floor).map(|r| r.key.clone()))
        .collect();
    let n = segments.len();
    assert!(n >= 8, "{n} segments");
    let (flip_path, flip_records) = &segments[n / 3];
    let (cut_path, cut_records) = &segments[2 * n / 3];
    assert!(flip_records.len() >= 3 && cut_records.len() >= 4);
    assert!(
        flip_records[0].id >= floor,
        "damage where records are pending"
    );
    let flipped = &flip_records[1];
    let mut bytes = std::fs::read(flip_path).expect("read");
    bytes[(flipped.offset + flipped.len / 2) as usize] ^= 0x10;
    std::fs::write(flip_path, &bytes).expect("write");
    let cut = &cut_records[2];
    std::fs::OpenOptions::new()
        .write(true)
        .open(cut_path)
        .and_then(|f| f.set_len(cut.offset + cut.len / 2))
        .expect("truncate");
    let damaged: BTreeSet<Key> = std::iter::once(flipped.key.clone())
        .chain(cut_records[2..].iter().map(|r| r.key.clone()))
        .collect();
    let servers_damaged: BTreeSet<&str> = damaged.iter().map(|k| k.0.as_str()).collect();
    assert_eq!(servers_damaged.len(), 2, "both streams lose records");
    let after_damage: BTreeSet<Key> = segments[2 * n / 3 + 1..]
        .iter()
        .flat_map(|(_, r)| r.iter().map(|r| r.key.clone()))
        .collect();

    // Run 2: the broker is back; the spool is read past the damage.
    broker(|| nats.restart());
    std::fs::write(&cfg_path, config(&sim, &spool_dir, &nats, "20s")).expect("config");
    let second = spawn_amibus(&cfg_path, &log2);
    let first_epochs: BTreeSet<(String, u64)> =
        pending.iter().map(|(s, e, _)| (s.clone(), *e)).collect();
    reader
        .wait_for(
            "everything spooled, the damage named, and the new epochs flowing",
            |got| {
                let v = View::of(got);
                let (named, delivered) = (v.named(), v.delivered());
                pending
                    .iter()
                    .all(|k| delivered.contains(k) || named.contains_key(k))
                    && damaged.iter().all(|k| named.contains_key(k))
                    && v.all_epochs()
                        .iter()
                        .filter(|k| !first_epochs.contains(*k))
                        .filter(|(s, e)| delivered.contains(&(s.clone(), *e, 10)))
                        .count()
                        == 2
            },
        )
        .await;
    let run2 = stop_gracefully(second, &log2).await;
    reader
        .wait_for("the ConnectionDown of every epoch", |got| {
            let v = View::of(got);
            v.down.len() == v.all_epochs().len()
        })
        .await;
    sim.shutdown().await;
    assert!(reader.catch_up().await);
    let view = View::of(&reader.got);
    eprintln!("{}", view.ledger());
    let delivered = view.delivered();
    let ctx = format!(
        "{}\ndamaged: {damaged:?}\nrun 2: {}",
        view.summary(),
        run2.lines()
            .filter(|l| l.contains("damage") || l.contains("records ("))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Run 2 found the damage and said so, once per damaged span.
    assert!(run2.contains(", 0 left in the spool"), "{ctx}");
    assert_eq!(
        run2.matches("damaged records skipped on open").count(),
        2,
        "{ctx}"
    );
    // Every record delivered at most once; every gap record is about the damage.
    assert_eq!(view.duplicates, 0, "read twice: {ctx}");
    assert_eq!(
        view.gap_reasons,
        BTreeSet::from(["spool damaged".to_owned()]),
        "{ctx}"
    );
    let named = view.named();
    assert!(named.values().all(|&n| n == 1), "named twice: {ctx}");
    // The gap records name exactly the damaged records, none of which was delivered.
    let named_keys: BTreeSet<Key> = named.keys().cloned().collect();
    assert_eq!(named_keys, damaged, "{ctx}");
    assert!(damaged.iter().all(|k| !delivered.contains(k)), "{ctx}");
    // Everything else that was spooled was delivered, what came after the damage included.
    let missing: Vec<&Key> = pending
        .iter()
        .filter(|k| !damaged.contains(*k) && !delivered.contains(*k))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "spooled, not delivered: {missing:?}\n{ctx}"
    );
    assert!(!after_damage.is_empty() && after_damage.iter().all(|k| delivered.contains(k)));
    // Every epoch, both runs': each seq 1..=N delivered or named, once, N its ConnectionDown.
    assert!(
        view.all_epochs().len() >= 4,
        "two per server at least: {ctx}"
    );
    for (server, epoch) in view.all_epochs() {
        let n = view
            .down
            .get(&(server.clone(), epoch))
            .copied()
            .unwrap_or(0);
        let holes: Vec<u64> = (1..=n)
            .filter(|&q| {
                let k = (server.clone(), epoch, q);
                !delivered.contains(&k) && !named.contains_key(&k)
            })
            .take(10)
            .collect();
        assert!(
            n > 0 && holes.is_empty(),
            "{server}/{epoch}: ConnectionDown at {n}, neither delivered nor named: {holes:?}\n{ctx}"
        );
        let beyond = delivered
            .range((server.clone(), epoch, n + 1)..(server.clone(), epoch + 1, 0))
            .count();
        assert_eq!(
            beyond, 0,
            "{server}/{epoch}: records after ConnectionDown\n{ctx}"
        );
    }
}
