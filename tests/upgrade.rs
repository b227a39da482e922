//! Upgrading amibus over a spool the previous format wrote, end to end: the real binary, a real
//! nats-server, and a spool an amibus before typed record metadata left behind
//! (`tests/fixtures/spool-format1`: 134 records of two simulated servers, written while the
//! broker was down; how it was made and what it holds is in its README and `pending.tsv`,
//! listed by a Python reader of the old format, independent of the code under test).
//!
//! Checked from a consumer's view of the stream: every record of the old spool is delivered
//! exactly once, in its epoch's order, with the kind and snapshot id it was written with and
//! bus headers that agree with its envelope (the stream reader checks that for every
//! message); the records the new run reads after them follow. Sleeps only pace the test.

#[path = "support/child.rs"]
mod child;
#[path = "support/ledger.rs"]
mod ledger;
#[path = "support/nats.rs"]
mod nats_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use amibus::model::json::kind_name;
use amibus::sim::Sim;
use ledger::*;
use nats_support::NatsServer;

const NAME: &str = "UPGRADE1";

/// One line of `pending.tsv`: (server, epoch, seq) → (kind, has a snapshot id).
fn manifest(dir: &Path) -> BTreeMap<(String, u64, u64), (String, bool)> {
    std::fs::read_to_string(dir.join("pending.tsv"))
        .expect("pending.tsv")
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let num = |s: &str| s.parse::<u64>().expect("a number");
            (
                (f[1].to_owned(), num(f[2]), num(f[3])),
                (
                    f[4].to_owned(),
                    f[5..].iter().any(|x| x.starts_with("snapshot=")),
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_of_the_previous_format_is_delivered_after_the_upgrade() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spool-format1");
    let old = manifest(&fixture);
    assert_eq!(old.len(), 134);
    let dir = tempfile::tempdir().expect("tempdir");
    let spool_dir = dir.path().join("spool");
    std::fs::create_dir(&spool_dir).expect("spool dir");
    for f in ["00000000000000000001.seg", "open-epochs"] {
        std::fs::copy(fixture.join(f), spool_dir.join(f)).expect("copy the old spool");
    }
    let nats = NatsServer::start();
    // The fixture's servers are pbx1 and pbx2, as here: the new run's records follow theirs.
    let sim = Sim::start(sim_config(NAME, 2, 200, Some(50)))
        .await
        .expect("sim");
    let cfg_path = dir.path().join("amibus.toml");
    std::fs::write(&cfg_path, config_toml(&sim, &spool_dir, &nats, NAME, "")).expect("config");
    let log = dir.path().join("run.log");
    let _run = spawn_amibus(&cfg_path, &log);

    let old_epochs: BTreeSet<(String, u64)> = old.keys().map(|(s, e, _)| (s.clone(), *e)).collect();
    // Epochs of the new run with at least ten records.
    let new_epochs = |v: &View| {
        v.seqs
            .iter()
            .filter(|(k, seqs)| !old_epochs.contains(*k) && seqs.len() >= 10)
            .count()
    };
    let mut reader = StreamReader::new(&nats, NAME).await;
    reader
        .wait_for("the old spool and the new run's events", |got| {
            let v = View::of(got);
            let delivered = v.delivered();
            old.keys().all(|k| delivered.contains(k)) && new_epochs(&v) >= 2
        })
        .await;
    let view = View::of(&reader.got);
    assert_eq!(view.duplicates, 0, "{}", view.summary());
    let mut found = BTreeMap::new();
    for g in &reader.got {
        let e = &g.env;
        let key = (e.server.clone(), e.epoch, e.seq);
        if old.contains_key(&key) {
            found.insert(
                key,
                (kind_name(e.kind()).to_owned(), !e.snapshot_id.is_empty()),
            );
        }
    }
    assert_eq!(
        found, old,
        "every old record, with its kind and snapshot id"
    );
    // Each old epoch in order, and whole: connection_up at 1 to connection_down at its end.
    assert_eq!(old_epochs.len(), 2);
    for (server, epoch) in old_epochs.iter().cloned() {
        let seqs = &view.seqs[&(server.clone(), epoch)];
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{server}/{epoch}: {seqs:?}"
        );
        assert_eq!(view.cover(&(server, epoch)), Ok(seqs.len() as u64));
    }
    // The new run's own epochs followed (waited for above), written in the new format.
    assert!(new_epochs(&view) >= 2, "{}", view.summary());
}
