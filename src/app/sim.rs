//! `amibus sim`: run a farm of simulated Asterisk servers speaking AMI.
//!
//! Prints one JSON line with the bound addresses at start, and one JSON line of counters per
//! server at exit (count/duration reached and sessions drained, or SIGINT).

use std::path::PathBuf;
use std::time::Duration;

use crate::sim::{Sim, SimConfig, Speed};

/// Arguments of `amibus sim`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of servers, on consecutive ports from --port.
    #[arg(long, default_value_t = 1)]
    pub servers: usize,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// First port (0: an OS-assigned port for each server).
    #[arg(long, default_value_t = 5038)]
    pub port: u16,
    #[arg(long, default_value = "admin")]
    pub username: String,
    #[arg(long, default_value = "amp111")]
    pub secret: String,
    /// Delay before answering a failed login, in milliseconds (Asterisk: 1000).
    #[arg(long, default_value_t = 1000)]
    pub auth_fail_delay_ms: u64,
    /// Events per second per server (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Stop generating after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Stop generating after this many events per server.
    #[arg(long)]
    pub count: Option<u64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Virtual clock start (Unix seconds) for Timestamp and Uniqueid; default: now.
    #[arg(long)]
    pub epoch: Option<u64>,
    /// Calls in progress at once per server.
    #[arg(long, default_value_t = 8)]
    pub concurrent_calls: usize,
    /// Generate only while at least this many sessions are logged in.
    #[arg(long, default_value_t = 1)]
    pub min_clients: usize,
    #[arg(long, default_value_t = 0.0)]
    pub non_ascii_share: f64,
    #[arg(long, default_value_t = 0.0)]
    pub non_utf8_share: f64,
    #[arg(long, default_value_t = 0.0)]
    pub malformed_share: f64,
    /// Every Nth event is made larger than --oversized-bytes.
    #[arg(long)]
    pub oversized_every: Option<u64>,
    #[arg(long, default_value_t = 9 << 20)]
    pub oversized_bytes: usize,
    /// Close every session this often (seconds).
    #[arg(long)]
    pub disconnect_every: Option<f64>,
    /// Write at most this many bytes per socket write.
    #[arg(long)]
    pub slow_drip: Option<usize>,
    /// Disconnect a session whose socket takes no bytes for this long.
    #[arg(long, default_value_t = 100)]
    pub write_timeout_ms: u64,
    /// Replay this raw AMI recording instead of generating events.
    #[arg(long)]
    pub replay: Option<PathBuf>,
    /// Replay speed: a factor of real time by the recorded Timestamps, or `max`.
    #[arg(long, default_value = "max")]
    pub speed: String,
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

fn secs(v: Option<f64>, name: &str) -> anyhow::Result<Option<Duration>> {
    v.map(|s| {
        Duration::try_from_secs_f64(s)
            .map_err(|_| anyhow::anyhow!("--{name} must be a positive number"))
    })
    .transpose()
}

impl Args {
    /// The library configuration these flags describe.
    ///
    /// # Errors
    /// A bad `--speed`, `--duration` or `--disconnect-every`.
    pub fn to_config(&self) -> anyhow::Result<SimConfig> {
        let speed = if self.speed.eq_ignore_ascii_case("max") {
            Speed::Max
        } else {
            let x: f64 = self
                .speed
                .parse()
                .map_err(|_| anyhow::anyhow!("--speed must be a number or `max`"))?;
            anyhow::ensure!(x > 0.0, "--speed must be above 0");
            Speed::Factor(x)
        };
        Ok(SimConfig {
            servers: self.servers,
            host: self.host.clone(),
            port: self.port,
            username: self.username.clone(),
            secret: self.secret.clone(),
            auth_fail_delay: Duration::from_millis(self.auth_fail_delay_ms),
            rate: self.rate,
            duration: secs(self.duration, "duration")?,
            count: self.count,
            seed: self.seed,
            epoch: self.epoch,
            concurrent_calls: self.concurrent_calls,
            min_clients: self.min_clients,
            non_ascii_share: self.non_ascii_share,
            non_utf8_share: self.non_utf8_share,
            malformed_share: self.malformed_share,
            oversized_every: self.oversized_every,
            oversized_bytes: self.oversized_bytes,
            disconnect_every: secs(self.disconnect_every, "disconnect-every")?,
            slow_drip: self.slow_drip,
            write_timeout: Duration::from_millis(self.write_timeout_ms),
            replay: self.replay.clone(),
            speed,
            tls: self.tls_cert.clone().zip(self.tls_key.clone()),
            ..SimConfig::default()
        })
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = args.to_config()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let limited = cfg.count.is_some() || cfg.duration.is_some() || cfg.replay.is_some();
        let sim = Sim::start(cfg).await?;
        let addrs: Vec<String> = sim.addrs().iter().map(|a| a.to_string()).collect();
        println!("{}", serde_json::json!({ "servers": addrs }));
        tokio::select! {
            _ = sim.wait_generated(), if limited => {
                // Let sessions drain what is queued for them.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            r = tokio::signal::ctrl_c() => r?,
        }
        for s in sim.shutdown().await {
            println!("{}", serde_json::to_string(&s)?);
        }
        Ok(())
    })
}
