//! `[spool]` and `[sink]` (file, NATS, Kafka): raw form and validation.

#[allow(unused_imports)]
use super::*;

#[derive(Default, Deserialize)]
pub(super) struct RawSpool {
    dir: Option<PathBuf>,
    segment_bytes: Option<RawSize>,
    max_bytes: Option<RawSize>,
    fsync: Option<String>,
    when_full: Option<String>,
    max_in_flight: Option<u64>,
    memory_bytes: Option<RawSize>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawSize {
    Bytes(u64),
    Text(String),
}

#[derive(Default, Deserialize)]
pub(super) struct RawSink {
    kind: Option<String>,
    file: Option<RawFileSink>,
    nats: Option<RawNatsSink>,
    kafka: Option<RawKafkaSink>,
}

#[derive(Default, Deserialize)]
pub(super) struct RawKafkaSink {
    brokers: Option<String>,
    topic: Option<String>,
    compression: Option<String>,
    linger: Option<String>,
    batch_bytes: Option<RawSize>,
    message_timeout: Option<String>,
    create_topics: Option<RawKafkaTopics>,
    tls: Option<RawKafkaTls>,
    sasl: Option<RawKafkaSasl>,
    #[serde(default)]
    properties: std::collections::BTreeMap<String, String>,
}

#[derive(Default, Deserialize)]
pub(super) struct RawKafkaTopics {
    partitions: Option<i32>,
    replication: Option<i32>,
}

#[derive(Default, Deserialize)]
pub(super) struct RawKafkaTls {
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

#[derive(Default, Deserialize)]
pub(super) struct RawKafkaSasl {
    mechanism: Option<String>,
    username: Option<String>,
    password_env: Option<String>,
}

#[derive(Default, Deserialize)]
pub(super) struct RawNatsSink {
    servers: Option<Vec<String>>,
    subject: Option<String>,
    mode: Option<String>,
    name: Option<String>,
    token_env: Option<String>,
    user: Option<String>,
    password_env: Option<String>,
    credentials_file: Option<PathBuf>,
    nkey_seed_env: Option<String>,
    tls: Option<RawNatsTls>,
    stream: Option<RawNatsStream>,
    ack_timeout: Option<String>,
    max_in_flight: Option<usize>,
}

/// The connection keys of a NATS client: `[sink.nats]` has them among its own, `[control.nats]`
/// is only them.
#[derive(Default, Deserialize)]
pub(super) struct RawNatsConnection {
    servers: Option<Vec<String>>,
    name: Option<String>,
    token_env: Option<String>,
    user: Option<String>,
    password_env: Option<String>,
    credentials_file: Option<PathBuf>,
    nkey_seed_env: Option<String>,
    tls: Option<RawNatsTls>,
}

#[derive(Default, Deserialize)]
pub(super) struct RawNatsTls {
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    #[serde(default)]
    require: bool,
    #[serde(default)]
    handshake_first: bool,
}

#[derive(Default, Deserialize)]
pub(super) struct RawNatsStream {
    name: Option<String>,
    subjects: Option<Vec<String>>,
    storage: Option<String>,
    max_bytes: Option<RawSize>,
    max_age: Option<String>,
    duplicate_window: Option<String>,
}

#[derive(Default, Deserialize)]
pub(super) struct RawFileSink {
    path: Option<String>,
    rotate_bytes: Option<RawSize>,
    keep: Option<u32>,
}

pub(super) fn validate_spool(raw: RawSpool, problems: &mut Vec<Problem>) -> SpoolConfig {
    let mut cfg = SpoolConfig::new(raw.dir.unwrap_or_else(|| PathBuf::from("amibus-spool")));
    cfg.segment_bytes = size(
        "spool.segment_bytes",
        raw.segment_bytes,
        cfg.segment_bytes,
        problems,
    );
    cfg.max_bytes = size("spool.max_bytes", raw.max_bytes, cfg.max_bytes, problems);
    if cfg.segment_bytes > cfg.max_bytes {
        problem(
            problems,
            "spool.segment_bytes",
            "must not be larger than spool.max_bytes",
        );
    }
    if let Some(f) = raw.fsync {
        cfg.fsync = match f.as_str() {
            "never" => Fsync::Never,
            "always" => Fsync::Always,
            other => match parse_duration(other) {
                Some(d) if !d.is_zero() => Fsync::Interval(d),
                _ => {
                    problem(
                        problems,
                        "spool.fsync",
                        format!("{f:?}: use \"never\", \"always\" or an interval such as \"1s\""),
                    );
                    cfg.fsync
                }
            },
        };
    }
    if let Some(w) = raw.when_full {
        cfg.when_full = match w.as_str() {
            "drop_oldest" => WhenFull::DropOldest,
            "drop_newest" => WhenFull::DropNewest,
            _ => {
                problem(
                    problems,
                    "spool.when_full",
                    format!("{w:?}: use \"drop_oldest\" or \"drop_newest\""),
                );
                cfg.when_full
            }
        };
    }
    set_positive(
        "spool.max_in_flight",
        raw.max_in_flight,
        &mut cfg.max_in_flight,
        problems,
    );
    cfg.memory_bytes = size(
        "spool.memory_bytes",
        raw.memory_bytes,
        cfg.memory_bytes,
        problems,
    );
    cfg
}

pub(super) fn validate_sink(
    raw: RawSink,
    env: &dyn Env,
    problems: &mut Vec<Problem>,
) -> SinkConfig {
    let kind = raw.kind.unwrap_or_else(|| "file".into());
    match kind.as_str() {
        "file" => {
            let f = raw.file.unwrap_or_default();
            SinkConfig::File(FileSinkConfig {
                path: f.path.unwrap_or_else(|| "-".into()),
                framing: Framing::Lines,
                rotate_bytes: match f.rotate_bytes {
                    None | Some(RawSize::Bytes(0)) => 0,
                    Some(r) => size("sink.file.rotate_bytes", Some(r), 0, problems),
                },
                keep: f.keep.unwrap_or(5),
            })
        }
        "kafka" => SinkConfig::Kafka(Box::new(validate_kafka(
            raw.kafka.unwrap_or_default(),
            env,
            problems,
        ))),
        "nats" => SinkConfig::Nats(Box::new(validate_nats(
            raw.nats.unwrap_or_default(),
            env,
            problems,
        ))),
        other => {
            problem(
                problems,
                "sink.kind",
                format!("{other:?}: use \"file\", \"kafka\" or \"nats\""),
            );
            SinkConfig::File(FileSinkConfig {
                path: "-".into(),
                framing: Framing::Lines,
                rotate_bytes: 0,
                keep: 0,
            })
        }
    }
}

pub(super) fn validate_kafka(
    raw: RawKafkaSink,
    env: &dyn Env,
    problems: &mut Vec<Problem>,
) -> KafkaSinkConfig {
    use crate::broker::kafka::{KafkaSasl, KafkaTls};
    use crate::sink::kafka::NewTopics;
    let brokers = raw.brokers.unwrap_or_else(|| {
        problem(
            problems,
            "sink.kafka.brokers",
            "required (host:port[,host:port...])",
        );
        String::new()
    });
    let mut cfg = KafkaSinkConfig::new(brokers);
    if let Some(topic) = raw.topic {
        cfg.topic = topic;
    }
    if let Some(c) = raw.compression {
        match c.parse() {
            Ok(c) => cfg.compression = c,
            Err(e) => problem(problems, "sink.kafka.compression", e),
        }
    }
    cfg.linger = match raw.linger {
        None => cfg.linger,
        Some(s) => parse_duration(&s).unwrap_or_else(|| {
            problem(
                problems,
                "sink.kafka.linger",
                format!("{s:?} is not a duration"),
            );
            cfg.linger
        }),
    };
    if let Some(b) = raw.batch_bytes {
        cfg.batch_bytes =
            size("sink.kafka.batch_bytes", Some(b), 1, problems).min(u64::from(u32::MAX)) as u32;
    }
    cfg.message_timeout = opt_duration(
        "sink.kafka.message_timeout",
        raw.message_timeout,
        cfg.message_timeout,
        problems,
    );
    if let Some(t) = raw.create_topics {
        let mut topics = NewTopics::default();
        if let Some(p) = t.partitions {
            topics.partitions = p;
        }
        if let Some(r) = t.replication {
            topics.replication = r;
        }
        cfg.create_topics = Some(topics);
    }
    if let Some(t) = raw.tls {
        cfg.connection.tls = Some(KafkaTls {
            ca_file: t.ca_file,
            cert_file: t.cert_file,
            key_file: t.key_file,
        });
    }
    if let Some(sasl) = raw.sasl {
        let mechanism = match sasl.mechanism.as_deref().unwrap_or("PLAIN").parse() {
            Ok(m) => m,
            Err(e) => {
                problem(problems, "sink.kafka.sasl.mechanism", e);
                Default::default()
            }
        };
        let username = sasl.username.unwrap_or_else(|| {
            problem(
                problems,
                "sink.kafka.sasl.username",
                "required with [sink.kafka.sasl]",
            );
            String::new()
        });
        let password = match sasl.password_env {
            Some(var) => env_secret("sink.kafka.sasl.password_env", Some(var), env, problems)
                .unwrap_or_default(),
            None => {
                problem(
                    problems,
                    "sink.kafka.sasl.password_env",
                    "required with [sink.kafka.sasl]",
                );
                Secret::default()
            }
        };
        cfg.connection.sasl = Some(KafkaSasl {
            mechanism,
            username,
            password,
        });
    }
    cfg.properties = raw.properties;
    if let Err(e) = cfg.client_config() {
        for p in e.problems {
            problem(problems, "sink.kafka", p);
        }
    }
    cfg
}

pub(super) fn validate_nats(
    raw: RawNatsSink,
    env: &dyn Env,
    problems: &mut Vec<Problem>,
) -> NatsSinkConfig {
    let mut cfg = NatsSinkConfig::default();
    let connection = RawNatsConnection {
        servers: raw.servers,
        name: raw.name,
        token_env: raw.token_env,
        user: raw.user,
        password_env: raw.password_env,
        credentials_file: raw.credentials_file,
        nkey_seed_env: raw.nkey_seed_env,
        tls: raw.tls,
    };
    cfg.connection =
        validate_nats_connection("sink.nats", connection, cfg.connection, env, problems);
    if let Some(subject) = raw.subject {
        cfg.subject = subject;
    }
    cfg.mode = match raw.mode.as_deref() {
        None | Some("jetstream") => NatsMode::JetStream,
        Some("core") => NatsMode::Core,
        Some(other) => {
            problem(
                problems,
                "sink.nats.mode",
                format!(
                    "{other:?}: use \"jetstream\" (PubAck, at-least-once) or \"core\" (at-most-once)"
                ),
            );
            NatsMode::JetStream
        }
    };
    if let Some(st) = raw.stream {
        let mut spec = StreamSpec::new(st.name.unwrap_or_else(|| "AMI".into()));
        spec.subjects = st.subjects.unwrap_or_default();
        spec.storage = match st.storage.as_deref() {
            None | Some("file") => StreamStorage::File,
            Some("memory") => StreamStorage::Memory,
            Some(other) => {
                problem(
                    problems,
                    "sink.nats.stream.storage",
                    format!("{other:?}: use \"file\" or \"memory\""),
                );
                StreamStorage::File
            }
        };
        spec.max_bytes = st
            .max_bytes
            .map(|m| size("sink.nats.stream.max_bytes", Some(m), 0, problems));
        spec.max_age = st.max_age.map(|a| {
            opt_duration(
                "sink.nats.stream.max_age",
                Some(a),
                Duration::ZERO,
                problems,
            )
        });
        spec.duplicate_window = opt_duration(
            "sink.nats.stream.duplicate_window",
            st.duplicate_window,
            spec.duplicate_window,
            problems,
        );
        if cfg.mode == NatsMode::Core {
            problem(
                problems,
                "sink.nats.stream",
                "a stream needs mode = \"jetstream\"",
            );
        }
        cfg.stream = Some(spec);
    }
    cfg.ack_timeout = opt_duration(
        "sink.nats.ack_timeout",
        raw.ack_timeout,
        cfg.ack_timeout,
        problems,
    );
    set_positive(
        "sink.nats.max_in_flight",
        raw.max_in_flight,
        &mut cfg.max_in_flight,
        problems,
    );
    cfg
}

/// The NATS connection that the keys of `raw` (at `path`) describe, on top of `base`: servers,
/// client name, one kind of auth (secrets read from the environment), TLS.
pub(super) fn validate_nats_connection(
    path: &str,
    raw: RawNatsConnection,
    base: NatsConnection,
    env: &dyn Env,
    problems: &mut Vec<Problem>,
) -> NatsConnection {
    let mut conn = base;
    if let Some(servers) = raw.servers {
        if servers.is_empty() {
            problem(
                problems,
                &format!("{path}.servers"),
                "must list at least one server URL",
            );
        } else {
            conn.servers = servers;
        }
    }
    if raw.name.is_some() {
        conn.name = raw.name;
    }
    let token = env_secret(&format!("{path}.token_env"), raw.token_env, env, problems);
    let password = env_secret(
        &format!("{path}.password_env"),
        raw.password_env,
        env,
        problems,
    );
    let seed = env_secret(
        &format!("{path}.nkey_seed_env"),
        raw.nkey_seed_env,
        env,
        problems,
    );
    let chosen = [
        token.is_some(),
        raw.user.is_some(),
        raw.credentials_file.is_some(),
        seed.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if chosen > 1 {
        problem(
            problems,
            path,
            "choose one of token_env, user + password_env, credentials_file, nkey_seed_env",
        );
    }
    conn.auth = match (token, raw.user, password, raw.credentials_file, seed) {
        (Some(t), ..) => NatsAuth::Token(t),
        (_, Some(user), Some(password), ..) => NatsAuth::UserPassword { user, password },
        (_, Some(_), None, ..) => {
            problem(
                problems,
                &format!("{path}.password_env"),
                "required with user",
            );
            NatsAuth::None
        }
        (_, _, _, Some(file), _) => NatsAuth::CredentialsFile(file),
        (_, _, _, _, Some(seed)) => NatsAuth::NkeySeed(seed),
        _ => NatsAuth::None,
    };
    if let Some(tls) = raw.tls {
        if tls.client_cert.is_some() != tls.client_key.is_some() {
            problem(
                problems,
                &format!("{path}.tls"),
                "client_cert and client_key go together",
            );
        }
        conn.tls = NatsTls {
            ca_file: tls.ca_file,
            client_cert: tls.client_cert,
            client_key: tls.client_key,
            require: tls.require,
            handshake_first: tls.handshake_first,
        };
    }
    conn
}
