//! Tests of the action consumer with a fake transport and fake AMI handles.

use super::*;
use crate::control::stats::ControlSnapshot;
use crate::control::transport::PublishError;
use std::sync::atomic::AtomicU32;
use tokio::sync::mpsc;

/// Requests from a channel.
struct Chan(mpsc::Receiver<Incoming>);

impl RequestSource for Chan {
    async fn next(&mut self) -> Option<Incoming> {
        self.0.recv().await
    }
}

/// Fails the first `fail` publishes (retriably or not), then records what it publishes.
struct Flaky {
    fail: AtomicU32,
    permanent: bool,
    out: mpsc::UnboundedSender<(Option<String>, ActionResult)>,
}

impl Publisher for Flaky {
    async fn publish(&self, to: Option<&str>, result: &ActionResult) -> Result<(), PublishError> {
        if self
            .fail
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(if self.permanent {
                PublishError::Permanent("no such topic".into())
            } else {
                PublishError::Retriable("broker down".into())
            });
        }
        let _ = self.out.send((to.map(str::to_owned), result.clone()));
        Ok(())
    }
}

struct Rig {
    tx: mpsc::Sender<Incoming>,
    out: mpsc::UnboundedReceiver<(Option<String>, ActionResult)>,
    acks: mpsc::UnboundedReceiver<&'static str>,
    ack_tx: mpsc::UnboundedSender<&'static str>,
    stats: Arc<ControlStats>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// A running consumer fed by the returned rig, its publisher failing the first `fail`
/// results (permanently or not); `make` builds the controller around that publisher.
fn start(fail: u32, permanent: bool, make: impl FnOnce(Flaky) -> Controller<Flaky>) -> Rig {
    let (tx, rx) = mpsc::channel(16);
    let (out_tx, out) = mpsc::unbounded_channel();
    let (ack_tx, acks) = mpsc::unbounded_channel();
    let controller = make(Flaky {
        fail: AtomicU32::new(fail),
        permanent,
        out: out_tx,
    });
    let stats = controller.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(controller.run(Chan(rx), stop.clone()));
    Rig {
        tx,
        out,
        acks,
        ack_tx,
        stats,
        stop,
        task,
    }
}

fn rig(fail: u32, permanent: bool, answer_not_owned: bool, owns: Owns) -> Rig {
    let cfg = ControlConfig {
        answer_not_owned,
        ..ControlConfig::default()
    };
    start(fail, permanent, |publisher| {
        Controller::new(HashMap::new(), owns, cfg, publisher)
    })
}

impl Rig {
    async fn send(&self, name: &'static str, payload: Vec<u8>, key: Option<&str>) {
        let ack_tx = self.ack_tx.clone();
        let msg = Incoming {
            payload: payload.into(),
            reply: None,
            ack: Some(Box::new(move || {
                let _ = ack_tx.send(name);
            })),
            key: key.map(str::to_owned),
        };
        assert!(self.tx.send(msg).await.is_ok());
    }

    /// Until the consumer has taken everything sent, finished it, and stopped.
    async fn finish(self) -> (Vec<ActionResult>, Vec<&'static str>, ControlSnapshot) {
        let Rig {
            tx,
            mut out,
            mut acks,
            ack_tx,
            stats,
            stop,
            task,
        } = self;
        drop(tx);
        drop(ack_tx);
        let _ = task.await;
        drop(stop);
        let mut results = Vec::new();
        while let Ok((_, r)) = out.try_recv() {
            results.push(r);
        }
        let mut acked = Vec::new();
        while let Some(a) = acks.recv().await {
            acked.push(a);
        }
        (results, acked, stats.snapshot())
    }
}

/// A consumer for server `pbx1`, whose actions arrive on the returned receiver (the
/// simulated Asterisk: what it receives was sent), keeping its memory in `journal`.
fn journaled_rig(
    journal: &JournalConfig,
    broken: bool,
) -> (Rig, mpsc::Receiver<crate::ami::handle::Command>) {
    let (cmd_tx, cmd_rx) = mpsc::channel(16);
    let targets = HashMap::from([(
        "pbx1".to_owned(),
        Target {
            handle: Handle::new(Arc::from("pbx1"), cmd_tx),
            allow: AllowList::new(["read-only"]),
        },
    )]);
    let cfg = ControlConfig {
        rate: 0.0,
        ..ControlConfig::default()
    };
    let rig = start(0, false, |publisher| {
        let controller = Controller::new(targets, Arc::new(|_: &str| true), cfg, publisher)
            .with_journal(journal)
            .expect("journal");
        if broken {
            let j = controller.journal.as_ref().expect("journal");
            lock(j).break_writes().expect("reopen");
        }
        controller
    });
    (rig, cmd_rx)
}

fn ping(id: &str) -> Vec<u8> {
    ActionRequest {
        request_id: id.into(),
        server: "pbx1".into(),
        action: "Ping".into(),
        deadline_ns: now_ns() + 60_000_000_000,
        timeout_ms: 50_000,
        ..ActionRequest::default()
    }
    .encode_to_vec()
}

fn journal_cfg(dir: &std::path::Path) -> JournalConfig {
    JournalConfig {
        path: dir.join("control-journal"),
        fsync: super::journal::JournalFsync::Never,
        max_bytes: 1 << 20,
    }
}

#[tokio::test]
async fn an_action_the_journal_cannot_record_is_not_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rig, mut asterisk) = journaled_rig(&journal_cfg(dir.path()), true);
    rig.send("a", ping("a"), None).await;
    let (results, acked, snap) = rig.finish().await;
    assert_eq!(results.len(), 1);
    let r = &results[0];
    assert_eq!(
        (r.status, r.reject_code.as_str(), r.retriable),
        (ActionStatus::Rejected as i32, "journal_unavailable", true)
    );
    assert_eq!(acked, ["a"]);
    assert_eq!(snap.journal_write_failures, 1);
    assert!(asterisk.try_recv().is_err(), "nothing was sent");
}

#[tokio::test]
async fn after_a_restart_the_journal_answers_and_nothing_is_sent_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = journal_cfg(dir.path());
    let (mut first, mut asterisk) = journaled_rig(&cfg, false);
    // `answered` gets its reply; `running` never does: amibus stops first.
    first.send("answered", ping("answered"), None).await;
    let answered = asterisk.recv().await.expect("sent");
    answered
        .reply
        .accept()
        .unknown(crate::ami::handle::Unknown::TimedOut);
    let (_, r) = first.out.recv().await.expect("a result");
    assert_eq!(r.status, ActionStatus::Timeout as i32);
    first.send("running", ping("running"), None).await;
    let running = asterisk.recv().await.expect("sent");
    // The crash: the second amibus opens the journal while `running` is still held.

    let (second, mut asterisk2) = journaled_rig(&cfg, false);
    second.send("running", ping("running"), None).await;
    second.send("answered", ping("answered"), None).await;
    let (results, acked, snap) = second.finish().await;
    let mut got: Vec<_> = results
        .iter()
        .map(|r| {
            (
                r.request_id.as_str(),
                r.status,
                r.replayed,
                r.reason.as_str(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (
                "answered",
                ActionStatus::Timeout as i32,
                true,
                r.reason.as_str()
            ),
            (
                "running",
                ActionStatus::OutcomeUnknown as i32,
                // Nothing was published for it before the restart: not a replay.
                false,
                journal::RESTARTED_REASON
            ),
        ]
    );
    assert_eq!(acked.len(), 2);
    assert_eq!((snap.journal_loaded, snap.journal_restart_unknown), (2, 1));
    assert_eq!(snap.replayed, 1, "only the answered one");
    assert!(asterisk2.try_recv().is_err(), "nothing was sent again");

    // A third run: the restart answer was journaled, so now it is a replay.
    let (third, mut asterisk3) = journaled_rig(&cfg, false);
    third.send("running", ping("running"), None).await;
    let (results, _, snap) = third.finish().await;
    assert_eq!(
        (results[0].status, results[0].replayed),
        (ActionStatus::OutcomeUnknown as i32, true)
    );
    assert_eq!(snap.journal_restart_unknown, 0);
    assert!(asterisk3.try_recv().is_err(), "nothing was sent again");
    drop(running);
}

fn unknown(id: &str, server: &str) -> Vec<u8> {
    ActionRequest {
        request_id: id.into(),
        server: server.into(),
        action: "Ping".into(),
        deadline_ns: now_ns() + 60_000_000_000,
        ..ActionRequest::default()
    }
    .encode_to_vec()
}

#[tokio::test]
async fn a_retriable_publish_failure_is_retried_and_acked_once_published() {
    let rig = rig(2, false, true, Arc::new(|_: &str| true));
    rig.send("a", unknown("a", "pbx9"), None).await;
    let (results, acked, snap) = rig.finish().await;
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].reject_code, "unknown_server");
    assert_eq!(acked, ["a"]);
    assert_eq!(snap.publish_failures, 2);
}

#[tokio::test]
async fn a_result_the_bus_keeps_refusing_stays_unacknowledged() {
    let rig = rig(u32::MAX, false, true, Arc::new(|_: &str| true));
    rig.send("a", unknown("a", "pbx9"), None).await;
    let (results, acked, snap) = rig.finish().await;
    assert!(results.is_empty());
    assert!(acked.is_empty(), "never published, never acknowledged");
    assert_eq!(snap.publish_failures, u64::from(PUBLISH_ATTEMPTS));
}

#[tokio::test]
async fn a_permanent_publish_failure_settles_the_message() {
    let rig = rig(1, true, true, Arc::new(|_: &str| true));
    rig.send("a", unknown("a", "pbx9"), None).await;
    rig.send("b", unknown("b", "pbx9"), None).await;
    let (results, mut acked, snap) = rig.finish().await;
    assert_eq!(results.len(), 1, "the second is published");
    acked.sort();
    assert_eq!(acked, ["a", "b"], "both settled");
    assert_eq!(snap.publish_failures, 1);
}

#[tokio::test]
async fn where_every_replica_sees_every_request_only_the_owner_answers() {
    // This replica owns "mine" and the empty key, nothing else.
    let owns: Owns = Arc::new(|id: &str| id == "mine" || id.is_empty());
    let rig = rig(0, false, false, owns);
    let bad = vec![0xff, 0xff, 0xff];
    rig.send("bad-theirs", bad.clone(), Some("theirs")).await;
    rig.send("bad-mine", bad.clone(), Some("mine")).await;
    rig.send("bad-nokey", bad, None).await;
    rig.send("req-theirs", unknown("t", "theirs"), Some("mine"))
        .await;
    rig.send("req-mine", unknown("m", "mine"), Some("theirs"))
        .await;
    rig.send("req-mine-keyed", unknown("k", "mine"), Some("mine"))
        .await;
    rig.send("req-mine-unkeyed", unknown("u", "mine"), None)
        .await;
    // Fails its checks, but is not ours: skipped before them.
    rig.send("invalid-theirs", unknown("", "theirs"), None)
        .await;
    let (results, mut acked, snap) = rig.finish().await;
    let mut answered: Vec<_> = results
        .iter()
        .map(|r| (r.request_id.as_str(), r.reject_code.as_str()))
        .collect();
    answered.sort();
    assert_eq!(
        answered,
        [
            ("", "malformed"),
            ("", "malformed"),
            ("k", "unknown_server"),
            ("t", "server_mismatch"),
            ("u", "unknown_server"),
        ],
        "a body that names another server than its key is refused by the key's owner"
    );
    acked.sort();
    assert_eq!(acked.len(), 8, "everything is acknowledged: {acked:?}");
    assert_eq!(snap.skipped_not_owned, 3);
}
