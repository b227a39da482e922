use super::*;
use crate::ami::{Parsed, Parser};

fn frame(bytes: &[u8]) -> OwnedFrame {
    let mut p = Parser::default();
    match p.parse(bytes) {
        Parsed::Frame { frame, .. } => frame.to_owned(),
        other => panic!("not a frame: {other:?}"),
    }
}

fn snapshots(lists: &[&str]) -> Snapshots {
    let settings = Settings {
        lists: lists.iter().map(|s| (*s).to_owned()).collect(),
        gap_interval: Duration::from_secs(60),
        timeout: Duration::from_secs(5),
    };
    Snapshots::new(Arc::from("pbx1"), Arc::new(settings), Arc::default(), 7, 0)
}

/// Run `due` once with ActionIDs `a-1`, `a-2`, …; the record and what was written.
fn due(s: &mut Snapshots, now: Instant, gaps: u64) -> (Option<Record>, String) {
    let mut n = 0;
    let mut next = || {
        n += 1;
        format!("a-{n}")
    };
    let mut wbuf = BytesMut::new();
    let r = s.due(now, gaps, &mut next, &mut wbuf);
    (r, String::from_utf8_lossy(&wbuf).into_owned())
}

fn end(r: Routed) -> End {
    match r {
        Routed::Emit(Record::SnapshotEnd(e)) => *e,
        other => panic!("expected SnapshotEnd, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_login_snapshot_tags_items_consumes_the_rest_and_ends_complete() {
    let mut s = snapshots(&["CoreShowChannels", "BridgeList"]);
    let (begin, wrote) = due(&mut s, Instant::now(), 0);
    let Some(Record::SnapshotBegin(b)) = begin else {
        panic!("{begin:?}")
    };
    assert_eq!((b.id.as_ref(), b.trigger), ("7-1", Trigger::Login));
    assert_eq!(
        wrote,
        "Action: CoreShowChannels\r\nActionID: a-1\r\n\r\nAction: BridgeList\r\nActionID: a-2\r\n\r\n"
    );
    assert!(due(&mut s, Instant::now(), 0).0.is_none(), "once");
    let live = frame(b"Event: Newchannel\r\nPrivilege: call,all\r\n\r\n");
    assert!(matches!(s.route(live), Routed::Pass(_)));
    let start =
        b"Response: Success\r\nActionID: a-1\r\nEventList: start\r\nMessage: Channels will follow\r\n\r\n";
    assert!(matches!(s.route(frame(start)), Routed::Consumed));
    match s.route(frame(
        b"Event: CoreShowChannel\r\nActionID: a-1\r\nChannel: X\r\n\r\n",
    )) {
        Routed::Emit(Record::SnapshotItem { snapshot_id, frame }) => {
            assert_eq!(&*snapshot_id, "7-1");
            assert_eq!(frame.frame().get("Channel"), Some(&b"X"[..]));
        }
        other => panic!("{other:?}"),
    }
    let done = b"Event: CoreShowChannelsComplete\r\nActionID: a-1\r\nEventList: Complete\r\nListItems: 1\r\n\r\n";
    assert!(matches!(s.route(frame(done)), Routed::Consumed));
    let start = b"Response: Success\r\nActionID: a-2\r\nEventList: start\r\n\r\n";
    assert!(matches!(s.route(frame(start)), Routed::Consumed));
    let done = b"Event: BridgeListComplete\r\nActionID: a-2\r\nEventList: Complete\r\nListItems: 0\r\n\r\n";
    let e = end(s.route(frame(done)));
    assert!(e.complete, "{e:?}");
    assert_eq!(e.reason, "");
    assert_eq!(
        e.lists
            .iter()
            .map(|l| (l.items, l.complete))
            .collect::<Vec<_>>(),
        [(1, true), (0, true)]
    );
    assert!(!s.is_active());
    let c = s.counters.snapshot();
    assert_eq!((c.login, c.items, c.incomplete), (1, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_refused_list_is_reported_and_not_asked_again_this_session() {
    let mut s = snapshots(&["QueueStatus", "CoreShowChannels"]);
    due(&mut s, Instant::now(), 0);
    let denied = b"Response: Error\r\nActionID: a-1\r\nMessage: Permission denied\r\n\r\n";
    assert!(matches!(s.route(frame(denied)), Routed::Consumed));
    let empty = b"Response: Success\r\nActionID: a-2\r\nEventList: start\r\n\r\n";
    s.route(frame(empty));
    let done = b"Event: CoreShowChannelsComplete\r\nActionID: a-2\r\nEventList: Complete\r\n\r\n";
    let e = end(s.route(frame(done)));
    assert!(!e.complete);
    assert_eq!(e.reason, "refused: QueueStatus");
    assert_eq!(e.lists[0].error, "Permission denied");
    // A gap later: the refused list is reported again without being asked.
    let later = Instant::now() + Duration::from_secs(61);
    let (begin, wrote) = due(&mut s, later, 1);
    assert!(matches!(&begin, Some(Record::SnapshotBegin(b)) if b.trigger == Trigger::Gap));
    assert_eq!(wrote, "Action: CoreShowChannels\r\nActionID: a-1\r\n\r\n");
}

#[tokio::test(start_paused = true)]
async fn a_list_that_never_completes_ends_at_the_deadline_and_its_late_frames_are_dropped() {
    let mut s = snapshots(&["CoreShowChannels"]);
    let t0 = Instant::now();
    due(&mut s, t0, 0);
    s.route(frame(
        b"Response: Success\r\nActionID: a-1\r\nEventList: start\r\n\r\n",
    ));
    assert_eq!(s.next_wake(), Some(t0 + Duration::from_secs(5)));
    assert!(due(&mut s, t0 + Duration::from_secs(4), 0).0.is_none());
    let (r, _) = due(&mut s, t0 + Duration::from_secs(5), 0);
    let Some(Record::SnapshotEnd(e)) = r else {
        panic!("{r:?}")
    };
    assert!(!e.complete);
    assert_eq!(e.reason, "timeout");
    assert_eq!(e.lists[0].error, "timeout");
    // Late items are not published as live events; the completion releases the id.
    let late = b"Event: CoreShowChannel\r\nActionID: a-1\r\n\r\n";
    assert!(matches!(s.route(frame(late)), Routed::Consumed));
    let done = b"Event: CoreShowChannelsComplete\r\nActionID: a-1\r\nEventList: Complete\r\n\r\n";
    assert!(matches!(s.route(frame(done)), Routed::Consumed));
    assert!(matches!(s.route(frame(late)), Routed::Pass(_)));
    let c = s.counters.snapshot();
    assert_eq!((c.incomplete, c.late_frames), (1, 2));
}

#[tokio::test(start_paused = true)]
async fn gaps_start_a_snapshot_at_most_once_per_interval() {
    let mut s = snapshots(&["CoreShowChannels"]);
    let t0 = Instant::now();
    due(&mut s, t0, 0);
    s.abort("eof");
    // A gap right after the login snapshot waits for the interval, then starts one.
    assert!(due(&mut s, t0 + Duration::from_secs(1), 1).0.is_none());
    assert_eq!(s.next_wake(), Some(t0 + Duration::from_secs(60)));
    let (r, _) = due(&mut s, t0 + Duration::from_secs(60), 1);
    assert!(matches!(&r, Some(Record::SnapshotBegin(b)) if b.trigger == Trigger::Gap));
    s.abort("eof");
    // No new gap: nothing more.
    assert!(due(&mut s, t0 + Duration::from_secs(200), 1).0.is_none());
    assert_eq!(s.next_wake(), None);
}

#[tokio::test(start_paused = true)]
async fn a_session_that_ends_ends_its_snapshot_incomplete() {
    let mut s = snapshots(&["CoreShowChannels"]);
    due(&mut s, Instant::now(), 0);
    s.route(frame(
        b"Response: Success\r\nActionID: a-1\r\nEventList: start\r\n\r\n",
    ));
    s.route(frame(b"Event: CoreShowChannel\r\nActionID: a-1\r\n\r\n"));
    let Some(Record::SnapshotEnd(e)) = s.abort("eof") else {
        panic!()
    };
    assert!(!e.complete);
    assert_eq!(e.reason, "connection ended: eof");
    assert_eq!(e.lists[0].items, 1);
    assert!(s.abort("eof").is_none(), "ended once");
}

#[test]
fn no_lists_no_snapshots() {
    let mut s = snapshots(&[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        assert!(due(&mut s, Instant::now(), 0).0.is_none());
        assert!(due(&mut s, Instant::now(), 5).0.is_none());
        assert_eq!(s.next_wake(), None);
    });
}
