use super::*;
use crate::broker::nats::NatsConnection;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A scripted server: INFO, then the client's CONNECT and PING answered with PONG.
async fn accept(listener: &TcpListener) -> BufReader<TcpStream> {
    let (sock, _) = listener.accept().await.unwrap();
    let mut sock = BufReader::new(sock);
    sock.get_mut()
        .write_all(b"INFO {\"server_id\":\"fake\",\"headers\":true,\"max_payload\":1000}\r\n")
        .await
        .unwrap();
    assert!(line(&mut sock).await.starts_with("CONNECT {"));
    assert_eq!(line(&mut sock).await, "PING");
    sock.get_mut().write_all(b"PONG\r\n").await.unwrap();
    sock
}

async fn line(sock: &mut BufReader<TcpStream>) -> String {
    let mut l = String::new();
    sock.read_line(&mut l).await.unwrap();
    l.trim_end().to_owned()
}

/// A publisher connected to a scripted server, and the server's side.
async fn started(confirm: Confirm) -> (TcpListener, Publisher, BufReader<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("nats://{}", listener.local_addr().unwrap());
    let dialer = Dialer::new(&NatsConnection {
        servers: vec![url],
        ..NatsConnection::default()
    })
    .unwrap();
    let (publisher, sock) = tokio::join!(Publisher::start(dialer, confirm), accept(&listener));
    (listener, publisher.unwrap(), sock)
}

fn hpub(text: &str) -> impl FnMut(&mut Vec<u8>, usize, Reply<'_>) -> Result<(), SinkError> + '_ {
    move |out, max, _| {
        assert_eq!(max, 1000, "the server's max_payload");
        out.extend_from_slice(format!("PUB s {}\r\n{text}\r\n", text.len()).as_bytes());
        Ok(())
    }
}

#[tokio::test]
async fn a_record_is_confirmed_by_the_pong_after_it_and_failed_without_one() {
    let (listener, publisher, mut sock) = started(Confirm::Pong).await;

    // Written and flushed, but the server never answers its PING: failed, not confirmed.
    let n = publisher
        .queue(Duration::from_secs(5), hpub("one"))
        .await
        .unwrap();
    assert_eq!(
        (line(&mut sock).await, line(&mut sock).await),
        ("PUB s 3".into(), "one".into())
    );
    assert_eq!(line(&mut sock).await, "PING");
    drop(sock);
    assert!(
        publisher.outcome(n).await.is_err(),
        "confirmed without a PONG"
    );

    // The reconnect: the server's own PING is answered, an -ERR about permissions does
    // not end the connection, and the PONG confirms what was written before its PING.
    let mut sock = accept(&listener).await;
    sock.get_mut()
        .write_all(b"PING\r\n-ERR 'Permissions Violation for Publish to \"x\"'\r\n")
        .await
        .unwrap();
    assert_eq!(line(&mut sock).await, "PONG");
    let n = loop {
        // Refused until the client has seen the handshake through.
        match publisher.queue(Duration::from_secs(5), hpub("two")).await {
            Ok(n) => break n,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    assert_eq!(
        (line(&mut sock).await, line(&mut sock).await),
        ("PUB s 3".into(), "two".into())
    );
    assert_eq!(line(&mut sock).await, "PING");
    let outcome = publisher.outcome(n);
    sock.get_mut().write_all(b"PONG\r\n").await.unwrap();
    outcome.await.expect("confirmed by the PONG");
}

#[tokio::test]
async fn pubacks_settle_their_own_record_in_any_order() {
    let (_listener, publisher, mut sock) = started(Confirm::PubAck { max_in_flight: 3 }).await;
    let sub = line(&mut sock).await;
    let inbox = sub
        .strip_prefix("SUB ")
        .and_then(|s| s.strip_suffix("* 1"))
        .expect("the inbox is subscribed first")
        .to_owned();
    let reply = |out: &mut Vec<u8>, _: usize, reply: Reply<'_>| {
        let (inbox, n) = reply.expect("a reply subject");
        out.extend_from_slice(format!("PUB s {inbox}{n} 1\r\nx\r\n").as_bytes());
        Ok(())
    };
    let mut numbers = Vec::new();
    for _ in 0..3 {
        numbers.push(
            publisher
                .queue(Duration::from_secs(5), reply)
                .await
                .unwrap(),
        );
        assert_eq!(
            line(&mut sock).await,
            format!("PUB s {inbox}{} 1", numbers.len())
        );
        assert_eq!(line(&mut sock).await, "x");
    }
    // Three awaited: a fourth waits for room, here in vain.
    let full = publisher.queue(Duration::from_millis(50), reply).await;
    assert!(full.is_err_and(|e| e.is_retriable()));

    let ok = "{\"stream\":\"S\",\"seq\":1}";
    let too_big = "{\"error\":{\"code\":400,\"err_code\":10054,\"description\":\"message size exceeds maximum allowed\"}}";
    let acks = format!(
        "MSG {inbox}2 1 {}\r\n{ok}\r\nHMSG {inbox}1 1 16 16\r\nNATS/1.0 503\r\n\r\n\r\n\
         MSG {inbox}3 1 {}\r\n{too_big}\r\nMSG _INBOX.other.1 1 2\r\n{{}}\r\n",
        ok.len(),
        too_big.len()
    );
    sock.get_mut().write_all(acks.as_bytes()).await.unwrap();
    assert_eq!(publisher.outcome(2).await, Ok(()));
    assert_eq!(publisher.outcome(1).await, Err(Failed::NoResponders));
    assert_eq!(
        publisher.outcome(3).await,
        Err(Failed::Api {
            err_code: 10054,
            description: "message size exceeds maximum allowed".into()
        })
    );

    // An outcome dropped unread (the driver gave up at its deadline) lets its slot go,
    // or every slot behind it would be kept for good.
    let dropped = publisher
        .queue(Duration::from_secs(5), reply)
        .await
        .unwrap();
    let _ = (line(&mut sock).await, line(&mut sock).await);
    drop(publisher.outcome(dropped));
    assert_eq!(
        lock(&publisher.shared.acks.as_ref().unwrap().slots).held(),
        0
    );

    // Room again; then the connection goes before its PubAck: failed.
    let n = publisher
        .queue(Duration::from_secs(5), reply)
        .await
        .unwrap();
    assert_eq!(line(&mut sock).await, format!("PUB s {inbox}5 1"));
    drop(sock);
    assert!(matches!(
        publisher.outcome(n).await,
        Err(Failed::Sink(SinkError::Retriable(_)))
    ));
}

#[test]
fn losses_and_refusals_are_counted() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A current-thread runtime: the publisher's task runs on this thread, under the
    // recorder set for it.
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let (listener, publisher, mut sock) = started(Confirm::Pong).await;
            sock.get_mut()
                .write_all(b"-ERR 'Permissions Violation for Publish to \"x\"'\r\nPING\r\n")
                .await
                .unwrap();
            assert_eq!(
                line(&mut sock).await,
                "PONG",
                "still connected after the -ERR"
            );
            drop(sock);
            // Garbage from the server ends the connection as a protocol error; the
            // publisher connects again.
            let mut again = accept(&listener).await;
            again.get_mut().write_all(b"HELLO THERE\r\n").await.unwrap();
            let _third = accept(&listener).await;
            drop(publisher);
        })
    });
    let text = handle.render();
    assert!(
        text.contains("amibus_nats_refused_messages_total 1"),
        "{text}"
    );
    assert!(
        text.contains("amibus_nats_disconnects_total{reason=\"closed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("amibus_nats_disconnects_total{reason=\"protocol\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_server_that_stops_reading_makes_queue_refuse_not_grow() {
    let (_listener, publisher, sock) = started(Confirm::Pong).await;
    // The server reads nothing more: the socket buffers fill, then the queue's 8 MiB.
    let big = vec![b'x'; 1 << 20];
    let mut refused = None;
    for _ in 0..64 {
        let put = |out: &mut Vec<u8>, _: usize, _: Reply<'_>| {
            out.extend_from_slice(&big);
            Ok(())
        };
        if let Err(e) = publisher.queue(Duration::from_millis(200), put).await {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("64 MiB queued into a server that reads nothing");
    assert!(e.is_retriable(), "{e:?}");
    assert!(lock(&publisher.shared.queue).bytes.len() <= MAX_QUEUED + (1 << 20));
    drop(sock);
}
