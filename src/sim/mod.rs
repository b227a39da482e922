//! The AMI simulator: a farm of fake Asterisk servers speaking real AMI (`amibus sim`), also
//! usable in-process by tests through [`Sim::start`].
//!
//! Owns: listening sockets, the AMI session state machine (banner, Login/Challenge, actions,
//! Events/Filter), the per-server event source ([`source`]), and fault injection.
//!
//! Must never: know about brokers or protobuf; buffer without bound (each session has a bounded
//! batch queue and the generator waits for it: back-pressure, as fast as the slowest reader, while a
//! reader that stops for longer than the write timeout is disconnected, as Asterisk does).
//!
//! ```no_run
//! # async fn demo() -> Result<(), amibus::sim::SimError> {
//! use amibus::sim::{Sim, SimConfig};
//! let sim = Sim::start(SimConfig { servers: 2, count: Some(1000), ..SimConfig::default() }).await?;
//! let addrs = sim.addrs();          // 127.0.0.1:<os-assigned> each
//! sim.set_unresponsive(0, true);    // server 0 goes silent (keepalive tests)
//! sim.stop_server(1).await;         // server 1 closes its listener and sessions
//! sim.start_server(1).await?;       // and comes back on the same address
//! let stats = sim.shutdown().await; // per-server counters
//! # let _ = (addrs, stats); Ok(()) }
//! ```

pub mod filter;
mod list;
pub mod md5;
mod replay;
mod server;
mod session;
pub mod source;
pub mod tally;
pub mod template;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use server::{DisconnectReason, ServerStats};
pub use tally::ActionsSeen;

/// How fast a replay goes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Speed {
    /// As fast as the sockets take it.
    Max,
    /// Paced by the recording's `Timestamp:` headers, this many times real time.
    Factor(f64),
}

/// Everything a sim is started with. `Default` is one plain TCP server on 127.0.0.1:0, user
/// `admin`/`amp111`, synthetic events at full speed with no limit and seed 0.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub servers: usize,
    pub host: String,
    /// First port; server `i` binds `port + i`. 0 gives each an OS-assigned port.
    pub port: u16,
    pub username: String,
    pub secret: String,
    /// How long a failed login waits before `Authentication failed` (Asterisk: 1 s).
    pub auth_fail_delay: Duration,
    /// Synthetic events per second per server; 0 is as fast as possible.
    pub rate: u64,
    /// Stop generating after this long.
    pub duration: Option<Duration>,
    /// Stop generating after this many events per server.
    pub count: Option<u64>,
    pub seed: u64,
    /// Start of the virtual clock behind `Timestamp:` and Uniqueids (Unix seconds). `None` is the
    /// wall clock at start; fix it for byte-identical runs.
    pub epoch: Option<u64>,
    /// Calls in progress at once per server (their events interleave).
    pub concurrent_calls: usize,
    /// Events are generated only while at least this many sessions are logged in (0 = always).
    pub min_clients: usize,
    pub non_ascii_share: f64,
    pub non_utf8_share: f64,
    pub malformed_share: f64,
    pub oversized_every: Option<u64>,
    /// Size of the filler added to an oversized event.
    pub oversized_bytes: usize,
    /// Close every session of a server this often.
    pub disconnect_every: Option<Duration>,
    /// Write at most this many bytes per socket write.
    pub slow_drip: Option<usize>,
    /// A session whose socket takes no bytes for this long is disconnected (Asterisk: 100 ms).
    pub write_timeout: Duration,
    /// Replay this recording instead of generating events.
    pub replay: Option<PathBuf>,
    pub speed: Speed,
    /// PEM certificate chain and key: the listeners speak TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Event batches queued per session before the generator waits.
    pub session_queue: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            servers: 1,
            host: "127.0.0.1".into(),
            port: 0,
            username: "admin".into(),
            secret: "amp111".into(),
            auth_fail_delay: Duration::from_secs(1),
            rate: 0,
            duration: None,
            count: None,
            seed: 0,
            epoch: None,
            concurrent_calls: 8,
            min_clients: 1,
            non_ascii_share: 0.0,
            non_utf8_share: 0.0,
            malformed_share: 0.0,
            oversized_every: None,
            oversized_bytes: 9 << 20,
            disconnect_every: None,
            slow_drip: None,
            write_timeout: Duration::from_millis(100),
            replay: None,
            speed: Speed::Max,
            tls: None,
            session_queue: 8,
        }
    }
}

/// Why the sim could not start or a server could not come back.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot read replay file {path}: {source}")]
    Replay {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no server {0}")]
    NoServer(usize),
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl SimError {
    /// A bind failure may go away (port in TIME_WAIT, busy); the rest will not.
    pub fn is_retriable(&self) -> bool {
        matches!(self, SimError::Bind { .. })
    }
}

/// The simulator entry point.
pub struct Sim;

impl Sim {
    /// Bind every server, start its generator and return a handle.
    ///
    /// # Errors
    /// [`SimError`] if a listener cannot bind, the TLS files are unusable, the replay file cannot
    /// be read, or the configuration is inconsistent.
    pub async fn start(config: SimConfig) -> Result<SimHandle, SimError> {
        server::start(config).await
    }
}

/// A running sim. Dropping it does not stop it; call [`SimHandle::shutdown`].
pub struct SimHandle {
    inner: Arc<server::Farm>,
}

impl SimHandle {
    /// The bound address of each server, in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.inner.addrs()
    }

    /// A snapshot of every server's counters.
    pub fn stats(&self) -> Vec<ServerStats> {
        self.inner.stats()
    }

    /// Close server `i`'s listener and every session on it (clients see EOF; new connections
    /// are refused). Its generator pauses.
    pub async fn stop_server(&self, i: usize) {
        self.inner.stop_server(i).await;
    }

    /// Bring a stopped server back on the same address.
    ///
    /// # Errors
    /// [`SimError::Bind`] if the address cannot be bound again, [`SimError::NoServer`].
    pub async fn start_server(&self, i: usize) -> Result<SocketAddr, SimError> {
        self.inner.start_server(i).await
    }

    /// Over all servers, the actions a logged-in session sent per request id, for actions
    /// marked `Variable: amibus_request_id=<id>` (see [`tally`]): what reached "Asterisk".
    pub fn actions_seen(&self) -> ActionsSeen {
        self.inner.actions_seen()
    }

    /// Make server `i` stop answering (no responses, no events, sockets stay open) or resume.
    pub fn set_unresponsive(&self, i: usize, silent: bool) {
        self.inner.set_unresponsive(i, silent);
    }

    /// Pause (or resume) generating events on server `i`. Unlike [`SimHandle::set_unresponsive`],
    /// sessions go on writing what is already queued for them and answering actions (a
    /// `Logoff` gets its `Goodbye`), so a client can read everything sent and leave cleanly.
    pub fn set_paused(&self, i: usize, paused: bool) {
        self.inner.set_paused(i, paused);
    }

    /// Close every session of server `i` now, counted as `injected`; the listener stays.
    pub fn disconnect_all(&self, i: usize) {
        self.inner.disconnect_all(i);
    }

    /// Wait until every server has generated its `count` or `duration` (never returns for a sim
    /// without either).
    pub async fn wait_generated(&self) {
        self.inner.wait_generated().await;
    }

    /// Stop everything: sessions flush what is queued for them (bounded by the write timeout),
    /// then close. Returns the final counters.
    pub async fn shutdown(self) -> Vec<ServerStats> {
        self.inner.shutdown().await
    }
}
