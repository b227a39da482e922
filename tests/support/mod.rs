//! Small scripted AMI servers for the connection tests, on 127.0.0.1:0.
//!
//! Not a simulator: each behaviour is the least an Asterisk would do for the action under test.
//! Every action a client sends is reported to the test, and the test can push raw bytes or
//! close the connection at any time.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amibus::ami::login::md5_key;
use amibus::ami::{Record, Stamped, handoff};
use amibus::secret::Secret;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub const BANNER: &[u8] = b"Asterisk Call Manager/11.0.0\r\n";
pub const CHALLENGE: &str = "149028585";

/// One action as received: `(key, value)` lines in order, and the raw bytes.
#[derive(Clone, Debug)]
pub struct Received {
    pub headers: Vec<(String, String)>,
    pub raw: Vec<u8>,
}

impl Received {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }
    pub fn action(&self) -> &str {
        self.get("Action").unwrap_or("")
    }
    pub fn id(&self) -> &str {
        self.get("ActionID").unwrap_or("")
    }
}

/// What the fake does.
#[derive(Clone)]
pub struct Behaviour {
    pub secret: String,
    pub answer_ping: bool,
    /// Bytes written in the same write as a successful Login response (events behind it).
    pub after_login: Vec<u8>,
    /// Bytes written in the same write as the response to `Action: Events`.
    pub after_events: Vec<u8>,
    /// A `Filter:` value answered with an error.
    pub reject_filter: Option<String>,
    /// Items in a CoreShowChannels list.
    pub list_items: usize,
    /// Actions (lower case) the fake never answers: the test answers them with `send`.
    pub leave_to_test: Vec<String>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            secret: "s3cret".into(),
            answer_ping: true,
            after_login: Vec::new(),
            after_events: Vec::new(),
            reject_filter: None,
            list_items: 3,
            leave_to_test: Vec::new(),
        }
    }
}

pub enum Ctl {
    Send(Vec<u8>),
    Close,
    /// Stop answering Ping.
    Mute,
}

/// One accepted connection, as seen by the test.
pub struct FakeConn {
    pub actions: mpsc::UnboundedReceiver<Received>,
    pub ctl: mpsc::UnboundedSender<Ctl>,
}

impl FakeConn {
    pub fn send(&self, bytes: impl Into<Vec<u8>>) {
        let _ = self.ctl.send(Ctl::Send(bytes.into()));
    }

    pub fn close(&self) {
        let _ = self.ctl.send(Ctl::Close);
    }

    /// The next action the client sent (waits up to 10 s).
    pub async fn next_action(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(10), self.actions.recv())
            .await
            .expect("no action within 10 s")
            .expect("connection ended")
    }

    /// Actions until (and including) the first named `name`.
    pub async fn until_action(&mut self, name: &str) -> Vec<Received> {
        let mut out = Vec::new();
        loop {
            let a = self.next_action().await;
            let done = a.action().eq_ignore_ascii_case(name);
            out.push(a);
            if done {
                return out;
            }
        }
    }
}

pub struct Fake {
    pub addr: SocketAddr,
    pub conns: mpsc::UnboundedReceiver<FakeConn>,
    pub task: JoinHandle<()>,
}

impl Fake {
    pub async fn start(b: Behaviour) -> Fake {
        Self::start_on("127.0.0.1:0", b, None).await
    }

    pub async fn start_on(
        addr: &str,
        b: Behaviour,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Fake {
        // A deep backlog: with the default (1024), a burst of 1,000 connects can overflow the
        // SYN queue, and a client whose handshake ends in a syncookie the full accept queue
        // drops believes it is connected and waits for a banner that never comes (the server
        // speaks first in AMI), until its login timeout.
        let addr: SocketAddr = addr.parse().expect("address");
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        socket.bind(addr).expect("bind");
        let listener = socket.listen(4096).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let (tx, conns) = mpsc::unbounded_channel();
        let b = Arc::new(b);
        let task = tokio::spawn(async move {
            // A JoinSet: aborting the accept task drops it, which aborts every connection.
            let mut children = tokio::task::JoinSet::new();
            while let Ok((sock, _)) = listener.accept().await {
                let (atx, actions) = mpsc::unbounded_channel();
                let (ctl, crx) = mpsc::unbounded_channel();
                if tx.send(FakeConn { actions, ctl }).is_err() {
                    // Nobody watches the connections; keep serving anyway.
                }
                let b = b.clone();
                let tls = tls.clone();
                children.spawn(async move {
                    match tls {
                        None => serve(sock, &b, atx, crx).await,
                        Some(acc) => {
                            if let Ok(s) = acc.accept(sock).await {
                                serve(s, &b, atx, crx).await
                            }
                        }
                    }
                });
            }
            drop(children);
        });
        Fake { addr, conns, task }
    }

    pub async fn next_conn(&mut self) -> FakeConn {
        tokio::time::timeout(Duration::from_secs(10), self.conns.recv())
            .await
            .expect("no connection within 10 s")
            .expect("fake stopped")
    }

    /// Stop accepting and drop every connection (the listener and the per-connection tasks are
    /// aborted).
    pub fn stop(self) {
        self.task.abort();
    }
}

/// Split `buf` at the first empty line; returns the action's bytes.
pub fn take_frame(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let rest = buf.split_off(end + 4);
    Some(std::mem::replace(buf, rest))
}

pub fn parse_lines(raw: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(raw)
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .map(|l| match l.split_once(": ") {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (l.to_owned(), String::new()),
        })
        .collect()
}

fn response(id: &str, status: &str, extra: &str) -> String {
    format!("Response: {status}\r\nActionID: {id}\r\n{extra}\r\n")
}

async fn serve<S>(
    mut sock: S,
    b: &Behaviour,
    actions: mpsc::UnboundedSender<Received>,
    mut ctl: mpsc::UnboundedReceiver<Ctl>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if sock.write_all(BANNER).await.is_err() {
        return;
    }
    let mut answer_ping = b.answer_ping;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut authed = false;
    let mut ctl_open = true;
    loop {
        tokio::select! {
            c = ctl.recv(), if ctl_open => match c {
                Some(Ctl::Send(bytes)) => { if sock.write_all(&bytes).await.is_err() { return; } }
                Some(Ctl::Mute) => answer_ping = false,
                Some(Ctl::Close) => { let _ = sock.shutdown().await; return; }
                // The test dropped its end: keep serving.
                None => ctl_open = false,
            },
            r = sock.read(&mut chunk) => {
                let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                buf.extend_from_slice(&chunk[..n]);
                while let Some(raw) = take_frame(&mut buf) {
                    let a = Received { headers: parse_lines(&raw), raw };
                    let _ = actions.send(a.clone());
                    let id = a.id().to_owned();
                    let name = a.action().to_ascii_lowercase();
                    let mut out: String;
                    let mut close = false;
                    match name.as_str() {
                        "challenge" => out = response(&id, "Success", &format!("Challenge: {CHALLENGE}\r\n")),
                        "login" => {
                            let ok = match a.get("Key") {
                                Some(k) => k == md5_key(CHALLENGE, &Secret::new(b.secret.clone())),
                                None => a.get("Secret") == Some(b.secret.as_str()),
                            };
                            if ok {
                                authed = true;
                                out = response(&id, "Success", "Message: Authentication accepted\r\n");
                                let mut bytes = out.into_bytes();
                                bytes.extend_from_slice(&b.after_login);
                                if sock.write_all(&bytes).await.is_err() { return; }
                                continue;
                            }
                            out = response(&id, "Error", "Message: Authentication failed\r\n");
                            close = true;
                        }
                        _ if !authed => out = response(&id, "Error", "Message: Permission denied\r\n"),
                        n if b.leave_to_test.iter().any(|a| a == n) => continue,
                        "filter" => {
                            if b.reject_filter.is_some() && a.get("Filter") == b.reject_filter.as_deref() {
                                out = response(&id, "Error", "Message: Filter did not compile.\r\n");
                            } else {
                                out = response(&id, "Success", "Message: Filter Added.\r\n");
                            }
                        }
                        "events" => {
                            let mut bytes = response(&id, "Success", "Events: On\r\n").into_bytes();
                            bytes.extend_from_slice(&b.after_events);
                            if sock.write_all(&bytes).await.is_err() { return; }
                            continue;
                        }
                        "ping" => {
                            if !answer_ping { continue; }
                            out = response(&id, "Success", "Ping: Pong\r\nTimestamp: 1795671273.086287\r\n");
                        }
                        "logoff" => {
                            out = response(&id, "Goodbye", "Message: Thanks for all the fish.\r\n");
                            close = true;
                        }
                        "coreshowchannels" => {
                            out = response(&id, "Success", "EventList: start\r\nMessage: Channels will follow\r\n");
                            for i in 0..b.list_items {
                                out.push_str(&format!("Event: CoreShowChannel\r\nActionID: {id}\r\nChannel: Local/{i}@ctx-00000001;1\r\n\r\n"));
                            }
                            out.push_str(&format!("Event: CoreShowChannelsComplete\r\nActionID: {id}\r\nEventList: Complete\r\nListItems: {}\r\n\r\n", b.list_items));
                        }
                        "originate" => {
                            out = response(&id, "Success", "Message: Originate successfully queued\r\n");
                            out.push_str("Event: Newchannel\r\nPrivilege: call,all\r\nChannel: Local/1@ctx-00000002;1\r\n\r\n");
                            out.push_str(&format!("Event: OriginateResponse\r\nPrivilege: call,all\r\nActionID: {id}\r\nResponse: Success\r\nChannel: Local/1@ctx-00000002;1\r\nReason: 4\r\n\r\n"));
                        }
                        // Never answered.
                        "swallow" => continue,
                        // The server goes away with the action unanswered.
                        "vanish" => { let _ = sock.shutdown().await; return; }
                        _ => out = response(&id, "Error", &format!("Message: Invalid/unknown command: {}.\r\n", a.action())),
                    }
                    if sock.write_all(out.as_bytes()).await.is_err() { return; }
                    if close { let _ = sock.shutdown().await; return; }
                }
            }
        }
    }
}

/// An event frame.
pub fn event(name: &str, n: usize) -> Vec<u8> {
    format!("Event: {name}\r\nPrivilege: call,all\r\nUniqueid: 1700000000.{n}\r\n\r\n").into_bytes()
}

/// The next record (waits up to 10 s).
pub async fn next(rx: &mut handoff::Receiver) -> Stamped {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no record within 10 s")
        .expect("downstream closed")
}

/// Records up to and including the first one matching `pred`.
pub async fn until(rx: &mut handoff::Receiver, pred: impl Fn(&Stamped) -> bool) -> Vec<Stamped> {
    let mut out = Vec::new();
    loop {
        let r = next(rx).await;
        let done = pred(&r);
        out.push(r);
        if done {
            return out;
        }
    }
}

pub fn is_up(r: &Stamped) -> bool {
    matches!(r.record, Record::ConnectionUp { .. })
}

pub fn is_down(r: &Stamped) -> bool {
    matches!(r.record, Record::ConnectionDown { .. })
}

pub fn event_name(r: &Stamped) -> Option<String> {
    match &r.record {
        Record::Frame(f) => f
            .frame()
            .get("Event")
            .map(|e| String::from_utf8_lossy(e).into_owned()),
        _ => None,
    }
}

pub fn down_reason(r: &Stamped) -> Option<&str> {
    match &r.record {
        Record::ConnectionDown { reason } => Some(reason),
        _ => None,
    }
}

/// Start a connection task for `c` whose records go to a queue of `queue`.
pub fn start(
    c: amibus::ami::server::ServerConfig,
    queue: usize,
) -> (
    amibus::ami::connection::Connection,
    handoff::Receiver,
    tokio_util::sync::CancellationToken,
) {
    let (tx, rx) = handoff::channel(queue);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let conn = amibus::ami::connection::Connection::spawn(
        Arc::new(c),
        tx,
        shutdown.clone(),
        amibus::ami::connection::Options::default(),
    );
    (conn, rx, shutdown)
}

/// Stop a connection task and wait for it (it logs off first).
pub async fn stop(
    conn: amibus::ami::connection::Connection,
    shutdown: tokio_util::sync::CancellationToken,
) {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), conn.task)
        .await
        .expect("task did not stop")
        .expect("task panicked");
}
