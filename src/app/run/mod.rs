//! `amibus run`: every configured Asterisk → envelopes → spool → sink, until told to stop.
//!
//! Owns: starting the parts in order and stopping them in the reverse order.
//!
//! Start: open the spool (what an earlier run left unacknowledged is sent first), connect the
//! sink and start its driver, start the pipeline, then the connections (and the in-process
//! simulator of the embedded demo, if configured).
//!
//! Stop (SIGINT/SIGTERM, or the demo's simulator is done): stop reading AMI (each connection
//! sends Logoff), let the pipeline empty the hand-off queue into the spool, keep delivering
//! until the spool is empty or `pipeline.drain_timeout` passes, flush the sink, persist the
//! spool's floor, exit 0. Whatever was not delivered stays in the spool for the next start.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ami::connection::{Connection, Options, StatsSnapshot};
use crate::ami::handoff;
use crate::ami::server::ServerConfig;
use crate::config::{Config, ControlSection, ControlTransport, DemoSim, ProcessEnv, SinkConfig};
use crate::control::kafka::{KafkaRequestSource, KafkaResultPublisher};
use crate::control::nats::{
    JetStreamRequestSource, NatsRequestSource, NatsResultPublisher, Resubscriber, subject_for,
};
use crate::control::{AllowList, ControlStats, Controller, Owns, Target, Targets};
use crate::sim::{Sim, SimConfig, SimHandle};
use crate::sink::Sink;
use crate::sink::driver::{self, DriverConfig, DriverStats};
use crate::sink::file::FileSink;
use crate::sink::nats::NatsSink;
use crate::spool::Spool;
use crate::supervise::Supervisor;

use crate::pipeline::{
    LostRange, OPEN_EPOCHS_FILE, OpenEpochs, Pipeline, PipelineStats, SharedStats, UNREPORTED_FILE,
    load_unreported, save_unreported,
};
use crate::telemetry::{self, Sources};

mod control;
mod running;

use control::*;
use running::*;

/// The embedded default: an in-process simulator with two servers, read like real ones, written
/// as JSON lines to standard output; amibus stops once every simulated event is delivered.
pub const EMBEDDED_DEFAULT: &str = r#"
[sim]
servers = 2
rate = 2000
count = 5000
exit_when_done = true

[pipeline]
format = "json"

[sink]
kind = "file"
[sink.file]
path = "-"
"#;

/// How long a reload waits for the core NATS source to change its subscriptions.
const RESUBSCRIBE_WAIT: Duration = Duration::from_secs(5);

/// How often the pipeline retries reporting a loss while no record arrives.
const GAP_RETRY: Duration = Duration::from_millis(200);

/// Arguments of `amibus run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The configuration file (TOML). Without it, the embedded demo runs: a simulator with two
    /// servers, written as JSON lines to standard output.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => {
            let mut cfg = Config::parse(EMBEDDED_DEFAULT, &ProcessEnv)?;
            cfg.spool.dir =
                std::env::temp_dir().join(format!("amibus-demo-{}", std::process::id()));
            cfg
        }
    };
    let demo_spool = args.config.is_none().then(|| cfg.spool.dir.clone());
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cfg.pipeline.threads {
        builder.worker_threads(n);
    }
    let runtime = builder
        .enable_all()
        .thread_name("amibus")
        .build()
        .context("cannot start the runtime")?;
    let report = runtime.block_on(async {
        let stop = CancellationToken::new();
        spawn_signal_handler(stop.clone());
        let (reload_tx, reloads) = mpsc::channel(4);
        if let Some(path) = args.config.clone() {
            spawn_reload_handler(path, reload_tx);
        }
        run_with(&mut cfg, stop, reloads).await
    })?;
    eprintln!("{report}");
    if let Some(dir) = demo_spool {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// On SIGHUP, read the configuration again and hand its server list to the running job. A file
/// that does not validate is reported and changes nothing. Other sections (sink, spool) take
/// effect at the next start.
fn spawn_reload_handler(path: PathBuf, reloads: mpsc::Sender<Vec<ServerConfig>>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot install the SIGHUP handler; reloads are off");
            return;
        };
        while hup.recv().await.is_some() {
            match Config::load(&path) {
                Ok(cfg) => {
                    tracing::info!(path = %path.display(), servers = cfg.servers.len(), "SIGHUP: reloading the server list");
                    if reloads.send(cfg.servers).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "SIGHUP: configuration rejected; keeping the running server list")
                }
            }
        }
    });
    #[cfg(not(unix))]
    {
        let _ = (path, reloads);
    }
}

fn spawn_signal_handler(stop: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                tracing::error!("cannot install signal handlers; stop with SIGKILL");
                return;
            };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = int.recv() => tracing::info!("SIGINT: stopping"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        stop.cancel();
    });
}

/// What a run did, printed at exit.
#[derive(Debug, Default)]
pub struct Report {
    /// Servers this replica read (after sharding).
    pub servers: usize,
    pub pipeline: PipelineStats,
    pub delivered: u64,
    pub failed_permanent: u64,
    pub left_in_spool: u64,
    /// In-doubt records sent again (see [`crate::spool::SpoolStats::in_doubt_resent`]).
    pub in_doubt_resent: u64,
    pub events_by_server: HashMap<String, u64>,
    /// Each configured server's connection counters at exit (reconnects, dropped records, the
    /// last epoch), by server id.
    pub connections: BTreeMap<String, StatsSnapshot>,
    pub sim_events: Option<u64>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let events: u64 = self.events_by_server.values().sum();
        write!(
            f,
            "amibus: {} records ({} events from {} servers) stored, {} delivered, {} undeliverable, {} dropped by the spool, {} left in the spool",
            self.pipeline.stored,
            events,
            self.events_by_server.len(),
            self.delivered,
            self.failed_permanent,
            self.pipeline.dropped_newest + self.pipeline.dropped_oldest,
            self.left_in_spool
        )?;
        let reconnects: u64 = self.connections.values().map(|c| c.reconnects).sum();
        write!(f, "; {reconnects} AMI reconnects")?;
        if let Some(sim) = self.sim_events {
            write!(f, "; the simulator sent {sim} events")?;
        }
        Ok(())
    }
}

/// Run with `cfg` until `stop` is cancelled (or the demo is done), then shut down in order.
///
/// # Errors
/// As [`run_with`].
pub async fn run_until(cfg: &mut Config, stop: CancellationToken) -> anyhow::Result<Report> {
    let (_keep, reloads) = mpsc::channel(1);
    run_with(cfg, stop, reloads).await
}

/// [`run_until`], also taking new server lists (a SIGHUP reload): servers that appear are
/// connected, servers that disappear or whose settings changed are logged off (and the changed
/// ones reconnected), and every other connection is left alone. The action consumer follows:
/// requests for a removed server are answered `unknown_server` before its connection stops,
/// and the added ones are controllable (and subscribed, with core NATS) once connected.
///
/// # Errors
/// The spool cannot be opened or written, the sink cannot be set up, or the simulator cannot
/// start.
pub async fn run_with(
    cfg: &mut Config,
    stop: CancellationToken,
    mut reloads: mpsc::Receiver<Vec<ServerConfig>>,
) -> anyhow::Result<Report> {
    // Before anything records: a handle taken from the macros while no recorder is installed
    // (the sink driver takes its histogram's once, at start) records nowhere for good.
    let metrics_handle = match cfg.metrics.listen {
        Some(_) => Some(telemetry::install().context("cannot install the metrics recorder")?),
        None => None,
    };
    let sim = match cfg.sim.clone() {
        Some(demo) => Some(start_sim(&demo, cfg).await?),
        None => None,
    };
    let (spool, recovery) = Spool::open(cfg.spool.clone())
        .with_context(|| format!("cannot open the spool in {}", cfg.spool.dir.display()))?;
    if recovery.pending > 0 || recovery.torn_bytes > 0 || recovery.damaged_records > 0 {
        tracing::info!(
            pending = recovery.pending,
            torn_bytes = recovery.torn_bytes,
            damaged_records = recovery.damaged_records,
            damaged_bytes = recovery.damaged_bytes,
            "spool recovered; sending what an earlier run left"
        );
    }
    let sup = Supervisor::new();
    let stats = Arc::new(DriverStats::default());
    let driver_stop = CancellationToken::new();
    let drain_cfg = DriverConfig {
        drain_deadline: cfg.pipeline.drain_timeout,
        ..DriverConfig::default()
    };
    let drivers = Drivers {
        sup: &sup,
        spool: &spool,
        stats: &stats,
        stop: &driver_stop,
    };
    let driver = match &cfg.sink {
        SinkConfig::File(f) => {
            let sink =
                FileSink::open(f.clone()).with_context(|| format!("cannot open {}", f.path))?;
            drivers.spawn(sink, drain_cfg)
        }
        SinkConfig::Kafka(k) => {
            let sink = crate::sink::kafka::KafkaSink::new((**k).clone())
                .context("cannot set up the Kafka sink")?;
            drivers.spawn(sink, drain_cfg)
        }
        SinkConfig::Nats(n) => {
            // The sink supplies the ack deadline the driver times deliveries with.
            let sink = NatsSink::connect((**n).clone())
                .await
                .context("cannot set up the NATS sink")?;
            drivers.spawn(sink, drain_cfg)
        }
    };
    let maintain_stop = CancellationToken::new();
    let maintain = {
        let stop = maintain_stop.clone();
        let spool = spool.clone();
        sup.spawn("spool maintenance", async move {
            spool.maintain(async move { stop.cancelled().await }).await;
            Ok::<(), std::convert::Infallible>(())
        })
    };

    // The pipelines: each server is read into one of them; they append to the one spool.
    let shared_stats = Arc::new(SharedStats::default());
    let events_seen = Arc::new(AtomicU64::new(0));
    let workers = cfg.pipeline.workers;
    let mut txs = Vec::with_capacity(workers);
    let mut pipeline_tasks = Vec::with_capacity(workers);
    // Loss an earlier run could not report: the first pipeline reports it.
    let (mut carried, bad) = load_unreported(&cfg.spool.dir).with_context(|| {
        format!(
            "cannot read {UNREPORTED_FILE} in {}",
            cfg.spool.dir.display()
        )
    })?;
    for line in &bad {
        tracing::error!(line, "{UNREPORTED_FILE}: not a loss range; ignored");
    }
    if !carried.is_empty() {
        tracing::info!(
            ranges = carried.len(),
            "reporting loss an earlier run could not"
        );
    }
    // Sessions an earlier run left open (it was killed): the first pipeline closes them.
    let (open_epochs, left_open) = OpenEpochs::load(&cfg.spool.dir).with_context(|| {
        format!(
            "cannot read {OPEN_EPOCHS_FILE} in {}",
            cfg.spool.dir.display()
        )
    })?;
    for line in &left_open.bad_lines {
        tracing::error!(
            line,
            "{OPEN_EPOCHS_FILE}: not a `server epoch` line; ignored"
        );
    }
    let mut unclosed = left_open.epochs;
    // The pipelines' gap records, per server, for the connections' snapshots.
    let downstream_gaps = Arc::new(crate::ami::connection::DownstreamGaps::default());
    for _ in 0..workers {
        let (tx, rx) = handoff::channel((cfg.pipeline.handoff_queue / workers).max(1));
        txs.push(tx);
        let mut pipeline = Pipeline::new(spool.clone(), cfg.pipeline.format)
            .with_open_epochs(open_epochs.clone())
            .with_gap_notices(downstream_gaps.clone());
        for range in carried.drain(..) {
            pipeline.remember_range(&range);
        }
        pipeline.close_unclosed(&std::mem::take(&mut unclosed));
        pipeline.flush();
        let stage = format!("pipeline {}", pipeline_tasks.len() + 1);
        let run = run_pipeline(pipeline, rx, shared_stats.clone(), events_seen.clone());
        pipeline_tasks.push(sup.spawn(stage, async move {
            Ok::<_, std::convert::Infallible>(run.await)
        }));
    }

    // What an earlier run left open is closed in the spool now: the file forgets it.
    open_epochs.persist();

    // The connections, one task per owned server; SIGHUP can change the set.
    let read_stop = CancellationToken::new();
    let shard = cfg.shard;
    cfg.servers.retain(|s| shard.owns(&s.id));
    let registry: telemetry::Registry = Arc::default();
    let mut running = Running {
        tasks: HashMap::new(),
        txs,
        assigned: 0,
        read_stop: read_stop.clone(),
        registry: registry.clone(),
        sup: sup.clone(),
        conn_opts: Options {
            handoff_wait: cfg.pipeline.handoff_wait,
            downstream_gaps,
            limits: crate::ami::Limits {
                max_frame_bytes: usize::try_from(cfg.pipeline.max_frame_bytes)
                    .unwrap_or(usize::MAX)
                    .min(crate::ami::Limits::MAX_FRAME_BYTES_CEILING),
                ..crate::ami::Limits::default()
            },
            max_reply_bytes: cfg
                .control
                .as_ref()
                .map_or(crate::ami::connection::DEFAULT_MAX_REPLY_BYTES, |c| {
                    c.consumer.max_reply_bytes
                }),
            ..Options::default()
        },
    };
    running.apply(cfg.servers.clone()).await;
    // The action consumer, after the connections it sends through; stopped before them.
    let control_stop = CancellationToken::new();
    let control = match &cfg.control {
        Some(ctl) => Some(
            start_control(
                ctl,
                &cfg.servers,
                &running,
                shard,
                control_stop.clone(),
                &sup,
            )
            .await
            .context("cannot start the action consumer ([control])")?,
        ),
        None => None,
    };
    let metrics_stop = CancellationToken::new();
    if let (Some(addr), Some(handle)) = (cfg.metrics.listen, metrics_handle) {
        let sources = Sources {
            connections: registry.clone(),
            spool: Some(spool.clone()),
            sink: Some((sink_name(&cfg.sink), stats.clone())),
            pipeline: Some(shared_stats.clone()),
            control: control.as_ref().map(|c| c.stats.clone()),
            supervisor: Some(sup.clone()),
            stall_timeout: cfg.metrics.stall_timeout,
            progress: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for metrics"))?;
        // The bound address: with port 0 the system picked it, and this line says which.
        let addr = listener.local_addr().unwrap_or(addr);
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        let stop = metrics_stop.clone();
        let serve = telemetry::serve(
            listener,
            handle,
            sources,
            cfg.metrics.ready_min_connected,
            async move { stop.cancelled().await },
        );
        sup.spawn("metrics server", async move {
            serve.await;
            Ok::<(), std::convert::Infallible>(())
        });
    }
    tracing::info!(
        servers = running.tasks.len(),
        sink = sink_name(&cfg.sink),
        "amibus running"
    );

    // Wait for the stop signal, or for the demo's simulator to be done and delivered.
    let mut demo_done = Box::pin(async {
        match (&sim, cfg.sim.as_ref().is_some_and(|s| s.exit_when_done)) {
            (Some(sim), true) => {
                sim.wait_generated().await;
                let sent: u64 = sim.stats().iter().map(|s| s.events).sum();
                // Everything the simulator sent is in the spool once the pipeline has seen
                // that many events; then the spool drains as at any stop.
                while events_seen.load(Ordering::Relaxed) < sent {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            _ => std::future::pending().await,
        }
    });
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = sup.failed() => break,
            _ = &mut demo_done => {
                tracing::info!("the simulator is done; stopping");
                break;
            }
            Some(servers) = reloads.recv() => {
                let owned: Vec<ServerConfig> =
                    servers.into_iter().filter(|s| shard.owns(&s.id)).collect();
                if let Some(c) = &control {
                    c.before_reload(&owned, &running);
                }
                running.apply(owned.clone()).await;
                if let Some(c) = &control {
                    c.after_reload(&owned, &running).await;
                }
            }
        }
    }

    drop(demo_done);
    // From here on every stage is expected to end.
    sup.stopping();

    // Stop in reverse order: no new actions, answer those in flight, then stop reading AMI.
    control_stop.cancel();
    if let Some(c) = control {
        let _ = c.task.await;
    }
    read_stop.cancel();
    let servers = running.tasks.len();
    let mut connection_stats = BTreeMap::new();
    for (id, r) in running.tasks.drain() {
        let _ = r.task.await;
        connection_stats.insert(id, r.stats.snapshot());
    }
    drop(running);
    let mut pipeline_stats = PipelineStats::default();
    let mut events_by_server: HashMap<String, u64> = HashMap::new();
    let mut pipeline_error = None;
    let mut unreported = Vec::new();
    for task in pipeline_tasks {
        match task.await {
            Ok(Some(Ok((stats, events, lost)))) => {
                unreported.extend(lost);
                pipeline_stats.merge(&stats);
                for (server, n) in events {
                    *events_by_server.entry(server).or_default() += n;
                }
            }
            Ok(Some(Err(never))) => match never {},
            Ok(None) => pipeline_error = Some(anyhow::anyhow!("a pipeline panicked")),
            Err(e) => pipeline_error = Some(anyhow::anyhow!("a pipeline task failed: {e}")),
        }
    }
    if let Some(e) = pipeline_error {
        return Err(e);
    }
    // Loss the spool had no room to report (it was over half full to the end) goes to the
    // next run, which reports it first.
    if !unreported.is_empty() {
        tracing::warn!(
            ranges = unreported.len(),
            "lost records not yet reported (the spool is too full); the next start reports them"
        );
    }
    save_unreported(&cfg.spool.dir, &unreported).with_context(|| {
        format!(
            "cannot write {UNREPORTED_FILE} in {}",
            cfg.spool.dir.display()
        )
    })?;
    let deadline = Instant::now() + cfg.pipeline.drain_timeout;
    // In-doubt records are below the floor, not in `records_held`: sent again, they wait too.
    while spool.stats().records_held + spool.stats().in_doubt > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    driver_stop.cancel();
    // A failed driver is the supervisor's to report: the run ends with that error after its
    // orderly stop.
    let _ = driver.await.context("the sink driver's task")?;
    // In-doubt records live in memory only: what the sink did not confirm by now goes to the
    // next run as `spool full (in doubt)` gaps (the broker may have them, or not).
    if spool.abandon_in_doubt() > 0 {
        let mut doubts = Pipeline::new(spool.clone(), crate::model::PayloadFormat::Proto);
        doubts.collect_spool_losses();
        let in_doubt = doubts.unreported();
        tracing::warn!(
            ranges = in_doubt.len(),
            "records deleted by drop_oldest were still unconfirmed at shutdown; the next start \
             reports them as in doubt"
        );
        unreported.extend(in_doubt);
        save_unreported(&cfg.spool.dir, &unreported).with_context(|| {
            format!(
                "cannot write {UNREPORTED_FILE} in {}",
                cfg.spool.dir.display()
            )
        })?;
    }
    maintain_stop.cancel();
    let _ = maintain.await;
    metrics_stop.cancel();
    let sim_events = match sim {
        Some(sim) => Some(sim.shutdown().await.iter().map(|s| s.events).sum()),
        None => None,
    };
    if let Some(failure) = sup.failure() {
        // Stopped in order all the same: what the spool holds is sent at the next start.
        return Err(anyhow::anyhow!("{failure}"));
    }
    Ok(Report {
        servers,
        pipeline: pipeline_stats,
        delivered: stats.acknowledged.load(Ordering::Relaxed),
        failed_permanent: stats.failed_permanent.load(Ordering::Relaxed),
        left_in_spool: spool.stats().records_held,
        in_doubt_resent: spool.stats().in_doubt_resent,
        events_by_server,
        connections: connection_stats,
        sim_events,
    })
}

fn sink_name(cfg: &SinkConfig) -> &'static str {
    match cfg {
        SinkConfig::File(_) => "file",
        SinkConfig::Nats(_) => "nats",
        SinkConfig::Kafka(_) => "kafka",
    }
}

/// Per-server counts keyed by name, for the report.
fn by_name(events: HashMap<Arc<str>, u64>) -> HashMap<String, u64> {
    events
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// What starting the sink driver needs besides the sink, whichever sink it is.
struct Drivers<'a> {
    sup: &'a Supervisor,
    spool: &'a Spool,
    stats: &'a Arc<DriverStats>,
    stop: &'a CancellationToken,
}

impl Drivers<'_> {
    /// The sink driver as a supervised stage.
    fn spawn<S: Sink>(
        &self,
        sink: S,
        cfg: DriverConfig,
    ) -> tokio::task::JoinHandle<Option<Result<(), crate::spool::SpoolError>>> {
        let stop = self.stop.clone();
        self.sup.spawn(
            "sink driver",
            driver::run(
                sink,
                self.spool.reader(),
                cfg,
                self.stats.clone(),
                async move { stop.cancelled().await },
            ),
        )
    }
}

/// Start the demo's simulator and add its servers to the configuration.
async fn start_sim(demo: &DemoSim, cfg: &mut Config) -> anyhow::Result<SimHandle> {
    let sim_cfg = SimConfig {
        servers: demo.servers,
        rate: demo.rate,
        count: demo.count,
        seed: demo.seed,
        ..SimConfig::default()
    };
    let sim = Sim::start(sim_cfg.clone())
        .await
        .context("cannot start the simulator")?;
    for (i, addr) in sim.addrs().iter().enumerate() {
        cfg.servers.push(ServerConfig::new(
            &format!("sim-{}", i + 1),
            &addr.ip().to_string(),
            addr.port(),
            &sim_cfg.username,
            crate::secret::Secret::new(sim_cfg.secret.clone()),
        ));
    }
    Ok(sim)
}
