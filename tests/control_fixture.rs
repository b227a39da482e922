//! The real request/response pairs of `tests/fixtures/asterisk22-actions.{sent,ami}` through
//! the correlation logic: every recorded action is sent (concurrently, as the consumer does)
//! through a connection handle to a server that answers with the recorded frames, byte for
//! byte except the ActionID, which it maps from the fixture's to the one amibus chose. Every
//! response and every list item must land on the request it answers, and the consumer's result
//! mapping must carry them all.
//!
//! Actions that the consumer's rules refuse (lines over Asterisk's 1024-byte limit) are checked
//! to be refused instead; Login, Logoff and Events belong to the session and are not replayed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amibus::ami::server::{Auth, ServerConfig};
use amibus::ami::{Connection, Options, Request};
use amibus::control::RejectCode;
use amibus::control::result::fill_reply;
use amibus::control::rules::check_request;
use amibus::model::pb::{ActionHeader, ActionRequest, ActionResult};
use amibus::secret::Secret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Lines = Vec<(String, String)>;

fn lines(block: &[u8]) -> Lines {
    String::from_utf8_lossy(block)
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .map(|l| match l.split_once(": ") {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (l.to_owned(), String::new()),
        })
        .collect()
}

fn get<'a>(l: &'a Lines, key: &str) -> Option<&'a str> {
    l.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
}

fn blocks(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some(i) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let b = &rest[..i];
        // An empty line between frames (QueueRule) leaves a leading CRLF.
        let b = b.strip_prefix(b"\r\n").unwrap_or(b);
        if !b.is_empty() {
            out.push(b);
        }
        rest = &rest[i + 4..];
    }
    out
}

/// The content of an action without its ActionID: what identifies it on the wire.
fn content(l: &Lines) -> Lines {
    l.iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("ActionID"))
        .cloned()
        .collect()
}

const SKIP: [&str; 4] = ["Login", "Logoff", "Events", "Challenge"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_pairs_land_on_their_requests() {
    let sent = std::fs::read("tests/fixtures/asterisk22-actions.sent").unwrap();
    let ami = std::fs::read("tests/fixtures/asterisk22-actions.ami").unwrap();
    let banner_end = ami.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    let frames: Vec<Vec<u8>> = blocks(&ami[banner_end..])
        .into_iter()
        .map(<[u8]>::to_vec)
        .collect();

    // The actions to replay, and the ones the rules refuse.
    let mut to_send: Vec<(String, Lines)> = Vec::new();
    let mut refused = 0;
    for b in blocks(&sent) {
        let l = lines(b);
        let (Some(id), Some(name)) = (get(&l, "ActionID"), get(&l, "Action")) else {
            continue;
        };
        if SKIP.iter().any(|s| s.eq_ignore_ascii_case(name)) {
            continue;
        }
        let req = ActionRequest {
            request_id: id.to_owned(),
            server: "pbx".into(),
            action: name.to_owned(),
            headers: content(&l)
                .into_iter()
                .skip(1)
                .map(|(key, value)| ActionHeader { key, value })
                .collect(),
            deadline_ns: 1,
            ..ActionRequest::default()
        };
        match check_request(&req) {
            Ok(_) => to_send.push((id.to_owned(), content(&l))),
            Err(e) => {
                assert_eq!(e.code, RejectCode::InvalidHeader, "{id}: {}", e.reason);
                refused += 1;
            }
        }
    }
    assert!(to_send.len() > 2000, "{}", to_send.len());
    assert!(refused > 0, "the recording has over-long lines");

    // Expected frames per fixture id, in wire order.
    let sendable: Arc<HashMap<String, Lines>> = Arc::new(to_send.iter().cloned().collect());
    let mut expected: HashMap<String, Vec<Lines>> = HashMap::new();
    for f in &frames {
        let l = lines(f);
        if let Some(id) = get(&l, "ActionID")
            && sendable.contains_key(id)
            // Responses, list items and completions; not broadcast events that copy an
            // ActionID (UserEvent). List items have no Privilege, except Status (`Call`).
            && (l[0].0 == "Response" || matches!(get(&l, "Privilege"), None | Some("Call")))
        {
            expected.entry(id.to_owned()).or_default().push(content(&l));
        }
    }

    // The server: maps each received action to an unmatched recorded one with the same
    // content, then streams the recording in order, holding back at any frame whose action
    // has not arrived yet.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut pool: HashMap<Lines, VecDeque<String>> = HashMap::new();
    for (id, l) in &to_send {
        pool.entry(l.clone()).or_default().push_back(id.clone());
    }
    let all_ids: std::collections::HashSet<String> = blocks(&sent)
        .iter()
        .filter_map(|b| get(&lines(b), "ActionID").map(str::to_owned))
        .collect();
    let mapping: Arc<Mutex<HashMap<String, String>>> = Arc::default(); // client id → fixture id
    let server_map = mapping.clone();
    let server_sendable = sendable.clone();
    let server = tokio::spawn(async move {
        let sendable = server_sendable;
        let (mut sock, _) = listener.accept().await.unwrap();
        sock.write_all(b"Asterisk Call Manager/11.0.0\r\n")
            .await
            .unwrap();
        let mut fixture_to_client: HashMap<String, String> = HashMap::new();
        let mut cursor = 0;
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        loop {
            let n = match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            let mut out = Vec::new();
            while let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let action: Vec<u8> = buf.drain(..i + 4).collect();
                let l = lines(&action);
                let cid = get(&l, "ActionID").unwrap_or_default().to_owned();
                let name = get(&l, "Action").unwrap_or_default();
                if name.eq_ignore_ascii_case("Login") {
                    out.extend_from_slice(
                        format!("Response: Success\r\nActionID: {cid}\r\nMessage: Authentication accepted\r\n\r\n").as_bytes(),
                    );
                    continue;
                }
                if name.eq_ignore_ascii_case("Logoff") {
                    out.extend_from_slice(
                        format!("Response: Goodbye\r\nActionID: {cid}\r\n\r\n").as_bytes(),
                    );
                    continue;
                }
                let fid = pool
                    .get_mut(&content(&l))
                    .and_then(VecDeque::pop_front)
                    .unwrap_or_else(|| panic!("an action not in the recording: {l:?}"));
                server_map.lock().unwrap().insert(cid.clone(), fid.clone());
                fixture_to_client.insert(fid, cid);
            }
            while let Some(f) = frames.get(cursor) {
                let l = lines(f);
                match get(&l, "ActionID") {
                    None => out.extend_from_slice(f),
                    Some(fid) => match fixture_to_client.get(fid) {
                        Some(cid) => {
                            let old = format!("ActionID: {fid}");
                            let new = format!("ActionID: {cid}");
                            let text: Vec<&[u8]> = f.split(|&b| b == b'\n').collect();
                            let mut rewritten = Vec::with_capacity(f.len() + 32);
                            for (i, line) in text.iter().enumerate() {
                                if i > 0 {
                                    rewritten.push(b'\n');
                                }
                                let bare = line.strip_suffix(b"\r").unwrap_or(line);
                                if bare == old.as_bytes() {
                                    rewritten.extend_from_slice(new.as_bytes());
                                    if bare.len() != line.len() {
                                        rewritten.push(b'\r');
                                    }
                                } else {
                                    rewritten.extend_from_slice(line);
                                }
                            }
                            out.extend_from_slice(&rewritten);
                        }
                        // Waiting for this frame's action.
                        None if sendable.contains_key(fid) => break,
                        // An action of the session (Login, Events, Logoff) or a refused one.
                        None if all_ids.contains(fid) => {
                            cursor += 1;
                            continue;
                        }
                        None => out.extend_from_slice(f),
                    },
                }
                out.extend_from_slice(b"\r\n\r\n");
                cursor += 1;
            }
            if !out.is_empty() && sock.write_all(&out).await.is_err() {
                return;
            }
        }
    });

    let mut cfg = ServerConfig::new("pbx", "127.0.0.1", port, "bench", Secret::new("x"));
    cfg.auth = Auth::Plain;
    // The scripted server answers the recording's actions in order; a snapshot's would take
    // their answers (snapshots are tested in tests/snapshot.rs).
    cfg.snapshot.lists.clear();
    let (tx, mut rx) = amibus::ami::handoff::channel(1 << 20);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let stop = CancellationToken::new();
    let opts = Options {
        command_queue: 4096,
        max_in_flight: 4096,
        ..Options::default()
    };
    let conn = Connection::spawn(Arc::new(cfg), tx, stop.clone(), opts);
    let mut tasks = tokio::task::JoinSet::new();
    for (id, l) in to_send.iter().cloned() {
        let handle = conn.handle.clone();
        tasks.spawn(async move {
            let mut action = amibus::ami::Action::new(l[0].1.clone());
            action.headers = l[1..].to_vec();
            let reply = handle
                .request(Request::new(action, Duration::from_secs(60)))
                .await
                .unwrap_or_else(|e| panic!("{id}: {e}"));
            (l, reply)
        });
    }
    let mut checked = 0;
    let mut items = 0;
    while let Some(done) = tasks.join_next().await {
        let (sent_content, reply) = done.unwrap();
        let cid =
            String::from_utf8(reply.response.frame().get("ActionID").unwrap().to_vec()).unwrap();
        let fid = mapping.lock().unwrap().get(&cid).cloned().expect("mapped");
        // The reply belongs to a request with exactly this content.
        assert_eq!(sendable[fid.as_str()], sent_content, "{fid}");
        let mut got = vec![content(&lines(reply.response.bytes()))];
        got.extend(reply.events.iter().map(|f| content(&lines(f.bytes()))));
        let want = &expected[&fid];
        assert_eq!(
            &got, want,
            "{fid}: every response and list item, nothing else"
        );
        for f in std::iter::once(&reply.response).chain(&reply.events) {
            assert_eq!(f.frame().get("ActionID"), Some(cid.as_bytes()));
        }
        // The consumer's result carries the same frames.
        let mut result = ActionResult::default();
        fill_reply(&mut result, reply);
        assert_eq!(result.events.len(), got.len() - 1);
        assert_eq!(result.action_id, cid);
        items += result.events.len();
        checked += 1;
    }
    assert_eq!(checked, to_send.len());
    assert!(items > 1000, "{items} list items");
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.task).await;
    server.abort();
    drain.abort();
}
