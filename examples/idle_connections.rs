//! What an idle AMI connection costs: resident memory per connection and CPU while idle.
//!
//! ```text
//! cargo run --release --example idle_connections -- [connections=1000] [idle_secs=10] [keepalive_secs=20]
//! ```
//!
//! The example starts itself a second time as a child process that serves a minimal AMI
//! (banner, plain login, Ping, Logoff), so the numbers measured in this process are the
//! client side's alone. Linux only (`/proc`); assumes 100 clock ticks per second.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amibus::ami::server::{Auth, ServerConfig};
use amibus::ami::{Connection, Options, Record, handoff};
use amibus::secret::Secret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Runtime::new()?;
    if args.get(1).map(String::as_str) == Some("serve") {
        return rt.block_on(serve());
    }
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let idle: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10);
    let keepalive: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(20);
    rt.block_on(measure(n, idle, keepalive))
}

async fn measure(n: usize, idle: u64, keepalive: u64) -> anyhow::Result<()> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("serve")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    BufReader::new(stdout).read_line(&mut line)?;
    let port: u16 = line.trim().parse()?;

    let rss0 = rss_kib()?;
    let (tx, mut rx) = handoff::channel(n * 4);
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = ServerConfig::new(
            &format!("pbx-{i}"),
            "127.0.0.1",
            port,
            "bench",
            Secret::new("bench"),
        );
        c.auth = Auth::Plain;
        c.keepalive_interval = Duration::from_secs(keepalive);
        conns.push(Connection::spawn(
            Arc::new(c),
            tx.clone(),
            shutdown.clone(),
            Options::default(),
        ));
    }
    drop(tx);
    let mut up = 0;
    while up < n {
        match rx.recv().await {
            Some(r) if matches!(r.record, Record::ConnectionUp { .. }) => up += 1,
            Some(_) => {}
            None => anyhow::bail!("records channel closed"),
        }
    }
    let login_time = started.elapsed();
    // Keep draining so the queue never fills.
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = rss_kib()?;
    let (t0, c0, s0) = (
        Instant::now(),
        cpu_ticks("self")?,
        cpu_ticks(&child.id().to_string())?,
    );
    tokio::time::sleep(Duration::from_secs(idle)).await;
    let (c1, s1) = (cpu_ticks("self")?, cpu_ticks(&child.id().to_string())?);
    let secs = t0.elapsed().as_secs_f64();
    let frames: u64 = conns.iter().map(|c| c.stats.snapshot().frames).sum();

    println!("connections:           {n} (all logged in after {login_time:.2?})");
    println!("RSS before / after:    {rss0} KiB / {rss1} KiB");
    println!(
        "RSS per connection:    {:.1} KiB",
        (rss1.saturating_sub(rss0)) as f64 / n as f64
    );
    println!(
        "client CPU while idle: {:.2} % of one core over {secs:.1} s (keepalive every {keepalive} s; {frames} frames read in total)",
        (c1 - c0) as f64 / secs
    );
    println!(
        "server CPU (child):    {:.2} % of one core",
        (s1 - s0) as f64 / secs
    );

    shutdown.cancel();
    for c in conns {
        let _ = c.task.await;
    }
    let _ = drain.await;
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}

fn rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS"))
}

/// utime + stime of a process, in clock ticks (1/100 s).
fn cpu_ticks(pid: &str) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("bad stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; here 12 and 13 (0-based, after state).
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(utime + stime)
}

/// A minimal AMI server: banner, any Login accepted, Ping answered, Logoff closes.
async fn serve() -> anyhow::Result<()> {
    // A deep backlog: a burst of 1,000 connects overflows the default one now and then, and a
    // client whose handshake ended in a dropped syncookie waits for the banner until its
    // login timeout (AMI servers speak first).
    let socket = TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let listener = socket.listen(4096)?;
    println!("{}", listener.local_addr()?.port());
    loop {
        let (mut sock, _) = listener.accept().await?;
        tokio::spawn(async move {
            if sock
                .write_all(b"Asterisk Call Manager/11.0.0\r\n")
                .await
                .is_err()
            {
                return;
            }
            let mut buf = Vec::new();
            let mut chunk = [0u8; 2048];
            loop {
                let n = match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let frame: Vec<u8> = buf.drain(..end + 4).collect();
                    let text = String::from_utf8_lossy(&frame);
                    let get = |k: &str| {
                        text.lines()
                            .find_map(|l| l.strip_prefix(k))
                            .unwrap_or("")
                            .to_owned()
                    };
                    let id = get("ActionID: ");
                    let reply = match get("Action: ").to_ascii_lowercase().as_str() {
                        "login" => "Response: Success\r\nActionID: {id}\r\nMessage: Authentication accepted\r\n\r\n",
                        "ping" => "Response: Success\r\nActionID: {id}\r\nPing: Pong\r\nTimestamp: 1795671273.086287\r\n\r\n",
                        "logoff" => "Response: Goodbye\r\nActionID: {id}\r\nMessage: Thanks for all the fish.\r\n\r\n",
                        _ => "Response: Error\r\nActionID: {id}\r\nMessage: Invalid/unknown command\r\n\r\n",
                    }
                    .replace("{id}", &id);
                    if sock.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                    if reply.contains("Goodbye") {
                        return;
                    }
                }
            }
        });
    }
}
