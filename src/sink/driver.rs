//! The sink driver: spool → sink, acknowledging in the spool only what the sink confirmed.
//!
//! Owns: the in-flight set of deliveries, what to do with each outcome, and draining at
//! shutdown. Rules:
//! - acknowledged → `spool.ack(id)`;
//! - permanent failure (too large, invalid) → counted, logged, and acknowledged so it never
//!   blocks the records behind it;
//! - retriable failure → stop taking new records, let the in-flight ones finish, wait a
//!   backoff, and rewind the reader to the oldest unacknowledged record. Records behind the
//!   failure are sent again in order, skipping those acknowledged meanwhile.
//!
//! Order: Kafka's idempotent producer keeps each partition in order through its own retries,
//! so per-key order holds up to duplicates. NATS (core and JetStream) publishes on a
//! connection whose queue is emptied when it breaks, and the resend starts at the oldest
//! unconfirmed record, so a reconnect keeps the order (what the server had stored of the resent
//! records is dropped by `Nats-Msg-Id`). JetStream can still store one record after later
//! ones when it alone fails while they succeed (a stream briefly without a leader refuses one
//! publish and takes the next): its resend lands after them. Nothing is lost or stored twice,
//! and every record carries `epoch` and `seq` (headers and envelope) for consumers that need
//! strict order.
//!
//! Must never: acknowledge a record the sink did not confirm or give up on as permanent.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use std::time::Instant;

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};

use super::{Delivery, Sink, SinkError};
use crate::spool::{Reader, SpoolError};

/// The send-latency histogram (hand-off to acknowledgement), recorded here per acknowledgement
/// and described by `telemetry`.
pub const SEND_SECONDS: &str = "amibus_sink_send_seconds";

/// Running totals of one driver, readable from other tasks.
#[derive(Debug, Default)]
pub struct DriverStats {
    pub sent: AtomicU64,
    pub acknowledged: AtomicU64,
    pub failed_permanent: AtomicU64,
    pub failed_retriable: AtomicU64,
    pub rewinds: AtomicU64,
    /// Set by a retriable failure, cleared by the next acknowledgement.
    failing: AtomicBool,
}

impl DriverStats {
    /// False while deliveries fail retriably (the broker is down or refusing).
    pub fn is_ready(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
    }

    /// The totals now.
    pub fn snapshot(&self) -> DriverSnapshot {
        DriverSnapshot {
            sent: self.sent.load(Ordering::Relaxed),
            acknowledged: self.acknowledged.load(Ordering::Relaxed),
            failed_permanent: self.failed_permanent.load(Ordering::Relaxed),
            failed_retriable: self.failed_retriable.load(Ordering::Relaxed),
            rewinds: self.rewinds.load(Ordering::Relaxed),
        }
    }
}

/// [`DriverStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverSnapshot {
    /// Records handed to the sink (resends included).
    pub sent: u64,
    pub acknowledged: u64,
    /// Records the broker refused for good (acknowledged in the spool, counted, not resent).
    pub failed_permanent: u64,
    /// Deliveries that failed and will be sent again.
    pub failed_retriable: u64,
    /// Times the driver went back to the oldest unacknowledged record to resend.
    pub rewinds: u64,
}

#[derive(Clone, Copy, Debug)]
pub struct DriverConfig {
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long shutdown waits for in-flight deliveries.
    pub drain_deadline: Duration,
    /// A delivery not confirmed this long after it was handed to the sink fails (retriable),
    /// counted from the hand-off, whatever the client's own timer does; `None` takes the
    /// sink's [`Sink::ack_deadline`].
    pub ack_deadline: Option<Duration>,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            drain_deadline: Duration::from_secs(10),
            ack_deadline: None,
        }
    }
}

/// Deliveries in the order their records were sent. Only the oldest is polled: the brokers
/// confirm in order or nearly (a core NATS flush covers every record before it, PubAcks come
/// back in publish order, Kafka reports a partition in order), so one registered waker serves
/// them all, where a set polled as a whole woke and polled every record's future on its own.
/// A later delivery that finished first is settled as soon as the ones before it are; the
/// spool's in-flight window already counts from the oldest unacknowledged record.
///
/// Deadlines count from the hand-off, not from the first poll: a client timer that starts when
/// its future is first polled (the JetStream PubAck's) ran one record after another here, since
/// only the oldest is polled, and after a broker restart delivery froze for (records in flight)
/// x (ack timeout): half an hour with 20,000 in flight. One timer serves the whole queue: it is
/// armed at the oldest's deadline and, when it fires for a record already settled, moved to the
/// new oldest's, so it costs nothing per record.
struct InFlight {
    queue: VecDeque<(u64, Instant, Delivery)>,
    deadline: Option<Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl InFlight {
    fn new(deadline: Option<Duration>) -> Self {
        InFlight {
            queue: VecDeque::new(),
            deadline,
            timer: None,
        }
    }

    fn push(&mut self, id: u64, delivery: Delivery) {
        self.queue.push_back((id, Instant::now(), delivery));
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The oldest delivery's outcome once it has one, or a retriable failure once its deadline
    /// has passed; pending while empty.
    fn poll_oldest(&mut self, cx: &mut Context<'_>) -> Poll<(u64, Instant, Result<(), SinkError>)> {
        let Some((_, sent, delivery)) = self.queue.front_mut() else {
            return Poll::Pending;
        };
        if let Poll::Ready(outcome) = delivery.as_mut().poll(cx) {
            let (id, sent, _) = self.queue.pop_front().expect("front exists");
            return Poll::Ready((id, sent, outcome));
        }
        let Some(limit) = self.deadline else {
            return Poll::Pending;
        };
        let due = tokio::time::Instant::from_std(*sent + limit);
        loop {
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if timer.deadline() < due {
                // Armed for a record settled since: it fires early, and is moved then.
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                timer.as_mut().reset(due);
                continue;
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.timer = None;
            let (id, sent, _) = self.queue.pop_front().expect("front exists");
            let why = format!("not acknowledged within {limit:?} of the hand-off");
            return Poll::Ready((id, sent, Err(SinkError::Retriable(why))));
        }
    }

    async fn next(&mut self) -> (u64, Instant, Result<(), SinkError>) {
        poll_fn(|cx| self.poll_oldest(cx)).await
    }
}

/// Says "delivery failed; will resend" at most once per [`RETRY_LOG_EVERY`], with how many
/// failures there were since: a stall of any length leaves a line every few seconds, never a
/// line per record (a counter per 1,000 failures left a 30-minute stall with one line).
struct RetryLog {
    last: Option<Instant>,
    since: u64,
}

const RETRY_LOG_EVERY: Duration = Duration::from_secs(10);

impl RetryLog {
    fn failed(&mut self, sink: &str, id: u64, why: &str) {
        self.since += 1;
        if self.last.is_some_and(|t| t.elapsed() < RETRY_LOG_EVERY) {
            return;
        }
        tracing::warn!(
            sink,
            record = id,
            error = why,
            failures = self.since,
            "delivery failed; will resend"
        );
        self.last = Some(Instant::now());
        self.since = 0;
    }
}

/// Move records until `shutdown` resolves, then drain in-flight deliveries within the deadline.
/// Records not confirmed by then stay in the spool for the next start.
///
/// # Errors
/// Only when the spool cannot be read.
pub async fn run<S: Sink>(
    mut sink: S,
    mut reader: Reader,
    cfg: DriverConfig,
    stats: Arc<DriverStats>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), SpoolError> {
    let mut in_flight = InFlight::new(cfg.ack_deadline.or(sink.ack_deadline()));
    let mut retry_log = RetryLog {
        last: None,
        since: 0,
    };
    let name = sink.name();
    // Looked up once: the macro with labels builds and hashes a key on every call.
    let send_seconds = metrics::histogram!(SEND_SECONDS, "sink" => name);
    let mut settled =
        |reader: &Reader, (id, sent, outcome): (u64, Instant, Result<(), SinkError>)| {
            if outcome.is_ok() {
                send_seconds.record(sent.elapsed().as_secs_f64());
            }
            settle(reader, &stats, &mut retry_log, name, id, outcome)
        };
    let mut rewind_pending = false;
    let mut backoff = cfg.backoff_min;
    tokio::pin!(shutdown);
    loop {
        if rewind_pending && in_flight.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = &mut shutdown => break,
            }
            backoff = (backoff * 2).min(cfg.backoff_max);
            reader.rewind();
            stats.rewinds.fetch_add(1, Ordering::Relaxed);
            rewind_pending = false;
        }
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            done = in_flight.next(), if !in_flight.is_empty() => {
                if settled(&reader, done) {
                    rewind_pending = true;
                } else if !rewind_pending {
                    backoff = cfg.backoff_min;
                }
            }
            next = reader.next(), if !rewind_pending => {
                let (id, record) = next?;
                stats.sent.fetch_add(1, Ordering::Relaxed);
                // `send` may wait for room that only settling deliveries makes (the JetStream
                // client holds a permit per PubAck until its future is polled), so deliveries
                // keep settling while it waits.
                let send = sink.send(&record);
                tokio::pin!(send);
                let sent = loop {
                    tokio::select! {
                        biased;
                        sent = &mut send => break sent,
                        done = in_flight.next(), if !in_flight.is_empty() => {
                            if settled(&reader, done) {
                                rewind_pending = true;
                            }
                        }
                    }
                };
                match sent {
                    Ok(delivery) => in_flight.push(id, delivery),
                    Err(e) => {
                        if settled(&reader, (id, Instant::now(), Err(e))) {
                            rewind_pending = true;
                        }
                    }
                }
            }
        }
    }
    // Drain: flush the client and collect what it confirms in time.
    let drain = async {
        let _ = sink.flush(cfg.drain_deadline).await;
        while !in_flight.is_empty() {
            settled(&reader, in_flight.next().await);
        }
    };
    let _ = tokio::time::timeout(cfg.drain_deadline, drain).await;
    Ok(())
}

/// Record one outcome; returns true when the reader must rewind.
fn settle(
    reader: &Reader,
    stats: &DriverStats,
    retry_log: &mut RetryLog,
    sink: &str,
    id: u64,
    outcome: Result<(), SinkError>,
) -> bool {
    match outcome {
        Ok(()) => {
            reader.spool().ack(id);
            stats.acknowledged.fetch_add(1, Ordering::Relaxed);
            stats.failing.store(false, Ordering::Relaxed);
            false
        }
        Err(SinkError::Permanent(why)) => {
            tracing::warn!(sink, record = id, error = %why, "record cannot be delivered; dropped");
            reader.spool().ack(id);
            stats.failed_permanent.fetch_add(1, Ordering::Relaxed);
            false
        }
        Err(SinkError::Retriable(why)) => {
            stats.failing.store(true, Ordering::Relaxed);
            stats.failed_retriable.fetch_add(1, Ordering::Relaxed);
            retry_log.failed(sink, id, &why);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::{Delivery, Record};
    use crate::spool::{Fsync, Spool, SpoolConfig};
    use bytes::Bytes;
    use std::sync::Mutex;

    /// Fails record "3" permanently, and record "5" retriably the first time it is sent.
    struct FlakySink {
        delivered: Arc<Mutex<Vec<String>>>,
        failed_once: bool,
    }

    impl Sink for FlakySink {
        fn name(&self) -> &'static str {
            "flaky"
        }
        async fn send(&mut self, record: &Record) -> Result<Delivery, SinkError> {
            let name = String::from_utf8_lossy(&record.payload).into_owned();
            let outcome = match name.as_str() {
                "3" => Err(SinkError::Permanent("too large".into())),
                "5" if !self.failed_once => {
                    self.failed_once = true;
                    Err(SinkError::Retriable("broker down".into()))
                }
                _ => {
                    self.delivered.lock().expect("lock").push(name);
                    Ok(())
                }
            };
            Ok(Box::pin(async move { outcome }))
        }
        async fn flush(&mut self, _: Duration) -> Result<(), SinkError> {
            Ok(())
        }
    }

    /// Like the JetStream client: `send` waits for one of `permits`, which a delivery gives
    /// back only when its future is polled to the end.
    struct PermitSink {
        permits: Arc<tokio::sync::Semaphore>,
    }

    impl Sink for PermitSink {
        fn name(&self) -> &'static str {
            "permits"
        }
        async fn send(&mut self, _: &Record) -> Result<Delivery, SinkError> {
            let permit = self
                .permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| SinkError::Retriable("closed".into()))?;
            Ok(Box::pin(async move {
                tokio::task::yield_now().await;
                drop(permit);
                Ok(())
            }))
        }
        async fn flush(&mut self, _: Duration) -> Result<(), SinkError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn deliveries_settle_in_the_order_they_were_sent() {
        let mut in_flight = InFlight::new(None);
        let mut confirm = Vec::new();
        for id in 0..3u64 {
            let (tx, rx) = tokio::sync::oneshot::channel::<Result<(), SinkError>>();
            confirm.push(tx);
            in_flight.push(
                id,
                Box::pin(
                    async move { rx.await.unwrap_or(Err(SinkError::Retriable("gone".into()))) },
                ),
            );
        }
        let mut confirm = confirm.into_iter();
        let (first, second, third) = (confirm.next(), confirm.next(), confirm.next());
        let _ = second
            .expect("second")
            .send(Err(SinkError::Permanent("too large".into())));
        let pending = poll_fn(|cx| Poll::Ready(in_flight.poll_oldest(cx).is_pending())).await;
        assert!(pending, "a later outcome waits for the earlier ones");
        let _ = first.expect("first").send(Ok(()));
        let (id, _, outcome) = in_flight.next().await;
        assert_eq!((id, outcome), (0, Ok(())));
        let (id, _, outcome) = in_flight.next().await;
        assert_eq!(
            (id, outcome),
            (1, Err(SinkError::Permanent("too large".into())))
        );
        drop(third);
        let (id, _, outcome) = in_flight.next().await;
        assert_eq!(id, 2);
        assert!(outcome.is_err_and(|e| e.is_retriable()));
        assert!(in_flight.is_empty());
    }

    /// Deadlines count from the hand-off: once they have all passed, every waiting delivery
    /// fails on its first poll, instead of each starting its own timer when it becomes the
    /// oldest (which made a broker restart freeze delivery for in-flight x timeout).
    #[tokio::test]
    async fn ack_deadlines_count_from_the_hand_off_not_from_the_first_poll() {
        let limit = Duration::from_millis(50);
        let mut in_flight = InFlight::new(Some(limit));
        for id in 0..100u64 {
            in_flight.push(id, Box::pin(std::future::pending()));
        }
        // Paces the test only: every deadline is behind us after this.
        tokio::time::sleep(limit * 2).await;
        for want in 0..100u64 {
            let got = poll_fn(|cx| Poll::Ready(in_flight.poll_oldest(cx))).await;
            let Poll::Ready((id, _, outcome)) = got else {
                panic!("record {want} waited for a timer of its own");
            };
            assert_eq!(id, want);
            assert!(outcome.is_err_and(|e| e.is_retriable()));
        }
        assert!(in_flight.is_empty());

        // A record confirmed in time is not failed by the timer armed for it.
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<(), SinkError>>();
        in_flight.push(1, Box::pin(async move { rx.await.unwrap_or(Ok(())) }));
        in_flight.push(2, Box::pin(std::future::pending()));
        let pending = poll_fn(|cx| Poll::Ready(in_flight.poll_oldest(cx).is_pending())).await;
        assert!(pending);
        let _ = tx.send(Ok(()));
        let (id, _, outcome) = in_flight.next().await;
        assert_eq!((id, outcome), (1, Ok(())));
        let (id, _, outcome) = in_flight.next().await;
        assert_eq!(id, 2);
        assert!(outcome.is_err_and(|e| e.is_retriable()));
    }

    #[tokio::test]
    async fn deliveries_settle_while_send_waits_for_room() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spool, _) = Spool::open(SpoolConfig {
            fsync: Fsync::Never,
            ..SpoolConfig::new(dir.path())
        })
        .expect("open");
        for n in 0..50 {
            spool
                .append(&Record {
                    key: Bytes::new(),
                    meta: Default::default(),
                    payload: Bytes::from(n.to_string()),
                })
                .expect("append");
        }
        let sink = PermitSink {
            permits: Arc::new(tokio::sync::Semaphore::new(4)),
        };
        let stats = Arc::new(DriverStats::default());
        let watch = spool.clone();
        let done = async move {
            while watch.stats().records_held > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        // Without settling during `send`, the fifth send waits forever.
        tokio::time::timeout(
            Duration::from_secs(30),
            run(
                sink,
                spool.reader(),
                DriverConfig::default(),
                stats.clone(),
                done,
            ),
        )
        .await
        .expect("the driver must not wait on itself")
        .expect("runs");
        assert_eq!(stats.acknowledged.load(Ordering::Relaxed), 50);
    }

    #[tokio::test]
    async fn retriable_failures_rewind_and_permanent_ones_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spool, _) = Spool::open(SpoolConfig {
            fsync: Fsync::Never,
            ..SpoolConfig::new(dir.path())
        })
        .expect("open");
        for n in 0..10 {
            spool
                .append(&Record {
                    key: Bytes::new(),
                    meta: Default::default(),
                    payload: Bytes::from(n.to_string()),
                })
                .expect("append");
        }
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let stats = Arc::new(DriverStats::default());
        let sink = FlakySink {
            delivered: delivered.clone(),
            failed_once: false,
        };
        let cfg = DriverConfig {
            backoff_min: Duration::from_millis(1),
            ..DriverConfig::default()
        };
        let watch = spool.clone();
        let done = async move {
            while watch.stats().records_held > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        run(sink, spool.reader(), cfg, stats.clone(), done)
            .await
            .expect("runs");
        let got = delivered.lock().expect("lock").clone();
        // Every record but the permanent failure arrives; order holds for what was resent.
        let mut unique = got.clone();
        unique.dedup();
        let expect: Vec<String> = [0, 1, 2, 4, 5, 6, 7, 8, 9]
            .iter()
            .map(|n| n.to_string())
            .collect();
        let mut sorted = unique.clone();
        sorted.sort_by_key(|s| s.parse::<u32>().unwrap_or(0));
        sorted.dedup();
        assert_eq!(sorted, expect);
        let pos5 = got.iter().position(|s| s == "5").expect("5 delivered");
        assert!(
            got[pos5..]
                .windows(2)
                .all(|w| w[0].parse::<u32>().unwrap_or(0) < w[1].parse::<u32>().unwrap_or(0))
        );
        assert_eq!(stats.failed_permanent.load(Ordering::Relaxed), 1);
        assert_eq!(stats.rewinds.load(Ordering::Relaxed), 1);
        assert_eq!(spool.stats().records_held, 0);
    }
}
