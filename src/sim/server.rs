//! One simulated Asterisk per listener: the accept loop, the event hub that fans batches out to
//! logged-in sessions, the generator task, and the counters.
//!
//! Owns: binding/rebinding listeners, server modes (running, silent, stopped), the per-session
//! bounded batch queues, and the stop/shutdown order.
//!
//! Shutdown order: the generator stops first (a batch it was still waiting to queue is queued
//! nowhere and not counted), then every session writes what is queued for it and closes. So
//! `events` counts exactly the events queued to the sessions, and a session that was logged in
//! throughout writes every one of them before its EOF.
//!
//! Must never: let a queue grow without bound (the generator waits for the slowest session; a
//! session that cannot write for the write timeout is dropped), or block a session on the
//! generator while the generator waits on that session (sessions keep draining while they wait);
//! count an event as produced that was not queued to every session logged in at that moment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
use tokio_rustls::TlsAcceptor;

use super::replay::Replay;
use super::source::{Batch, BatchBuilder, GenConfig, Generator, Library};
use super::tally::{ActionsSeen, Tally};
use super::{SimConfig, SimError, Speed};

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DisconnectReason {
    ClientClosed,
    Logoff,
    AuthFailed,
    /// The socket took no bytes for the write timeout (Asterisk's `writetimeout`).
    WriteTimeout,
    WriteError,
    ReadError,
    /// `--disconnect-every` or [`super::SimHandle::disconnect_all`].
    Injected,
    ServerStopped,
    Shutdown,
}

impl DisconnectReason {
    pub const ALL: [DisconnectReason; 9] = [
        DisconnectReason::ClientClosed,
        DisconnectReason::Logoff,
        DisconnectReason::AuthFailed,
        DisconnectReason::WriteTimeout,
        DisconnectReason::WriteError,
        DisconnectReason::ReadError,
        DisconnectReason::Injected,
        DisconnectReason::ServerStopped,
        DisconnectReason::Shutdown,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::ClientClosed => "client_closed",
            DisconnectReason::Logoff => "logoff",
            DisconnectReason::AuthFailed => "auth_failed",
            DisconnectReason::WriteTimeout => "write_timeout",
            DisconnectReason::WriteError => "write_error",
            DisconnectReason::ReadError => "read_error",
            DisconnectReason::Injected => "injected",
            DisconnectReason::ServerStopped => "server_stopped",
            DisconnectReason::Shutdown => "shutdown",
        }
    }
}

/// The counters of one server, as printed on exit.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerStats {
    pub server: usize,
    pub addr: String,
    /// Broadcast events produced (synthetic, replayed, and raised by actions).
    pub events: u64,
    /// Bytes of those events.
    pub event_bytes: u64,
    /// Bytes written to all sessions (banner, responses and events).
    pub bytes_written: u64,
    /// Connections accepted.
    pub clients: u64,
    pub logins: u64,
    /// Ended sessions by reason (only reasons that occurred).
    pub disconnects: BTreeMap<&'static str, u64>,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub events: AtomicU64,
    pub event_bytes: AtomicU64,
    pub bytes_written: AtomicU64,
    pub clients: AtomicU64,
    pub logins: AtomicU64,
    pub disconnects: [AtomicU64; 9],
}

impl Counters {
    pub fn disconnect(&self, r: DisconnectReason) {
        if let Some(i) = DisconnectReason::ALL.iter().position(|&x| x == r) {
            self.disconnects[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Running,
    Silent,
    Stopped,
}

/// Deferred work a job hands back: run after the job's events were queued to every session.
pub(crate) type After = Box<dyn FnOnce() + Send>;
/// Work run on the generator task, with access to the live-call table.
pub(crate) type Job = Box<dyn FnOnce(&mut Generator, &mut BatchBuilder) -> After + Send>;

/// Fans batches out to the logged-in sessions of one server.
#[derive(Default)]
pub(crate) struct Hub {
    subs: Mutex<Vec<(u64, mpsc::Sender<Arc<Batch>>)>>,
    changed: Notify,
}

impl Hub {
    pub fn subscribe(&self, id: u64, cap: usize) -> mpsc::Receiver<Arc<Batch>> {
        let (tx, rx) = mpsc::channel(cap.max(1));
        if let Ok(mut s) = self.subs.lock() {
            s.push((id, tx));
        }
        self.changed.notify_waiters();
        rx
    }
    pub fn unsubscribe(&self, id: u64) {
        if let Ok(mut s) = self.subs.lock() {
            s.retain(|(i, _)| *i != id);
        }
        self.changed.notify_waiters();
    }
    pub fn count(&self) -> usize {
        self.subs.lock().map(|s| s.len()).unwrap_or(0)
    }
    /// Queue `batch` to every session subscribed now, or to none: a slot is reserved in every
    /// queue first (waiting for the slowest session), then the batch goes into all of them at
    /// once. Dropped while it waits (at shutdown), it has queued nothing. Sessions whose queue
    /// is gone are forgotten.
    async fn publish(&self, batch: Arc<Batch>) {
        let subs: Vec<_> = match self.subs.lock() {
            Ok(s) => s.clone(),
            Err(_) => return,
        };
        let mut permits = Vec::with_capacity(subs.len());
        for (id, tx) in subs {
            match tx.reserve_owned().await {
                Ok(p) => permits.push(p),
                Err(_) => self.unsubscribe(id),
            }
        }
        for p in permits {
            p.send(batch.clone());
        }
    }
}

pub(crate) struct Server {
    pub index: usize,
    pub addr: Mutex<SocketAddr>,
    pub cfg: Arc<SimConfig>,
    pub counters: Counters,
    /// Actions received per request id (see [`super::tally`]).
    pub tally: Tally,
    pub hub: Hub,
    pub mode: watch::Sender<Mode>,
    /// Generation is paused; sessions go on writing what is queued and answering actions.
    pub paused: std::sync::atomic::AtomicBool,
    pub kick: watch::Sender<u64>,
    pub jobs: mpsc::Sender<Job>,
    pub tls: Option<TlsAcceptor>,
    pub started: Instant,
    pub next_session: AtomicU64,
    pub active_sessions: AtomicUsize,
    pub sessions_gone: Notify,
    pub gen_done: watch::Sender<bool>,
    /// The generator task has ended (after shutdown): nothing more will be queued to sessions.
    pub gen_stopped: watch::Sender<bool>,
    pub shutdown: watch::Receiver<bool>,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Server {
    pub fn stats(&self) -> ServerStats {
        let c = &self.counters;
        let mut disconnects = BTreeMap::new();
        for (i, r) in DisconnectReason::ALL.iter().enumerate() {
            let n = c.disconnects[i].load(Ordering::Relaxed);
            if n > 0 {
                disconnects.insert(r.as_str(), n);
            }
        }
        ServerStats {
            server: self.index,
            addr: self.addr.lock().map(|a| a.to_string()).unwrap_or_default(),
            events: c.events.load(Ordering::Relaxed),
            event_bytes: c.event_bytes.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            clients: c.clients.load(Ordering::Relaxed),
            logins: c.logins.load(Ordering::Relaxed),
            disconnects,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
            .lock()
            .map(|a| *a)
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

pub(crate) struct Farm {
    servers: Vec<Arc<Server>>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

fn load_tls(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsAcceptor, SimError> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| SimError::Tls(format!("{}: {e}", cert.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SimError::Tls(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| SimError::Tls(format!("{}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SimError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| SimError::Tls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

pub(crate) async fn start(cfg: SimConfig) -> Result<super::SimHandle, SimError> {
    if cfg.servers == 0 {
        return Err(SimError::Config("--servers must be at least 1".into()));
    }
    for (name, v) in [
        ("non-ascii-share", cfg.non_ascii_share),
        ("non-utf8-share", cfg.non_utf8_share),
        ("malformed-share", cfg.malformed_share),
    ] {
        if !(0.0..=1.0).contains(&v) {
            return Err(SimError::Config(format!("{name} must be within 0..=1")));
        }
    }
    let tls = match &cfg.tls {
        Some((c, k)) => Some(load_tls(c, k)?),
        None => None,
    };
    let replay = match &cfg.replay {
        Some(p) => Some(Arc::new(Replay::load(p)?)),
        None => None,
    };
    let cfg = Arc::new(cfg);
    let lib = Arc::new(Library::build());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let epoch_us = match cfg.epoch {
        Some(s) => s * 1_000_000,
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0),
    };
    let mut servers = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..cfg.servers {
        let port = if cfg.port == 0 {
            0
        } else {
            cfg.port
                .checked_add(i as u16)
                .ok_or_else(|| SimError::Config("port range overflows".into()))?
        };
        let bind = format!("{}:{}", cfg.host, port);
        let listener = TcpListener::bind(&bind)
            .await
            .map_err(|source| SimError::Bind {
                addr: bind.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| SimError::Bind {
            addr: bind.clone(),
            source,
        })?;
        let (jobs_tx, jobs_rx) = mpsc::channel(64);
        let srv = Arc::new(Server {
            index: i,
            addr: Mutex::new(addr),
            cfg: cfg.clone(),
            counters: Counters::default(),
            tally: Tally::default(),
            hub: Hub::default(),
            mode: watch::channel(Mode::Running).0,
            paused: std::sync::atomic::AtomicBool::new(false),
            kick: watch::channel(0).0,
            jobs: jobs_tx,
            tls: tls.clone(),
            started: Instant::now(),
            next_session: AtomicU64::new(0),
            active_sessions: AtomicUsize::new(0),
            sessions_gone: Notify::new(),
            gen_done: watch::channel(false).0,
            gen_stopped: watch::channel(false).0,
            shutdown: shutdown_rx.clone(),
            listener: Mutex::new(None),
        });
        let step_us = 1_000_000u64.checked_div(cfg.rate).map_or(10, |s| s.max(1));
        let generator = Generator::new(
            lib.clone(),
            GenConfig {
                seed: cfg.seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
                epoch_us,
                step_us,
                concurrent_calls: cfg.concurrent_calls,
                non_ascii_share: cfg.non_ascii_share,
                non_utf8_share: cfg.non_utf8_share,
                malformed_share: cfg.malformed_share,
                oversized_every: cfg.oversized_every,
                oversized_bytes: cfg.oversized_bytes,
            },
        );
        let handle = tokio::spawn(accept_loop(srv.clone(), listener));
        if let Ok(mut l) = srv.listener.lock() {
            *l = Some(handle);
        }
        tasks.push(tokio::spawn(run_generator(
            srv.clone(),
            generator,
            jobs_rx,
            replay.clone(),
        )));
        if let Some(every) = cfg.disconnect_every.filter(|d| !d.is_zero()) {
            let s = srv.clone();
            let mut sd = shutdown_rx.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tokio::select! {
                        _ = tick.tick() => s.kick.send_modify(|k| *k += 1),
                        _ = sd.changed() => break,
                    }
                }
            }));
        }
        servers.push(srv);
    }
    Ok(super::SimHandle {
        inner: Arc::new(Farm {
            servers,
            shutdown: shutdown_tx,
            tasks: Mutex::new(tasks),
        }),
    })
}

async fn accept_loop(srv: Arc<Server>, listener: TcpListener) {
    let mut shutdown = srv.shutdown.clone();
    let mut mode = srv.mode.subscribe();
    loop {
        tokio::select! {
            res = listener.accept() => {
                let Ok((stream, peer)) = res else { continue };
                let _ = stream.set_nodelay(true);
                srv.counters.clients.fetch_add(1, Ordering::Relaxed);
                let s = srv.clone();
                s.active_sessions.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    match s.tls.clone() {
                        Some(acc) => {
                            let hs = tokio::time::timeout(Duration::from_secs(10), acc.accept(stream)).await;
                            match hs {
                                Ok(Ok(tls)) => super::session::run(s.clone(), tls, peer).await,
                                _ => s.counters.disconnect(DisconnectReason::ReadError),
                            }
                        }
                        None => super::session::run(s.clone(), stream, peer).await,
                    }
                    s.active_sessions.fetch_sub(1, Ordering::SeqCst);
                    s.sessions_gone.notify_waiters();
                });
            }
            _ = shutdown.changed() => break,
            r = mode.changed() => {
                if r.is_err() || *mode.borrow() == Mode::Stopped {
                    break;
                }
            }
        }
    }
}

/// How many events go into one batch at full speed: about 128 KB.
const BATCH_EVENTS: u64 = 256;

/// Sets [`Server::gen_stopped`] when the generator task ends, however it ends (a panic too), so
/// a session at shutdown never waits for a generator that is gone.
struct Stopped(Arc<Server>);

impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.gen_stopped.send_replace(true);
    }
}

async fn run_generator(
    srv: Arc<Server>,
    mut generator: Generator,
    mut jobs: mpsc::Receiver<Job>,
    replay: Option<Arc<Replay>>,
) {
    let _stopped = Stopped(srv.clone());
    let cfg = srv.cfg.clone();
    let mut shutdown = srv.shutdown.clone();
    let mut mode = srv.mode.subscribe();
    let mut out = BatchBuilder::with_capacity(192 << 10);
    let mut after: Vec<After> = Vec::new();
    let mut produced: u64 = 0;
    let mut done = cfg.count == Some(0);
    let mut first_run: Option<Instant> = None;
    // Pacing base: (when, produced then), reset whenever generation resumes.
    let mut pace: Option<(Instant, u64)> = None;
    let mut replay_pos = 0usize;
    let mut replay_base: Option<(Instant, u64)> = None;
    if done {
        srv.gen_done.send_replace(true);
    }
    loop {
        if *shutdown.borrow() {
            break;
        }
        while let Ok(job) = jobs.try_recv() {
            after.push(job(&mut generator, &mut out));
        }
        generator.flush_fast_forward(&mut out);
        if !out.is_empty() || !after.is_empty() {
            publish(&srv, &mut out, generator.emitted(), &mut shutdown).await;
            for a in after.drain(..) {
                a();
            }
        }
        // A pause is polled (the wait below wakes every 50 ms): it is a test's tool.
        let running = *mode.borrow() == Mode::Running && !srv.paused.load(Ordering::Relaxed);
        let listeners = srv.hub.count();
        if !done
            && let (Some(d), Some(t0)) = (cfg.duration, first_run)
            && t0.elapsed() >= d
        {
            done = true;
            srv.gen_done.send_replace(true);
        }
        if done || !running || listeners < cfg.min_clients {
            pace = None;
            replay_base = None;
            tokio::select! {
                job = jobs.recv() => match job {
                    Some(job) => after.push(job(&mut generator, &mut out)),
                    None => break,
                },
                _ = srv.hub.changed.notified() => {}
                _ = mode.changed() => {}
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            continue;
        }
        let now = Instant::now();
        first_run.get_or_insert(now);
        let mut n = BATCH_EVENTS;
        if let Some(c) = cfg.count {
            n = n.min(c.saturating_sub(produced));
        }
        let mut wait: Option<Duration> = None;
        if let Some(rep) = &replay {
            match cfg.speed {
                Speed::Max => {}
                Speed::Factor(x) => {
                    let (t0, ts0) = *replay_base.get_or_insert((now, rep.ts_us(replay_pos)));
                    let mut k = 0;
                    while k < n {
                        let due_us = (rep.ts_us(replay_pos + k as usize).saturating_sub(ts0))
                            as f64
                            / x.max(1e-9);
                        if t0 + Duration::from_micros(due_us as u64) > now {
                            if k == 0 {
                                wait = Some((t0 + Duration::from_micros(due_us as u64)) - now);
                            }
                            break;
                        }
                        k += 1;
                    }
                    n = k;
                }
            }
        } else if cfg.rate > 0 {
            let (t0, p0) = *pace.get_or_insert((now, produced));
            let due = (now - t0).as_micros() as u64 * cfg.rate / 1_000_000 + 1;
            let owed = (p0 + due).saturating_sub(produced);
            if owed == 0 {
                wait = Some(Duration::from_micros(
                    (1_000_000 / cfg.rate).clamp(200, 10_000),
                ));
            }
            n = n.min(owed);
        }
        if let Some(w) = wait.filter(|_| n == 0) {
            tokio::select! {
                job = jobs.recv() => if let Some(job) = job { after.push(job(&mut generator, &mut out)) },
                _ = tokio::time::sleep(w) => {}
                _ = shutdown.changed() => break,
            }
            continue;
        }
        match &replay {
            Some(rep) => {
                let k = rep.copy_into(replay_pos, n as usize, &mut out);
                replay_pos += k;
                generator.count_external(k as u64);
                produced += k as u64;
                if k < n as usize || replay_pos >= rep.len() {
                    done = true;
                }
            }
            None => {
                generator.generate(n as usize, &mut out);
                produced += n;
            }
        }
        if cfg.count.is_some_and(|c| produced >= c) {
            done = true;
        }
        publish(&srv, &mut out, generator.emitted(), &mut shutdown).await;
        if done {
            // Only now: every event is queued to every session.
            srv.gen_done.send_replace(true);
        }
    }
    srv.gen_done.send_replace(true);
}

/// Queue what `out` holds to every session and count it; `end` is the generator's emitted count
/// now. Once shutdown has begun nothing is queued or counted: the sessions' last flush must find
/// every event counted in their queues (see the module docs).
async fn publish(
    srv: &Server,
    out: &mut BatchBuilder,
    end: u64,
    shutdown: &mut watch::Receiver<bool>,
) {
    if out.is_empty() {
        return;
    }
    let mut batch = out.take();
    batch.end = end;
    let (events, bytes) = (batch.events.len() as u64, batch.bytes.len() as u64);
    let batch = Arc::new(batch);
    tokio::select! {
        biased;
        _ = shutdown.wait_for(|s| *s) => {}
        () = srv.hub.publish(batch) => {
            srv.counters.events.fetch_add(events, Ordering::Relaxed);
            srv.counters.event_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }
}

impl Farm {
    fn get(&self, i: usize) -> Option<&Arc<Server>> {
        self.servers.get(i)
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(|s| s.addr()).collect()
    }

    pub fn stats(&self) -> Vec<ServerStats> {
        self.servers.iter().map(|s| s.stats()).collect()
    }

    pub fn actions_seen(&self) -> ActionsSeen {
        let mut seen = ActionsSeen::default();
        for s in &self.servers {
            s.tally.add_to(&mut seen);
        }
        seen
    }

    pub async fn stop_server(&self, i: usize) {
        let Some(s) = self.get(i) else { return };
        s.mode.send_replace(Mode::Stopped);
        let handle = s.listener.lock().ok().and_then(|mut l| l.take());
        if let Some(h) = handle {
            let _ = h.await;
        }
        wait_sessions(s, Duration::from_secs(2)).await;
    }

    pub async fn start_server(&self, i: usize) -> Result<SocketAddr, SimError> {
        let s = self.get(i).ok_or(SimError::NoServer(i))?;
        let addr = s.addr();
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| SimError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        s.mode.send_replace(Mode::Running);
        let handle = tokio::spawn(accept_loop(s.clone(), listener));
        if let Ok(mut l) = s.listener.lock() {
            *l = Some(handle);
        }
        Ok(addr)
    }

    pub fn set_unresponsive(&self, i: usize, silent: bool) {
        if let Some(s) = self.get(i) {
            s.mode.send_if_modified(|m| {
                let new = match (*m, silent) {
                    (Mode::Stopped, _) => Mode::Stopped,
                    (_, true) => Mode::Silent,
                    (_, false) => Mode::Running,
                };
                let changed = *m != new;
                *m = new;
                changed
            });
        }
    }

    pub fn set_paused(&self, i: usize, paused: bool) {
        if let Some(s) = self.get(i) {
            s.paused.store(paused, Ordering::Relaxed);
        }
    }

    pub fn disconnect_all(&self, i: usize) {
        if let Some(s) = self.get(i) {
            s.kick.send_modify(|k| *k += 1);
        }
    }

    pub async fn wait_generated(&self) {
        for s in &self.servers {
            let mut rx = s.gen_done.subscribe();
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    pub async fn shutdown(&self) -> Vec<ServerStats> {
        self.shutdown.send_replace(true);
        for s in &self.servers {
            wait_sessions(s, Duration::from_secs(5)).await;
        }
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        self.stats()
    }
}

async fn wait_sessions(s: &Server, limit: Duration) {
    let deadline = Instant::now() + limit;
    while s.active_sessions.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(20), s.sessions_gone.notified()).await;
    }
}
