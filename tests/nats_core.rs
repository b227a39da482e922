//! Core NATS publishing on amibus's own connection (`src/broker/nats_wire.rs`,
//! `src/sink/nats_publisher/`) against a real nats-server: every way of authenticating the
//! configuration can name (user and password, user info in the URL, an nkey seed, a
//! credentials file in operator mode), TLS, failing over to the next server and to a server
//! only the cluster advertised, and a server restart (what was not confirmed fails, nothing is
//! queued while disconnected, publishing resumes). Every message is read back by an independent client (async-nats). JetStream on
//! the same connection is tested in `tests/nats.rs` and, through the binary, in
//! `tests/e2e_nats.rs` and `tests/fault_nats.rs`. Timeouts only keep a broken test from
//! hanging.

#[path = "support/nats.rs"]
mod nats_support;

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use amibus::broker::nats::{NatsAuth, NatsConnection, NatsError, NatsTls, Secret};
use amibus::sink::nats::{NatsMode, NatsSink, NatsSinkConfig};
use amibus::sink::{Record, Sink, SinkError};
use amibus::spool::{Kind, Meta};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use futures_util::StreamExt;
use nats_support::{NatsServer, ServerOptions, self_signed_cert};

const GUARD: Duration = Duration::from_secs(60);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {GUARD:?}"))
}

fn record(seq: u64, payload: &str) -> Record {
    Record {
        key: Bytes::from_static(b"pbx1/1700000000.1"),
        meta: Meta {
            server: Bytes::from_static(b"pbx1"),
            event: Bytes::from_static(b"Hangup"),
            kind: Kind::Event,
            class: Bytes::from_static(b"call"),
            epoch: 7,
            seq,
            ..Meta::default()
        },
        payload: Bytes::from(payload.to_owned()),
    }
}

fn config(url: String, subject: &str, auth: NatsAuth) -> NatsSinkConfig {
    NatsSinkConfig {
        connection: NatsConnection {
            servers: vec![url],
            auth,
            ..NatsConnection::default()
        },
        subject: subject.into(),
        mode: NatsMode::Core,
        ..NatsSinkConfig::default()
    }
}

/// Publish one record and wait for the server's confirmation.
async fn publish(sink: &mut NatsSink, seq: u64, payload: &str) {
    let d = sink.send(&record(seq, payload)).await.expect("queued");
    within("confirmation", d).await.expect("confirmed");
}

/// Send one record until the server confirms it (refused or failed while the sink has no
/// connection yet).
async fn publish_once_reconnected(sink: &mut NatsSink, what: &str, seq: u64, payload: &str) {
    within(what, async {
        loop {
            if let Ok(d) = sink.send(&record(seq, payload)).await
                && within("outcome", d).await.is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// The next message on `sub`: (subject, seq header, payload).
async fn next(sub: &mut async_nats::Subscriber) -> (String, String, String) {
    let m = within("message", sub.next())
        .await
        .expect("subscription open");
    let seq = m
        .headers
        .as_ref()
        .and_then(|h| h.get("seq"))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    (
        m.subject.to_string(),
        seq,
        String::from_utf8_lossy(&m.payload).into_owned(),
    )
}

/// Connecting must fail with the server's refusal in the message.
async fn refused(cfg: NatsSinkConfig) -> String {
    match NatsSink::connect(cfg).await {
        Err(e @ NatsError::Connect { .. }) => {
            let text = format!("{e}: {}", std::error::Error::source(&e).unwrap());
            assert!(text.contains("Authorization Violation"), "{text}");
            text
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("connected with wrong credentials"),
    }
}

#[tokio::test]
async fn user_and_password_from_the_config_or_the_url() {
    let server = NatsServer::start_with(ServerOptions {
        config: Some("authorization { user: alice, password: \"pw-1\" }".into()),
        ..ServerOptions::default()
    });
    let reader = async_nats::ConnectOptions::with_user_and_password("alice".into(), "pw-1".into())
        .connect(server.url())
        .await
        .expect("reader connects");
    let mut sub = reader.subscribe("up.>").await.expect("subscribe");
    reader.flush().await.expect("flush");

    let wrong = NatsAuth::UserPassword {
        user: "alice".into(),
        password: Secret::new("nope"),
    };
    let text = refused(config(server.url(), "up.{server}", wrong)).await;
    assert!(
        !text.contains("nope"),
        "the password is not in the error: {text}"
    );

    let right = NatsAuth::UserPassword {
        user: "alice".into(),
        password: Secret::new("pw-1"),
    };
    let mut sink = NatsSink::connect(config(server.url(), "up.{server}", right))
        .await
        .expect("connect");
    publish(&mut sink, 1, "from the config").await;
    assert_eq!(
        next(&mut sub).await,
        ("up.pbx1".into(), "1".into(), "from the config".into())
    );

    let url = format!("nats://alice:pw-1@127.0.0.1:{}", server.port());
    let mut sink = NatsSink::connect(config(url, "up.{server}", NatsAuth::None))
        .await
        .expect("connect with the URL's user info");
    publish(&mut sink, 2, "from the url").await;
    assert_eq!(
        next(&mut sub).await,
        ("up.pbx1".into(), "2".into(), "from the url".into())
    );
}

#[tokio::test]
async fn an_nkey_seed_signs_the_servers_nonce() {
    let user = nkeys::KeyPair::new_user();
    let other = nkeys::KeyPair::new_user();
    let server = NatsServer::start_with(ServerOptions {
        config: Some(format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}",
            user.public_key()
        )),
        ..ServerOptions::default()
    });
    let reader = async_nats::ConnectOptions::with_nkey(user.seed().unwrap())
        .connect(server.url())
        .await
        .expect("reader connects");
    let mut sub = reader.subscribe("nk.>").await.expect("subscribe");
    reader.flush().await.expect("flush");

    let text = refused(config(
        server.url(),
        "nk.{server}",
        NatsAuth::NkeySeed(Secret::new(other.seed().unwrap())),
    ))
    .await;
    assert!(!text.contains(&other.seed().unwrap()), "{text}");

    let mut sink = NatsSink::connect(config(
        server.url(),
        "nk.{server}",
        NatsAuth::NkeySeed(Secret::new(user.seed().unwrap())),
    ))
    .await
    .expect("connect with the seed");
    publish(&mut sink, 3, "signed").await;
    assert_eq!(
        next(&mut sub).await,
        ("nk.pbx1".into(), "3".into(), "signed".into())
    );
}

/// A JWT as nats-server's `jwt` library writes them: header, claims, and the issuer's
/// ed25519 signature over both, each base64url without padding.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "ed25519-nkey"});
    let claims = serde_json::json!({
        "jti": format!("T{now}{name}"),
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = issuer.sign(signed.as_bytes()).expect("sign");
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig))
}

#[tokio::test]
async fn a_credentials_file_authenticates_in_operator_mode() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let op_jwt = jwt(
        &operator,
        &operator.public_key(),
        "op",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let unlimited = &serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1
    });
    let acc_jwt = jwt(
        &operator,
        &account.public_key(),
        "acc",
        serde_json::json!({"limits": unlimited, "type": "account", "version": 2}),
    );
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        "amibus",
        serde_json::json!({"subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}),
    );
    // JetStream (every test server runs it) wants a system account.
    let system = nkeys::KeyPair::new_account();
    let sys_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"limits": unlimited, "type": "account", "version": 2}),
    );
    let server = NatsServer::start_with(ServerOptions {
        config: Some(format!(
            "operator: {op_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{ {acc}: {acc_jwt}, {sys}: {sys_jwt} }}",
            acc = account.public_key(),
            sys = system.public_key(),
        )),
        ..ServerOptions::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = dir.path().join("amibus.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .expect("write creds");
    let reader = async_nats::ConnectOptions::with_credentials_file(&creds)
        .await
        .expect("read creds")
        .connect(server.url())
        .await
        .expect("reader connects");
    let mut sub = reader.subscribe("cr.>").await.expect("subscribe");
    reader.flush().await.expect("flush");

    // Another user's seed with this JWT: the signature does not match.
    let forged = dir.path().join("forged.creds");
    let text = std::fs::read_to_string(&creds).unwrap().replace(
        &user.seed().unwrap(),
        &nkeys::KeyPair::new_user().seed().unwrap(),
    );
    std::fs::write(&forged, text).unwrap();
    refused(config(
        server.url(),
        "cr.{server}",
        NatsAuth::CredentialsFile(forged),
    ))
    .await;

    let mut sink = NatsSink::connect(config(
        server.url(),
        "cr.{server}",
        NatsAuth::CredentialsFile(creds),
    ))
    .await
    .expect("connect with the credentials file");
    publish(&mut sink, 4, "with a jwt").await;
    assert_eq!(
        next(&mut sub).await,
        ("cr.pbx1".into(), "4".into(), "with a jwt".into())
    );

    // An unreadable file is a configuration error that names it.
    match NatsSink::connect(config(
        server.url(),
        "cr.{server}",
        NatsAuth::CredentialsFile(dir.path().join("missing.creds")),
    ))
    .await
    {
        Err(NatsError::Config(why)) => assert!(why.contains("missing.creds"), "{why}"),
        Err(e) => panic!("expected a configuration error, got {e}"),
        Ok(_) => panic!("connected without credentials"),
    }
}

#[tokio::test]
async fn tls_needs_the_ca_and_carries_the_messages() {
    let certs = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed_cert(certs.path());
    let server = NatsServer::start_with(ServerOptions {
        tls: Some((cert.clone(), key)),
        ..ServerOptions::default()
    });
    let reader = async_nats::ConnectOptions::new()
        .add_root_certificates(cert.clone())
        .require_tls(true)
        .connect(server.url())
        .await
        .expect("reader connects");
    let mut sub = reader.subscribe("tl.>").await.expect("subscribe");
    reader.flush().await.expect("flush");

    // The server requires TLS; without its CA the certificate is not trusted.
    let plain = format!("nats://127.0.0.1:{}", server.port());
    match NatsSink::connect(config(plain.clone(), "tl.{server}", NatsAuth::None)).await {
        Err(e @ NatsError::Connect { .. }) => {
            let why = std::error::Error::source(&e).unwrap().to_string();
            assert!(why.contains("TLS"), "{why}");
        }
        Err(e) => panic!("expected a TLS failure, got {e}"),
        Ok(_) => panic!("connected without trusting the certificate"),
    }
    let mut cfg = config(plain, "tl.{server}", NatsAuth::None);
    cfg.connection.tls = NatsTls {
        ca_file: Some(cert),
        ..NatsTls::default()
    };
    let mut sink = NatsSink::connect(cfg).await.expect("connect over TLS");
    publish(&mut sink, 5, "over tls").await;
    assert_eq!(
        next(&mut sub).await,
        ("tl.pbx1".into(), "5".into(), "over tls".into())
    );
}

/// A server configured with TLS `handshake_first` says nothing until the TLS handshake is done:
/// without the setting the connection fails with a message naming it; with it, both modes
/// connect (JetStream also opens async-nats's management connection) and publish.
#[tokio::test]
async fn a_handshake_first_server_needs_and_takes_tls_before_its_info() {
    let certs = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed_cert(certs.path());
    let server = NatsServer::start_with(ServerOptions {
        config: Some(format!(
            "tls {{ cert_file: {cert:?}, key_file: {key:?}, handshake_first: true, timeout: 1 }}"
        )),
        ..ServerOptions::default()
    });
    let url = format!("nats://127.0.0.1:{}", server.port());
    let reader = async_nats::ConnectOptions::new()
        .add_root_certificates(cert.clone())
        .tls_first()
        .connect(url.clone())
        .await
        .expect("reader connects TLS-first");
    let mut sub = reader.subscribe("hf.>").await.expect("subscribe");
    reader.flush().await.expect("flush");

    let tls = |handshake_first| NatsTls {
        ca_file: Some(cert.clone()),
        handshake_first,
        ..NatsTls::default()
    };
    let mut cfg = config(url.clone(), "hf.{server}", NatsAuth::None);
    cfg.connection.tls = tls(false);
    cfg.connection.connect_timeout = Duration::from_secs(5);
    match NatsSink::connect(cfg.clone()).await {
        Err(e @ NatsError::Connect { .. }) => {
            let why = std::error::Error::source(&e).unwrap().to_string();
            assert!(why.contains("handshake_first"), "{why}");
        }
        Err(e) => panic!("expected a connect failure naming handshake_first, got {e}"),
        Ok(_) => panic!("connected without TLS first"),
    }

    cfg.connection.tls = tls(true);
    let mut sink = NatsSink::connect(cfg.clone())
        .await
        .expect("connect TLS-first");
    publish(&mut sink, 1, "core, tls first").await;
    assert_eq!(
        next(&mut sub).await,
        ("hf.pbx1".into(), "1".into(), "core, tls first".into())
    );

    cfg.mode = NatsMode::JetStream;
    cfg.stream = Some(amibus::broker::nats::StreamSpec {
        subjects: vec!["hf.>".into()],
        ..amibus::broker::nats::StreamSpec::new("HF")
    });
    let mut sink = NatsSink::connect(cfg).await.expect("jetstream, TLS-first");
    publish(&mut sink, 2, "jetstream, tls first").await;
    assert_eq!(
        next(&mut sub).await,
        ("hf.pbx1".into(), "2".into(), "jetstream, tls first".into())
    );
}

#[tokio::test]
async fn require_tls_refuses_a_server_without_it() {
    let server = NatsServer::start();
    let mut cfg = config(server.url(), "rq.{server}", NatsAuth::None);
    cfg.connection.tls.require = true;
    match NatsSink::connect(cfg).await {
        Err(e @ NatsError::Connect { .. }) => {
            let why = std::error::Error::source(&e).unwrap().to_string();
            assert!(why.contains("does not offer TLS"), "{why}");
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("connected in plain text although TLS was required"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_fails_what_was_not_confirmed_and_publishing_resumes() {
    let mut server = NatsServer::start();
    let mut sink = NatsSink::connect(config(server.url(), "rs.{server}", NatsAuth::None))
        .await
        .expect("connect");
    publish(&mut sink, 1, "before").await;

    server.stop();
    // Once the loss is noticed, nothing is queued: every send is refused until the reconnect.
    let refused = within("the loss noticed", async {
        loop {
            match sink.send(&record(2, "while down")).await {
                Err(SinkError::Retriable(why)) => break why,
                Err(e) => panic!("expected retriable, got {e:?}"),
                // Queued before the loss was seen: it must fail, never be confirmed.
                Ok(d) => match within("outcome", d).await {
                    Err(SinkError::Retriable(_)) => {}
                    other => panic!("a record sent into a dead connection: {other:?}"),
                },
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(refused.contains("not connected"), "{refused}");

    server.restart();
    let reader = async_nats::connect(server.url()).await.expect("reader");
    let mut sub = reader.subscribe("rs.>").await.expect("subscribe");
    reader.flush().await.expect("flush");
    publish_once_reconnected(&mut sink, "publishing resumes", 3, "after").await;
    assert_eq!(
        next(&mut sub).await,
        ("rs.pbx1".into(), "3".into(), "after".into())
    );
    within("flush", sink.flush(GUARD)).await.expect("flushed");
}

#[tokio::test]
async fn a_server_that_does_not_answer_is_skipped_for_the_next() {
    let server = NatsServer::start();
    // A port nobody listens on: bound, then closed.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("nats://127.0.0.1:{}", dead.local_addr().unwrap().port());
    drop(dead);
    let reader = async_nats::connect(server.url()).await.expect("reader");
    let mut sub = reader.subscribe("fo.>").await.expect("subscribe");
    reader.flush().await.expect("flush");

    let mut cfg = config(dead_url.clone(), "fo.{server}", NatsAuth::None);
    cfg.connection.servers.push(server.url());
    let mut sink = NatsSink::connect(cfg).await.expect("the second server");
    publish(&mut sink, 6, "failed over").await;
    assert_eq!(
        next(&mut sub).await,
        ("fo.pbx1".into(), "6".into(), "failed over".into())
    );

    // With no server answering, connecting fails and names the servers.
    match NatsSink::connect(config(dead_url, "fo.{server}", NatsAuth::None)).await {
        Err(e @ NatsError::Connect { .. }) => assert!(e.to_string().contains("127.0.0.1"), "{e}"),
        Err(e) => panic!("expected a connect error, got {e}"),
        Ok(_) => panic!("connected to nothing"),
    }
}

/// A port nobody listens on now (bound, then closed).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_with_one_seed_it_fails_over_to_the_servers_its_cluster_advertised() {
    let (route_a, route_b) = (free_port(), free_port());
    let node = |name: &str, listen: u16, peer: u16| ServerOptions {
        config: Some(format!(
            "server_name: {name}\ncluster {{ name: c1, listen: 127.0.0.1:{listen}, \
             routes: [nats-route://127.0.0.1:{peer}] }}"
        )),
        ..ServerOptions::default()
    };
    let mut a = NatsServer::start_with(node("a", route_a, route_b));
    let b = NatsServer::start_with(node("b", route_b, route_a));
    // Until the route is up, a's INFO advertises only itself.
    let probe = within("the cluster forms", async {
        loop {
            if let Ok(c) = async_nats::connect(a.url()).await
                && c.server_info().connect_urls.len() == 2
            {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    drop(probe);
    let reader = async_nats::connect(b.url()).await.expect("reader on b");
    let mut sub = reader.subscribe("cl.>").await.expect("subscribe");
    reader.flush().await.expect("flush");

    // Only a is configured.
    let mut sink = NatsSink::connect(config(a.url(), "cl.{server}", NatsAuth::None))
        .await
        .expect("connect to a");
    // Routed from a to b's subscriber: the cluster carries it.
    within("routed", async {
        loop {
            publish(&mut sink, 1, "via a").await;
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await
            {
                break m;
            }
        }
    })
    .await;

    a.stop();
    // b was never configured: reaching it means it was learned from a's INFO.
    publish_once_reconnected(&mut sink, "failed over to b", 2, "via b").await;
    let got = within("the message on b", async {
        loop {
            let (_, seq, payload) = next(&mut sub).await;
            if seq == "2" {
                break payload;
            }
        }
    })
    .await;
    assert_eq!(got, "via b");
}

/// A server in lame duck mode (a rolling upgrade of the cluster) is left for the next one
/// before it closes the connection: every record is confirmed, none fails, none is published
/// twice. Without the move, the server's eviction after its grace period failed what was in
/// flight and refused records until the reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_in_lame_duck_mode_is_left_without_failing_or_repeating_a_record() {
    let (route_a, route_b) = (free_port(), free_port());
    let node = |name: &str, listen: u16, peer: u16| ServerOptions {
        config: Some(format!(
            "server_name: {name}\nlame_duck_grace_period: \"1s\"\nlame_duck_duration: \"30s\"\n\
             cluster {{ name: c1, listen: 127.0.0.1:{listen}, \
             routes: [nats-route://127.0.0.1:{peer}] }}"
        )),
        ..ServerOptions::default()
    };
    let a = NatsServer::start_with(node("a", route_a, route_b));
    let b = NatsServer::start_with(node("b", route_b, route_a));
    let reader = async_nats::connect(b.url()).await.expect("reader on b");
    let mut sub = reader.subscribe("ld.>").await.expect("subscribe");
    reader.flush().await.expect("flush");
    let mut sink = NatsSink::connect(NatsSinkConfig {
        connection: NatsConnection {
            servers: vec![a.url(), b.url()],
            ..NatsConnection::default()
        },
        subject: "ld.{server}".into(),
        mode: NatsMode::Core,
        ..NatsSinkConfig::default()
    })
    .await
    .expect("connect to a");
    // Routed from a to b's subscriber: the cluster carries it.
    within("the route is up", async {
        loop {
            publish(&mut sink, 0, "probe").await;
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await
            {
                break;
            }
        }
    })
    .await;

    let mut seq = 0;
    for _ in 0..100 {
        seq += 1;
        publish(&mut sink, seq, "before").await;
    }
    a.lame_duck();
    // Past a's grace period, when it starts closing its clients: each record must still be
    // accepted and confirmed (`publish` fails the test otherwise).
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        seq += 1;
        publish(&mut sink, seq, "during").await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    let mut count = std::collections::BTreeMap::<u64, usize>::new();
    within("every record on b", async {
        while count.len() < seq as usize {
            let (_, s, _) = next(&mut sub).await;
            let s: u64 = s.parse().expect("seq header");
            if s > 0 {
                *count.entry(s).or_default() += 1;
            }
        }
    })
    .await;
    // Anything published twice would have arrived by now, right behind the original.
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
        let s = m
            .headers
            .as_ref()
            .and_then(|h| h.get("seq"))
            .map(|v| v.as_str().to_owned());
        if let Some(s) = s.and_then(|s| s.parse::<u64>().ok()).filter(|&s| s > 0) {
            *count.entry(s).or_default() += 1;
        }
    }
    let twice: Vec<_> = count.iter().filter(|&(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "published twice: {twice:?}");
    assert_eq!(
        count.keys().copied().collect::<Vec<_>>(),
        (1..=seq).collect::<Vec<_>>()
    );
}
