use super::*;

#[test]
fn reads_grow_under_a_flood_and_shrink_when_it_passes() {
    // Full reads double the room up to the cap.
    let mut size = READ_MIN;
    for _ in 0..10 {
        size = next_read_size(size, size, size);
    }
    assert_eq!(size, READ_MAX);
    // A read that did not fill the room but was not small keeps it.
    assert_eq!(next_read_size(READ_MAX, READ_MAX, READ_MAX / 2), READ_MAX);
    // Small reads halve it down to the floor, never below.
    for _ in 0..10 {
        size = next_read_size(size, size, 100);
    }
    assert_eq!(size, READ_MIN);
}

#[test]
fn backoff_stays_within_floor_and_cap() {
    let min = Duration::from_millis(100);
    let max = Duration::from_secs(5);
    for attempt in 0..40 {
        for v in [0, 1, u64::MAX / 3, u64::MAX] {
            let d = backoff_delay(min, max, attempt, v);
            assert!(d >= min && d <= max, "{attempt} {v} {d:?}");
            let cap = min.saturating_mul(1 << attempt.min(20)).min(max);
            assert!(d <= cap);
        }
    }
    assert_eq!(backoff_delay(min, max, 0, 12345), min);
}

#[test]
fn instance_id_is_stable_within_the_process() {
    assert_eq!(instance_id(), instance_id());
    assert_eq!(instance_id().len(), 12);
}

fn out(cap: usize) -> (Out, handoff::Receiver) {
    let (tx, rx) = handoff::channel(cap);
    (
        Out {
            server: Arc::from("s"),
            tx,
            epoch: 7,
            seq: 0,
            gaps: VecDeque::new(),
            stats: Arc::new(Stats::default()),
        },
        rx,
    )
}

fn rec() -> Record {
    Record::ConnectionDown { reason: "x".into() }
}

#[test]
fn overflow_becomes_a_gap_when_room_returns() {
    let (mut o, mut rx) = out(2);
    for _ in 0..5 {
        o.emit(rec(), 0).unwrap();
    }
    // 1 and 2 fit; 3..=5 dropped.
    assert_eq!(rx.try_recv().unwrap().stamp.seq, 1);
    assert_eq!(rx.try_recv().unwrap().stamp.seq, 2);
    o.emit(rec(), 0).unwrap(); // the gap (seq 6) goes first, then this record (seq 7)
    let g = rx.try_recv().unwrap();
    assert_eq!(g.stamp.seq, 6);
    assert_eq!(
        g.record,
        Record::Gap {
            epoch: 7,
            first_seq: 3,
            last_seq: 5,
            reason: "downstream queue full".into()
        }
    );
    assert_eq!(rx.try_recv().unwrap().stamp.seq, 7);
    let st = o.stats.snapshot();
    assert_eq!((st.dropped_records, st.gaps), (3, 1));
}

#[test]
fn a_gap_that_does_not_fit_grows() {
    let (mut o, mut rx) = out(1);
    o.emit(rec(), 0).unwrap(); // 1 delivered
    o.emit(rec(), 0).unwrap(); // 2 dropped
    assert_eq!(rx.try_recv().unwrap().stamp.seq, 1);
    o.emit(rec(), 0).unwrap(); // gap 2..=2 as seq 3 fills the queue, 4 dropped
    o.emit(rec(), 0).unwrap(); // 5 dropped: gap 4..=5
    assert_eq!(
        rx.try_recv().unwrap().record,
        Record::Gap {
            epoch: 7,
            first_seq: 2,
            last_seq: 2,
            reason: "downstream queue full".into()
        }
    );
    assert_eq!(o.gaps.len(), 1);
    assert_eq!((o.gaps[0].first, o.gaps[0].last), (4, 5));
}
