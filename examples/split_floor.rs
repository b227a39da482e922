//! The floor `amibus decode` is measured against: a bare memchr line split into key/value
//! slices (the same as `benches/parse.rs`) over a whole recording held in memory.
//!
//! `cargo run --release --example split_floor -- FILE [ROUNDS]` prints the best round in MB/s,
//! to set beside the MB/s `amibus decode --format none FILE` reports.

use std::hint::black_box;
use std::time::Instant;

#[path = "../benches/support/floor.rs"]
mod floor;
use floor::floor;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| {
        eprintln!("usage: split_floor FILE [ROUNDS]");
        std::process::exit(2)
    });
    let rounds: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(5);
    let input = std::fs::read(&path)?;
    let mut best = f64::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        black_box(floor(black_box(&input)));
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "bare split of {} bytes: best of {rounds} {:.3} s ({:.1} MB/s)",
        input.len(),
        best,
        input.len() as f64 / best / 1e6
    );
    Ok(())
}
