//! The running connections and pipelines: which server reads into which hand-off queue, and
//! the pipeline tasks that empty those queues into the spool.

use super::*;

/// The running connections, by server id.
pub(super) struct Running {
    pub(super) tasks: HashMap<String, RunningServer>,
    /// One hand-off queue per pipeline; servers are given to them in turn.
    pub(super) txs: Vec<handoff::Sender>,
    pub(super) assigned: usize,
    pub(super) read_stop: CancellationToken,
    pub(super) registry: telemetry::Registry,
    /// Given to every connection started.
    pub(super) conn_opts: Options,
    pub(super) sup: Supervisor,
}

pub(super) struct RunningServer {
    pub(super) cfg: ServerConfig,
    pub(super) handle: crate::ami::handle::Handle,
    pub(super) stats: Arc<crate::ami::connection::Stats>,
    /// The connection's task as a supervised stage: a panic in it ends the run.
    pub(super) task: tokio::task::JoinHandle<Option<Result<(), String>>>,
    pub(super) stop: CancellationToken,
}

impl Running {
    /// Make the running set equal `servers`, touching only what differs.
    pub(super) async fn apply(&mut self, servers: Vec<ServerConfig>) {
        let wanted: HashMap<String, ServerConfig> =
            servers.into_iter().map(|s| (s.id.clone(), s)).collect();
        let stale: Vec<String> = self
            .tasks
            .iter()
            .filter(|(id, r)| wanted.get(*id) != Some(&r.cfg))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &stale {
            if let Some(r) = self.tasks.remove(id) {
                r.stop.cancel();
                let _ = r.task.await;
            }
        }
        let mut added = 0;
        for (id, server) in wanted {
            if self.tasks.contains_key(&id) {
                continue;
            }
            let stop = self.read_stop.child_token();
            let tx = self.txs[self.assigned % self.txs.len()].clone();
            self.assigned += 1;
            let conn = Connection::spawn(
                Arc::new(server.clone()),
                tx,
                stop.clone(),
                self.conn_opts.clone(),
            );
            let inner = conn.task;
            let task =
                self.sup
                    .spawn_until(format!("connection {id}"), Some(stop.clone()), async move {
                        inner.await.map_err(|e| e.to_string())
                    });
            self.tasks.insert(
                id,
                RunningServer {
                    cfg: server,
                    handle: conn.handle,
                    stats: conn.stats,
                    task,
                    stop,
                },
            );
            added += 1;
        }
        let mut list: Vec<_> = self
            .tasks
            .iter()
            .map(|(id, r)| (id.clone(), r.stats.clone()))
            .collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        if let Ok(mut registry) = self.registry.write() {
            *registry = list;
        }
        if !stale.is_empty() || added > 0 {
            tracing::info!(
                stopped = stale.len(),
                started = added,
                running = self.tasks.len(),
                "server list applied"
            );
        }
    }
}

/// What a pipeline did, for the report: its counters, events by server, and the loss it
/// could not report (carried to the next start).
pub(super) type PipelineOutcome = (PipelineStats, HashMap<String, u64>, Vec<LostRange>);

/// One pipeline task: records from its connections into the spool, a write per batch, until
/// every connection that sends to it is gone. Nothing the spool refuses ends it (see
/// [`Pipeline::accept`]): a full disk drops records as gaps and the pipeline goes on. Taking a
/// batch that frees the queue's headroom wakes the connections holding a read for room (see
/// [`handoff`]).
pub(super) async fn run_pipeline(
    mut pipeline: Pipeline,
    mut rx: handoff::Receiver,
    published: Arc<SharedStats>,
    seen: Arc<AtomicU64>,
) -> PipelineOutcome {
    let mut events: HashMap<Arc<str>, u64> = HashMap::new();
    let mut batch = Vec::with_capacity(256);
    let mut before = PipelineStats::default();
    loop {
        // Loss the spool could not report yet (no room, or no record since) is reported
        // when the connections are quiet, and at the end, not only behind the next record.
        // Records the spool deleted while in flight are known lost only once the sink gives
        // up on them, and damaged records only once the sink's reader meets them, so they are
        // collected on a timer too.
        let received = tokio::time::timeout(GAP_RETRY, rx.recv_many(&mut batch, 256))
            .await
            .ok();
        pipeline.collect_spool_losses();
        if matches!(received, None | Some(0)) {
            pipeline.report_unreported_gaps();
            pipeline.flush();
            let now = pipeline.stats();
            published.publish(&before, &now);
            before = now;
            if received.is_some() {
                break; // every connection is gone
            }
            continue;
        }
        // Counted per run of one server's records (a batch is mostly such runs), not with a
        // hash and a reference count per record.
        let mut run: Option<(&Arc<str>, u64)> = None;
        let mut counted = 0;
        for stamped in &batch {
            pipeline.accept(stamped);
            if pipeline.last_was_broadcast_event() {
                let server = &stamped.stamp.server;
                match &mut run {
                    Some((s, n)) if Arc::ptr_eq(s, server) => *n += 1,
                    _ => {
                        if let Some((s, n)) = run.replace((server, 1)) {
                            *events.entry(s.clone()).or_default() += n;
                        }
                    }
                }
                counted += 1;
            }
        }
        if let Some((s, n)) = run {
            *events.entry(s.clone()).or_default() += n;
        }
        seen.fetch_add(counted, Ordering::Relaxed);
        batch.clear();
        let now = pipeline.stats();
        published.publish(&before, &now);
        before = now;
        // One write per batch puts the batch in the page cache: a SIGKILL from here on
        // loses none of it.
        pipeline.flush();
    }
    let now = pipeline.stats();
    published.publish(&before, &now);
    (now, by_name(events), pipeline.unreported())
}
