use super::*;

fn cfg(seed: u64) -> GenConfig {
    GenConfig {
        seed,
        epoch_us: 1_795_671_272_000_000,
        step_us: 10,
        concurrent_calls: 8,
        non_ascii_share: 0.2,
        non_utf8_share: 0.0,
        malformed_share: 0.0,
        oversized_every: None,
        oversized_bytes: 0,
    }
}

#[test]
fn same_seed_same_bytes() {
    let lib = Arc::new(Library::build());
    let mut a = Generator::new(lib.clone(), cfg(7));
    let mut b = Generator::new(lib.clone(), cfg(7));
    let mut c = Generator::new(lib, cfg(8));
    let (mut oa, mut ob, mut oc) = Default::default();
    a.generate(5000, &mut oa);
    b.generate(5000, &mut ob);
    c.generate(5000, &mut oc);
    let (oa, ob, oc): (BatchBuilder, BatchBuilder, BatchBuilder) = (oa, ob, oc);
    assert_eq!(oa.buf, ob.buf);
    assert_ne!(oa.buf, oc.buf);
    assert_eq!(oa.events.len(), 5000);
}

#[test]
fn uniqueids_and_linkedids_are_consistent_per_call() {
    let lib = Arc::new(Library::build());
    let mut g = Generator::new(lib, cfg(1));
    let mut out = BatchBuilder::default();
    g.generate(20_000, &mut out);
    let mut codec = crate::ami::Parser::default();
    let mut buf: &[u8] = &out.buf;
    let mut linked: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let mut frames = 0;
    while let crate::ami::Parsed::Frame { frame, consumed } = codec.parse(buf) {
        if let (Some(u), Some(l)) = (frame.get("Uniqueid"), frame.get("Linkedid")) {
            let prev = linked.entry(u.to_vec()).or_insert_with(|| l.to_vec());
            assert_eq!(prev, &l.to_vec());
        }
        frames += 1;
        buf = &buf[consumed..];
    }
    assert_eq!(frames, 20_000);
    assert!(linked.len() > 100);
}

#[test]
fn dates_format() {
    let mut d = [0u8; 19];
    format_date(1_795_671_272, &mut d);
    assert_eq!(&d, b"2026-11-26 05:34:32");
}

#[test]
fn non_utf8_share_produces_invalid_utf8() {
    let lib = Arc::new(Library::build());
    let mut c = cfg(3);
    c.non_utf8_share = 1.0;
    let mut g = Generator::new(lib, c);
    let mut out = BatchBuilder::default();
    g.generate(200, &mut out);
    assert!(std::str::from_utf8(&out.buf).is_err());
}
