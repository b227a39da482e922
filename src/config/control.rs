//! `[control]`: the action consumer's transport, limits and journal, validated against the
//! sink it may share a connection with.

#[allow(unused_imports)]
use super::*;

#[derive(Default, Deserialize)]
pub(super) struct RawControl {
    transport: Option<String>,
    kafka: Option<RawControlKafka>,
    jetstream: Option<RawControlJetStream>,
    nats_servers: Option<Vec<String>>,
    nats: Option<RawNatsConnection>,
    subject: Option<String>,
    queue_group: Option<String>,
    result_subject: Option<String>,
    max_in_flight: Option<usize>,
    default_timeout: Option<String>,
    max_timeout: Option<String>,
    dedupe_window: Option<String>,
    dedupe_capacity: Option<usize>,
    dedupe_max_bytes: Option<RawSize>,
    max_reply_bytes: Option<RawSize>,
    journal: Option<PathBuf>,
    journal_fsync: Option<String>,
    rate: Option<f64>,
    burst: Option<u32>,
}

#[derive(Default, Deserialize)]
pub(super) struct RawControlJetStream {
    stream: Option<String>,
    durable: Option<String>,
    create_stream: Option<bool>,
    max_age: Option<String>,
    ack_wait: Option<String>,
    max_ack_pending: Option<i64>,
}

#[derive(Default, Deserialize)]
pub(super) struct RawControlKafka {
    brokers: Option<String>,
    request_topic: Option<String>,
    result_topic: Option<String>,
    group: Option<String>,
    start: Option<String>,
    message_timeout: Option<String>,
    session_timeout: Option<String>,
}

pub(super) fn validate_control(
    mut raw: RawControl,
    sink: &SinkConfig,
    spool: &SpoolConfig,
    shard: crate::shard::Shard,
    env: &dyn Env,
    problems: &mut Vec<Problem>,
) -> ControlSection {
    let mut consumer = crate::control::ControlConfig::default();
    let transport = match raw.transport.as_deref() {
        None | Some("nats") => {
            if raw.kafka.is_some() {
                problem(
                    problems,
                    "control.kafka",
                    "only used with control.transport = \"kafka\"",
                );
            }
            let n = validate_control_nats(&mut raw, sink, shard, env, problems);
            // A durable consumer per shard sees every request subject.
            consumer.answer_not_owned = n.jetstream.is_none();
            ControlTransport::Nats(n)
        }
        Some("kafka") => {
            for (key, set) in [
                ("jetstream", raw.jetstream.is_some()),
                ("nats_servers", raw.nats_servers.is_some()),
                ("nats", raw.nats.is_some()),
                ("subject", raw.subject.is_some()),
                ("queue_group", raw.queue_group.is_some()),
                ("result_subject", raw.result_subject.is_some()),
            ] {
                if set {
                    problem(
                        problems,
                        &format!("control.{key}"),
                        "only used with control.transport = \"nats\"; see [control.kafka]",
                    );
                }
            }
            // Every replica must see every request: one consumer group per shard.
            consumer.answer_not_owned = false;
            ControlTransport::Kafka(validate_control_kafka(
                raw.kafka.take().unwrap_or_default(),
                sink,
                shard,
                problems,
            ))
        }
        Some(other) => {
            problem(
                problems,
                "control.transport",
                format!("{other:?} is not a transport (\"nats\" or \"kafka\")"),
            );
            ControlTransport::Nats(validate_control_nats(&mut raw, sink, shard, env, problems))
        }
    };
    set_positive(
        "control.max_in_flight",
        raw.max_in_flight,
        &mut consumer.max_in_flight,
        problems,
    );
    consumer.default_timeout = opt_duration(
        "control.default_timeout",
        raw.default_timeout,
        consumer.default_timeout,
        problems,
    );
    consumer.max_timeout = opt_duration(
        "control.max_timeout",
        raw.max_timeout,
        consumer.max_timeout,
        problems,
    );
    if consumer.default_timeout > consumer.max_timeout {
        problem(
            problems,
            "control.default_timeout",
            "is larger than control.max_timeout",
        );
    }
    consumer.dedupe_window = opt_duration(
        "control.dedupe_window",
        raw.dedupe_window,
        consumer.dedupe_window,
        problems,
    );
    set_positive(
        "control.dedupe_capacity",
        raw.dedupe_capacity,
        &mut consumer.dedupe_capacity,
        problems,
    );
    consumer.dedupe_max_bytes = size(
        "control.dedupe_max_bytes",
        raw.dedupe_max_bytes,
        consumer.dedupe_max_bytes as u64,
        problems,
    ) as usize;
    consumer.max_reply_bytes = usize::try_from(size(
        "control.max_reply_bytes",
        raw.max_reply_bytes,
        consumer.max_reply_bytes as u64,
        problems,
    ))
    .unwrap_or(usize::MAX);
    match raw.rate {
        Some(r) if !(r.is_finite() && r >= 0.0) => problem(
            problems,
            "control.rate",
            "must be 0 (unlimited) or a positive number",
        ),
        Some(r) => consumer.rate = r,
        None => {}
    }
    set_positive("control.burst", raw.burst, &mut consumer.burst, problems);
    let mut transport = transport;
    if let ControlTransport::Nats(NatsControl {
        jetstream: Some(js),
        ..
    }) = &mut transport
    {
        // Defaults that follow the consumer's settings.
        if js.ack_wait.is_zero() {
            js.ack_wait = consumer.max_timeout + Duration::from_secs(30);
        } else if js.ack_wait <= consumer.max_timeout {
            problem(
                problems,
                "control.jetstream.ack_wait",
                "must be longer than control.max_timeout, or requests still running are \
                 delivered again",
            );
        }
        if js.max_ack_pending == 0 {
            js.max_ack_pending = i64::try_from(consumer.max_in_flight).unwrap_or(i64::MAX);
        }
    }
    let fsync = match raw.journal_fsync.as_deref() {
        None | Some("never") => JournalFsync::Never,
        Some("always") => JournalFsync::Always,
        Some(other) => {
            problem(
                problems,
                "control.journal_fsync",
                format!("{other:?}: use \"never\" or \"always\""),
            );
            JournalFsync::Never
        }
    };
    if raw
        .journal
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        problem(
            problems,
            "control.journal",
            "must be a file path (default: control-journal in spool.dir)",
        );
    }
    let journal = JournalConfig {
        path: raw
            .journal
            .unwrap_or_else(|| spool.dir.join("control-journal")),
        fsync,
        // Compacted past twice what the memory holds (and never below 1 MiB).
        max_bytes: (consumer.dedupe_max_bytes as u64)
            .saturating_mul(2)
            .max(1 << 20),
    };
    ControlSection {
        transport,
        consumer,
        journal,
    }
}

pub(super) fn validate_control_nats(
    raw: &mut RawControl,
    sink: &SinkConfig,
    shard: crate::shard::Shard,
    env: &dyn Env,
    problems: &mut Vec<Problem>,
) -> NatsControl {
    let own = raw.nats.take();
    if own.is_some() && raw.nats_servers.is_some() {
        problem(
            problems,
            "control.nats_servers",
            "set either control.nats_servers or [control.nats] (servers, auth, TLS), not both",
        );
    }
    let nats = match (raw.nats_servers.take(), sink) {
        // Like [sink.nats]: servers default to the local NATS.
        _ if own.is_some() => validate_nats_connection(
            "control.nats",
            own.unwrap_or_default(),
            crate::broker::nats::NatsConnection::default(),
            env,
            problems,
        ),
        (Some(servers), _) if servers.is_empty() => {
            problem(
                problems,
                "control.nats_servers",
                "must list at least one server URL",
            );
            crate::broker::nats::NatsConnection::default()
        }
        (Some(servers), _) => crate::broker::nats::NatsConnection {
            servers,
            ..crate::broker::nats::NatsConnection::default()
        },
        (None, SinkConfig::Nats(n)) => n.connection.clone(),
        (None, _) => {
            problem(
                problems,
                "control.nats_servers",
                "required (or [control.nats]) unless sink.kind = \"nats\" (whose connection is then used)",
            );
            crate::broker::nats::NatsConnection::default()
        }
    };
    let template = |path: &str, v: Option<String>, default: &str, problems: &mut Vec<Problem>| {
        let v = v.unwrap_or_else(|| default.to_owned());
        if v.is_empty() || v.contains([' ', '\t', '\r', '\n']) {
            problem(problems, path, format!("{v:?} is not a NATS subject"));
        }
        v
    };
    let subject = template(
        "control.subject",
        raw.subject.take(),
        "amibus.action.{server}",
        problems,
    );
    if !subject.contains("{server}") {
        problem(
            problems,
            "control.subject",
            "must contain {server}: each replica subscribes to the subjects of its own servers",
        );
    }
    let result_subject = template(
        "control.result_subject",
        raw.result_subject.take(),
        "amibus.result.{server}",
        problems,
    );
    let jetstream = raw.jetstream.take().map(|js| {
        if raw.queue_group.is_some() {
            problem(
                problems,
                "control.queue_group",
                "not used with [control.jetstream] (a durable consumer per shard instead)",
            );
        }
        let stream = js.stream.unwrap_or_else(|| "AMIBUS_ACTIONS".to_owned());
        if stream.is_empty()
            || !stream
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            problem(
                problems,
                "control.jetstream.stream",
                format!("{stream:?} is not a stream name ([A-Za-z0-9_-])"),
            );
        }
        let durable = js
            .durable
            .unwrap_or_else(|| "amibus-control-{shard}".to_owned());
        if shard.count > 1 && !durable.contains("{shard}") {
            problem(
                problems,
                "control.jetstream.durable",
                "must contain {shard} with more than one shard: each shard needs its own \
                 durable consumer to see every request",
            );
        }
        let durable = durable.replace("{shard}", &shard.index.to_string());
        if durable.is_empty()
            || !durable
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            problem(
                problems,
                "control.jetstream.durable",
                format!("{durable:?} is not a consumer name ([A-Za-z0-9_-])"),
            );
        }
        let ack_wait = match js.ack_wait {
            None => Duration::ZERO, // filled in from max_timeout
            Some(v) => opt_duration(
                "control.jetstream.ack_wait",
                Some(v),
                Duration::ZERO,
                problems,
            ),
        };
        let max_ack_pending = match js.max_ack_pending {
            Some(n) if n < 1 => {
                problem(
                    problems,
                    "control.jetstream.max_ack_pending",
                    "must be at least 1",
                );
                0
            }
            Some(n) => n,
            None => 0, // filled in from max_in_flight
        };
        crate::control::nats::JetStreamRequests {
            stream,
            durable,
            create_stream: js.create_stream.unwrap_or(true),
            max_age: opt_duration(
                "control.jetstream.max_age",
                js.max_age,
                Duration::from_secs(24 * 3600),
                problems,
            ),
            ack_wait,
            max_ack_pending,
        }
    });
    NatsControl {
        jetstream,
        nats,
        subject,
        queue_group: Some(
            raw.queue_group
                .take()
                .unwrap_or_else(|| "amibus-control".to_owned()),
        )
        .filter(|g| !g.is_empty()),
        result_subject,
    }
}

pub(super) fn validate_control_kafka(
    raw: RawControlKafka,
    sink: &SinkConfig,
    shard: crate::shard::Shard,
    problems: &mut Vec<Problem>,
) -> crate::control::kafka::KafkaControlConfig {
    use crate::control::kafka::KafkaControlConfig;
    let mut cfg = match (raw.brokers, sink) {
        (Some(b), _) if b.trim().is_empty() => {
            problem(
                problems,
                "control.kafka.brokers",
                "must list at least one host:port",
            );
            KafkaControlConfig::new(b)
        }
        (Some(b), _) => KafkaControlConfig::new(b),
        (None, SinkConfig::Kafka(k)) => KafkaControlConfig {
            connection: k.connection.clone(),
            ..KafkaControlConfig::new("")
        },
        (None, _) => {
            problem(
                problems,
                "control.kafka.brokers",
                "required unless sink.kind = \"kafka\" (whose connection is then used)",
            );
            KafkaControlConfig::new("")
        }
    };
    let topic = |path: &str, v: Option<String>, default: String, problems: &mut Vec<Problem>| {
        let v = v.unwrap_or(default);
        let ok = !v.is_empty()
            && v.len() <= 249
            && v != "."
            && v != ".."
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            problem(
                problems,
                path,
                format!("{v:?} is not a Kafka topic name (1 to 249 of [A-Za-z0-9._-])"),
            );
        }
        v
    };
    cfg.request_topic = topic(
        "control.kafka.request_topic",
        raw.request_topic,
        cfg.request_topic,
        problems,
    );
    cfg.result_topic = topic(
        "control.kafka.result_topic",
        raw.result_topic,
        cfg.result_topic,
        problems,
    );
    if cfg.request_topic == cfg.result_topic {
        problem(
            problems,
            "control.kafka.result_topic",
            "must differ from control.kafka.request_topic (results would be read as requests)",
        );
    }
    cfg.start = match raw.start.as_deref() {
        None | Some("latest") => crate::control::kafka::GroupStart::Latest,
        Some("earliest") => crate::control::kafka::GroupStart::Earliest,
        Some(other) => {
            problem(
                problems,
                "control.kafka.start",
                format!(
                    "{other:?}: use \"latest\" (only requests published from the group's first start) or \"earliest\" (everything the topic still holds)"
                ),
            );
            crate::control::kafka::GroupStart::Latest
        }
    };
    let group = raw
        .group
        .unwrap_or_else(|| "amibus-control-{shard}".to_owned());
    if group.trim().is_empty() {
        problem(problems, "control.kafka.group", "must not be empty");
    } else if shard.count > 1 && !group.contains("{shard}") {
        problem(
            problems,
            "control.kafka.group",
            "must contain {shard} with more than one shard: every replica must read every \
             request, so each shard needs its own consumer group",
        );
    }
    cfg.group_id = group.replace("{shard}", &shard.index.to_string());
    cfg.message_timeout = opt_duration(
        "control.kafka.message_timeout",
        raw.message_timeout,
        cfg.message_timeout,
        problems,
    );
    cfg.session_timeout = opt_duration(
        "control.kafka.session_timeout",
        raw.session_timeout,
        cfg.session_timeout,
        problems,
    );
    if cfg.session_timeout.is_zero() {
        problem(
            problems,
            "control.kafka.session_timeout",
            "must be more than 0",
        );
    }
    cfg
}
