//! Simulator generation throughput: events/s and bytes/s of `Generator::generate` (copy a
//! pre-rendered event, patch its fixed-width fields), against a floor that only copies the same
//! bytes (one `extend_from_slice` per event from a ready buffer). The ratio floor/generate says
//! what the patching and call interleaving cost on top of the unavoidable copy.
//!
//! Run: `cargo bench --bench sim`.

use std::hint::black_box;
use std::sync::Arc;

use amibus::sim::source::{BatchBuilder, GenConfig, Generator, Library};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const EVENTS: usize = 20_000;

fn cfg() -> GenConfig {
    GenConfig {
        seed: 1,
        epoch_us: 1_795_671_272_000_000,
        step_us: 10,
        concurrent_calls: 8,
        non_ascii_share: 0.1,
        non_utf8_share: 0.0,
        malformed_share: 0.0,
        oversized_every: None,
        oversized_bytes: 0,
    }
}

fn bench(c: &mut Criterion) {
    let lib = Arc::new(Library::build());
    // The bytes the generator makes for EVENTS events, and where each event ends.
    let mut reference = BatchBuilder::default();
    Generator::new(lib.clone(), cfg()).generate(EVENTS, &mut reference);
    let bytes = reference.buf.len() as u64;

    let mut g = c.benchmark_group("sim");
    g.throughput(Throughput::Elements(EVENTS as u64));
    let mut generator = Generator::new(lib.clone(), cfg());
    let mut out = BatchBuilder::with_capacity(reference.buf.len() + (1 << 16));
    g.bench_function("generate_events", |b| {
        b.iter(|| {
            out.buf.clear();
            out.events.clear();
            generator.generate(EVENTS, &mut out);
            black_box(out.buf.len())
        })
    });
    let mut floor = Vec::with_capacity(reference.buf.len());
    g.bench_function("memcpy_floor_events", |b| {
        b.iter(|| {
            floor.clear();
            let mut start = 0usize;
            for &(end, _) in &reference.events {
                floor.extend_from_slice(&reference.buf[start..end as usize]);
                start = end as usize;
            }
            black_box(floor.len())
        })
    });
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("generate_bytes", |b| {
        b.iter(|| {
            out.buf.clear();
            out.events.clear();
            generator.generate(EVENTS, &mut out);
            black_box(out.buf.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
