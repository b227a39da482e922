use super::*;

#[test]
fn commits_follow_the_lowest_offset_not_done() {
    let mut o = Offsets::default();
    for off in 10..15 {
        o.received("t", 0, off);
    }
    o.received("t", 1, 3);
    assert_eq!(o.pending(), [("t".into(), 0, 10), ("t".into(), 1, 3)]);
    o.committed(&o.pending());
    assert!(o.pending().is_empty());
    // 12 and 11 finish first: nothing can be committed past 10.
    assert!(!o.done("t", 0, 12));
    assert!(!o.done("t", 0, 11));
    assert!(o.pending().is_empty());
    // 10 finishes: the floor jumps to 13.
    assert!(o.done("t", 0, 10));
    assert_eq!(o.pending(), [("t".into(), 0, 13)]);
    o.committed(&o.pending());
    assert!(!o.done("t", 0, 14));
    assert!(o.done("t", 0, 13));
    assert_eq!(o.pending(), [("t".into(), 0, 15)]);
    // The other partition is independent.
    assert!(o.done("t", 1, 3));
    assert_eq!(o.pending(), [("t".into(), 0, 15), ("t".into(), 1, 4)]);
}

#[test]
fn gaps_in_offsets_and_unknown_acks() {
    let mut o = Offsets::default();
    o.received("t", 0, 5);
    o.received("t", 0, 9); // 6..8 were compacted away
    assert!(o.done("t", 0, 5));
    assert_eq!(o.pending(), [("t".into(), 0, 9)]);
    assert!(!o.done("t", 0, 7), "never received");
    assert!(!o.done("t", 3, 1), "unknown partition");
    o.forget("t", 0);
    assert!(!o.done("t", 0, 9), "revoked meanwhile");
    assert!(o.pending().is_empty());
}

#[test]
fn topic_names() {
    assert!(is_topic_name("amibus.results-1_a"));
    for bad in ["", ".", "..", "a b", "a/b", "é"] {
        assert!(!is_topic_name(bad), "{bad:?}");
    }
    assert!(!is_topic_name(&"x".repeat(250)));
}
