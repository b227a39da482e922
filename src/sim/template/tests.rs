use super::*;
use std::collections::HashMap;

#[test]
fn events_are_framed_and_patches_inside_their_event() {
    for kind in CallKind::ALL {
        let t = render(
            kind,
            &Caller {
                name: b"Alice",
                num: 1001,
            },
        );
        let mut prev = 0;
        for e in &t.events {
            assert_eq!(e.start, prev);
            let bytes = &t.bytes[e.start as usize..e.end as usize];
            assert!(bytes.starts_with(b"Event: "));
            assert!(bytes.ends_with(b"\r\n\r\n"));
            assert_eq!(
                memchr::memmem::find(bytes, b"\r\n\r\n"),
                Some(bytes.len() - 4)
            );
            for p in &t.patches[e.patch_lo as usize..e.patch_hi as usize] {
                assert!(p.off >= e.start && (p.off as usize + p.kind.width()) <= e.end as usize);
            }
            prev = e.end;
        }
        assert_eq!(prev as usize, t.bytes.len());
    }
}

#[test]
fn mix_resembles_recording() {
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut total = 0usize;
    let mut sizes = Vec::new();
    for kind in CallKind::ALL {
        let t = render(
            kind,
            &Caller {
                name: b"Alice Smith",
                num: 1001,
            },
        );
        for e in &t.events {
            let bytes = &t.bytes[e.start as usize..e.end as usize];
            let line = bytes.split(|&b| b == b'\r').next().unwrap();
            let name = String::from_utf8_lossy(&line[7..]).into_owned();
            *counts.entry(name).or_default() += kind.weight() as usize;
            total += kind.weight() as usize;
            for _ in 0..kind.weight() {
                sizes.push(bytes.len());
            }
        }
    }
    let share = |n: &str| counts.get(n).copied().unwrap_or(0) as f64 / total as f64;
    // Recording: VarSet 24 %, Newexten 19 %, CEL 15 %.
    assert!(
        (0.15..0.32).contains(&share("VarSet")),
        "VarSet {}",
        share("VarSet")
    );
    assert!(
        (0.12..0.26).contains(&share("Newexten")),
        "Newexten {}",
        share("Newexten")
    );
    assert!((0.10..0.22).contains(&share("CEL")), "CEL {}", share("CEL"));
    sizes.sort_unstable();
    let median = sizes[sizes.len() / 2];
    assert!((400..750).contains(&median), "median {median}");
}
