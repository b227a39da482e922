//! `Parser::parse` on arbitrary bytes, limits and reads (see `common.rs` for the input layout):
//! no panic; every call makes progress or says Partial; Partial is stable and leaves at most
//! `max_frame_bytes + 2` bytes buffered; frames respect the limits and are their own raw bytes;
//! one read and the chosen reads give the same items, with every classifier the CPU runs (SIMD
//! and the portable fallback).
#![no_main]

#[path = "common.rs"]
mod common;

use amibus::ami::{Classifier, Limits, Parsed, Parser};
use common::{Item, Reads};
use libfuzzer_sys::fuzz_target;

fn run(
    input: &[u8],
    limits: Limits,
    mut reads: Option<Reads>,
    classifier: Classifier,
) -> (Vec<Item>, usize) {
    let mut parser = Parser::with_classifier(limits, classifier);
    let max = parser.limits().max_frame_bytes;
    let max_headers = parser.limits().max_headers;
    let mut buf = Vec::new();
    let mut items = Vec::new();
    let mut next = 0;
    let mut calls = 0usize;
    while next < input.len() {
        let n = reads.as_mut().map_or(input.len(), Reads::next_len);
        let end = (next + n).min(input.len());
        buf.extend_from_slice(&input[next..end]);
        next = end;
        loop {
            calls += 1;
            assert!(calls <= 2 * input.len() + 8, "no progress");
            let len = buf.len();
            let consumed = match parser.parse(&buf) {
                Parsed::Frame { frame, consumed } => {
                    assert!(consumed > 0 && consumed <= len.min(max));
                    assert!(frame.len() <= max_headers);
                    assert_eq!(frame.raw(), &buf[..consumed]);
                    items.push(Item::frame(&frame));
                    consumed
                }
                Parsed::Skip { consumed, error } => {
                    assert!(consumed > 0 && consumed <= len);
                    items.extend(error.map(Item::Error));
                    consumed
                }
                Parsed::Partial => {
                    assert!(len <= max + 2, "{len} bytes buffered, limit {max}");
                    assert!(matches!(parser.parse(&buf), Parsed::Partial));
                    break;
                }
            };
            buf.drain(..consumed);
        }
    }
    (items, buf.len())
}

fuzz_target!(|data: &[u8]| {
    let (limits, reads, input) = common::split(data);
    let whole = run(input, limits, None, Classifier::swar());
    for classifier in Classifier::available() {
        let name = classifier.name();
        let chunked = run(input, limits, Some(reads), classifier);
        assert_eq!(whole, chunked, "{name}: reads or the classifier changed the result");
    }
});
