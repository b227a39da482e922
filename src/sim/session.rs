//! One AMI session: banner, login, actions, and the broadcast events the session may see.
//!
//! Owns: the session state machine (unauthenticated → logged in), response shapes as Asterisk 22
//! writes them (`shared/fixtures/README.md`), the event mask and filters, and the write timeout.
//!
//! Must never: trust the client (no panics or unchecked indexing on its input), interleave events
//! inside a response or an event list, or keep a socket that took no bytes for the write timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Decoder;

use super::filter::{self, Filter, class};
use super::list;
use super::md5;
use super::server::{After, DisconnectReason, Job, Mode, Server};
use super::source::{Batch, BatchBuilder, Generator};
use crate::ami::{AmiCodec, Decoded, Frame, Limits};

const BANNER: &[u8] = b"Asterisk Call Manager/11.0.0\r\n";

/// A response being built: `Response:`, then `ActionID:` when the request had one.
pub(super) struct Resp(Vec<u8>);

impl Resp {
    pub(super) fn new(kind: &str, action_id: Option<&[u8]>) -> Resp {
        let mut v = Vec::with_capacity(128);
        v.extend_from_slice(b"Response: ");
        v.extend_from_slice(kind.as_bytes());
        v.extend_from_slice(b"\r\n");
        if let Some(id) = action_id {
            v.extend_from_slice(b"ActionID: ");
            v.extend_from_slice(id);
            v.extend_from_slice(b"\r\n");
        }
        Resp(v)
    }
    pub(super) fn kv(mut self, k: &str, v: &[u8]) -> Resp {
        push_kv(&mut self.0, k, v);
        self
    }
    pub(super) fn done(mut self) -> Vec<u8> {
        self.0.extend_from_slice(b"\r\n");
        self.0
    }
}

pub(super) fn push_kv(v: &mut Vec<u8>, k: &str, val: &[u8]) {
    v.extend_from_slice(k.as_bytes());
    v.extend_from_slice(b": ");
    v.extend_from_slice(val);
    v.extend_from_slice(b"\r\n");
}

pub(super) fn error(aid: Option<&[u8]>, msg: &str) -> Vec<u8> {
    Resp::new("Error", aid).kv("Message", msg.as_bytes()).done()
}

fn success(aid: Option<&[u8]>, msg: &str) -> Vec<u8> {
    Resp::new("Success", aid)
        .kv("Message", msg.as_bytes())
        .done()
}

fn wall_ts() -> Vec<u8> {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:06}", d.as_secs(), d.subsec_micros()).into_bytes()
}

/// Writes with Asterisk's inactivity timeout and the slow-drip fault.
struct Writer<W> {
    w: W,
    timeout: Duration,
    drip: Option<usize>,
    srv: Arc<Server>,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    async fn write(&mut self, mut buf: &[u8]) -> Result<(), DisconnectReason> {
        while !buf.is_empty() {
            let n = self.drip.map_or(buf.len(), |d| d.max(1).min(buf.len()));
            let k = match tokio::time::timeout(self.timeout, self.w.write(&buf[..n])).await {
                Err(_) => return Err(DisconnectReason::WriteTimeout),
                Ok(Err(_)) | Ok(Ok(0)) => return Err(DisconnectReason::WriteError),
                Ok(Ok(k)) => k,
            };
            self.srv
                .counters
                .bytes_written
                .fetch_add(k as u64, Ordering::Relaxed);
            buf = buf.get(k..).unwrap_or_default();
            if self.drip.is_some() {
                self.flush().await?;
                tokio::task::yield_now().await;
            }
        }
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), DisconnectReason> {
        match tokio::time::timeout(self.timeout, self.w.flush()).await {
            Err(_) => Err(DisconnectReason::WriteTimeout),
            Ok(Err(_)) => Err(DisconnectReason::WriteError),
            Ok(Ok(())) => Ok(()),
        }
    }
}

struct State {
    id: u64,
    authed: bool,
    challenge: Option<String>,
    mask: u32,
    filters: Vec<Filter>,
    events: Option<mpsc::Receiver<Arc<Batch>>>,
    /// A batch taken off `events` that must wait until an answer is written (its events came
    /// after the state the answer shows); written before anything else from `events`.
    held: Option<Arc<Batch>>,
}

enum Flow {
    Continue,
    Close(DisconnectReason),
}

/// Serve one connection until it ends; counts the reason.
pub(crate) async fn run<S>(srv: Arc<Server>, stream: S, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _ = peer;
    let (rd, wr) = tokio::io::split(stream);
    let mut reader = FrameReader {
        rd,
        buf: BytesMut::with_capacity(8192),
        codec: AmiCodec::new(Limits {
            max_frame_bytes: 1 << 20,
            max_headers: 1024,
        }),
        eof: false,
    };
    let mut w = Writer {
        w: wr,
        timeout: srv.cfg.write_timeout,
        drip: srv.cfg.slow_drip,
        srv: srv.clone(),
    };
    let mut st = State {
        id: srv.next_session.fetch_add(1, Ordering::Relaxed),
        authed: false,
        challenge: None,
        mask: class::ALL,
        filters: Vec::new(),
        events: None,
        held: None,
    };
    let reason = serve(&srv, &mut reader, &mut w, &mut st).await;
    srv.hub.unsubscribe(st.id);
    srv.counters.disconnect(reason);
    let _ = tokio::time::timeout(Duration::from_millis(100), w.w.shutdown()).await;
}

async fn next_batch(
    held: &mut Option<Arc<Batch>>,
    rx: &mut Option<mpsc::Receiver<Arc<Batch>>>,
) -> Option<Arc<Batch>> {
    if let Some(b) = held.take() {
        return Some(b);
    }
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn serve<R, W>(
    srv: &Arc<Server>,
    reader: &mut FrameReader<R>,
    w: &mut Writer<W>,
    st: &mut State,
) -> DisconnectReason
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut mode = srv.mode.subscribe();
    let mut kick = srv.kick.subscribe();
    let mut shutdown = srv.shutdown.clone();
    // A silent server does not even greet.
    if let Some(r) = wait_while_silent(&mut mode, &mut shutdown).await {
        return r;
    }
    if let Err(r) = w.write(BANNER).await {
        return r;
    }
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => return close_for_shutdown(srv, st, w).await,
            _ = kick.changed() => return DisconnectReason::Injected,
            r = mode.changed() => {
                if r.is_err() {
                    return DisconnectReason::ServerStopped;
                }
                let m = *mode.borrow_and_update();
                match m {
                    Mode::Stopped => return DisconnectReason::ServerStopped,
                    Mode::Silent => match wait_while_silent(&mut mode, &mut shutdown).await {
                        Some(DisconnectReason::Shutdown) => {
                            return close_for_shutdown(srv, st, w).await;
                        }
                        Some(r) => return r,
                        None => {}
                    },
                    Mode::Running => {}
                }
            }
            item = reader.next() => match item {
                None => return DisconnectReason::ClientClosed,
                Some(Err(_)) => return DisconnectReason::ReadError,
                Some(Ok(Decoded::Frame(f))) => {
                    match action(srv, w, st, f.frame()).await {
                        Flow::Continue => {}
                        Flow::Close(r) => return r,
                    }
                }
                Some(Ok(Decoded::Error(_))) => {
                    let aid = None;
                    if let Err(r) = w.write(&error(aid, "Failed to parse message: line too long")).await {
                        return r;
                    }
                }
                Some(Ok(Decoded::Truncated { .. })) => return DisconnectReason::ClientClosed,
            },
            b = next_batch(&mut st.held, &mut st.events) => match b {
                Some(b) => if let Err(r) = write_batch(st.mask, &st.filters, w, &b).await { return r },
                None => st.events = None,
            },
        }
    }
}

/// Reads a client's actions through [`AmiCodec`]. `next` is cancel-safe: bytes are kept in `buf`
/// between calls.
struct FrameReader<R> {
    rd: R,
    buf: BytesMut,
    codec: AmiCodec,
    eof: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    async fn next(&mut self) -> Option<Result<Decoded, std::io::Error>> {
        loop {
            if self.eof {
                return self.codec.decode_eof(&mut self.buf).transpose();
            }
            match self.codec.decode(&mut self.buf) {
                Ok(Some(d)) => return Some(Ok(d)),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            match self.rd.read_buf(&mut self.buf).await {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// The server shuts down: once its generator has stopped (nothing more will be queued), write
/// what is queued for this session, then go. A silent session does too (a shutdown ends the
/// silence): what is queued was counted as sent, and a resume just before the shutdown may not
/// have been seen yet.
async fn close_for_shutdown<W: AsyncWrite + Unpin>(
    srv: &Server,
    st: &mut State,
    w: &mut Writer<W>,
) -> DisconnectReason {
    let _ = srv.gen_stopped.subscribe().wait_for(|s| *s).await;
    if let Some(b) = st.held.take() {
        if write_batch(st.mask, &st.filters, w, &b).await.is_err() {
            return DisconnectReason::Shutdown;
        }
    }
    if let Some(rx) = st.events.as_mut() {
        while let Ok(b) = rx.try_recv() {
            if write_batch(st.mask, &st.filters, w, &b).await.is_err() {
                break;
            }
        }
    }
    DisconnectReason::Shutdown
}

async fn wait_while_silent(
    mode: &mut tokio::sync::watch::Receiver<Mode>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<DisconnectReason> {
    loop {
        let m = *mode.borrow_and_update();
        match m {
            Mode::Running => return None,
            Mode::Stopped => return Some(DisconnectReason::ServerStopped),
            Mode::Silent => {}
        }
        tokio::select! {
            r = mode.changed() => if r.is_err() { return Some(DisconnectReason::ServerStopped) },
            _ = shutdown.changed() => return Some(DisconnectReason::Shutdown),
        }
    }
}

/// Write the events of `b` this session may see.
async fn write_batch<W: AsyncWrite + Unpin>(
    mask: u32,
    filters: &[Filter],
    w: &mut Writer<W>,
    b: &Batch,
) -> Result<(), DisconnectReason> {
    if mask == class::ALL && filters.is_empty() {
        return w.write(&b.bytes).await;
    }
    if mask == 0 {
        return Ok(());
    }
    let mut out = Vec::new();
    let mut start = 0usize;
    for &(end, cl) in &b.events {
        let end = end as usize;
        let Some(ev) = b.bytes.get(start..end) else {
            break;
        };
        start = end;
        if cl & mask != cl || (cl == 0 && mask != class::ALL) {
            continue;
        }
        if filter::should_send(filters, ev) {
            out.extend_from_slice(ev);
        }
    }
    if out.is_empty() {
        return Ok(());
    }
    w.write(&out).await
}

/// Run `job` on the generator and wait for its answer, writing queued events meanwhile (the
/// generator may be waiting for this session's queue). Events queued before the answer are
/// written before it returns, so a response written next comes after them.
async fn call_gen<T, W, F>(
    srv: &Server,
    st: &mut State,
    w: &mut Writer<W>,
    f: F,
) -> Result<Option<T>, DisconnectReason>
where
    T: Send + 'static,
    W: AsyncWrite + Unpin,
    F: FnOnce(&mut Generator, &mut BatchBuilder) -> T + Send + 'static,
{
    let (tx, mut rx) = oneshot::channel();
    let job: Job = Box::new(move |g, out| {
        let v = f(g, out);
        // What the answer saw: every event emitted so far (published before `after` runs).
        let seen = g.emitted();
        let after: After = Box::new(move || {
            let _ = tx.send((v, seen));
        });
        after
    });
    let send = srv.jobs.send(job);
    tokio::pin!(send);
    let mut sent = false;
    loop {
        // Biased, the answer first: once it is ready, every batch queued after it holds
        // events it did not see, and must not be written before it.
        tokio::select! {
            biased;
            r = &mut send, if !sent => {
                if r.is_err() { return Ok(None); }
                sent = true;
            }
            v = &mut rx, if sent => {
                let Ok((v, seen)) = v else { return Ok(None) };
                // The events the answer saw go first; later ones wait until it is written
                // (the generator may have queued more since), so the answer agrees with the
                // events before it.
                loop {
                    let b = match st.held.take() {
                        Some(b) => b,
                        None => match st.events.as_mut().map(mpsc::Receiver::try_recv) {
                            Some(Ok(b)) => b,
                            _ => break,
                        },
                    };
                    if b.end > seen {
                        st.held = Some(b);
                        break;
                    }
                    write_batch(st.mask, &st.filters, w, &b).await?;
                }
                return Ok(Some(v));
            }
            b = next_batch(&mut st.held, &mut st.events) => match b {
                Some(b) => write_batch(st.mask, &st.filters, w, &b).await?,
                None => st.events = None,
            },
        }
    }
}

fn is(name: &[u8], s: &str) -> bool {
    name.eq_ignore_ascii_case(s.as_bytes())
}

fn nonempty(v: Option<&[u8]>) -> Option<&[u8]> {
    v.filter(|v| !v.is_empty())
}

async fn action<W: AsyncWrite + Unpin>(
    srv: &Arc<Server>,
    w: &mut Writer<W>,
    st: &mut State,
    f: Frame<'_>,
) -> Flow {
    match action_inner(srv, w, st, f).await {
        Ok(flow) => flow,
        Err(r) => Flow::Close(r),
    }
}

async fn action_inner<W: AsyncWrite + Unpin>(
    srv: &Arc<Server>,
    w: &mut Writer<W>,
    st: &mut State,
    f: Frame<'_>,
) -> Result<Flow, DisconnectReason> {
    let aid = f.get("ActionID");
    let Some(name) = nonempty(f.get("Action")) else {
        w.write(&error(aid, "Missing action in request")).await?;
        return Ok(Flow::Continue);
    };
    let cfg = &srv.cfg;
    if is(name, "Logoff") {
        w.write(
            &Resp::new("Goodbye", aid)
                .kv("Message", b"Thanks for all the fish.")
                .done(),
        )
        .await?;
        return Ok(Flow::Close(DisconnectReason::Logoff));
    }
    if is(name, "Challenge") {
        let ok = f.get("AuthType").is_some_and(|t| is(t, "MD5"));
        if !ok {
            w.write(&error(aid, "Must specify AuthType")).await?;
            return Ok(Flow::Continue);
        }
        let challenge = st
            .challenge
            .get_or_insert_with(|| {
                let seed = (st.id + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ srv.cfg.seed;
                let mut rng = super::source::Rng::new(seed);
                (rng.below(999_999_999) + 1).to_string()
            })
            .clone();
        w.write(
            &Resp::new("Success", aid)
                .kv("Challenge", challenge.as_bytes())
                .done(),
        )
        .await?;
        return Ok(Flow::Continue);
    }
    if is(name, "Login") {
        if st.authed {
            w.write(&success(aid, "Already authenticated")).await?;
            return Ok(Flow::Continue);
        }
        let user_ok = f.get("Username") == Some(cfg.username.as_bytes());
        let md5 = f.get("AuthType").is_some_and(|t| is(t, "MD5"));
        let secret_ok = if md5 {
            match (&st.challenge, nonempty(f.get("Key"))) {
                (Some(c), Some(key)) => key == md5::login_key(c, &cfg.secret).as_bytes(),
                _ => false,
            }
        } else {
            f.get("Secret") == Some(cfg.secret.as_bytes())
        };
        if !(user_ok && secret_ok) {
            tokio::time::sleep(cfg.auth_fail_delay).await;
            w.write(&error(aid, "Authentication failed")).await?;
            return Ok(Flow::Close(DisconnectReason::AuthFailed));
        }
        st.authed = true;
        if let Some(ev) = f.get("Events") {
            st.mask = filter::parse_event_mask(ev);
        }
        srv.counters.logins.fetch_add(1, Ordering::Relaxed);
        let mut out = success(aid, "Authentication accepted");
        if st.mask & class::SYSTEM != 0 {
            let up = srv.started.elapsed().as_secs().to_string();
            out.extend_from_slice(b"Event: FullyBooted\r\nPrivilege: system,all\r\n");
            push_kv(&mut out, "Uptime", up.as_bytes());
            push_kv(&mut out, "LastReload", up.as_bytes());
            out.extend_from_slice(b"Status: Fully Booted\r\n\r\n");
        }
        w.write(&out).await?;
        st.events = Some(srv.hub.subscribe(st.id, srv.cfg.session_queue));
        return Ok(Flow::Continue);
    }
    if !st.authed {
        w.write(&error(aid, "Permission denied")).await?;
        return Ok(Flow::Continue);
    }
    srv.tally.record(&f);
    let out = if is(name, "Ping") {
        Resp::new("Success", aid)
            .kv("Ping", b"Pong")
            .kv("Timestamp", &wall_ts())
            .done()
    } else if is(name, "Events") {
        if let Some(m) = f.get("EventMask").or(f.get("Events")) {
            st.mask = filter::parse_event_mask(m);
        }
        let on: &[u8] = if st.mask != 0 { b"On" } else { b"Off" };
        Resp::new("Success", aid).kv("Events", on).done()
    } else if is(name, "Filter") {
        let op = f.get("Operation").unwrap_or_default();
        if !is(op, "Add") {
            error(aid, "Unknown operation")
        } else {
            match Filter::parse(f.get("Filter"), f.get("MatchCriteria")) {
                Ok(fl) => {
                    st.filters.push(fl);
                    success(aid, "Success")
                }
                Err(e) => error(aid, &e.to_string()),
            }
        }
    } else if is(name, "CoreShowChannels") {
        let chans = call_gen(srv, st, w, |g, _| g.channels())
            .await?
            .unwrap_or_default();
        list::core_show_channels(aid, &chans)
    } else if is(name, "QueueStatus") {
        let only = nonempty(f.get("Queue")).map(<[u8]>::to_vec);
        let id = aid.map(<[u8]>::to_vec);
        call_gen(srv, st, w, move |g, _| {
            g.lists()
                .queue_status(id.as_deref(), only.as_deref(), g.now_us())
        })
        .await?
        .unwrap_or_else(|| list::Tracker::default().queue_status(aid, None, 0))
    } else if is(name, "DeviceStateList") {
        let id = aid.map(<[u8]>::to_vec);
        call_gen(srv, st, w, move |g, _| {
            g.lists().device_state_list(id.as_deref())
        })
        .await?
        .unwrap_or_else(|| list::Tracker::default().device_state_list(aid))
    } else if is(name, "BridgeList") {
        let kind = nonempty(f.get("BridgeType")).map(<[u8]>::to_vec);
        let id = aid.map(<[u8]>::to_vec);
        call_gen(srv, st, w, move |g, _| {
            g.lists().bridge_list(id.as_deref(), kind.as_deref())
        })
        .await?
        .unwrap_or_else(|| list::Tracker::default().bridge_list(aid, None))
    } else if is(name, "Status") {
        let want = nonempty(f.get("Channel")).map(<[u8]>::to_vec);
        let chans = call_gen(srv, st, w, |g, _| g.channels())
            .await?
            .unwrap_or_default();
        let vars: Vec<Vec<u8>> = f
            .get("Variables")
            .map(|v| {
                v.split(|&b| b == b',')
                    .map(|s| s.trim_ascii().to_vec())
                    .collect()
            })
            .unwrap_or_default();
        list::status(aid, &chans, want.as_deref(), &vars)
    } else if is(name, "Originate") {
        originate(srv, st, w, &f, aid).await?
    } else if is(name, "Hangup") {
        match nonempty(f.get("Channel")).map(<[u8]>::to_vec) {
            None => error(aid, "No channel specified"),
            Some(ch) => {
                let found = call_gen(srv, st, w, move |g, _| g.hangup(&ch)).await?;
                if found == Some(true) {
                    success(aid, "Channel Hungup")
                } else {
                    error(aid, "No such channel")
                }
            }
        }
    } else if is(name, "Redirect") {
        match nonempty(f.get("Channel")).map(<[u8]>::to_vec) {
            None => error(aid, "Channel not specified"),
            Some(ch) => {
                let c2 = ch.clone();
                let found = call_gen(srv, st, w, move |g, _| g.exists(&c2)).await?;
                if found == Some(true) {
                    success(aid, "Redirect successful")
                } else {
                    let msg = format!("Channel does not exist: {}", String::from_utf8_lossy(&ch));
                    error(aid, &msg)
                }
            }
        }
    } else if is(name, "Getvar") {
        match nonempty(f.get("Variable")).map(<[u8]>::to_vec) {
            None => error(aid, "No variable specified"),
            Some(var) => {
                let ch = nonempty(f.get("Channel")).map(<[u8]>::to_vec);
                let v2 = var.clone();
                let r = call_gen(srv, st, w, move |g, _| g.getvar(ch.as_deref(), &v2)).await?;
                match r {
                    Some(Ok(val)) => Resp::new("Success", aid)
                        .kv("Variable", &var)
                        .kv("Value", &val)
                        .done(),
                    _ => error(aid, "No such channel"),
                }
            }
        }
    } else if is(name, "Setvar") {
        match nonempty(f.get("Variable")).map(<[u8]>::to_vec) {
            None => error(aid, "No variable specified"),
            Some(var) => {
                let ch = nonempty(f.get("Channel")).map(<[u8]>::to_vec);
                let val = f.get("Value").unwrap_or_default().to_vec();
                let r =
                    call_gen(srv, st, w, move |g, _| g.setvar(ch.as_deref(), &var, &val)).await?;
                match r {
                    Some(Ok(())) => success(aid, "Variable Set"),
                    _ => error(aid, "No such channel"),
                }
            }
        }
    } else if is(name, "UserEvent") {
        match nonempty(f.get("UserEvent")).map(<[u8]>::to_vec) {
            None => error(aid, "UserEvent header missing"),
            Some(ue) => {
                let mut body = Vec::new();
                push_kv(&mut body, "UserEvent", &ue);
                for h in f.headers() {
                    if h.is("Action") || h.is("UserEvent") {
                        continue;
                    }
                    body.extend_from_slice(h.key);
                    if let Some(v) = h.value {
                        body.extend_from_slice(b": ");
                        body.extend_from_slice(v);
                    }
                    body.extend_from_slice(b"\r\n");
                }
                let resp = success(aid, "Event Sent");
                w.write(&resp).await?;
                call_gen(srv, st, w, move |g, out| {
                    g.inject(
                        b"Event: UserEvent\r\nPrivilege: user,all\r\n",
                        &body,
                        class::USER,
                        out,
                    )
                })
                .await?;
                return Ok(Flow::Continue);
            }
        }
    } else if is(name, "Command") {
        command(srv, st, w, aid, f.get("Command")).await?
    } else {
        let msg = format!(
            "Invalid/unknown command: {}. Use Action: ListCommands to show available commands.",
            String::from_utf8_lossy(name)
        );
        error(aid, &msg)
    };
    w.write(&out).await?;
    Ok(Flow::Continue)
}

const TECHS: &[&[u8]] = &[b"Local/", b"PJSIP/", b"SIP/", b"IAX2/", b"DAHDI/"];

async fn originate<W: AsyncWrite + Unpin>(
    srv: &Arc<Server>,
    st: &mut State,
    w: &mut Writer<W>,
    f: &Frame<'_>,
    aid: Option<&[u8]>,
) -> Result<Vec<u8>, DisconnectReason> {
    let Some(channel) = nonempty(f.get("Channel")).map(<[u8]>::to_vec) else {
        return Ok(error(aid, "Channel not specified"));
    };
    let exten = nonempty(f.get("Exten")).map(<[u8]>::to_vec);
    let context = nonempty(f.get("Context")).map(<[u8]>::to_vec);
    let app = nonempty(f.get("Application")).map(<[u8]>::to_vec);
    if exten.is_some() && (context.is_none() || nonempty(f.get("Priority")).is_none()) {
        return Ok(error(
            aid,
            "Originate with 'Exten' requires 'Context' and 'Priority'",
        ));
    }
    let is_async = f.get("Async").is_some_and(|v| {
        let v = v.trim_ascii();
        is(v, "true") || is(v, "yes") || is(v, "1") || is(v, "on")
    });
    let known = TECHS
        .iter()
        .any(|t| channel.len() > t.len() && channel[..t.len()].eq_ignore_ascii_case(t));
    let (context, exten) = match (context, exten, app) {
        (c, Some(e), _) => (c.unwrap_or_default(), e),
        (_, None, Some(a)) => (b"default".to_vec(), a),
        _ => (b"default".to_vec(), b"s".to_vec()),
    };
    let id = aid.map(<[u8]>::to_vec);
    if is_async {
        w.write(&success(aid, "Originate successfully queued"))
            .await?;
    }
    let ok = call_gen(srv, st, w, move |g, out| {
        if known {
            g.originate(&channel, &context, &exten, id.as_deref(), out)
                .is_some()
        } else {
            let mut body = Vec::new();
            if let Some(id) = &id {
                push_kv(&mut body, "ActionID", id);
            }
            push_kv(&mut body, "Response", b"Failure");
            push_kv(&mut body, "Channel", &channel);
            push_kv(&mut body, "Context", &context);
            push_kv(&mut body, "Exten", &exten);
            push_kv(&mut body, "Reason", b"0");
            push_kv(&mut body, "Uniqueid", b"<unknown>");
            push_kv(&mut body, "CallerIDNum", b"<unknown>");
            push_kv(&mut body, "CallerIDName", b"<unknown>");
            g.inject(
                b"Event: OriginateResponse\r\nPrivilege: call,all\r\n",
                &body,
                class::CALL,
                out,
            );
            false
        }
    })
    .await?;
    if is_async {
        // The response went out first; nothing more to say.
        return Ok(Vec::new());
    }
    Ok(if ok == Some(true) {
        success(aid, "Originate successfully queued")
    } else {
        error(aid, "Originate failed")
    })
}

async fn command<W: AsyncWrite + Unpin>(
    srv: &Arc<Server>,
    st: &mut State,
    w: &mut Writer<W>,
    aid: Option<&[u8]>,
    cmd: Option<&[u8]>,
) -> Result<Vec<u8>, DisconnectReason> {
    let Some(cmd) = nonempty(cmd) else {
        return Ok(error(aid, "No command provided"));
    };
    let text = String::from_utf8_lossy(cmd).trim().to_ascii_lowercase();
    let (ok, lines): (bool, Vec<String>) = match text.as_str() {
        "core show version" => (
            true,
            vec!["Asterisk 22.0.0 (amibus sim) built by amibus on a x86_64 running Linux".into()],
        ),
        "core show uptime" | "core show uptime seconds" => {
            let s = srv.started.elapsed().as_secs();
            (
                true,
                vec![
                    format!("System uptime: {s} seconds"),
                    format!("Last reload: {s} seconds"),
                ],
            )
        }
        "core show channels" | "core show channels concise" => {
            let chans = call_gen(srv, st, w, |g, _| g.channels())
                .await?
                .unwrap_or_default();
            let mut v = vec![format!(
                "{:<20} {:<20} {:<20} {}",
                "Channel", "Location", "State", "Application(Data)"
            )];
            for c in &chans {
                v.push(format!(
                    "{:<20} {:<20} {:<20} {}({})",
                    String::from_utf8_lossy(&c.name),
                    format!(
                        "{}@{}:1",
                        String::from_utf8_lossy(&c.exten),
                        String::from_utf8_lossy(&c.context)
                    ),
                    String::from_utf8_lossy(list::state_desc(c.state)),
                    c.app,
                    String::from_utf8_lossy(&c.app_data)
                ));
            }
            let calls: std::collections::HashSet<&[u8]> =
                chans.iter().map(|c| c.linkedid.as_slice()).collect();
            v.push(format!("{} active channels", chans.len()));
            v.push(format!("{} active calls", calls.len()));
            (true, v)
        }
        _ => {
            let c = String::from_utf8_lossy(cmd);
            (
                false,
                vec![format!(
                    "No such command '{c}' (type 'core show help {c}' for other possible commands)"
                )],
            )
        }
    };
    let mut r = Resp::new(if ok { "Success" } else { "Error" }, aid)
        .kv("Message", b"Command output follows");
    for l in lines {
        r = r.kv("Output", l.as_bytes());
    }
    Ok(r.done())
}
