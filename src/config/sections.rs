//! `[pipeline]`, `[shard]`, `[metrics]` and `[sim]`: raw form and validation.

#[allow(unused_imports)]
use super::*;

#[derive(Default, Deserialize)]
pub(super) struct RawShard {
    index: Option<u32>,
    count: Option<u32>,
    #[serde(default)]
    index_from_hostname: bool,
}

#[derive(Default, Deserialize)]
pub(super) struct RawMetrics {
    listen: Option<String>,
    ready_min_connected: Option<f64>,
    stall_timeout: Option<String>,
}

#[derive(Default, Deserialize)]
pub(super) struct RawPipeline {
    format: Option<String>,
    handoff_queue: Option<usize>,
    handoff_wait: Option<String>,
    workers: Option<usize>,
    threads: Option<usize>,
    drain_timeout: Option<String>,
    max_frame_bytes: Option<RawSize>,
}

#[derive(Default, Deserialize)]
pub(super) struct RawSim {
    servers: Option<usize>,
    rate: Option<u64>,
    count: Option<u64>,
    seed: Option<u64>,
    exit_when_done: Option<bool>,
}

pub(super) fn validate_pipeline(raw: RawPipeline, problems: &mut Vec<Problem>) -> PipelineConfig {
    let format = match raw.format.as_deref() {
        None | Some("proto") => PayloadFormat::Proto,
        Some("json") => PayloadFormat::Json,
        Some(other) => {
            problem(
                problems,
                "pipeline.format",
                format!("{other:?}: use \"proto\" or \"json\""),
            );
            PayloadFormat::Proto
        }
    };
    let mut handoff_queue = 65_536;
    set_positive(
        "pipeline.handoff_queue",
        raw.handoff_queue,
        &mut handoff_queue,
        problems,
    );
    let handoff_wait = match raw.handoff_wait {
        None => DEFAULT_HANDOFF_WAIT,
        Some(s) => match parse_duration(&s) {
            Some(d) if d < Duration::from_millis(100) => d,
            Some(_) => {
                problem(
                    problems,
                    "pipeline.handoff_wait",
                    format!(
                        "{s:?}: must be under 100ms, Asterisk's default writetimeout, after \
                         which it drops a session that does not read"
                    ),
                );
                DEFAULT_HANDOFF_WAIT
            }
            None => {
                problem(
                    problems,
                    "pipeline.handoff_wait",
                    format!("{s:?} is not a duration"),
                );
                DEFAULT_HANDOFF_WAIT
            }
        },
    };
    let mut workers = default_workers();
    set_positive("pipeline.workers", raw.workers, &mut workers, problems);
    let threads = match raw.threads {
        Some(0) => {
            problem(problems, "pipeline.threads", "must be greater than zero");
            None
        }
        Some(n) if n > MAX_THREADS => {
            problem(
                problems,
                "pipeline.threads",
                format!("{n} is more than {MAX_THREADS}"),
            );
            None
        }
        t => t,
    };
    let drain_timeout = match raw.drain_timeout {
        None => Duration::from_secs(10),
        Some(s) => parse_duration(&s).unwrap_or_else(|| {
            problem(
                problems,
                "pipeline.drain_timeout",
                format!("{s:?} is not a duration"),
            );
            Duration::from_secs(10)
        }),
    };
    let max_frame_bytes = size(
        "pipeline.max_frame_bytes",
        raw.max_frame_bytes,
        crate::ami::Limits::DEFAULT_MAX_FRAME_BYTES as u64,
        problems,
    );
    PipelineConfig {
        format,
        handoff_queue,
        handoff_wait,
        workers,
        threads,
        drain_timeout,
        max_frame_bytes,
    }
}

/// The most runtime threads `pipeline.threads` may ask for.
const MAX_THREADS: usize = 256;

/// The spool's cap must hold this many of the largest frames: a frame's envelope is larger
/// than the frame (header framing; JSON escapes), and one record must never need the whole
/// spool. A record that still does not fit is published as a `parse_error` record.
pub const SPOOL_FRAMES_AT_LEAST: u64 = 2;

pub use crate::ami::connection::DEFAULT_HANDOFF_WAIT;

/// One pipeline per core, at most 8 (one pipeline keeps up with well over 100k records/s).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// `[shard]`, with `AMIBUS_SHARD_INDEX` / `AMIBUS_SHARD_COUNT` from the environment taking
/// precedence (a StatefulSet sets them per pod), or the index read from the host name's
/// ordinal (`amibus-2` → 2) with `index_from_hostname = true`.
pub(super) fn validate_shard(
    raw: RawShard,
    env: &dyn Env,
    problems: &mut Vec<Problem>,
) -> crate::shard::Shard {
    let from_env = |name: &str, problems: &mut Vec<Problem>| {
        env.var(name).and_then(|v| match v.trim().parse::<u32>() {
            Ok(n) => Some(n),
            Err(_) => {
                problem(problems, "shard", format!("{name}={v:?} is not a number"));
                None
            }
        })
    };
    let count = from_env("AMIBUS_SHARD_COUNT", problems)
        .or(raw.count)
        .unwrap_or(1);
    let index = match from_env("AMIBUS_SHARD_INDEX", problems) {
        Some(i) => i,
        None if raw.index_from_hostname => {
            let host = env.var("HOSTNAME").unwrap_or_default();
            crate::shard::ordinal_from_hostname(&host).unwrap_or_else(|| {
                problem(
                    problems,
                    "shard.index_from_hostname",
                    format!("host name {host:?} does not end in -<number>"),
                );
                0
            })
        }
        None => raw.index.unwrap_or(0),
    };
    if count == 0 {
        problem(problems, "shard.count", "must be at least 1");
    } else if index >= count {
        problem(
            problems,
            "shard.index",
            format!("{index} is not below shard.count {count}"),
        );
    }
    crate::shard::Shard {
        index: index.min(count.saturating_sub(1)),
        count: count.max(1),
    }
}

pub(super) fn validate_metrics(raw: RawMetrics, problems: &mut Vec<Problem>) -> MetricsConfig {
    let listen = raw.listen.and_then(|l| match l.parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            problem(
                problems,
                "metrics.listen",
                format!("{l:?} is not an address such as 0.0.0.0:9898"),
            );
            None
        }
    });
    let share = raw.ready_min_connected.unwrap_or(0.5);
    if !(0.0..=1.0).contains(&share) {
        problem(
            problems,
            "metrics.ready_min_connected",
            "must be between 0 and 1",
        );
    }
    let stall_timeout = match raw.stall_timeout {
        None => DEFAULT_STALL_TIMEOUT,
        Some(s) => match parse_duration(&s) {
            Some(d) if !d.is_zero() => d,
            _ => {
                problem(
                    problems,
                    "metrics.stall_timeout",
                    format!("{s:?} is not a duration above zero"),
                );
                DEFAULT_STALL_TIMEOUT
            }
        },
    };
    MetricsConfig {
        listen,
        ready_min_connected: share.clamp(0.0, 1.0),
        stall_timeout,
    }
}

pub(super) fn validate_sim(raw: RawSim, problems: &mut Vec<Problem>) -> DemoSim {
    let servers = raw.servers.unwrap_or(2);
    if servers == 0 || servers > 10_000 {
        problem(problems, "sim.servers", "must be between 1 and 10000");
    }
    DemoSim {
        servers: servers.clamp(1, 10_000),
        rate: raw.rate.unwrap_or(1000),
        count: raw.count,
        seed: raw.seed.unwrap_or(1),
        exit_when_done: raw.exit_when_done.unwrap_or(false),
    }
}
