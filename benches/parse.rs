//! Parser, normalizer and encoder throughput on the real recordings and a larger stream built
//! from them, next to a floor on the same bytes: a bare memchr line split into key/value slices,
//! the least work any AMI parser must do. Report results as ratios to that floor.
//!
//! `cargo bench --bench parse`

use std::hint::black_box;
use std::sync::Arc;

use amibus::ami::{Classifier, Limits, Parsed, Parser, Stamp};
use amibus::model;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[path = "support/floor.rs"]
mod floor;
use floor::floor;

fn for_each_frame(input: &[u8], f: impl FnMut(&amibus::ami::Frame<'_>)) -> usize {
    for_each_frame_with(Classifier::detect(), input, f)
}

fn for_each_frame_with(
    classifier: Classifier,
    input: &[u8],
    mut f: impl FnMut(&amibus::ami::Frame<'_>),
) -> usize {
    let mut parser = Parser::with_classifier(Limits::default(), classifier);
    let mut at = 0;
    let mut frames = 0;
    loop {
        match parser.parse(&input[at..]) {
            Parsed::Frame { frame, consumed } => {
                f(&frame);
                frames += 1;
                at += consumed;
            }
            Parsed::Skip { consumed, .. } => at += consumed,
            Parsed::Partial => return frames,
        }
    }
}

fn stamp() -> Stamp {
    Stamp {
        server: Arc::from("pbx-01"),
        epoch: 1_795_671_272_000,
        seq: 1,
        received_at_ns: 1_795_671_272_000_000_000,
    }
}

fn inputs() -> Vec<(&'static str, Vec<u8>)> {
    let events = fixture("asterisk22-events.ami");
    let actions = fixture("asterisk22-actions.ami");
    // A larger stream: the event recording's frames eight times over (about 33 MB).
    let body = events
        .iter()
        .position(|&b| b == b'\n')
        .map_or(&events[..], |i| &events[i + 1..]);
    let mut storm = Vec::with_capacity(body.len() * 8);
    for _ in 0..8 {
        storm.extend_from_slice(body);
    }
    vec![("events", events), ("actions", actions), ("storm", storm)]
}

fn bench(c: &mut Criterion) {
    for (name, input) in inputs() {
        let frames = for_each_frame(&input, |_| {});
        let mut g = c.benchmark_group(format!("bytes/{name}"));
        g.throughput(Throughput::Bytes(input.len() as u64));
        g.sample_size(20);
        g.bench_function("floor_memchr_split", |b| {
            b.iter(|| floor(black_box(&input)))
        });
        g.bench_function("parse", |b| {
            b.iter(|| {
                for_each_frame(black_box(&input), |f| {
                    black_box(f.len());
                })
            })
        });
        // The same parse with each classifier the CPU runs (`parse` uses the fastest).
        for classifier in Classifier::available() {
            g.bench_function(format!("parse_{}", classifier.name()), |b| {
                b.iter(|| {
                    for_each_frame_with(classifier, black_box(&input), |f| {
                        black_box(f.len());
                    })
                })
            });
        }
        g.bench_function("parse_normalize", |b| {
            b.iter(|| {
                for_each_frame(black_box(&input), |f| {
                    black_box(model::normalize(f));
                })
            })
        });
        g.finish();

        let mut g = c.benchmark_group(format!("frames/{name}"));
        g.throughput(Throughput::Elements(frames as u64));
        g.sample_size(20);
        let st = stamp();
        let mut out = Vec::with_capacity(1 << 16);
        g.bench_function("parse_normalize_encode", |b| {
            b.iter(|| {
                for_each_frame(black_box(&input), |f| {
                    out.clear();
                    let n = model::normalize(f);
                    model::encode_frame(&st, &n, f, &mut out);
                    black_box(&out);
                })
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
