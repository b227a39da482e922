//! `amibus action` through the real binary, against `amibus run` (in this process) on the
//! simulator and a real nats-server (core and JetStream) or Kafka-protocol broker: the JSON
//! result on stdout and the exit status.
//!
//! No assertion depends on timing: waits only guard against hangs.

#[path = "support/in_process.rs"]
mod in_process;
#[path = "support/kafka.rs"]
mod kafka_support;
#[path = "support/nats.rs"]
mod nats_support;

use in_process::Running;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use amibus::config::{Config, ProcessEnv};
use amibus::sim::{Sim, SimConfig, SimHandle};
use nats_support::{NatsServer, ServerOptions};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn config(dir: &Path, sim: &SimHandle, control: &str) -> Config {
    let text = format!(
        "[[server]]\nid = \"pbx1\"\nhost = \"127.0.0.1\"\nport = {}\nusername = \"admin\"\nsecret = \"amp111\"\nallow_actions = [\"read-only\", \"Originate\"]\n[spool]\ndir = \"{}\"\n[sink]\nkind = \"file\"\n[sink.file]\npath = \"{}\"\n{control}",
        sim.addrs()[0].port(),
        dir.join("spool").display(),
        dir.join("out.jsonl").display()
    );
    Config::parse(&text, &ProcessEnv).expect("config")
}

/// `amibus action ARGS...`: (exit code, the JSON result if one was printed).
async fn action(args: &[&str]) -> (i32, Option<Value>) {
    let (code, json, _) = action_env(args, &[]).await;
    (code, json)
}

/// `amibus action ARGS...` with `env` added to its environment: (exit code, the JSON result
/// if one was printed, standard error).
async fn action_env(args: &[&str], env: &[(&str, &str)]) -> (i32, Option<Value>, String) {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_amibus"))
            .arg("action")
            .args(&args)
            .envs(env)
            .output()
            .expect("amibus runs")
    })
    .await
    .expect("joined");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = stdout
        .lines()
        .next()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}")));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), json, stderr)
}

/// Ask until amibus answers `Ping` successfully (it may still be starting).
async fn until_ready(transport: &[&str]) {
    tokio::time::timeout(T, async {
        loop {
            let mut a = transport.to_vec();
            a.extend(["--server", "pbx1", "--wait", "3s", "Ping"]);
            if action(&a).await.0 == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("amibus answers");
}

fn status(v: &Value) -> &str {
    v["status"].as_str().unwrap_or("")
}

/// Every scenario over one transport.
async fn scenarios(transport: &[&str]) {
    until_ready(transport).await;
    let with = |rest: &[&'static str]| {
        let mut a = transport.to_vec();
        a.extend(["--server", "pbx1"]);
        a.extend(rest);
        a
    };
    // A list action: every item and the completion.
    let (code, r) = action(&with(&["CoreShowChannels"])).await;
    let r = r.expect("a result");
    assert_eq!((code, status(&r)), (0, "success"), "{r}");
    let last = r["events"]
        .as_array()
        .and_then(|e| e.last())
        .expect("events");
    assert!(
        last.to_string().contains("CoreShowChannelsComplete"),
        "{last}"
    );
    // Originate with headers in order, async, with its OriginateResponse.
    let (code, r) = action(&with(&[
        "--request-id",
        "orig-1",
        "Originate",
        "Channel=Local/100@test",
        "Context=test",
        "Exten=100",
        "Priority=1",
        "Async=true",
        "Variable=A=1",
    ]))
    .await;
    let r = r.expect("a result");
    assert_eq!((code, status(&r)), (0, "success"), "{r}");
    assert!(r["originate_response"].is_array(), "{r}");
    assert_eq!(r["replayed"], false);
    // The same request id again: answered from the first run, not run again.
    let (code, again) = action(&with(&["--request-id", "orig-1", "Originate", "Channel=x"])).await;
    let again = again.expect("a result");
    assert_eq!(
        (code, status(&again), &again["replayed"]),
        (0, "success", &Value::Bool(true))
    );
    assert_eq!(again["action_id"], r["action_id"]);
    // Refused: exit 2, the reason in the JSON.
    let (code, r) = action(&with(&["Hangup", "Channel=PJSIP/x"])).await;
    let r = r.expect("a result");
    assert_eq!(
        (code, status(&r), r["reject_code"].as_str()),
        (2, "rejected", Some("not_allowed"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amibus_action_over_core_nats_and_jetstream() {
    let nats = NatsServer::start();
    let sim = Sim::start(SimConfig {
        rate: 100,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let url = nats.url();
    let amibus = Running::start(config(
        dir.path(),
        &sim,
        &format!("[control]\nnats_servers = [\"{url}\"]\nrate = 0\n"),
    ));
    scenarios(&["--nats", &url]).await;
    // Nobody serves this server: exit 1, nothing on stdout.
    let (code, r) = action(&["--nats", &url, "--server", "ghost", "--wait", "2s", "Ping"]).await;
    assert_eq!((code, r), (1, None));
    amibus.stop().await;

    let dir = tempfile::tempdir().expect("tempdir");
    let amibus = Running::start(config(
        dir.path(),
        &sim,
        &format!(
            "[control]\nnats_servers = [\"{url}\"]\nrate = 0\n[control.jetstream]\nstream = \"ACTIONS\"\n"
        ),
    ));
    scenarios(&["--nats", &url, "--jetstream"]).await;
    amibus.stop().await;
    sim.shutdown().await;
}

const TOKEN: &str = "act10n-t0ken";

/// The environment amibus's configuration reads in the token test: one variable.
struct TokenEnv;

impl amibus::config::Env for TokenEnv {
    fn var(&self, name: &str) -> Option<String> {
        (name == "AMIBUS_TEST_NATS_TOKEN").then(|| TOKEN.to_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_cli_and_control_nats_authenticate_with_a_token_from_the_environment() {
    let nats = NatsServer::start_with(ServerOptions {
        token: Some(TOKEN.into()),
        ..ServerOptions::default()
    });
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let url = nats.url();
    // The action consumer has a NATS of its own ([control.nats], token included); the sink
    // is a file.
    let text = format!(
        "[[server]]\nid = \"pbx1\"\nhost = \"127.0.0.1\"\nport = {}\nusername = \"admin\"\nsecret = \"amp111\"\n[spool]\ndir = \"{}\"\n[sink]\nkind = \"file\"\n[sink.file]\npath = \"{}\"\n[control]\nrate = 0\n[control.nats]\nservers = [\"{url}\"]\ntoken_env = \"AMIBUS_TEST_NATS_TOKEN\"\n",
        sim.addrs()[0].port(),
        dir.path().join("spool").display(),
        dir.path().join("out.jsonl").display(),
    );
    let amibus = Running::start(Config::parse(&text, &TokenEnv).expect("config"));
    let ping = [
        "--nats",
        &url,
        "--token-env",
        "ACTION_TOKEN",
        "--server",
        "pbx1",
        "--wait",
        "3s",
        "Ping",
    ];
    let answered = tokio::time::timeout(T, async {
        loop {
            let (code, r, _) = action_env(&ping, &[("ACTION_TOKEN", TOKEN)]).await;
            if code == 0 {
                return r.expect("a result");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("amibus answers a client with the token");
    assert_eq!(status(&answered), "success", "{answered}");

    // A wrong token: the server refuses the connection; exit 1, nothing on stdout, and the
    // token is not printed.
    let (code, r, stderr) = action_env(&ping, &[("ACTION_TOKEN", "wrong-token")]).await;
    assert_eq!((code, r), (1, None), "{stderr}");
    assert!(stderr.contains("cannot connect to NATS"), "{stderr}");
    assert!(!stderr.contains("wrong-token"), "{stderr}");
    // The variable is not set: said so by name.
    let (code, r, stderr) = action_env(&ping, &[]).await;
    assert_eq!((code, r), (1, None), "{stderr}");
    assert!(stderr.contains("ACTION_TOKEN is not set"), "{stderr}");
    amibus.stop().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amibus_action_over_kafka() {
    let broker = kafka_support::Broker::start().await;
    broker.create_topic("amibus.actions", 2).await;
    broker.create_topic("amibus.results", 2).await;
    let sim = Sim::start(SimConfig {
        rate: 100,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let amibus = Running::start(config(
        dir.path(),
        &sim,
        &format!(
            "[control]\ntransport = \"kafka\"\nrate = 0\n[control.kafka]\nbrokers = \"{}\"\n",
            broker.bootstrap()
        ),
    ));
    let bootstrap = broker.bootstrap();
    scenarios(&["--kafka", &bootstrap]).await;
    amibus.stop().await;
    sim.shutdown().await;
}
