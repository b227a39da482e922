//! The floor every parser measurement is set beside: split lines with memchr and each line at
//! its first colon, the least work any AMI parser must do. Shared by `benches/parse.rs` and
//! `examples/split_floor.rs` so both measure the same thing.

use std::hint::black_box;

use memchr::{memchr, memchr_iter};

/// The number of `key: value` lines in `input`, each split into its two slices.
pub fn floor(input: &[u8]) -> usize {
    let mut start = 0;
    let mut pairs = 0;
    for nl in memchr_iter(b'\n', input) {
        let line = &input[start..nl];
        if let Some(colon) = memchr(b':', line) {
            black_box((&line[..colon], &line[colon + 1..]));
            pairs += 1;
        }
        start = nl + 1;
    }
    pairs
}
