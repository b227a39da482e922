//! A real Kafka-protocol broker for tests: `tansu` as a child process on a free loopback port.
//!
//! The broker keeps its data in a SQLite file in a temporary directory, so it can be stopped
//! and started again on the same port without losing what it acknowledged ("broker down for
//! N seconds" tests). It is killed when the [`Broker`] is dropped.
//!
//! The binary is `$TANSU` if set, else `tansu` on `PATH`, else `~/.cargo/bin/tansu`.
//! Install it with `cargo install tansu --locked --features dynostore,libsql`
//! (`scripts/test` does this on a fresh machine).
//!
//! Flags used: `tansu broker --cluster-id amibus-test --listener-url tcp://127.0.0.1:PORT
//! --advertised-listener-url tcp://127.0.0.1:PORT --storage-engine sqlite://tansu.db`, run in
//! the temp dir (the SQLite path is relative to the working directory), `RUST_LOG=warn`.
//!
//! What tansu 0.6 does differently from Kafka, as met by these tests:
//! - Idempotent produce with `acks=all` and lz4 compression work.
//! - It enforces no message size limit (no `message.max.bytes`/`max.message.bytes`), so a
//!   "too large" test relies on the producer's own `message.max.bytes`.
//! - A topic must exist before producing, and CreateTopics with -1 partitions (broker
//!   default) makes a topic with none: always give a partition count.
//! - After a delivery timeout librdkafka bumps the idempotent producer's epoch locally; tansu
//!   panics on the next produce ("more or less than one row" in its SQLite engine) and fails
//!   every produce after it. Keep `message.timeout.ms` longer than any outage a test makes.
#![allow(dead_code)] // each test file uses a different part

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

const INSTALL: &str = "cargo install tansu --locked --features dynostore,libsql";

/// How long a start may take before the test fails with the broker's log.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// One tansu broker. See the module docs.
pub struct Broker {
    bin: PathBuf,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Option<Child>,
    starts: u32,
}

impl Broker {
    /// Start a broker with SQLite storage on a free loopback port and wait until it accepts
    /// connections.
    ///
    /// # Panics
    /// When `tansu` is missing (saying how to install it) or does not come up.
    pub async fn start() -> Broker {
        let mut broker = Broker {
            bin: find_tansu(),
            addr: free_addr(),
            dir: tempfile::tempdir().expect("tempdir for tansu"),
            child: None,
            starts: 0,
        };
        // The port is probed free and then bound by tansu, a child that must also advertise
        // it, so it cannot bind port 0. Another process can take the port in between: then
        // tansu exits at once, and the start is tried again on another port.
        for attempt in 1.. {
            match broker.run().await {
                Ok(()) => break,
                Err(why) if attempt < 5 => {
                    eprintln!(
                        "tansu did not start on {} ({why}); another port",
                        broker.addr
                    );
                    broker.addr = free_addr();
                }
                Err(why) => panic!("{why}"),
            }
        }
        broker
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    /// Kill the broker (as a crash would); its data stays on disk.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the broker again on the same port and storage, after [`Broker::stop`].
    pub async fn restart(&mut self) {
        self.stop();
        // The port was released by the stop; while another process holds it, wait.
        for attempt in 1.. {
            match self.run().await {
                Ok(()) => return,
                Err(_) if attempt < 100 => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(why) => panic!("{why}"),
            }
        }
    }

    /// Create a topic (an existing one is fine).
    ///
    /// # Panics
    /// The broker refuses.
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .expect("admin client");
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = admin
            .create_topics([&topic], &opts)
            .await
            .expect("create_topics request");
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => panic!("creating topic {name}: {code}"),
            }
        }
    }

    /// The broker's log so far (stdout and stderr of every start).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }

    /// Start tansu and wait until it accepts connections; why not if it exits first.
    async fn run(&mut self) -> Result<(), String> {
        self.starts += 1;
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("tansu log file");
        let url = format!("tcp://{}", self.addr);
        let child = Command::new(&self.bin)
            .arg("broker")
            .args(["--cluster-id", "amibus-test"])
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            // Relative to the working directory: the temp dir.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(self.dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "tansu exited with {status} on start {}; its log:\n{}",
                    self.starts,
                    self.log()
                ));
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            if started.elapsed() > START_DEADLINE {
                panic!(
                    "tansu did not accept connections on {} within {START_DEADLINE:?}; its log:\n{}",
                    self.addr,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn find_tansu() -> PathBuf {
    if let Some(p) = std::env::var_os("TANSU") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "TANSU={} is not a file; unset it or install tansu with `{INSTALL}`",
            p.display()
        );
        return p;
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("tansu"))
                .find(|p| p.is_file())
        })
        .unwrap_or_default();
    let in_cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|home| home.join("bin").join("tansu"))
        .filter(|p| p.is_file());
    on_path.or(in_cargo_home).unwrap_or_else(|| {
        panic!(
            "the Kafka tests need the `tansu` broker, which is not installed: run `{INSTALL}` \
             (about 20 minutes; scripts/test does it), or set TANSU=/path/to/tansu"
        )
    })
}
