//! `amibus run` inside the test process (`run_with`), with its stop token and its reload
//! channel, for tests that need the whole run without a child process.

#![allow(dead_code)]

use std::time::Duration;

use amibus::ami::server::ServerConfig;
use amibus::app::run::{Report, run_with};
use amibus::config::Config;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a stop may take.
const STOP_WAIT: Duration = Duration::from_secs(60);

pub struct Running {
    stop: CancellationToken,
    /// A new server list, as SIGHUP would give it.
    pub reloads: mpsc::Sender<Vec<ServerConfig>>,
    task: tokio::task::JoinHandle<anyhow::Result<Report>>,
}

impl Running {
    pub fn start(mut cfg: Config) -> Running {
        let stop = CancellationToken::new();
        let (reloads, rx) = mpsc::channel(1);
        let s = stop.clone();
        let task = tokio::spawn(async move { run_with(&mut cfg, s, rx).await });
        Running {
            stop,
            reloads,
            task,
        }
    }

    /// Stop as SIGTERM would; the run must end cleanly.
    pub async fn stop(self) -> Report {
        self.stop.cancel();
        tokio::time::timeout(STOP_WAIT, self.task)
            .await
            .expect("amibus stops")
            .expect("no panic")
            .expect("a clean exit")
    }
}
