//! A child process that does not outlive its test: a failed assertion unwinds past the test's
//! own stop, and an `amibus run` left behind would keep its simulator and spool busy (and its
//! ports taken) for every test after it.

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// Killed and reaped on drop, unless it has exited already.
pub struct KillOnDrop(pub Child);

impl Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The address `amibus run` serves metrics on, from its log line "serving /metrics, ..." (run
/// with `[metrics] listen = "127.0.0.1:0"`, so the system picks a port no other process holds:
/// probing for a free port and passing it on races with every other socket on the machine).
///
/// # Panics
/// The line does not appear within 60 s, or `child` exits first.
#[allow(dead_code)]
pub fn metrics_addr(log: &Path, child: &mut KillOnDrop) -> SocketAddr {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(addr) = text
            .lines()
            .filter(|l| l.contains("serving /metrics"))
            .find_map(|l| {
                l.split("addr=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
        {
            return addr;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("amibus exited ({status}) before serving metrics:\n{text}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "amibus did not log its metrics address:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
