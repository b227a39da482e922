use super::*;

fn sorted<'a>(paths: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<&str> = paths.into_iter().collect();
    v.sort_unstable();
    v
}

struct FakeEnv;
impl Env for FakeEnv {
    fn var(&self, name: &str) -> Option<String> {
        (name == "PBX_SECRET").then(|| "from-env".to_owned())
    }
}

#[test]
fn full_server_parses() {
    let cfg = Config::parse(
        r#"
            [[server]]
            id = "pbx-1"
            host = "pbx.example"
            username = "amibus"
            secret_env = "PBX_SECRET"
            auth = "plain"
            events = "call,system"
            filters = ["Event: Newchannel", { criteria = "action(exclude),name(RTCPSent)" },
                       { criteria = "name(Hangup),header(Cause),method(exact)", pattern = "16" }]
            keepalive_interval = "5s"
            keepalive_timeout = "2500ms"
            backoff_min = "1s"
            backoff_max = "1m"
            auth_failure_backoff = "1h"
            [server.tls]
            enabled = true
            insecure_skip_verify = true
            "#,
        &FakeEnv,
    )
    .unwrap();
    let s = &cfg.servers[0];
    assert_eq!(s.secret.expose(), "from-env");
    assert_eq!(s.port, 5039);
    assert_eq!(s.auth, Auth::Plain);
    assert_eq!(s.filters.len(), 3);
    assert_eq!(
        s.filters[2],
        Filter::Advanced {
            criteria: "name(Hangup),header(Cause),method(exact)".into(),
            pattern: Some("16".into())
        }
    );
    assert_eq!(s.keepalive_timeout, Duration::from_millis(2500));
    assert_eq!(s.backoff_max, Duration::from_secs(60));
    assert_eq!(s.tls.as_ref().unwrap().server_name, "pbx.example");
    assert!(!format!("{s:?}").contains("from-env"));
}

#[test]
fn the_file_sink_frames_as_the_pipeline_formats() {
    for (format, framing) in [
        ("", Framing::LengthDelimited),
        ("format = \"proto\"", Framing::LengthDelimited),
        ("format = \"json\"", Framing::Lines),
    ] {
        let cfg = Config::parse(
            &format!(
                "[sim]\nservers = 1\n[pipeline]\n{format}\n[sink]\nkind = \"file\"\n\
                     [sink.file]\npath = \"out\"\n"
            ),
            &FakeEnv,
        )
        .expect("valid");
        let SinkConfig::File(f) = &cfg.sink else {
            panic!("a file sink")
        };
        assert_eq!(f.framing, framing, "{format:?}");
    }
}

#[test]
fn control_section_and_allow_lists() {
    let cfg = Config::parse(
        r#"
            [[server]]
            id = "pbx1"
            host = "h"
            username = "u"
            secret = "s"
            allow_actions = ["read-only", "Originate", "Hangup"]
            [[server]]
            id = "pbx2"
            host = "h"
            username = "u"
            secret = "s"
            [control]
            nats_servers = ["nats://10.0.0.1:4222"]
            max_timeout = "30s"
            rate = 0
            dedupe_max_bytes = "1MiB"
            "#,
        &FakeEnv,
    )
    .unwrap();
    assert_eq!(
        cfg.servers[0].allow_actions,
        ["read-only", "Originate", "Hangup"]
    );
    assert_eq!(cfg.servers[1].allow_actions, ["read-only"]);
    let c = cfg.control.unwrap();
    let ControlTransport::Nats(n) = &c.transport else {
        panic!("nats is the default transport")
    };
    assert_eq!(n.nats.servers, ["nats://10.0.0.1:4222"]);
    assert_eq!(n.subject, "amibus.action.{server}");
    assert_eq!(n.result_subject, "amibus.result.{server}");
    assert_eq!(n.queue_group.as_deref(), Some("amibus-control"));
    assert!(c.consumer.answer_not_owned);
    assert_eq!(c.consumer.max_timeout, Duration::from_secs(30));
    assert_eq!(c.consumer.rate, 0.0);
    assert_eq!(c.consumer.dedupe_max_bytes, 1 << 20);
    assert_eq!(
        c.journal,
        JournalConfig {
            path: PathBuf::from("amibus-spool/control-journal"),
            fsync: JournalFsync::Never,
            max_bytes: 2 << 20,
        },
        "in the spool directory by default, compacted past twice the memory"
    );

    let err = Config::parse(
        r#"
            [[server]]
            id = "pbx1"
            host = "h"
            username = "u"
            secret = "s"
            allow_actions = ["Ping", "Logoff", "Bad Name"]
            [control]
            subject = "amibus.action"
            rate = -1
            default_timeout = "2m"
            journal = ""
            journal_fsync = "sometimes"
            "#,
        &FakeEnv,
    )
    .unwrap_err();
    // Problems come in file order; which order is not what these check.
    let paths = sorted(err.problems().iter().map(|p| p.path.as_str()));
    assert_eq!(
        paths,
        sorted([
            "server[0].allow_actions[1]",
            "server[0].allow_actions[2]",
            "control.nats_servers",
            "control.subject",
            "control.default_timeout",
            "control.rate",
            "control.journal_fsync",
            "control.journal",
        ])
    );
}

#[test]
fn snapshot_lists_are_list_actions_each_once() {
    let server = |extra: &str| {
        format!(
            "[[server]]\nid = \"pbx1\"\nhost = \"h\"\nusername = \"u\"\nsecret = \"s\"\n{extra}\n"
        )
    };
    let cfg = Config::parse(&server(""), &FakeEnv).unwrap();
    assert_eq!(
        cfg.servers[0].snapshot,
        crate::ami::snapshot::Settings::default()
    );
    assert_eq!(
        cfg.servers[0].snapshot.lists,
        [
            "CoreShowChannels",
            "QueueStatus",
            "DeviceStateList",
            "BridgeList"
        ]
    );
    let cfg = Config::parse(&server("snapshot = []"), &FakeEnv).unwrap();
    assert!(cfg.servers[0].snapshot.lists.is_empty(), "[] turns it off");
    let cfg = Config::parse(
            &server("snapshot = [\"coreshowchannels\"]\nsnapshot_timeout = \"5s\"\nsnapshot_gap_interval = \"2m\""),
            &FakeEnv,
        )
        .unwrap();
    let s = &cfg.servers[0].snapshot;
    assert_eq!(s.lists, ["CoreShowChannels"], "the canonical name");
    assert_eq!(
        (s.timeout, s.gap_interval),
        (Duration::from_secs(5), Duration::from_secs(120))
    );
    let err = Config::parse(
        &server(
            "snapshot = [\"Originate\", \"BridgeList\", \"bridgelist\"]\nsnapshot_timeout = \"0s\"",
        ),
        &FakeEnv,
    )
    .unwrap_err();
    let paths: Vec<&str> = err.problems().iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "server[0].snapshot[0]",
            "server[0].snapshot[2]",
            "server[0].snapshot_timeout"
        ]
    );
}

#[test]
fn control_over_kafka() {
    let base = r#"
            [[server]]
            id = "pbx1"
            host = "h"
            username = "u"
            secret = "s"
            [sink]
            kind = "kafka"
            [sink.kafka]
            brokers = "k1:9092"
            [shard]
            index = 2
            count = 3
        "#;
    let cfg = Config::parse(
        &format!("{base}[control]\ntransport = \"kafka\"\nrate = 5\n"),
        &FakeEnv,
    )
    .unwrap();
    let c = cfg.control.unwrap();
    let ControlTransport::Kafka(k) = &c.transport else {
        panic!("kafka transport")
    };
    assert_eq!(k.connection.brokers, "k1:9092", "from [sink.kafka]");
    assert_eq!(k.request_topic, "amibus.actions");
    assert_eq!(k.result_topic, "amibus.results");
    assert_eq!(k.group_id, "amibus-control-2", "one group per shard");
    assert_eq!(k.session_timeout, Duration::from_secs(45));
    assert!(!c.consumer.answer_not_owned, "skip what another shard owns");
    assert_eq!(c.consumer.rate, 5.0);

    let err = Config::parse(
        &format!(
            "{base}[control]\ntransport = \"kafka\"\nsubject = \"a.{{server}}\"\n\
                 [control.kafka]\nbrokers = \" \"\nrequest_topic = \"a b\"\n\
                 result_topic = \"\"\ngroup = \"fixed\"\nmessage_timeout = \"soon\"\n\
                 session_timeout = \"0s\"\n"
        ),
        &FakeEnv,
    )
    .unwrap_err();
    // Problems come in file order; which order is not what these check.
    let paths = sorted(err.problems().iter().map(|p| p.path.as_str()));
    assert_eq!(
        paths,
        sorted([
            "control.subject",
            "control.kafka.brokers",
            "control.kafka.request_topic",
            "control.kafka.result_topic",
            "control.kafka.group",
            "control.kafka.message_timeout",
            "control.kafka.session_timeout",
        ])
    );
    let err = Config::parse(
        &format!("{base}[control]\ntransport = \"mqtt\"\n[control.kafka]\n"),
        &FakeEnv,
    )
    .unwrap_err();
    // Problems come in file order; which order is not what these check.
    let paths = sorted(err.problems().iter().map(|p| p.path.as_str()));
    assert_eq!(
        paths,
        sorted(["control.transport", "control.nats_servers"]),
        "{err}"
    );
}

#[test]
fn control_over_jetstream() {
    let base = r#"
            [[server]]
            id = "pbx1"
            host = "h"
            username = "u"
            secret = "s"
            [shard]
            index = 1
            count = 2
            [control]
            nats_servers = ["nats://n:4222"]
            max_timeout = "20s"
        "#;
    let cfg = Config::parse(&format!("{base}[control.jetstream]\n"), &FakeEnv).unwrap();
    let c = cfg.control.unwrap();
    let ControlTransport::Nats(n) = &c.transport else {
        panic!("nats transport")
    };
    let js = n.jetstream.as_ref().expect("jetstream");
    assert_eq!(js.stream, "AMIBUS_ACTIONS");
    assert_eq!(js.durable, "amibus-control-1", "one durable per shard");
    assert!(js.create_stream);
    assert_eq!(js.max_age, Duration::from_secs(24 * 3600));
    assert_eq!(js.ack_wait, Duration::from_secs(50), "max_timeout + 30s");
    assert_eq!(js.max_ack_pending, 1024, "max_in_flight");
    assert!(
        !c.consumer.answer_not_owned,
        "every shard sees every request"
    );

    let err = Config::parse(
        &format!(
            "{base}queue_group = \"q\"\n[control.jetstream]\nstream = \"a.b\"\n\
                 durable = \"fixed\"\nack_wait = \"10s\"\nmax_ack_pending = 0\n"
        ),
        &FakeEnv,
    )
    .unwrap_err();
    // Problems come in file order; which order is not what these check.
    let paths = sorted(err.problems().iter().map(|p| p.path.as_str()));
    assert_eq!(
        paths,
        sorted([
            "control.queue_group",
            "control.jetstream.stream",
            "control.jetstream.durable",
            "control.jetstream.max_ack_pending",
            "control.jetstream.ack_wait",
        ]),
        "{err}"
    );
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let err = Config::parse(
        r#"
            [[server]]
            id = "a.b"
            host = "h"
            username = "u"
            secret = "x"
            secret_env = "Y"
            auth = "sha1"
            keepalive_interval = "soon"
            backoff_min = "2m"
            backoff_max = "1m"
            filters = [{ criteria = "name(Hangup),header(Cause)", pattern = "16" }]
            [server.tls]
            enabled = true
            [[server]]
            id = "b"
            host = "h"
            username = "u"
            secret_env = "MISSING"
            "#,
        &FakeEnv,
    )
    .unwrap_err();
    // Problems come in file order; which order is not what these check.
    let paths = sorted(err.problems().iter().map(|p| p.path.as_str()));
    assert_eq!(
        paths,
        sorted([
            "server[0].id",
            "server[0].secret",
            "server[0].auth",
            "server[0].tls.ca_file",
            "server[0].filters[0].criteria",
            "server[0].keepalive_interval",
            "server[0].backoff_min",
            "server[1].secret_env",
        ])
    );
    assert!(!err.is_retriable());
}

#[test]
fn handoff_wait_stays_under_asterisks_writetimeout() {
    let server = "[[server]]\nid = \"a\"\nhost = \"h\"\nusername = \"u\"\nsecret = \"x\"\n";
    let parse = |wait: &str| {
        Config::parse(
            &format!("{server}[pipeline]\nhandoff_wait = \"{wait}\"\n"),
            &FakeEnv,
        )
    };
    assert_eq!(
        Config::parse(server, &FakeEnv)
            .expect("valid")
            .pipeline
            .handoff_wait,
        DEFAULT_HANDOFF_WAIT
    );
    for (wait, want) in [("0s", 0), ("50ms", 50), ("99ms", 99)] {
        let cfg = parse(wait).expect("valid");
        assert_eq!(cfg.pipeline.handoff_wait, Duration::from_millis(want));
    }
    for wait in ["100ms", "1s", "soon"] {
        let err = parse(wait).unwrap_err();
        assert_eq!(err.problems()[0].path, "pipeline.handoff_wait", "{wait}");
    }
}

#[test]
fn runtime_threads_are_tokios_default_unless_set() {
    let server = "[[server]]\nid = \"a\"\nhost = \"h\"\nusername = \"u\"\nsecret = \"x\"\n";
    let parse = |threads: &str| {
        Config::parse(
            &format!("{server}[pipeline]\nthreads = {threads}\n"),
            &FakeEnv,
        )
    };
    let defaults = Config::parse(server, &FakeEnv).expect("valid");
    assert_eq!(defaults.pipeline.threads, None);
    assert_eq!(parse("1").expect("valid").pipeline.threads, Some(1));
    assert_eq!(parse("256").expect("valid").pipeline.threads, Some(256));
    for bad in ["0", "257"] {
        let err = parse(bad).unwrap_err();
        assert_eq!(err.problems()[0].path, "pipeline.threads", "{bad}");
    }
    let err = parse("\"two\"").unwrap_err();
    assert_eq!(err.problems()[0].path, "pipeline.threads");
}

#[test]
fn the_spool_cap_holds_two_of_the_largest_frames() {
    let server = "[[server]]\nid = \"a\"\nhost = \"h\"\nusername = \"u\"\nsecret = \"x\"\n";
    let parse = |spool: &str, pipeline: &str| {
        Config::parse(
            &format!("{server}[spool]\n{spool}\n[pipeline]\n{pipeline}\n"),
            &FakeEnv,
        )
    };
    let cfg = parse("", "").expect("the defaults fit");
    assert_eq!(cfg.pipeline.max_frame_bytes, 8 << 20);
    assert_eq!(cfg.metrics.stall_timeout, DEFAULT_STALL_TIMEOUT);
    let err = parse("max_bytes = \"8MiB\"\nsegment_bytes = \"1MiB\"", "").unwrap_err();
    assert_eq!(err.problems().len(), 1, "{err}");
    assert_eq!(err.problems()[0].path, "spool.max_bytes");
    assert!(
        err.problems()[0].message.contains("max_frame_bytes"),
        "{err}"
    );
    let cfg = parse(
        "max_bytes = \"64KiB\"\nsegment_bytes = \"8KiB\"",
        "max_frame_bytes = \"32KiB\"",
    )
    .expect("a small spool with small frames");
    assert_eq!(cfg.pipeline.max_frame_bytes, 32 << 10);
    assert!(parse("", "max_frame_bytes = 0").is_err());
}

#[test]
fn unknown_keys_are_refused() {
    let err = Config::parse(
        "[[server]]\nid = \"a\"\nhost = \"h\"\nusername = \"u\"\nsecret = \"x\"\nsecert = \"y\"\n",
        &FakeEnv,
    )
    .unwrap_err();
    let p = err.problems();
    assert_eq!(p.len(), 1, "{err}");
    assert_eq!(
        (p[0].path.as_str(), p[0].line),
        ("server[0].secert", Some(6))
    );
}

#[test]
fn every_unknown_key_and_wrong_type_is_reported_once_with_its_path_and_line() {
    let text = "\
[[server]]
id = \"a\"
host = \"h\"
usernme = \"u\"
secret = \"x\"
port = \"5038\"

[[server]]
id = \"b\"
host = \"h\"
username = \"u\"
secret = \"x\"
tls = { enabled = true, ca_fil = \"/ca.pem\" }

[spool]
max_bytes = \"1GiB\"
fsync = 7

[sink]
kind = \"file\"
[sink.fiel]
path = \"x\"
";
    let err = Config::parse(text, &FakeEnv).unwrap_err();
    let got: Vec<(String, Option<usize>)> = err
        .problems()
        .iter()
        .map(|p| (p.path.clone(), p.line))
        .collect();
    for (path, line) in [
        ("server[0].usernme", 4),
        ("server[0].port", 6),
        ("server[1].tls.ca_fil", 13),
        ("spool.fsync", 17),
        ("sink.fiel", 21),
    ] {
        let n = got.iter().filter(|(p, _)| p == path).count();
        assert_eq!(n, 1, "{path} reported {n} times in:\n{err}");
        assert!(
            got.contains(&(path.to_owned(), Some(line))),
            "{path} line {line}:\n{err}"
        );
    }
    // The missing username of server[0] is reported too, at its table.
    assert!(
        got.contains(&("server[0].username".to_owned(), Some(1))),
        "{err}"
    );
    // Printed once each.
    let shown = err.to_string();
    assert_eq!(shown.matches("usernme").count(), 1, "{shown}");
    assert!(
        shown.contains("server[0].port (line 6): invalid type"),
        "{shown}"
    );
}

#[test]
fn a_value_set_by_an_override_has_no_line() {
    let err = Config::parse(
        ONE_SERVER,
        &OverrideEnv(vec![("AMIBUS__SERVER__0__PORT".into(), "\"x\"".into())]),
    )
    .unwrap_err();
    let p = &err.problems()[0];
    assert_eq!((p.path.as_str(), p.line), ("server[0].port", None), "{err}");
}

#[test]
fn duplicate_ids_are_refused() {
    let one = "[[server]]\nid = \"a\"\nhost = \"h\"\nusername = \"u\"\nsecret = \"x\"\n";
    let err = Config::parse(&format!("{one}{one}"), &FakeEnv).unwrap_err();
    assert_eq!(err.problems()[0].path, "server[1].id");
}

#[test]
fn criteria_rules() {
    assert!(check_criteria("action(include),name(Newchannel)", None).is_ok());
    assert!(check_criteria("name(Hangup),method(regex)", Some("x")).is_ok());
    assert!(check_criteria("name(Hangup)", Some("x")).is_err());
    assert!(check_criteria("name(Hangup),method(exact)", None).is_err());
    assert!(check_criteria("name(A),name(B)", None).is_err());
    assert!(check_criteria("colour(red)", None).is_err());
    assert!(check_criteria("", None).is_err());
}

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(parse_duration("3m"), Some(Duration::from_secs(180)));
    assert_eq!(parse_duration("3"), None);
    assert_eq!(parse_duration("s"), None);
    assert_eq!(parse_duration("3 days"), None);
}

#[test]
fn secret_is_redacted() {
    let s = Secret::new("hunter2");
    assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
}

struct MapEnv(&'static [(&'static str, &'static str)]);
impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    }
}

const ONE_SERVER: &str = "[[server]]\nid = \"a\"\nhost = \"h\"\nusername = \"u\"\nsecret = \"s\"\n";

#[test]
fn shard_comes_from_the_environment_or_the_host_name() {
    let cfg = Config::parse(
        &format!("{ONE_SERVER}[shard]\nindex = 0\ncount = 2\n"),
        &MapEnv(&[("AMIBUS_SHARD_INDEX", "2"), ("AMIBUS_SHARD_COUNT", "3")]),
    )
    .unwrap();
    assert_eq!(cfg.shard, crate::shard::Shard { index: 2, count: 3 });
    let cfg = Config::parse(
        &format!("{ONE_SERVER}[shard]\ncount = 4\nindex_from_hostname = true\n"),
        &MapEnv(&[("HOSTNAME", "amibus-3")]),
    )
    .unwrap();
    assert_eq!(cfg.shard, crate::shard::Shard { index: 3, count: 4 });
    let err = Config::parse(
        &format!("{ONE_SERVER}[shard]\nindex = 3\ncount = 3\n"),
        &MapEnv(&[]),
    )
    .unwrap_err();
    assert_eq!(err.problems()[0].path, "shard.index");
    // An empty index (an old cluster without the pod-index label) is refused, not guessed.
    let err = Config::parse(ONE_SERVER, &MapEnv(&[("AMIBUS_SHARD_INDEX", "")])).unwrap_err();
    assert!(err.to_string().contains("AMIBUS_SHARD_INDEX"), "{err}");
}

struct OverrideEnv(Vec<(String, String)>);
impl Env for OverrideEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
    fn overrides(&self) -> Vec<(String, String)> {
        self.0.clone()
    }
}

#[test]
fn environment_overrides_set_any_key() {
    let env = OverrideEnv(vec![
        ("AMIBUS__SPOOL__DIR".into(), "/data/spool".into()),
        ("AMIBUS__SPOOL__MAX_BYTES".into(), "2GiB".into()),
        ("AMIBUS__SERVER__0__PORT".into(), "5039".into()),
        ("AMIBUS__SINK__KIND".into(), "kafka".into()),
        (
            "AMIBUS__SINK__KAFKA__BROKERS".into(),
            "k1:9092,k2:9092".into(),
        ),
        ("AMIBUS__METRICS__LISTEN".into(), "0.0.0.0:9898".into()),
    ]);
    let cfg = Config::parse(ONE_SERVER, &env).unwrap();
    assert_eq!(cfg.spool.dir, std::path::PathBuf::from("/data/spool"));
    assert_eq!(cfg.spool.max_bytes, 2 << 30);
    assert_eq!(cfg.servers[0].port, 5039);
    assert!(matches!(&cfg.sink, SinkConfig::Kafka(k) if k.connection.brokers == "k1:9092,k2:9092"));
    assert!(cfg.metrics.listen.is_some());
    // A typo in an override is an error naming the key, like one in the file.
    let err = Config::parse(
        ONE_SERVER,
        &OverrideEnv(vec![("AMIBUS__SPOOL__DIRR".into(), "/x".into())]),
    )
    .unwrap_err();
    assert!(err.to_string().contains("dirr"), "{err}");
    let err = Config::parse(
        ONE_SERVER,
        &OverrideEnv(vec![("AMIBUS__SERVER__7__HOST".into(), "h".into())]),
    )
    .unwrap_err();
    assert_eq!(err.problems()[0].path, "AMIBUS__SERVER__7__HOST");
}

#[test]
fn control_nats_has_its_own_connection_with_auth_and_tls() {
    struct TokenEnv;
    impl Env for TokenEnv {
        fn var(&self, name: &str) -> Option<String> {
            match name {
                "PBX_SECRET" => Some("from-env".to_owned()),
                "ACTIONS_TOKEN" => Some("t0ken".to_owned()),
                _ => None,
            }
        }
    }
    let base = r#"
        [[server]]
        id = "pbx-1"
        host = "pbx.example"
        username = "amibus"
        secret_env = "PBX_SECRET"
        [sink]
        kind = "file"
        [sink.file]
        path = "out.jsonl"
    "#;
    let cfg = Config::parse(
        &format!(
            "{base}\n[control]\n[control.nats]\nservers = [\"tls://actions:4222\"]\n\
             name = \"amibus-actions\"\ntoken_env = \"ACTIONS_TOKEN\"\n\
             [control.nats.tls]\nca_file = \"/etc/ca.pem\"\n"
        ),
        &TokenEnv,
    )
    .unwrap();
    let Some(ControlSection {
        transport: ControlTransport::Nats(n),
        ..
    }) = &cfg.control
    else {
        panic!("a NATS control section: {:?}", cfg.control);
    };
    assert_eq!(n.nats.servers, ["tls://actions:4222"]);
    assert_eq!(n.nats.name.as_deref(), Some("amibus-actions"));
    assert_eq!(n.nats.auth, NatsAuth::Token(Secret::new("t0ken")));
    assert_eq!(
        n.nats.tls.ca_file.as_deref(),
        Some(std::path::Path::new("/etc/ca.pem"))
    );
    assert!(
        !format!("{cfg:?}").contains("t0ken"),
        "the token is not printed"
    );

    // Both ways at once, an unset variable, two kinds of auth, an empty server list: each
    // named.
    let err = Config::parse(
        &format!(
            "{base}\n[control]\nnats_servers = [\"nats://a:4222\"]\n[control.nats]\n\
             servers = []\nnkey_seed_env = \"MISSING\"\ntoken_env = \"ACTIONS_TOKEN\"\n\
             credentials_file = \"x.creds\"\n"
        ),
        &TokenEnv,
    )
    .unwrap_err();
    let paths = sorted(err.problems().iter().map(|p| p.path.as_str()));
    assert_eq!(
        paths,
        sorted([
            "control.nats_servers",
            "control.nats.servers",
            "control.nats.nkey_seed_env",
            "control.nats",
        ]),
        "{err}"
    );
    // Over Kafka the NATS keys are refused.
    let err = Config::parse(
        &format!(
            "{base}\n[control]\ntransport = \"kafka\"\n[control.kafka]\nbrokers = \"k:9092\"\n\
             [control.nats]\nservers = [\"nats://a:4222\"]\n"
        ),
        &TokenEnv,
    )
    .unwrap_err();
    assert!(
        err.problems().iter().any(|p| p.path == "control.nats"),
        "{err}"
    );
}
