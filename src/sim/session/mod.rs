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

mod actions;

use actions::*;

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
    if let Some(b) = st.held.take()
        && write_batch(st.mask, &st.filters, w, &b).await.is_err()
    {
        return DisconnectReason::Shutdown;
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
