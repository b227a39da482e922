//! The connection's task: dialing (the next server first), writing the queue, reading the
//! server (`PING`, `PONG`, `INFO`, `-ERR`, PubAcks on the inbox), and what a lost connection
//! fails.

use super::*;
use std::collections::VecDeque;

/// Serve the connection; when it breaks, fail what it held and dial again (the next server
/// first, backing off up to 4 s once every server failed in a row).
pub(super) async fn keep_connected(
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
            self.0.disconnected();
            self.0.failed.store(u64::MAX, Ordering::Release);
            self.0.wake_outcomes();
        }
    }
    let _stopped = Stopped(&shared);
    let mut conn = Some(conn);
    let mut failures = 0u32;
    // Left a server in lame duck mode with records still queued: they wait for the next one.
    let mut handing_over = false;
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
                        if std::mem::take(&mut handing_over) {
                            shared.disconnected();
                        }
                        failures += 1;
                        let known = dialer.count();
                        tracing::debug!(server = %dialer.url(index), error = %e, "nats connect failed");
                        if (failures as usize).is_multiple_of(known) {
                            let rounds = failures / known as u32;
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
            e = serve(&shared, &dialer, c) => e,
            () = stop.cancelled() => return,
        };
        metrics::counter!("amibus_nats_disconnects_total", "reason" => why.kind()).increment(1);
        if matches!(why, WireError::LameDuck { drained: true }) {
            // Everything written was confirmed: nothing to fail. What is queued stays queued
            // (and the queue open) for the next server, unless it cannot be reached.
            handing_over = true;
            tracing::info!(server = %url, "nats server in lame duck mode; moving to the next");
        } else {
            shared.disconnected();
            tracing::warn!(server = %url, error = %why, "nats disconnected; reconnecting");
        }
    }
}

/// What the reader tells the writer.
#[derive(Default)]
struct Session {
    /// `PING`s written and not answered: the last record each covers, and when it was sent.
    pings: Mutex<VecDeque<(u64, Instant)>>,
    pongs_owed: AtomicU32,
    /// Core: records were written while a `PING` was out; send another when it is answered.
    ping_wanted: AtomicBool,
    /// The server said it entered lame duck mode.
    lame_duck: AtomicBool,
}

/// Write the queue and read the server until the connection fails; the error says why.
async fn serve(shared: &Shared, dialer: &Dialer, conn: Conn) -> WireError {
    let Conn { io, read, info, .. } = conn;
    let (mut rd, mut wr) = tokio::io::split(io);
    let session = Session::default();
    // A PubAck or a stray message is small; the server's max payload bounds any message.
    let max_message = info.max_payload() + (64 << 10);
    let reading = async {
        let mut buf = read;
        loop {
            let mut changed = false;
            while let Some(end) = memchr::memmem::find(&buf, b"\r\n") {
                let line = &buf[..end];
                if line.starts_with(b"MSG ") || line.starts_with(b"HMSG ") {
                    let msg = MsgLine::parse(line)?;
                    let need = end + 2 + msg.total + 2;
                    if msg.total > max_message {
                        return Err(WireError::Protocol(format!(
                            "a message of {} bytes",
                            msg.total
                        )));
                    }
                    if buf.len() < need {
                        break;
                    }
                    let body = &buf[end + 2..end + 2 + msg.total];
                    changed |= on_message(shared, &msg, line, body);
                    buf.advance(need);
                } else {
                    changed |= on_line(shared, dialer, &session, line)?;
                    buf.advance(end + 2);
                }
            }
            if changed {
                // Once per read, not per PubAck: a read carries many.
                shared.wake_outcomes();
                shared.room.notify_waiters();
            }
            if buf.len() > max_message + 1024 {
                return Err(WireError::Protocol(
                    "a line longer than the max payload".into(),
                ));
            }
            buf.reserve(4096);
            if rd.read_buf(&mut buf).await? == 0 {
                return Err(WireError::Closed);
            }
        }
    };
    let writing = async {
        if let Some(acks) = &shared.acks {
            // The first write: every record of this connection is queued behind it.
            wr.write_all(format!("SUB {}* 1\r\n", acks.inbox).as_bytes())
                .await?;
        }
        let core = shared.acks.is_none();
        let mut out = Vec::with_capacity(256 << 10);
        let mut written = 0u64;
        let mut last_write = Instant::now();
        loop {
            if session.lame_duck.load(Ordering::Acquire) {
                return leave_lame_duck(shared, &session, &mut wr, written).await;
            }
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
                let mut pings = lock(&session.pings);
                let now = Instant::now();
                if let Some((_, sent)) = pings.front()
                    && now.duration_since(*sent) > STALE
                {
                    return Err(WireError::Protocol(format!("no PONG in {STALE:?}")));
                }
                let wanted = core && (had_data || session.ping_wanted.load(Ordering::Acquire));
                let idle = now.duration_since(last_write) >= KEEPALIVE;
                if pings.is_empty() && (wanted || idle) {
                    out.extend_from_slice(b"PING\r\n");
                    pings.push_back((written, now));
                    session.ping_wanted.store(false, Ordering::Release);
                } else if core && had_data {
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

/// How long a server in lame duck mode is given to confirm what was written to it before the
/// connection is left anyway (failing what it did not confirm). nats-server waits 10 s by
/// default before it starts closing connections itself.
const LAME_DUCK_DRAIN: Duration = Duration::from_secs(5);

/// The server is shutting down: write nothing more to it, and leave once every record written
/// on this connection is confirmed, so the move to the next server fails and repeats nothing.
/// Server `PING`s are still answered meanwhile.
async fn leave_lame_duck(
    shared: &Shared,
    session: &Session,
    wr: &mut (impl tokio::io::AsyncWrite + Unpin),
    written: u64,
) -> Result<(), WireError> {
    let deadline = Instant::now() + LAME_DUCK_DRAIN;
    let mut out = Vec::new();
    loop {
        let drained = match &shared.acks {
            None => shared.confirmed.load(Ordering::Acquire) >= written,
            Some(acks) => lock(&acks.slots).settled_through(written),
        };
        if drained || Instant::now() >= deadline {
            return Err(WireError::LameDuck { drained });
        }
        for _ in 0..session.pongs_owed.swap(0, Ordering::AcqRel) {
            out.extend_from_slice(b"PONG\r\n");
        }
        if shared.acks.is_none() {
            let mut pings = lock(&session.pings);
            if pings.is_empty() {
                out.extend_from_slice(b"PING\r\n");
                pings.push_back((written, Instant::now()));
            }
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
            wr.flush().await?;
            out.clear();
        }
        // Confirmations wake the writer; the timeout is for PubAcks, which do not.
        let _ = tokio::time::timeout(Duration::from_millis(20), shared.wake.notified()).await;
    }
}

/// `MSG <subject> <sid> [reply] <bytes>` or `HMSG <subject> <sid> [reply] <header bytes>
/// <total bytes>`.
struct MsgLine {
    header_len: usize,
    total: usize,
}

impl MsgLine {
    fn parse(line: &[u8]) -> Result<MsgLine, WireError> {
        let bad = || {
            WireError::Protocol(format!(
                "bad message line `{}`",
                String::from_utf8_lossy(&line[..line.len().min(120)])
            ))
        };
        let text = std::str::from_utf8(line).map_err(|_| bad())?;
        let mut parts = text.split_ascii_whitespace().rev();
        let number = |s: Option<&str>| s.and_then(|s| s.parse::<usize>().ok()).ok_or_else(bad);
        if line.starts_with(b"HMSG ") {
            let total = number(parts.next())?;
            let header_len = number(parts.next())?;
            if header_len > total {
                return Err(bad());
            }
            Ok(MsgLine { header_len, total })
        } else {
            Ok(MsgLine {
                header_len: 0,
                total: number(parts.next())?,
            })
        }
    }
}

/// The API error of a PubAck that is not a success.
#[derive(Deserialize)]
struct PubAckReply {
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// A message on the inbox: the PubAck (or status) of the record its subject numbers. True if
/// an outcome changed.
fn on_message(shared: &Shared, msg: &MsgLine, line: &[u8], body: &[u8]) -> bool {
    let Some(acks) = &shared.acks else {
        return false;
    };
    // The subject is the second word; its last level is the record's number.
    let subject = line.split(|&b| b == b' ').nth(1).unwrap_or_default();
    let Some(n) = subject
        .strip_prefix(acks.inbox.as_bytes())
        .and_then(|n| std::str::from_utf8(n).ok())
        .and_then(|n| n.parse::<u64>().ok())
    else {
        tracing::debug!("nats: a message on no inbox of ours; ignored");
        return false;
    };
    let (headers, payload) = body.split_at(msg.header_len);
    let outcome = if headers.starts_with(b"NATS/1.0 503") {
        Err(Failed::NoResponders)
    } else if headers.starts_with(b"NATS/1.0 ") && headers.len() > 12 {
        let status = headers[9..]
            .split(|&b| b == b'\r')
            .next()
            .unwrap_or_default();
        Err(Failed::Sink(SinkError::Retriable(format!(
            "nats jetstream: status {}",
            String::from_utf8_lossy(status)
        ))))
    } else if memchr::memmem::find(payload, b"\"error\"").is_none()
        && memchr::memmem::find(payload, b"\"seq\"").is_some()
    {
        Ok(())
    } else {
        match serde_json::from_slice::<PubAckReply>(payload) {
            Ok(PubAckReply { error: Some(e) }) => Err(Failed::Api {
                err_code: e.err_code,
                description: e.description,
            }),
            _ => Err(Failed::Sink(SinkError::Retriable(format!(
                "nats jetstream: a PubAck that cannot be read: `{}`",
                String::from_utf8_lossy(&payload[..payload.len().min(120)])
            )))),
        }
    };
    lock(&acks.slots).resolve(n, outcome)
}

/// One line from the server that is not a message. True if an outcome changed.
fn on_line(
    shared: &Shared,
    dialer: &Dialer,
    session: &Session,
    line: &[u8],
) -> Result<bool, WireError> {
    match line {
        b"PING" => {
            session.pongs_owed.fetch_add(1, Ordering::AcqRel);
            shared.wake.notify_one();
        }
        b"PONG" => {
            let answered = lock(&session.pings).pop_front();
            let Some((upto, _)) = answered else {
                return Err(WireError::Protocol("a PONG nobody asked for".into()));
            };
            if session.ping_wanted.load(Ordering::Acquire)
                || session.lame_duck.load(Ordering::Acquire)
            {
                shared.wake.notify_one();
            }
            if shared.acks.is_none() {
                return Ok(shared.confirmed.fetch_max(upto, Ordering::AcqRel) < upto);
            }
        }
        b"+OK" => {}
        l if l.starts_with(b"INFO ") => {
            let info = ServerInfo::parse(&l[5..])?;
            lock(&shared.queue).max_payload = info.max_payload();
            dialer.learn(&info);
            if info.ldm && !session.lame_duck.swap(true, Ordering::AcqRel) {
                shared.wake.notify_one();
            }
        }
        l if l.starts_with(b"-ERR") => {
            // Permission errors leave the connection open (the message is dropped: core
            // NATS's at-most-once; a JetStream record then times out and is sent again);
            // every other -ERR is followed by the server closing it.
            let e = refusal(l);
            if e.to_string().contains("Permissions Violation") {
                metrics::counter!("amibus_nats_refused_messages_total").increment(1);
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
    Ok(false)
}
