//! Component tests of the AMI connection task against small scripted servers on 127.0.0.1:0
//! and replays of real Asterisk 22 login exchanges (`tests/fixtures`, copies of `shared/fixtures`).
//!
//! No assertion depends on timing: waits only guard against hangs.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use amibus::ami::login::md5_key;
use amibus::ami::server::{Auth, Filter, ServerConfig, TlsConfig};
use amibus::ami::{Action, ActionError, Connection, Options, Record, Request, Stamped, handoff};
use amibus::secret::Secret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use support::*;

const T: Duration = Duration::from_secs(10);

fn cfg(addr: SocketAddr) -> ServerConfig {
    let mut c = ServerConfig::new(
        "pbx-1",
        "127.0.0.1",
        addr.port(),
        "amibus",
        Secret::new("s3cret"),
    );
    c.backoff_min = Duration::from_millis(10);
    c.backoff_max = Duration::from_millis(50);
    c.auth_failure_backoff = Duration::from_secs(3600);
    c.keepalive_interval = Duration::from_secs(60);
    // These tests script every action the fake answers; snapshots have their own tests
    // (tests/snapshot.rs).
    c.snapshot.lists.clear();
    c
}

/// Every record of one epoch has the next seq: no hole when the consumer keeps up.
fn assert_contiguous(records: &[Stamped]) {
    let mut last: HashMap<u64, u64> = HashMap::new();
    for r in records {
        let prev = last.insert(r.stamp.epoch, r.stamp.seq).unwrap_or(0);
        assert_eq!(r.stamp.seq, prev + 1, "hole before {:?}", r);
        assert_eq!(&*r.stamp.server, "pbx-1");
    }
}

#[tokio::test]
async fn md5_login_then_events_flow_in_order() {
    let mut fake = Fake::start(Behaviour::default()).await;
    let (conn, mut rx, shutdown) = start(cfg(fake.addr), 64);
    let mut fc = fake.next_conn().await;

    let up = next(&mut rx).await;
    match &up.record {
        Record::ConnectionUp {
            ami_version,
            address,
        } => {
            assert_eq!(ami_version, "11.0.0");
            assert_eq!(address, &fake.addr.to_string());
        }
        other => panic!("expected ConnectionUp, got {other:?}"),
    }
    assert_eq!(up.stamp.seq, 1);
    assert!(up.stamp.epoch > 1_600_000_000_000, "epoch is unix ms");

    let sent = fc.until_action("Login").await;
    assert_eq!(sent[0].action(), "Challenge");
    assert_eq!(sent[0].get("AuthType"), Some("MD5"));
    let login = &sent[1];
    assert_eq!(login.get("Username"), Some("amibus"));
    assert_eq!(
        login.get("Key"),
        Some(md5_key(CHALLENGE, &Secret::new("s3cret")).as_str())
    );
    assert_eq!(
        login.get("Secret"),
        None,
        "md5 login never sends the secret"
    );
    assert_eq!(login.get("Events"), Some("on"));
    assert!(login.id().contains("-pbx-1-"));

    for i in 0..5 {
        fc.send(event("Newchannel", i));
    }
    let mut got = vec![up];
    for i in 0..5 {
        let r = next(&mut rx).await;
        assert_eq!(event_name(&r).as_deref(), Some("Newchannel"));
        let Record::Frame(f) = &r.record else {
            unreachable!()
        };
        assert_eq!(
            f.frame().get("Uniqueid"),
            Some(format!("1700000000.{i}").as_bytes())
        );
        got.push(r);
    }
    assert_contiguous(&got);
    let st = conn.stats.snapshot();
    assert!(st.connected);
    assert!(st.bytes > 0 && st.last_byte_ns > 0);
    stop(conn, shutdown).await;
    let rest = until(&mut rx, is_down).await;
    assert_eq!(down_reason(rest.last().unwrap()), Some("shutdown"));
}

#[tokio::test]
async fn plain_login_sends_the_secret_once() {
    let mut fake = Fake::start(Behaviour::default()).await;
    let mut c = cfg(fake.addr);
    c.auth = Auth::Plain;
    c.events = "call,system".into();
    let (conn, mut rx, shutdown) = start(c, 64);
    let mut fc = fake.next_conn().await;
    let login = fc.next_action().await;
    assert_eq!(login.action(), "Login");
    assert_eq!(login.get("Secret"), Some("s3cret"));
    assert_eq!(login.get("Events"), Some("call,system"));
    assert!(is_up(&next(&mut rx).await));
    stop(conn, shutdown).await;
}

// ---- byte-exact replays of real Asterisk 22 login exchanges ----

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("fixture {}: {e}", p.display()))
}

/// Replace the values that differ per run (ActionID, Key) so two exchanges can be compared.
fn normalize(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .split_inclusive("\r\n")
        .map(|l| {
            if l.starts_with("ActionID: ") {
                "ActionID: *\r\n".to_owned()
            } else if l.starts_with("Key: ") {
                "Key: *\r\n".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect()
}

/// A server that answers like the recorded Asterisk: for each action the client sends, the
/// next recorded action of the same name is looked up (recorded actions the client does not
/// make, such as the pre-login Ping, are skipped), the client's lines must equal the recorded
/// ones (ActionID, Key and `ignore` keys aside), and every recorded frame carrying that
/// ActionID is sent back with the client's ActionID. After `Authentication failed` or
/// `Goodbye` the socket is closed, as Asterisk does. Returns what the client sent.
async fn replay(
    name: &str,
    ignore: &'static [&'static str],
) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
    let sent = fixture(&format!("{name}.sent"));
    let mut ami = fixture(&format!("{name}.ami"));
    let banner_end = ami.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    let mut frames = ami.split_off(banner_end);
    let banner = ami;
    let mut by_id: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    while let Some(f) = take_frame(&mut frames) {
        let id = Received {
            headers: parse_lines(&f),
            raw: f.clone(),
        }
        .id()
        .to_owned();
        by_id.entry(id).or_default().push(f);
    }
    let mut recorded = Vec::new();
    let mut s = sent;
    while let Some(f) = take_frame(&mut s) {
        recorded.push(Received {
            headers: parse_lines(&f),
            raw: f,
        });
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        sock.write_all(&banner).await.unwrap();
        let mut log = Vec::new();
        let mut buf = Vec::new();
        let mut cursor = 0;
        let mut chunk = [0u8; 4096];
        loop {
            let n = match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return log,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            while let Some(raw) = take_frame(&mut buf) {
                log.extend_from_slice(&raw);
                let got = Received {
                    headers: parse_lines(&raw),
                    raw,
                };
                let Some(pos) = recorded[cursor..]
                    .iter()
                    .position(|r| r.action().eq_ignore_ascii_case(got.action()))
                else {
                    panic!("the recording has no further {:?} action", got.action());
                };
                let want = &recorded[cursor + pos];
                cursor += pos + 1;
                let strip = |r: &Received| {
                    r.headers
                        .iter()
                        .filter(|(k, _)| {
                            k != "ActionID" && k != "Key" && !ignore.contains(&k.as_str())
                        })
                        .cloned()
                        .collect::<Vec<_>>()
                };
                assert_eq!(
                    strip(&got),
                    strip(want),
                    "client action differs from the recording"
                );
                let mut close = false;
                for f in by_id.get(want.id()).into_iter().flatten() {
                    let text = String::from_utf8_lossy(f).replace(
                        &format!("ActionID: {}\r\n", want.id()),
                        &format!("ActionID: {}\r\n", got.id()),
                    );
                    close |= text.contains("Authentication failed")
                        || text.contains("Response: Goodbye");
                    sock.write_all(text.as_bytes()).await.unwrap();
                }
                if close {
                    let _ = sock.shutdown().await;
                    // Keep reading so a client that loops would show up in the log.
                    while let Ok(n) = sock.read(&mut chunk).await {
                        if n == 0 {
                            break;
                        }
                        log.extend_from_slice(&chunk[..n]);
                    }
                    return log;
                }
            }
        }
    });
    (addr, task)
}

#[tokio::test]
async fn md5_login_is_byte_exact_with_the_asterisk_recording() {
    // The recording's secret is not published; the exchange is compared with ActionIDs and
    // the Key blanked, and the Key is checked against md5(recorded challenge + our secret)
    // (md5_key itself is checked against RFC 1321 vectors in ami::login).
    let (addr, server) = replay("asterisk22-md5login", &[]).await;
    let mut c = cfg(addr);
    c.username = "md5user".into();
    c.secret = Secret::new("fixture-secret");
    c.events = "off".into();
    let (conn, mut rx, shutdown) = start(c, 64);
    assert!(is_up(&next(&mut rx).await));
    let reply = conn
        .handle
        .send(Action::new("Ping"), T)
        .await
        .expect("ping");
    assert!(reply.is_success());
    assert_eq!(reply.response.frame().get("Ping"), Some(&b"Pong"[..]));
    stop(conn, shutdown).await;
    let down = until(&mut rx, is_down).await;
    assert_eq!(down_reason(down.last().unwrap()), Some("shutdown"));

    let sent = tokio::time::timeout(T, server).await.unwrap().unwrap();
    assert_eq!(
        normalize(&sent),
        normalize(&fixture("asterisk22-md5login.sent"))
    );
    let text = String::from_utf8_lossy(&sent);
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("Key: "))
        .expect("a Key line");
    assert_eq!(key, md5_key("149028585", &Secret::new("fixture-secret")));
    // Our ActionIDs: <instance>-<server>-<epoch>-<counter>, unique per action.
    let ids: Vec<_> = text
        .lines()
        .filter_map(|l| l.strip_prefix("ActionID: "))
        .collect();
    assert_eq!(ids.len(), 4);
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 4);
    for id in &ids {
        let parts: Vec<_> = id.rsplitn(3, '-').collect();
        assert!(parts[2].ends_with("-pbx-1"), "{id}");
        assert!(
            parts[1].parse::<u64>().is_ok() && parts[0].parse::<u64>().is_ok(),
            "{id}"
        );
    }
}

async fn assert_auth_failure(
    name: &str,
    ignore: &'static [&'static str],
    c: impl FnOnce(&mut ServerConfig),
) {
    let (addr, server) = replay(name, ignore).await;
    let mut config = cfg(addr);
    c(&mut config);
    let (conn, mut rx, shutdown) = start(config, 64);
    let r = next(&mut rx).await;
    let reason = down_reason(&r).expect("a ConnectionDown record");
    assert!(reason.starts_with("auth failure: "), "{reason}");
    assert!(reason.contains("Authentication failed"), "{reason}");
    assert!(
        !reason.contains("wrong-secret"),
        "the secret must never appear"
    );
    assert_eq!(r.stamp.seq, 1);
    // The server closed; the client does not loop: its next attempt is an hour away.
    let sent = tokio::time::timeout(T, server).await.unwrap().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&sent)
            .matches("Action: Login")
            .count(),
        1
    );
    let st = conn.stats.snapshot();
    assert_eq!(st.auth_failures, 1);
    assert!(!st.connected);
    // While down, actions are refused without being sent.
    let err = conn.handle.send(Action::new("Ping"), T).await.unwrap_err();
    assert_eq!(err, ActionError::NotConnected);
    assert!(err.is_retriable());
    stop(conn, shutdown).await;
    assert!(
        rx.try_recv().is_err(),
        "nothing after the auth failure record"
    );
}

#[tokio::test]
async fn md5_bad_key_is_an_auth_failure() {
    // The recording sent no Events header; ours does.
    assert_auth_failure("asterisk22-authfail-md5badkey", &["Events"], |c| {
        c.username = "md5user".into();
        c.secret = Secret::new("wrong-secret");
        c.events = "off".into();
    })
    .await;
}

#[tokio::test]
async fn plain_bad_password_is_an_auth_failure() {
    // The recording sent no Events header; ours does.
    assert_auth_failure("asterisk22-authfail-badpassword", &["Events"], |c| {
        c.username = "bench".into();
        c.secret = Secret::new("wrong-secret");
        c.auth = Auth::Plain;
    })
    .await;
}

#[tokio::test]
async fn unknown_user_is_an_auth_failure() {
    assert_auth_failure("asterisk22-authfail-unknownuser", &["Events"], |c| {
        c.username = "nosuchuser".into();
        c.secret = Secret::new("x");
        c.auth = Auth::Plain;
    })
    .await;
}

#[tokio::test]
async fn auth_failure_is_retried_on_the_long_backoff_and_reported_once() {
    let mut fake = Fake::start(Behaviour {
        secret: "other".into(),
        ..Behaviour::default()
    })
    .await;
    let mut c = cfg(fake.addr);
    c.auth_failure_backoff = Duration::from_millis(20);
    let (conn, mut rx, shutdown) = start(c, 64);
    for _ in 0..3 {
        let mut fc = fake.next_conn().await;
        fc.until_action("Login").await;
    }
    let r = next(&mut rx).await;
    assert!(down_reason(&r).unwrap().starts_with("auth failure"));
    while conn.stats.snapshot().auth_failures < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(conn.stats.snapshot().reconnects >= 2);
    stop(conn, shutdown).await;
    // One record for the whole streak.
    assert!(rx.try_recv().is_err());
}

// ---- reconnect, keepalive, epochs ----

#[tokio::test]
async fn reconnects_after_the_server_restarts_with_a_new_epoch() {
    let mut fake = Fake::start(Behaviour::default()).await;
    let addr = fake.addr;
    let (conn, mut rx, shutdown) = start(cfg(addr), 64);
    let fc = fake.next_conn().await;
    let up1 = next(&mut rx).await;
    assert!(is_up(&up1));
    fc.send(event("Hangup", 1));
    let ev = next(&mut rx).await;
    assert_eq!(ev.stamp.seq, 2);

    // Restart: the listener and every connection go away, then come back on the same port.
    fake.stop();
    let down = next(&mut rx).await;
    assert_eq!(down_reason(&down), Some("eof"));
    assert_eq!((down.stamp.epoch, down.stamp.seq), (up1.stamp.epoch, 3));
    let mut fake = Fake::start_on(&addr.to_string(), Behaviour::default(), None).await;
    let fc = fake.next_conn().await;
    let up2 = next(&mut rx).await;
    assert!(is_up(&up2));
    assert!(up2.stamp.epoch > up1.stamp.epoch);
    assert_eq!(up2.stamp.seq, 1);
    fc.send(event("Hangup", 2));
    let ev2 = next(&mut rx).await;
    assert_eq!((ev2.stamp.epoch, ev2.stamp.seq), (up2.stamp.epoch, 2));
    assert_contiguous(&[up1, ev, down, up2, ev2]);
    assert!(conn.stats.snapshot().reconnects >= 1);
    stop(conn, shutdown).await;
}

#[tokio::test]
async fn epochs_grow_even_when_the_clock_does_not() {
    // A previous run's epoch far in the future: the next one is still larger.
    let mut fake = Fake::start(Behaviour::default()).await;
    let (tx, mut rx) = handoff::channel(16);
    let shutdown = CancellationToken::new();
    let future = u64::MAX / 2;
    let conn = Connection::spawn(
        Arc::new(cfg(fake.addr)),
        tx,
        shutdown.clone(),
        Options {
            previous_epoch: future,
            ..Options::default()
        },
    );
    let _fc = fake.next_conn().await;
    let up = next(&mut rx).await;
    assert_eq!(up.stamp.epoch, future + 1);
    stop(conn, shutdown).await;
}

#[tokio::test]
async fn keepalive_timeout_when_the_server_stops_answering() {
    let mut fake = Fake::start(Behaviour {
        answer_ping: false,
        ..Behaviour::default()
    })
    .await;
    let mut c = cfg(fake.addr);
    c.keepalive_interval = Duration::from_millis(50);
    c.keepalive_timeout = Duration::from_millis(100);
    let (conn, mut rx, shutdown) = start(c, 64);
    let mut fc = fake.next_conn().await;
    let up = next(&mut rx).await;
    assert!(is_up(&up));
    let sent = fc.until_action("Ping").await;
    assert_eq!(sent.last().unwrap().action(), "Ping");
    let down = next(&mut rx).await;
    assert_eq!(down_reason(&down), Some("keepalive timeout"));
    // And it comes back.
    let _fc2 = fake.next_conn().await;
    let up2 = next(&mut rx).await;
    assert!(is_up(&up2) && up2.stamp.epoch > up.stamp.epoch);
    stop(conn, shutdown).await;
}

#[tokio::test]
async fn answered_pings_keep_the_connection_up_and_stay_internal() {
    let mut fake = Fake::start(Behaviour::default()).await;
    let mut c = cfg(fake.addr);
    c.keepalive_interval = Duration::from_millis(20);
    c.keepalive_timeout = Duration::from_secs(5);
    let (conn, mut rx, shutdown) = start(c, 64);
    let mut fc = fake.next_conn().await;
    assert!(is_up(&next(&mut rx).await));
    for _ in 0..3 {
        fc.until_action("Ping").await;
    }
    fc.send(event("Marker", 0));
    let r = next(&mut rx).await;
    assert_eq!(
        event_name(&r).as_deref(),
        Some("Marker"),
        "Pong responses are not handed on"
    );
    assert_eq!(r.stamp.seq, 2);
    stop(conn, shutdown).await;
}

// ---- login details ----

#[tokio::test]
async fn filters_are_pushed_down_before_events_are_switched_on() {
    let mut fake = Fake::start(Behaviour::default()).await;
    let mut c = cfg(fake.addr);
    c.events = "call,system".into();
    c.filters = vec![
        Filter::Legacy("Event: Newchannel".into()),
        Filter::Legacy("!Event: RTCP".into()),
        Filter::Advanced {
            criteria: "action(exclude),name(VarSet)".into(),
            pattern: None,
        },
        Filter::Advanced {
            criteria: "name(Hangup),header(Cause),method(exact)".into(),
            pattern: Some("16".into()),
        },
    ];
    let (conn, mut rx, shutdown) = start(c, 64);
    let mut fc = fake.next_conn().await;
    let sent = fc.until_action("Events").await;
    let names: Vec<_> = sent.iter().map(|a| a.action().to_owned()).collect();
    assert_eq!(
        names,
        [
            "Challenge",
            "Login",
            "Filter",
            "Filter",
            "Filter",
            "Filter",
            "Events"
        ]
    );
    assert_eq!(
        sent[1].get("Events"),
        Some("off"),
        "no unfiltered events at login"
    );
    let lines = |a: &Received| {
        a.headers
            .iter()
            .filter(|(k, _)| k != "ActionID")
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        lines(&sent[2]),
        [
            "Action: Filter",
            "Operation: Add",
            "Filter: Event: Newchannel"
        ]
    );
    assert_eq!(
        lines(&sent[3]),
        ["Action: Filter", "Operation: Add", "Filter: !Event: RTCP"]
    );
    assert_eq!(
        lines(&sent[4]),
        [
            "Action: Filter",
            "Operation: Add",
            "MatchCriteria: action(exclude),name(VarSet)"
        ]
    );
    assert_eq!(
        lines(&sent[5]),
        [
            "Action: Filter",
            "Operation: Add",
            "MatchCriteria: name(Hangup),header(Cause),method(exact)",
            "Filter: 16"
        ]
    );
    assert_eq!(
        lines(&sent[6]),
        ["Action: Events", "EventMask: call,system"]
    );
    assert!(is_up(&next(&mut rx).await));
    stop(conn, shutdown).await;
}

#[tokio::test]
async fn a_rejected_filter_is_reported_as_a_config_error() {
    let mut fake = Fake::start(Behaviour {
        reject_filter: Some("([".into()),
        ..Behaviour::default()
    })
    .await;
    let mut c = cfg(fake.addr);
    c.filters = vec![Filter::Legacy("([".into())];
    let (conn, mut rx, shutdown) = start(c, 64);
    let _fc = fake.next_conn().await;
    let r = next(&mut rx).await;
    let reason = down_reason(&r).expect("ConnectionDown");
    assert!(reason.starts_with("filter rejected"), "{reason}");
    assert!(
        reason.contains("Filter: ([") && reason.contains("Filter did not compile"),
        "{reason}"
    );
    assert_eq!(conn.stats.snapshot().auth_failures, 0);
    stop(conn, shutdown).await;
}

#[tokio::test]
async fn events_in_the_same_write_as_login_responses_are_not_lost() {
    // Login response + FullyBooted + two events in one write; with filters, the Events
    // response + two more events in one write.
    let mut after_login =
        b"Event: FullyBooted\r\nPrivilege: system,all\r\nStatus: Fully Booted\r\n\r\n".to_vec();
    after_login.extend(event("Early", 1));
    after_login.extend(event("Early", 2));
    let mut after_events = event("Early", 3);
    after_events.extend(event("Early", 4));
    // Half a frame: the rest arrives in the next write.
    after_events.extend_from_slice(b"Event: Early\r\nPrivilege: call,all\r\n");
    let mut fake = Fake::start(Behaviour {
        after_login,
        after_events,
        ..Behaviour::default()
    })
    .await;
    let mut c = cfg(fake.addr);
    c.auth = Auth::Plain;
    c.filters = vec![Filter::Legacy("Event: Early".into())];
    let (conn, mut rx, shutdown) = start(c, 64);
    let mut fc = fake.next_conn().await;
    fc.until_action("Events").await;
    fc.send(b"Uniqueid: 1700000000.5\r\n\r\n".to_vec());
    let got = until(&mut rx, |r| {
        matches!(&r.record, Record::Frame(f) if f.frame().get("Uniqueid") == Some(&b"1700000000.5"[..]))
    })
    .await;
    assert!(is_up(&got[0]));
    let names: Vec<_> = got[1..].iter().filter_map(event_name).collect();
    assert_eq!(
        names,
        ["FullyBooted", "Early", "Early", "Early", "Early", "Early"]
    );
    assert_contiguous(&got);
    stop(conn, shutdown).await;
}

// ---- TLS ----

struct TestCa {
    acceptor: tokio_rustls::TlsAcceptor,
    ca_file: PathBuf,
}

fn tls_setup(tag: &str) -> TestCa {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let ca_file =
        std::env::temp_dir().join(format!("amibus-test-{tag}-{}.pem", std::process::id()));
    std::fs::write(&ca_file, cert.cert.pem()).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    TestCa {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        ca_file,
    }
}

#[tokio::test]
async fn tls_with_a_private_ca() {
    let ca = tls_setup("ca");
    let mut fake = Fake::start_on(
        "127.0.0.1:0",
        Behaviour::default(),
        Some(ca.acceptor.clone()),
    )
    .await;
    let mut c = cfg(fake.addr);
    c.tls = Some(TlsConfig {
        ca_file: Some(ca.ca_file.clone()),
        server_name: "localhost".into(),
        insecure_skip_verify: false,
    });
    let (conn, mut rx, shutdown) = start(c, 64);
    let fc = fake.next_conn().await;
    assert!(is_up(&next(&mut rx).await));
    fc.send(event("OverTls", 1));
    assert_eq!(event_name(&next(&mut rx).await).as_deref(), Some("OverTls"));
    let reply = conn.handle.send(Action::new("Ping"), T).await.unwrap();
    assert!(reply.is_success());
    stop(conn, shutdown).await;
    let _ = std::fs::remove_file(&ca.ca_file);
}

#[tokio::test]
async fn tls_refuses_a_name_the_certificate_does_not_carry() {
    let ca = tls_setup("name");
    let mut fake = Fake::start_on(
        "127.0.0.1:0",
        Behaviour::default(),
        Some(ca.acceptor.clone()),
    )
    .await;
    let mut c = cfg(fake.addr);
    c.tls = Some(TlsConfig {
        ca_file: Some(ca.ca_file.clone()),
        server_name: "pbx.example".into(),
        insecure_skip_verify: false,
    });
    let (conn, mut rx, shutdown) = start(c, 64);
    // Two handshakes fail, and no record says "up".
    let _ = fake.next_conn().await;
    let _ = fake.next_conn().await;
    assert!(rx.try_recv().is_err());
    assert!(!conn.stats.snapshot().connected);
    stop(conn, shutdown).await;
    let _ = std::fs::remove_file(&ca.ca_file);
}

#[tokio::test]
async fn tls_insecure_skip_verify_is_explicit_and_works() {
    let ca = tls_setup("insecure");
    let mut fake = Fake::start_on(
        "127.0.0.1:0",
        Behaviour::default(),
        Some(ca.acceptor.clone()),
    )
    .await;
    let mut c = cfg(fake.addr);
    c.tls = Some(TlsConfig {
        ca_file: None,
        server_name: "anything".into(),
        insecure_skip_verify: true,
    });
    let (conn, mut rx, shutdown) = start(c, 64);
    let _fc = fake.next_conn().await;
    assert!(is_up(&next(&mut rx).await));
    stop(conn, shutdown).await;
    let _ = std::fs::remove_file(&ca.ca_file);
}

// ---- hand-off and gaps ----

#[tokio::test]
async fn overflow_becomes_gap_records_and_every_seq_is_accounted_for() {
    const EVENTS: usize = 300;
    let mut fake = Fake::start(Behaviour::default()).await;
    let (conn, mut rx, shutdown) = start(cfg(fake.addr), 4);
    let fc = fake.next_conn().await;
    let mut got = vec![next(&mut rx).await];
    assert!(is_up(&got[0]));
    // The consumer does not read while the server floods.
    let mut burst = Vec::new();
    for i in 0..EVENTS {
        burst.extend(event("Flood", i));
    }
    fc.send(burst);
    while conn.stats.snapshot().frames < EVENTS as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The reader held back for `handoff_wait`, then read on: every frame was decoded although
    // the queue was full.
    let st = conn.stats.snapshot();
    assert!(st.dropped_records > 0);
    assert!(st.read_pauses > 0 && st.read_pause_timeouts > 0, "{st:?}");
    // Reading makes room: the gap is sent without any new input.
    got.extend(until(&mut rx, |r| matches!(r.record, Record::Gap { .. })).await);
    fc.send(event("Last", 0));
    got.extend(until(&mut rx, |r| event_name(r).as_deref() == Some("Last")).await);

    let epoch = got[0].stamp.epoch;
    let mut delivered = BTreeSet::new();
    let mut dropped = BTreeSet::new();
    let mut flood = 0;
    for r in &got {
        assert_eq!(r.stamp.epoch, epoch);
        assert!(delivered.insert(r.stamp.seq), "seq {} twice", r.stamp.seq);
        match &r.record {
            Record::Gap {
                epoch: e,
                first_seq,
                last_seq,
                reason,
            } => {
                assert_eq!(*e, epoch);
                assert_eq!(reason, "downstream queue full");
                assert!(first_seq <= last_seq && *last_seq < r.stamp.seq);
                for s in *first_seq..=*last_seq {
                    assert!(dropped.insert(s), "seq {s} in two gaps");
                }
            }
            Record::Frame(_) if event_name(r).as_deref() == Some("Flood") => flood += 1,
            _ => {}
        }
    }
    let max = *delivered.iter().max().unwrap();
    assert!(delivered.is_disjoint(&dropped));
    let all: BTreeSet<u64> = delivered.union(&dropped).copied().collect();
    assert_eq!(
        all,
        (1..=max).collect::<BTreeSet<_>>(),
        "every seq delivered or in a gap"
    );
    let st = conn.stats.snapshot();
    assert_eq!(st.dropped_records as usize, dropped.len());
    assert_eq!(
        flood + dropped.len(),
        EVENTS,
        "delivered + dropped == total"
    );
    let gaps = got
        .iter()
        .filter(|r| matches!(r.record, Record::Gap { .. }))
        .count();
    assert_eq!(st.gaps as usize, gaps);
    stop(conn, shutdown).await;
}

#[tokio::test]
async fn a_burst_waits_in_the_socket_while_a_slow_reader_catches_up() {
    // Far more than the queue holds, taken by a reader slower than the socket: the connection
    // holds its reads back while the queue is nearly full (the burst waits in the socket)
    // instead of dropping, as long as room comes within `handoff_wait`. (The queue is large
    // enough that the 1,024 slots a read waits for hold what one read can bring.)
    const EVENTS: usize = 6_000;
    let mut fake = Fake::start(Behaviour::default()).await;
    let (tx, mut rx) = handoff::channel(2_048);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let opts = Options {
        // The most allowed: a loaded test machine may leave this task unscheduled for a while.
        handoff_wait: Duration::from_millis(99),
        ..Default::default()
    };
    let conn = Connection::spawn(Arc::new(cfg(fake.addr)), tx, shutdown.clone(), opts);
    let fc = fake.next_conn().await;
    assert!(is_up(&next(&mut rx).await));
    let mut burst = Vec::new();
    for i in 0..EVENTS {
        burst.extend(event("Burst", i));
    }
    fc.send(burst);
    let mut seqs = Vec::new();
    while seqs.len() < EVENTS {
        let r = next(&mut rx).await;
        assert_eq!(event_name(&r).as_deref(), Some("Burst"), "{r:?}");
        seqs.push(r.stamp.seq);
        if seqs.len() % 256 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert_eq!(
        seqs,
        (2..=EVENTS as u64 + 1).collect::<Vec<_>>(),
        "in order, none lost"
    );
    let st = conn.stats.snapshot();
    assert_eq!((st.dropped_records, st.gaps), (0, 0), "{st:?}");
    assert!(st.read_pauses > 0, "the queue filled: {st:?}");
    assert_eq!(st.read_pause_timeouts, 0, "{st:?}");
    stop(conn, shutdown).await;
}

/// A connection on a queue of 4 (headroom 2) that nobody drains, held: the server sent more
/// than the queue holds, and the hold (60 s) cannot run out within a test. Returns the stats
/// at the moment the hold was seen.
async fn held(
    c: ServerConfig,
    fake: &mut Fake,
) -> (
    Connection,
    handoff::Receiver,
    CancellationToken,
    FakeConn,
    amibus::ami::StatsSnapshot,
) {
    let (tx, rx) = handoff::channel(4);
    let shutdown = CancellationToken::new();
    let opts = Options {
        handoff_wait: Duration::from_secs(60),
        ..Default::default()
    };
    let conn = Connection::spawn(Arc::new(c), tx, shutdown.clone(), opts);
    let fc = fake.next_conn().await;
    let mut burst = Vec::new();
    for i in 0..8 {
        burst.extend(event("Burst", i));
    }
    fc.send(burst);
    let seen = tokio::time::timeout(T, async {
        loop {
            let st = conn.stats.snapshot();
            if st.read_pauses > 0 {
                return st;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("no hold within 10 s");
    assert_eq!((seen.read_pauses, seen.read_pause_timeouts), (1, 0));
    (conn, rx, shutdown, fc, seen)
}

#[tokio::test]
async fn a_held_read_still_serves_keepalive_and_actions_and_ends_on_room() {
    let mut fake = Fake::start(Behaviour::default()).await;
    let mut c = cfg(fake.addr);
    // Long enough that the first Ping comes after the hold began (a Ping answered but not read
    // when it began would be outstanding for the whole hold, and no other would be sent).
    c.keepalive_interval = Duration::from_secs(1);
    c.keepalive_timeout = Duration::from_secs(60);
    let (conn, mut rx, shutdown, mut fc, seen) = held(c, &mut fake).await;
    while fc.actions.try_recv().is_ok() {}

    // Both the keepalive Ping and an action sent through the handle reach the server.
    let h = conn.handle.clone();
    let call = tokio::spawn(async move { h.send(Action::new("Status"), T).await });
    let (mut ping, mut status) = (false, false);
    while !(ping && status) {
        let a = fc.next_action().await;
        ping |= a.action() == "Ping";
        status |= a.action() == "Status";
    }
    // Still held: nothing was read since the hold began, so the reply waits in the socket.
    let st = conn.stats.snapshot();
    assert_eq!(st.bytes, seen.bytes, "read during the hold: {st:?}");
    assert_eq!((st.read_pauses, st.read_pause_timeouts), (1, 0), "{st:?}");
    assert!(!call.is_finished());

    // Taking records makes room: the hold ends on the notification (its deadline is 60 s
    // away), the reply is read, and the Ping's answer too, so the next Ping is sent.
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let reply = tokio::time::timeout(T, call)
        .await
        .expect("no reply within 10 s")
        .unwrap()
        .expect("the action is answered");
    assert!(!reply.is_success(), "the fake does not know Status");
    fc.until_action("Ping").await;
    assert_eq!(conn.stats.snapshot().read_pause_timeouts, 0);
    stop(conn, shutdown).await;
    tokio::time::timeout(T, drain).await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_during_a_held_read_logs_off() {
    let mut fake = Fake::start(Behaviour::default()).await;
    let (conn, _rx, shutdown, mut fc, _) = held(cfg(fake.addr), &mut fake).await;
    let stats = conn.stats.clone();
    // `stop` allows 20 s; the hold would last 60.
    stop(conn, shutdown).await;
    let logoff = fc.until_action("Logoff").await;
    assert_eq!(logoff.last().unwrap().action(), "Logoff");
    let st = stats.snapshot();
    assert_eq!((st.read_pauses, st.read_pause_timeouts), (1, 0), "{st:?}");
    assert!(!st.connected);
}

// ---- actions through the handle ----

#[tokio::test]
async fn action_round_trip_with_event_list_and_interleaved_events() {
    let mut fake = Fake::start(Behaviour {
        list_items: 3,
        ..Behaviour::default()
    })
    .await;
    let (conn, mut rx, shutdown) = start(cfg(fake.addr), 64);
    let mut fc = fake.next_conn().await;
    assert!(is_up(&next(&mut rx).await));
    fc.until_action("Login").await;

    let h = conn.handle.clone();
    let list = tokio::spawn(async move { h.send(Action::new("CoreShowChannels"), T).await });
    let a = fc.next_action().await;
    assert_eq!(a.action(), "CoreShowChannels");
    // A broadcast event between our actions goes downstream, not to the caller.
    fc.send(event("Newstate", 7));
    let reply = list.await.unwrap().unwrap();
    assert!(reply.is_success());
    assert_eq!(reply.message().as_deref(), Some("Channels will follow"));
    assert_eq!(reply.events.len(), 4);
    let names: Vec<_> = reply
        .events
        .iter()
        .map(|f| String::from_utf8_lossy(f.frame().get("Event").unwrap()).into_owned())
        .collect();
    assert_eq!(names[..3], ["CoreShowChannel"; 3]);
    assert_eq!(names[3], "CoreShowChannelsComplete");
    assert!(!reply.truncated);

    // An error response ends the action.
    let err = conn
        .handle
        .send(Action::new("NoSuchAction"), T)
        .await
        .unwrap();
    assert!(!err.is_success());

    // Async originate: the OriginateResponse goes downstream and to the waiting caller.
    let req = Request::new(
        Action::new("Originate")
            .header("Channel", "Local/1@ctx")
            .header("Application", "Wait")
            .header("Async", "true"),
        T,
    )
    .await_event("OriginateResponse");
    let reply = conn.handle.request(req).await.unwrap();
    assert_eq!(
        reply.message().as_deref(),
        Some("Originate successfully queued")
    );
    let awaited = reply.awaited.expect("the OriginateResponse");
    assert_eq!(awaited.frame().get("Reason"), Some(&b"4"[..]));

    let down: Vec<_> = until(&mut rx, |r| {
        event_name(r).as_deref() == Some("OriginateResponse")
    })
    .await;
    let names: Vec<_> = down.iter().filter_map(event_name).collect();
    assert_eq!(
        names,
        ["Newstate", "Newchannel", "OriginateResponse"],
        "no response or list item downstream"
    );

    // Invalid actions never reach the wire.
    let bad = conn
        .handle
        .send(
            Action::new("Setvar").header("Value", "x\r\nAction: Logoff"),
            T,
        )
        .await
        .unwrap_err();
    assert!(matches!(bad, ActionError::Invalid(_)));
    stop(conn, shutdown).await;
}

#[tokio::test]
async fn a_list_longer_than_the_bound_is_truncated_and_still_completes() {
    let mut fake = Fake::start(Behaviour {
        list_items: 5,
        ..Behaviour::default()
    })
    .await;
    let (tx, mut rx) = handoff::channel(64);
    let shutdown = CancellationToken::new();
    let conn = Connection::spawn(
        Arc::new(cfg(fake.addr)),
        tx,
        shutdown.clone(),
        Options {
            max_list_items: 2,
            ..Options::default()
        },
    );
    let _fc = fake.next_conn().await;
    assert!(is_up(&next(&mut rx).await));
    let reply = conn
        .handle
        .send(Action::new("CoreShowChannels"), T)
        .await
        .unwrap();
    assert!(reply.truncated);
    assert_eq!(reply.events.len(), 3, "two items and the completion event");
    assert_eq!(reply.events[2].frame().get("ListItems"), Some(&b"5"[..]));
    // The dropped items did not leak downstream either.
    conn.handle.send(Action::new("Ping"), T).await.unwrap();
    assert!(rx.try_recv().is_err());
    stop(conn, shutdown).await;
}

/// Issue 14: replies are bounded by bytes per connection too, not only by items per reply.
#[tokio::test]
async fn a_list_past_the_connections_byte_bound_is_truncated_and_still_completes() {
    let mut fake = Fake::start(Behaviour {
        list_items: 100,
        ..Behaviour::default()
    })
    .await;
    let (tx, mut rx) = handoff::channel(64);
    let shutdown = CancellationToken::new();
    let conn = Connection::spawn(
        Arc::new(cfg(fake.addr)),
        tx,
        shutdown.clone(),
        Options {
            max_reply_bytes: 1000,
            ..Options::default()
        },
    );
    let _fc = fake.next_conn().await;
    assert!(is_up(&next(&mut rx).await));
    let reply = conn
        .handle
        .send(Action::new("CoreShowChannels"), T)
        .await
        .unwrap();
    assert!(reply.truncated);
    let held: usize = reply.events.iter().map(|e| e.bytes().len()).sum();
    let (complete, items) = reply.events.split_last().unwrap();
    assert!(!items.is_empty() && items.len() < 100, "{}", items.len());
    let last = complete.bytes().len();
    assert!(held - last <= 1000, "items within the bound: {held}");
    assert_eq!(complete.frame().get("ListItems"), Some(&b"100"[..]));
    // The bytes were given back: the next list gets as much room again.
    let again = conn
        .handle
        .send(Action::new("CoreShowChannels"), T)
        .await
        .unwrap();
    assert_eq!(again.events.len(), reply.events.len());
    stop(conn, shutdown).await;
}

#[tokio::test]
async fn an_action_in_flight_when_the_connection_drops_is_outcome_unknown() {
    let mut fake = Fake::start(Behaviour::default()).await;
    let (conn, mut rx, shutdown) = start(cfg(fake.addr), 64);
    let mut fc = fake.next_conn().await;
    assert!(is_up(&next(&mut rx).await));
    let h = conn.handle.clone();
    let call = tokio::spawn(async move { h.send(Action::new("Vanish"), T).await });
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err, ActionError::OutcomeUnknown);
    assert!(!err.is_retriable() && err.outcome_unknown());
    assert_eq!(down_reason(&next(&mut rx).await), Some("eof"));
    // It was sent exactly once, and not again after the reconnect.
    let mut fc2 = fake.next_conn().await;
    assert!(is_up(&next(&mut rx).await));
    let r = conn.handle.send(Action::new("Ping"), T).await.unwrap();
    assert!(r.is_success());
    let vanish = fc.until_action("Vanish").await;
    assert_eq!(vanish.last().unwrap().action(), "Vanish");
    let after = fc2.until_action("Ping").await;
    assert!(after.iter().all(|a| a.action() != "Vanish"));
    stop(conn, shutdown).await;
}

#[tokio::test]
async fn an_unanswered_action_times_out_and_the_session_stays_up() {
    let mut fake = Fake::start(Behaviour::default()).await;
    let (conn, mut rx, shutdown) = start(cfg(fake.addr), 64);
    let _fc = fake.next_conn().await;
    assert!(is_up(&next(&mut rx).await));
    let err = conn
        .handle
        .send(Action::new("Swallow"), Duration::from_millis(50))
        .await
        .unwrap_err();
    assert_eq!(err, ActionError::TimedOut);
    let r = conn.handle.send(Action::new("Ping"), T).await.unwrap();
    assert!(r.is_success());
    assert!(conn.stats.snapshot().connected);
    stop(conn, shutdown).await;
}

/// Issue 14 through the real connection: the keepalive sweep finds the action past its deadline
/// before the caller is polled again (the caller's future is not polled meanwhile, so the
/// connection's turn certainly comes first). The caller must read "timed out", never "not
/// sent".
#[tokio::test]
async fn a_reply_dropped_by_the_deadline_sweep_before_the_caller_looks_is_timed_out() {
    use std::future::Future;
    use std::task::{Context, Waker};
    let mut fake = Fake::start(Behaviour::default()).await;
    let mut c = cfg(fake.addr);
    c.keepalive_interval = Duration::from_millis(100);
    let (conn, mut rx, shutdown) = start(c, 64);
    let mut fc = fake.next_conn().await;
    assert!(is_up(&next(&mut rx).await));
    let h = conn.handle.clone();
    let mut call = std::pin::pin!(h.send(Action::new("Swallow"), Duration::from_millis(20)));
    assert!(
        call.as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_pending()
    );
    fc.until_action("Swallow").await;
    // Past the deadline and past a keepalive tick: the sweep has run.
    fc.until_action("Ping").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = call.await.unwrap_err();
    assert_eq!(err, ActionError::TimedOut);
    assert!(!err.is_retriable());
    stop(conn, shutdown).await;
}

// ---- many connections ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_log_in_and_stop() {
    const N: usize = 1000;
    let mut fake = Fake::start(Behaviour::default()).await;
    let (tx, mut rx) = handoff::channel(N * 2);
    let shutdown = CancellationToken::new();
    let mut conns = Vec::new();
    for i in 0..N {
        let mut c = cfg(fake.addr);
        c.id = format!("pbx-{i}");
        c.auth = Auth::Plain;
        conns.push(Connection::spawn(
            Arc::new(c),
            tx.clone(),
            shutdown.clone(),
            Options::default(),
        ));
    }
    drop(tx);
    let mut servers = Vec::new();
    for _ in 0..N {
        servers.push(fake.next_conn().await);
    }
    let mut up = BTreeSet::new();
    while up.len() < N {
        let r = next(&mut rx).await;
        assert!(is_up(&r), "{r:?}");
        assert!(up.insert(r.stamp.server.clone()));
    }
    shutdown.cancel();
    for c in conns {
        tokio::time::timeout(T, c.task).await.unwrap().unwrap();
    }
    let mut down = 0;
    while let Some(r) = rx.recv().await {
        assert_eq!(down_reason(&r), Some("shutdown"));
        down += 1;
    }
    assert_eq!(down, N);
}
