//! Core-NATS publishing on a connection of our own ([`crate::broker::nats_wire`]).
//!
//! Owns: the write queue (`HPUB`s rendered straight into one buffer under a short lock), the
//! task that writes it and reads the server, reconnecting, and what "confirmed" means here:
//! a record is confirmed when the server answers a `PING` written after it with its `PONG`.
//! The server reads a connection in order, so by then it has read the record and routed it to
//! whoever subscribed. That is still at-most-once (nobody may be listening; core NATS keeps
//! nothing), but a record written into a connection that dies before the server read it is
//! failed and sent again from the spool instead of being reported sent.
//!
//! One `PING` is in flight at a time: a write while one is out asks for another when its `PONG`
//! comes, so a busy stream costs one `PING` per round trip, not one per write.
//!
//! While disconnected, `send` refuses ([`SinkError::Retriable`]); the queue is emptied when the
//! connection breaks (under the same lock `send` takes, so no record slips into a dead
//! connection's queue and out after the reconnect), and every record not confirmed by then is
//! failed.
//!
//! Must never: confirm a record before the server's `PONG` to a `PING` written after it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Buf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::SinkError;
use crate::broker::nats_wire::{Conn, Dialer, ServerInfo, WireError, refusal};

/// `send` waits for room past this many queued bytes (the writer is behind, or the server).
const MAX_QUEUED: usize = 8 << 20;
/// A `PING` when nothing was written for this long, so a dead peer is noticed.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// No `PONG` for this long: the connection is dead, whatever TCP says.
const STALE: Duration = Duration::from_secs(20);

/// The publisher: a handle to the queue and the task that drains it.
pub struct Publisher {
    shared: Arc<Shared>,
    _stop: DropGuard,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writer: bytes queued, a `PONG` owed, or a `PING` wanted.
    wake: Notify,
    /// Wakes senders waiting for room.
    room: Notify,
    /// The last record the server confirmed, and the last one failed by a lost connection
    /// (`u64::MAX` once the publisher stopped). Both only grow.
    confirmed: AtomicU64,
    failed: AtomicU64,
    /// Outcomes waiting for either to move.
    waiting: Mutex<Vec<Waker>>,
}

struct Queue {
    bytes: Vec<u8>,
    connected: bool,
    max_payload: usize,
    /// Records numbered as queued, from 1.
    queued: u64,
}

impl Publisher {
    /// Connect to the first server that answers (each tried once), then keep a connection in
    /// the background until the publisher is dropped.
    ///
    /// # Errors
    /// Every server failed: the last server's error.
    pub async fn start(dialer: Dialer) -> Result<Publisher, WireError> {
        let mut last = WireError::Config("no servers given".into());
        let mut first = None;
        for i in 0..dialer.urls.len() {
            match dialer.dial(i).await {
                Ok(conn) => {
                    first = Some((i, conn));
                    break;
                }
                Err(e) => last = e,
            }
        }
        let Some((index, conn)) = first else {
            return Err(last);
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                bytes: Vec::with_capacity(256 << 10),
                connected: false,
                max_payload: conn.info.max_payload(),
                queued: 0,
            }),
            wake: Notify::new(),
            room: Notify::new(),
            confirmed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            waiting: Mutex::new(Vec::new()),
        });
        let stop = CancellationToken::new();
        shared.connected(&conn.info);
        tracing::info!(server = %conn.url, "nats connected");
        tokio::spawn(keep_connected(
            shared.clone(),
            dialer,
            index,
            conn,
            stop.clone(),
        ));
        Ok(Publisher {
            shared,
            _stop: stop.drop_guard(),
        })
    }

    /// Queue one message: `render` writes it into the queue given the server's max payload
    /// and returns `Err` (nothing written) when it does not fit. Returns the record's number.
    ///
    /// # Errors
    /// Not connected, or no room within `wait` → retriable; whatever `render` says.
    pub async fn queue(
        &self,
        wait: Duration,
        mut render: impl FnMut(&mut Vec<u8>, usize) -> Result<(), SinkError>,
    ) -> Result<u64, SinkError> {
        let deadline = Instant::now() + wait;
        loop {
            let room = self.shared.room.notified();
            {
                let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
                if !q.connected {
                    return Err(SinkError::Retriable("nats: not connected".into()));
                }
                if q.bytes.len() < MAX_QUEUED {
                    let was_empty = q.bytes.is_empty();
                    let max = q.max_payload;
                    render(&mut q.bytes, max)?;
                    q.queued += 1;
                    let n = q.queued;
                    drop(q);
                    if was_empty {
                        self.shared.wake.notify_one();
                    }
                    return Ok(n);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, room).await.is_err() {
                return Err(SinkError::Retriable(format!(
                    "nats: {MAX_QUEUED} bytes queued for {wait:?}: the server is not reading"
                )));
            }
        }
    }

    /// The number of the last record queued.
    pub fn queued(&self) -> u64 {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queued
    }

    /// Resolves when record `n` is confirmed (`Ok`) or failed by a lost connection.
    pub fn outcome(&self, n: u64) -> Outcome {
        Outcome {
            shared: self.shared.clone(),
            n,
        }
    }
}

/// The outcome of one record: two atomic loads when it is already known (the usual case: one
/// `PONG` confirms every record written before its `PING`), a waker registered otherwise.
pub struct Outcome {
    shared: Arc<Shared>,
    n: u64,
}

impl Future for Outcome {
    type Output = Result<(), SinkError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(done) = self.shared.outcome_of(self.n) {
            return Poll::Ready(done);
        }
        {
            let mut waiting = self
                .shared
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
                waiting.push(cx.waker().clone());
            }
        }
        // Moved while registering: the waker may have been taken before it was pushed.
        match self.shared.outcome_of(self.n) {
            Some(done) => Poll::Ready(done),
            None => Poll::Pending,
        }
    }
}

impl Shared {
    fn outcome_of(&self, n: u64) -> Option<Result<(), SinkError>> {
        if self.confirmed.load(Ordering::Acquire) >= n {
            return Some(Ok(()));
        }
        match self.failed.load(Ordering::Acquire) {
            u64::MAX => Some(Err(SinkError::Retriable("nats: publisher stopped".into()))),
            f if f >= n => Some(Err(SinkError::Retriable(
                "nats: the connection was lost before the server confirmed the record".into(),
            ))),
            _ => None,
        }
    }

    fn wake_outcomes(&self) {
        let waiting = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()));
        for w in waiting {
            w.wake();
        }
    }

    fn connected(&self, info: &ServerInfo) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.connected = true;
        q.max_payload = info.max_payload();
    }

    /// The connection is gone: empty the queue and fail everything not confirmed.
    fn disconnected(&self) {
        let queued = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.connected = false;
            q.bytes.clear();
            q.queued
        };
        self.failed.fetch_max(queued, Ordering::AcqRel);
        self.wake_outcomes();
        self.room.notify_waiters();
    }

    fn confirm(&self, upto: u64) {
        if self.confirmed.fetch_max(upto, Ordering::AcqRel) < upto {
            self.wake_outcomes();
        }
    }

    /// Swap the queued bytes into `out` (which must be empty); the number of the last record
    /// in them.
    fn take(&self, out: &mut Vec<u8>) -> u64 {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::swap(&mut q.bytes, out);
        let full = out.len() >= MAX_QUEUED;
        let n = q.queued;
        drop(q);
        if full {
            self.room.notify_waiters();
        }
        n
    }
}

/// Serve the connection; when it breaks, fail what it held and dial again (the next server
/// first, backing off up to 4 s once every server failed in a row).
async fn keep_connected(
    shared: Arc<Shared>,
    dialer: Dialer,
    mut index: usize,
    conn: Conn,
    stop: CancellationToken,
) {
    /// Fails every outcome still waiting when the task ends, however it ends.
    struct Stopped<'a>(&'a Shared);
    impl Drop for Stopped<'_> {
        fn drop(&mut self) {
            self.0.failed.store(u64::MAX, Ordering::Release);
            self.0.wake_outcomes();
        }
    }
    let _stopped = Stopped(&shared);
    let mut conn = Some(conn);
    let mut failures = 0u32;
    loop {
        let c = match conn.take() {
            Some(c) => c,
            None => {
                index += 1;
                let dialed = tokio::select! {
                    r = dialer.dial(index) => r,
                    () = stop.cancelled() => return,
                };
                match dialed {
                    Ok(c) => {
                        failures = 0;
                        shared.connected(&c.info);
                        tracing::info!(server = %c.url, "nats connected");
                        c
                    }
                    Err(e) => {
                        failures += 1;
                        let url = &dialer.urls[index % dialer.urls.len()];
                        tracing::debug!(server = %url, error = %e, "nats connect failed");
                        if failures as usize % dialer.urls.len() == 0 {
                            let rounds = failures / dialer.urls.len() as u32;
                            let pause = Duration::from_millis(100 << rounds.min(5))
                                .min(Duration::from_secs(4));
                            tracing::warn!(error = %e, retry_in = ?pause, "nats unreachable");
                            tokio::select! {
                                () = tokio::time::sleep(pause) => {}
                                () = stop.cancelled() => return,
                            }
                        }
                        continue;
                    }
                }
            }
        };
        let url = c.url.clone();
        let why = tokio::select! {
            e = serve(&shared, c) => e,
            () = stop.cancelled() => return,
        };
        shared.disconnected();
        tracing::warn!(server = %url, error = %why, "nats disconnected; reconnecting");
    }
}

/// What the reader tells the writer.
#[derive(Default)]
struct Session {
    /// `PING`s written and not answered: the last record each covers, and when it was sent.
    pings: Mutex<VecDeque<(u64, Instant)>>,
    pongs_owed: AtomicU32,
    /// Records were written while a `PING` was out: send another when it is answered.
    ping_wanted: AtomicBool,
}

/// Write the queue and read the server until the connection fails; the error says why.
async fn serve(shared: &Shared, conn: Conn) -> WireError {
    let Conn { io, read, .. } = conn;
    let (mut rd, mut wr) = tokio::io::split(io);
    let session = Session::default();
    let reading = async {
        let mut buf = read;
        loop {
            while let Some(end) = memchr::memmem::find(&buf, b"\r\n") {
                handle(shared, &session, &buf[..end])?;
                buf.advance(end + 2);
            }
            if buf.len() > 1 << 20 {
                return Err(WireError::Protocol("a line longer than 1 MiB".into()));
            }
            buf.reserve(4096);
            if rd.read_buf(&mut buf).await? == 0 {
                return Err(WireError::Closed);
            }
        }
    };
    let writing = async {
        let mut out = Vec::with_capacity(256 << 10);
        let mut written = 0u64;
        let mut last_write = Instant::now();
        loop {
            let woken = shared.wake.notified();
            let upto = shared.take(&mut out);
            let had_data = !out.is_empty();
            if had_data {
                written = upto;
            }
            for _ in 0..session.pongs_owed.swap(0, Ordering::AcqRel) {
                out.extend_from_slice(b"PONG\r\n");
            }
            {
                let mut pings = session.pings.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                if let Some((_, sent)) = pings.front()
                    && now.duration_since(*sent) > STALE
                {
                    return Err(WireError::Protocol(format!("no PONG in {STALE:?}")));
                }
                let wanted = had_data || session.ping_wanted.load(Ordering::Acquire);
                let idle = now.duration_since(last_write) >= KEEPALIVE;
                if pings.is_empty() && (wanted || idle) {
                    out.extend_from_slice(b"PING\r\n");
                    pings.push_back((written, now));
                    session.ping_wanted.store(false, Ordering::Release);
                } else if had_data {
                    session.ping_wanted.store(true, Ordering::Release);
                }
            }
            if out.is_empty() {
                let _ = tokio::time::timeout(KEEPALIVE, woken).await;
                continue;
            }
            wr.write_all(&out).await?;
            wr.flush().await?;
            out.clear();
            last_write = Instant::now();
        }
    };
    match tokio::try_join!(reading, writing) {
        Err(e) => e,
        Ok(((), ())) => WireError::Closed,
    }
}

/// One line from the server.
fn handle(shared: &Shared, session: &Session, line: &[u8]) -> Result<(), WireError> {
    match line {
        b"PING" => {
            session.pongs_owed.fetch_add(1, Ordering::AcqRel);
            shared.wake.notify_one();
        }
        b"PONG" => {
            let answered = session
                .pings
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
            let Some((upto, _)) = answered else {
                return Err(WireError::Protocol("a PONG nobody asked for".into()));
            };
            shared.confirm(upto);
            if session.ping_wanted.load(Ordering::Acquire) {
                shared.wake.notify_one();
            }
        }
        b"+OK" => {}
        l if l.starts_with(b"INFO ") => {
            let info = ServerInfo::parse(&l[5..])?;
            shared
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .max_payload = info.max_payload();
        }
        l if l.starts_with(b"-ERR") => {
            // Permission errors leave the connection open (the message is dropped: core
            // NATS's at-most-once); every other -ERR is followed by the server closing it.
            let e = refusal(l);
            if e.to_string().contains("Permissions Violation") {
                tracing::warn!(error = %e, "nats dropped a message");
            } else {
                return Err(e);
            }
        }
        l => {
            return Err(WireError::Protocol(format!(
                "unexpected `{}`",
                String::from_utf8_lossy(&l[..l.len().min(80)])
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::nats::NatsConnection;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};

    /// A scripted server: INFO, then the client's CONNECT and PING answered with PONG.
    async fn accept(listener: &TcpListener) -> BufReader<TcpStream> {
        let (sock, _) = listener.accept().await.unwrap();
        let mut sock = BufReader::new(sock);
        sock.get_mut()
            .write_all(b"INFO {\"server_id\":\"fake\",\"headers\":true,\"max_payload\":1000}\r\n")
            .await
            .unwrap();
        assert!(line(&mut sock).await.starts_with("CONNECT {"));
        assert_eq!(line(&mut sock).await, "PING");
        sock.get_mut().write_all(b"PONG\r\n").await.unwrap();
        sock
    }

    async fn line(sock: &mut BufReader<TcpStream>) -> String {
        let mut l = String::new();
        sock.read_line(&mut l).await.unwrap();
        l.trim_end().to_owned()
    }

    fn hpub(text: &str) -> impl FnMut(&mut Vec<u8>, usize) -> Result<(), SinkError> + '_ {
        move |out, max| {
            assert_eq!(max, 1000, "the server's max_payload");
            out.extend_from_slice(format!("PUB s {}\r\n{text}\r\n", text.len()).as_bytes());
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_record_is_confirmed_by_the_pong_after_it_and_failed_without_one() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("nats://{}", listener.local_addr().unwrap());
        let dialer = Dialer::new(&NatsConnection {
            servers: vec![url],
            ..NatsConnection::default()
        })
        .unwrap();
        let (publisher, mut sock) = tokio::join!(Publisher::start(dialer), accept(&listener));
        let publisher = publisher.unwrap();

        // Written and flushed, but the server never answers its PING: failed, not confirmed.
        let n = publisher
            .queue(Duration::from_secs(5), hpub("one"))
            .await
            .unwrap();
        assert_eq!(
            (line(&mut sock).await, line(&mut sock).await),
            ("PUB s 3".into(), "one".into())
        );
        assert_eq!(line(&mut sock).await, "PING");
        drop(sock);
        assert!(
            publisher.outcome(n).await.is_err(),
            "confirmed without a PONG"
        );

        // The reconnect: the server's own PING is answered, an -ERR about permissions does
        // not end the connection, and the PONG confirms what was written before its PING.
        let mut sock = accept(&listener).await;
        sock.get_mut()
            .write_all(b"PING\r\n-ERR 'Permissions Violation for Publish to \"x\"'\r\n")
            .await
            .unwrap();
        assert_eq!(line(&mut sock).await, "PONG");
        let n = loop {
            // Refused until the client has seen the handshake through.
            match publisher.queue(Duration::from_secs(5), hpub("two")).await {
                Ok(n) => break n,
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        assert_eq!(
            (line(&mut sock).await, line(&mut sock).await),
            ("PUB s 3".into(), "two".into())
        );
        assert_eq!(line(&mut sock).await, "PING");
        let outcome = publisher.outcome(n);
        sock.get_mut().write_all(b"PONG\r\n").await.unwrap();
        outcome.await.expect("confirmed by the PONG");
    }
}
