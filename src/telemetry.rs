//! Telemetry: every metric amibus exports, described in one place, and the HTTP endpoints
//! `/metrics`, `/healthz` and `/readyz`.
//!
//! Owns: metric names, help texts and labels; turning the components' own counters (connection
//! stats, pipeline, spool, sink driver) into Prometheus series at scrape time; the tiny HTTP
//! server. The hot paths count in their own atomics; nothing here runs per record except the
//! sink's send-latency histogram.
//!
//! Labels stay low-cardinality: `server` (configured ids), `sink`, `reason`. Never a Uniqueid
//! or ActionID.
//!
//! | metric | type | labels | meaning |
//! | --- | --- | --- | --- |
//! | `amibus_ami_connected` | gauge | server | 1 while logged in |
//! | `amibus_ami_frames_total` | counter | server | frames read (events, responses, list items) |
//! | `amibus_ami_bytes_total` | counter | server | bytes read from the socket |
//! | `amibus_ami_parse_errors_total` | counter | server | frames skipped as malformed or oversized |
//! | `amibus_ami_reconnects_total` | counter | server | connection attempts after the first |
//! | `amibus_ami_auth_failures_total` | counter | server | logins refused |
//! | `amibus_ami_seconds_since_last_byte` | gauge | server | silence on the socket |
//! | `amibus_ami_dropped_records_total` | counter | server | records dropped at a full hand-off queue |
//! | `amibus_ami_read_pauses_total` | counter | server | reads held back for room in a nearly full hand-off queue |
//! | `amibus_ami_read_pause_timeouts_total` | counter | server | pauses that lasted `pipeline.handoff_wait`, after which the connection read on and dropped |
//! | `amibus_ami_gap_records_total` | counter | server | gap records sent for them |
//! | `amibus_snapshots_total` | counter | server, trigger | state snapshots begun (`login`, `gap`) |
//! | `amibus_snapshot_items_total` | counter | server | snapshot list items published |
//! | `amibus_snapshots_incomplete_total` | counter | server | snapshots that ended incomplete (timeout, connection ended, a list refused) |
//! | `amibus_snapshot_late_frames_total` | counter | server | frames of lists abandoned at the snapshot deadline that came later, dropped |
//! | `amibus_snapshot_duration_seconds` | histogram | server, trigger | from `snapshot_begin` to `snapshot_end` |
//! | `amibus_pipeline_records_total` | counter | | records encoded into the spool |
//! | `amibus_spool_records` | gauge | | records held (not yet acknowledged) |
//! | `amibus_spool_bytes` | gauge | | bytes of segments on disk |
//! | `amibus_spool_in_doubt_records` | gauge | | deleted by drop_oldest while in flight, not yet confirmed or failed |
//! | `amibus_spool_in_doubt_resent_records_total` | counter | | in-doubt records sent again after the sink failed them |
//! | `amibus_spool_oldest_record_age_seconds` | gauge | | age of the oldest unacknowledged record |
//! | `amibus_spool_dropped_records_total` | counter | reason | `drop_oldest`, `drop_newest` |
//! | `amibus_spool_gap_records_total` | counter | | gap records for spool drops |
//! | `amibus_spool_write_errors_total` | counter | | spool appends and flushes that failed (disk full, I/O error) |
//! | `amibus_spool_writable` | gauge | | 0 while the spool's last write failed (records are dropped and reported as gaps) |
//! | `amibus_pipeline_too_large_records_total` | counter | | records too large for the spool, published as `parse_error` in their place |
//! | `amibus_pipeline_write_failed_records_total` | counter | | records the spool could not write, reported as gaps |
//! | `amibus_healthy` | gauge | | 1 while `/healthz` passes |
//! | `amibus_spool_damaged_records_total` | counter | | records found damaged on disk (on open or while read), skipped and reported as `spool damaged` gaps |
//! | `amibus_spool_damaged_bytes_total` | counter | | bytes skipped with them |
//! | `amibus_spool_damaged_unattributed_records_total` | counter | | damaged records whose (server, epoch, seq) could not be inferred: lost without a gap record |
//! | `amibus_sink_records_sent_total` | counter | sink | records handed to the sink |
//! | `amibus_sink_records_acknowledged_total` | counter | sink | records the broker confirmed |
//! | `amibus_sink_records_failed_total` | counter | sink, reason | `permanent` (dropped), `retriable` (sent again) |
//! | `amibus_sink_rewinds_total` | counter | sink | resends after a retriable failure |
//! | `amibus_sink_send_seconds` | histogram | sink | hand-off to acknowledgement |
//! | `amibus_sink_ready` | gauge | sink | 0 while deliveries fail retriably |
//! | `amibus_nats_disconnects_total` | counter | reason | NATS sink connections lost (`closed`, `io`, `protocol`, `refused`, `timeout`, `tls`); what they held unconfirmed is sent again |
//! | `amibus_nats_refused_messages_total` | counter | | messages the server dropped with a permissions error (core: lost; JetStream: sent again after the ack deadline) |
//! | `amibus_servers_configured` | gauge | | servers this replica reads |
//! | `amibus_control_results_total` | counter | server, status | action results by status (`success`, `error`, `rejected`, `expired`, `timeout`, `outcome_unknown`); server `-` for ids not configured |
//! | `amibus_control_rejected_total` | counter | reason | rejections by label (`malformed`, `not_allowed`, `rate_limited`, …) |
//! | `amibus_control_replayed_total` | counter | | results published again for a duplicate request id |
//! | `amibus_control_skipped_not_owned_total` | counter | | requests left to the replica that owns their server |
//! | `amibus_control_publish_failures_total` | counter | | results that could not be published |
//! | `amibus_control_receive_errors_total` | counter | | requests the transport could not read (the source retries) |
//! | `amibus_control_ack_failures_total` | counter | | Kafka offset commits or JetStream acks refused (those requests may be delivered again) |
//! | `amibus_control_in_flight` | gauge | | actions sent and not yet answered |
//! | `amibus_control_journal_loaded_total` | counter | | requests read back from the idempotency journal at start |
//! | `amibus_control_journal_restart_unknown_total` | counter | | requests answered `outcome_unknown` because they ran when amibus stopped (never sent again) |
//! | `amibus_control_journal_torn_bytes_total` | counter | | bytes of a torn or corrupt journal tail cut off at start |
//! | `amibus_control_journal_write_failures_total` | counter | | journal writes that failed (before sending: the request is rejected `journal_unavailable`, retriable) |
//! | `amibus_control_journal_compactions_total` | counter | | journal rewrites keeping only live entries |

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::ami::connection::Stats as ConnectionStats;
use crate::sink::driver::DriverStats;
use crate::spool::Spool;

/// Install the Prometheus recorder and describe every metric.
///
/// # Errors
/// A recorder is already installed.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_gauge!(
        "amibus_ami_connected",
        "1 while the AMI session is logged in"
    );
    describe_counter!("amibus_ami_frames_total", "AMI frames read");
    describe_counter!(
        "amibus_ami_bytes_total",
        Unit::Bytes,
        "bytes read from AMI sockets"
    );
    describe_counter!(
        "amibus_ami_parse_errors_total",
        "AMI frames skipped as malformed or oversized"
    );
    describe_counter!(
        "amibus_ami_reconnects_total",
        "AMI connection attempts after the first"
    );
    describe_counter!("amibus_ami_auth_failures_total", "AMI logins refused");
    describe_gauge!(
        "amibus_ami_seconds_since_last_byte",
        Unit::Seconds,
        "time since the last byte from the server"
    );
    describe_counter!(
        "amibus_ami_dropped_records_total",
        "records dropped because the hand-off queue was full"
    );
    describe_counter!(
        "amibus_ami_read_pauses_total",
        "reads held back for room in a nearly full hand-off queue"
    );
    describe_counter!(
        "amibus_ami_read_pause_timeouts_total",
        "read pauses that lasted pipeline.handoff_wait; the connection then read on and dropped"
    );
    describe_counter!(
        "amibus_ami_gap_records_total",
        "gap records sent for records dropped at the hand-off queue"
    );
    describe_counter!(
        "amibus_snapshots_total",
        "state snapshots begun, by trigger (login, gap)"
    );
    describe_counter!(
        "amibus_snapshot_items_total",
        "snapshot list items published"
    );
    describe_counter!(
        "amibus_snapshots_incomplete_total",
        "snapshots that ended incomplete (timeout, connection ended, a list refused)"
    );
    describe_counter!(
        "amibus_snapshot_late_frames_total",
        "frames of lists abandoned at the snapshot deadline that arrived later, dropped"
    );
    describe_histogram!(
        crate::ami::snapshot::DURATION_SECONDS,
        Unit::Seconds,
        "time from snapshot_begin to snapshot_end"
    );
    describe_counter!(
        "amibus_pipeline_records_total",
        "records encoded into the spool"
    );
    describe_counter!(
        "amibus_pipeline_too_large_records_total",
        "records too large for the spool, published as a parse_error record in their place"
    );
    describe_counter!(
        "amibus_pipeline_write_failed_records_total",
        "records the spool could not write (disk full, I/O error), dropped and reported as gaps"
    );
    describe_counter!(
        "amibus_spool_write_errors_total",
        "spool appends and flushes that failed (disk full, I/O error)"
    );
    describe_gauge!(
        "amibus_spool_writable",
        "0 while the spool's last write failed and none has succeeded since"
    );
    describe_gauge!(
        "amibus_healthy",
        "1 while /healthz passes: no stage failed and the sink driver is not stalled"
    );
    describe_gauge!(
        "amibus_spool_records",
        "records in the spool not yet acknowledged by the sink"
    );
    describe_gauge!(
        "amibus_spool_in_doubt_records",
        "records deleted by drop_oldest while in flight to the sink, not yet confirmed or failed"
    );
    describe_counter!(
        "amibus_spool_in_doubt_resent_records_total",
        "records deleted by drop_oldest while in flight, sent again from memory after the sink failed them"
    );
    describe_gauge!(
        "amibus_spool_bytes",
        Unit::Bytes,
        "bytes of spool segments on disk"
    );
    describe_gauge!(
        "amibus_spool_oldest_record_age_seconds",
        Unit::Seconds,
        "age of the oldest unacknowledged record"
    );
    describe_counter!(
        "amibus_spool_dropped_records_total",
        "records dropped by the spool's cap, by policy"
    );
    describe_counter!(
        "amibus_spool_gap_records_total",
        "gap records sent for records the spool dropped"
    );
    describe_counter!(
        "amibus_spool_damaged_records_total",
        "records found damaged in spool segments (on open or while read), skipped and reported as lost"
    );
    describe_counter!(
        "amibus_spool_damaged_bytes_total",
        Unit::Bytes,
        "bytes of spool segments skipped as damaged"
    );
    describe_counter!(
        "amibus_spool_damaged_unattributed_records_total",
        "damaged spool records whose server, epoch and seq could not be inferred (lost without a gap record)"
    );
    describe_counter!(
        "amibus_sink_records_sent_total",
        "records handed to the sink"
    );
    describe_counter!(
        "amibus_sink_records_acknowledged_total",
        "records the broker confirmed"
    );
    describe_counter!(
        "amibus_sink_records_failed_total",
        "delivery failures: permanent ones are dropped, retriable ones sent again"
    );
    describe_counter!(
        "amibus_sink_rewinds_total",
        "resends from the oldest unacknowledged record after a retriable failure"
    );
    describe_histogram!(
        crate::sink::driver::SEND_SECONDS,
        Unit::Seconds,
        "time from handing a record to the sink to its acknowledgement"
    );
    describe_gauge!("amibus_sink_ready", "0 while deliveries fail retriably");
    describe_counter!(
        "amibus_nats_disconnects_total",
        "NATS sink connections lost, by reason"
    );
    describe_counter!(
        "amibus_nats_refused_messages_total",
        "messages the NATS server dropped with a permissions error"
    );
    describe_gauge!(
        "amibus_servers_configured",
        "AMI servers this replica reads"
    );
    describe_counter!(
        "amibus_control_results_total",
        "action results by server and status"
    );
    describe_counter!(
        "amibus_control_rejected_total",
        "action requests rejected, by reason"
    );
    describe_counter!(
        "amibus_control_replayed_total",
        "results published again for a duplicate request id"
    );
    describe_counter!(
        "amibus_control_skipped_not_owned_total",
        "action requests left to the replica owning their server"
    );
    describe_counter!(
        "amibus_control_publish_failures_total",
        "action results that could not be published"
    );
    describe_counter!(
        "amibus_control_receive_errors_total",
        "errors reading action requests from the bus (retried)"
    );
    describe_counter!(
        "amibus_control_ack_failures_total",
        "Kafka offset commits or JetStream acks the bus refused"
    );
    describe_gauge!(
        "amibus_control_in_flight",
        "actions sent to Asterisk and not yet answered"
    );
    describe_counter!(
        "amibus_control_journal_loaded_total",
        "requests read back from the idempotency journal at start"
    );
    describe_counter!(
        "amibus_control_journal_restart_unknown_total",
        "requests answered outcome_unknown because they ran when amibus stopped"
    );
    describe_counter!(
        "amibus_control_journal_torn_bytes_total",
        "bytes of a torn or corrupt journal tail cut off at start"
    );
    describe_counter!(
        "amibus_control_journal_write_failures_total",
        "idempotency journal writes that failed"
    );
    describe_counter!(
        "amibus_control_journal_compactions_total",
        "idempotency journal rewrites keeping only live entries"
    );
}

/// The running connections by server id, shared with the code that starts and stops them.
pub type Registry = Arc<RwLock<Vec<(String, Arc<ConnectionStats>)>>>;

/// Everything whose counters are exported at scrape time.
#[derive(Clone, Default)]
pub struct Sources {
    /// The running connections; replaced when a reload changes the server list.
    pub connections: Registry,
    pub spool: Option<Spool>,
    pub sink: Option<(&'static str, Arc<DriverStats>)>,
    pub pipeline: Option<Arc<crate::pipeline::SharedStats>>,
    pub control: Option<Arc<crate::control::ControlStats>>,
    /// The run's stages: a failed one makes `/healthz` fail.
    pub supervisor: Option<crate::supervise::Supervisor>,
    /// See [`crate::config::MetricsConfig::stall_timeout`].
    pub stall_timeout: std::time::Duration,
    /// The sink driver's progress as last seen, for stall detection.
    pub progress: Arc<std::sync::Mutex<Progress>>,
}

/// What the sink driver had settled when it was last seen to move, and when that was.
#[derive(Debug)]
pub struct Progress {
    settled: u64,
    since: std::time::Instant,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            settled: 0,
            since: std::time::Instant::now(),
        }
    }
}

impl Sources {
    fn connections(&self) -> Vec<(String, Arc<ConnectionStats>)> {
        self.connections
            .read()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// Copy the components' counters into the recorder.
    pub fn collect(&self) {
        let now = crate::ami::record::now_ns();
        let connections = self.connections();
        gauge!("amibus_servers_configured").set(connections.len() as f64);
        for (server, stats) in &connections {
            let s = stats.snapshot();
            let l = [("server", server.clone())];
            gauge!("amibus_ami_connected", &l).set(if s.connected { 1.0 } else { 0.0 });
            counter!("amibus_ami_frames_total", &l).absolute(s.frames);
            counter!("amibus_ami_bytes_total", &l).absolute(s.bytes);
            counter!("amibus_ami_parse_errors_total", &l).absolute(s.parse_errors);
            counter!("amibus_ami_reconnects_total", &l).absolute(s.reconnects);
            counter!("amibus_ami_auth_failures_total", &l).absolute(s.auth_failures);
            counter!("amibus_ami_dropped_records_total", &l).absolute(s.dropped_records);
            counter!("amibus_ami_gap_records_total", &l).absolute(s.gaps);
            counter!("amibus_ami_read_pauses_total", &l).absolute(s.read_pauses);
            counter!("amibus_ami_read_pause_timeouts_total", &l).absolute(s.read_pause_timeouts);
            let snap = &s.snapshot;
            for (trigger, n) in [("login", snap.login), ("gap", snap.gap)] {
                counter!("amibus_snapshots_total", "server" => server.clone(), "trigger" => trigger)
                    .absolute(n);
            }
            counter!("amibus_snapshot_items_total", &l).absolute(snap.items);
            counter!("amibus_snapshots_incomplete_total", &l).absolute(snap.incomplete);
            counter!("amibus_snapshot_late_frames_total", &l).absolute(snap.late_frames);
            if s.last_byte_ns > 0 {
                let silent = (now - s.last_byte_ns).max(0) as f64 / 1e9;
                gauge!("amibus_ami_seconds_since_last_byte", &l).set(silent);
            }
        }
        if let Some(p) = &self.pipeline {
            let p = p.snapshot();
            counter!("amibus_pipeline_records_total").absolute(p.records);
            counter!("amibus_spool_gap_records_total").absolute(p.gap_records);
            counter!("amibus_pipeline_too_large_records_total").absolute(p.too_large);
            counter!("amibus_pipeline_write_failed_records_total").absolute(p.write_failures);
        }
        if let Some(spool) = &self.spool {
            let s = spool.stats();
            gauge!("amibus_spool_records").set(s.records_held as f64);
            gauge!("amibus_spool_bytes").set(s.bytes_held as f64);
            gauge!("amibus_spool_in_doubt_records").set(s.in_doubt as f64);
            counter!("amibus_spool_in_doubt_resent_records_total").absolute(s.in_doubt_resent);
            gauge!("amibus_spool_oldest_record_age_seconds").set(spool.oldest_age().as_secs_f64());
            counter!("amibus_spool_dropped_records_total", "reason" => "drop_oldest")
                .absolute(s.dropped_oldest);
            counter!("amibus_spool_dropped_records_total", "reason" => "drop_newest")
                .absolute(s.dropped_newest);
            counter!("amibus_spool_write_errors_total").absolute(s.write_errors);
            gauge!("amibus_spool_writable").set(if s.write_failing { 0.0 } else { 1.0 });
            counter!("amibus_spool_damaged_records_total").absolute(s.damaged_records);
            counter!("amibus_spool_damaged_bytes_total").absolute(s.damaged_bytes);
            counter!("amibus_spool_damaged_unattributed_records_total")
                .absolute(s.damaged_unattributed);
        }
        if let Some((sink, d)) = &self.sink {
            let l = [("sink", (*sink).to_owned())];
            counter!("amibus_sink_records_sent_total", &l).absolute(d.sent.load(Ordering::Relaxed));
            counter!("amibus_sink_records_acknowledged_total", &l)
                .absolute(d.acknowledged.load(Ordering::Relaxed));
            counter!("amibus_sink_records_failed_total", "sink" => *sink, "reason" => "permanent")
                .absolute(d.failed_permanent.load(Ordering::Relaxed));
            counter!("amibus_sink_records_failed_total", "sink" => *sink, "reason" => "retriable")
                .absolute(d.failed_retriable.load(Ordering::Relaxed));
            counter!("amibus_sink_rewinds_total", &l).absolute(d.rewinds.load(Ordering::Relaxed));
            gauge!("amibus_sink_ready", &l).set(if d.is_ready() { 1.0 } else { 0.0 });
        }
        gauge!("amibus_healthy").set(if self.healthy().is_ok() { 1.0 } else { 0.0 });
        if let Some(c) = &self.control {
            let s = c.snapshot();
            for (server, status, n) in &s.results {
                counter!("amibus_control_results_total", "server" => server.clone(), "status" => *status)
                    .absolute(*n);
            }
            for (reason, n) in &s.rejected {
                counter!("amibus_control_rejected_total", "reason" => *reason).absolute(*n);
            }
            counter!("amibus_control_replayed_total").absolute(s.replayed);
            counter!("amibus_control_skipped_not_owned_total").absolute(s.skipped_not_owned);
            counter!("amibus_control_publish_failures_total").absolute(s.publish_failures);
            counter!("amibus_control_receive_errors_total").absolute(s.receive_errors);
            counter!("amibus_control_ack_failures_total").absolute(s.ack_failures);
            gauge!("amibus_control_in_flight").set(s.in_flight as f64);
            counter!("amibus_control_journal_loaded_total").absolute(s.journal_loaded);
            counter!("amibus_control_journal_restart_unknown_total")
                .absolute(s.journal_restart_unknown);
            counter!("amibus_control_journal_torn_bytes_total").absolute(s.journal_torn_bytes);
            counter!("amibus_control_journal_write_failures_total")
                .absolute(s.journal_write_failures);
            counter!("amibus_control_journal_compactions_total").absolute(s.journal_compactions);
        }
    }

    /// Alive: no stage has failed, and the sink driver is not stalled (it settled something
    /// within `stall_timeout`, or nothing waits). What recovers by itself (a broker that is
    /// down, a full disk) is not a liveness failure: a restart would not help.
    pub fn healthy(&self) -> Result<(), String> {
        if let Some(failure) = self.supervisor.as_ref().and_then(|s| s.failure()) {
            return Err(failure.to_string());
        }
        let (Some(spool), Some((sink, d))) = (&self.spool, &self.sink) else {
            return Ok(());
        };
        let settled = d.acknowledged.load(Ordering::Relaxed)
            + d.failed_permanent.load(Ordering::Relaxed)
            + d.failed_retriable.load(Ordering::Relaxed)
            + d.rewinds.load(Ordering::Relaxed);
        // In-doubt records wait below the spool's floor: sent again, they count too.
        let waiting = {
            let s = spool.stats();
            s.records_held + s.in_doubt
        };
        let mut p = self
            .progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if settled != p.settled || waiting == 0 {
            p.settled = settled;
            p.since = std::time::Instant::now();
            return Ok(());
        }
        let idle = p.since.elapsed();
        if !self.stall_timeout.is_zero() && idle >= self.stall_timeout {
            return Err(format!(
                "sink {sink} stalled: nothing settled for {}s with {waiting} records waiting",
                idle.as_secs()
            ));
        }
        Ok(())
    }

    /// Ready: alive, the spool can be written, the sink is not failing, and at least
    /// `min_connected` of the servers (a share, 0 to 1) are logged in.
    pub fn ready(&self, min_connected: f64) -> Result<(), String> {
        self.healthy()?;
        if let Some(spool) = &self.spool {
            let s = spool.stats();
            if s.write_failing {
                return Err(format!(
                    "the spool cannot be written ({} write errors; disk full?): new records are dropped and reported as gaps",
                    s.write_errors
                ));
            }
        }
        if let Some((sink, d)) = &self.sink
            && !d.is_ready()
        {
            return Err(format!("sink {sink} is failing deliveries"));
        }
        let connections = self.connections();
        if connections.is_empty() {
            return Ok(());
        }
        let up = connections
            .iter()
            .filter(|(_, s)| s.snapshot().connected)
            .count();
        let share = up as f64 / connections.len() as f64;
        if share + 1e-9 < min_connected {
            return Err(format!(
                "{up} of {} servers connected (needs {:.0} %)",
                connections.len(),
                min_connected * 100.0
            ));
        }
        Ok(())
    }
}

/// Serve `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` resolves. A
/// minimal HTTP/1.1 server: one request per connection, GET only, bounded request size.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    sources: Sources,
    min_connected: f64,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (mut sock, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let handle = handle.clone();
        let sources = sources.clone();
        tokio::spawn(async move {
            let mut req = [0u8; 2048];
            let mut len = 0;
            let read = async {
                loop {
                    let n = sock.read(&mut req[len..]).await?;
                    len += n;
                    if n == 0 || req[..len].windows(4).any(|w| w == b"\r\n\r\n") || len == req.len()
                    {
                        return Ok::<_, std::io::Error>(());
                    }
                }
            };
            if tokio::time::timeout(std::time::Duration::from_secs(5), read)
                .await
                .is_err()
            {
                return;
            }
            let line = req[..len].split(|&b| b == b'\r').next().unwrap_or_default();
            let mut parts = line.split(|&b| b == b' ');
            let method = parts.next().unwrap_or_default();
            let path = parts.next().unwrap_or_default();
            let (status, ctype, body) = match (method, path) {
                (b"GET", b"/metrics") => {
                    sources.collect();
                    ("200 OK", "text/plain; version=0.0.4", handle.render())
                }
                (b"GET", b"/healthz") => match sources.healthy() {
                    Ok(()) => ("200 OK", "text/plain", "ok\n".to_owned()),
                    Err(why) => (
                        "503 Service Unavailable",
                        "text/plain",
                        format!("unhealthy: {why}\n"),
                    ),
                },
                (b"GET", b"/readyz") => match sources.ready(min_connected) {
                    Ok(()) => ("200 OK", "text/plain", "ready\n".to_owned()),
                    Err(why) => (
                        "503 Service Unavailable",
                        "text/plain",
                        format!("not ready: {why}\n"),
                    ),
                },
                (b"GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
                _ => (
                    "405 Method Not Allowed",
                    "text/plain",
                    "GET only\n".to_owned(),
                ),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
