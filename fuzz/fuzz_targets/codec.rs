//! `AmiCodec` as a `FramedRead` drives it: `decode` after each read, `decode_eof` until it
//! returns `None` at the end. No panic, no stream error, bounded buffering, the buffer empty at
//! the end, and one read and the chosen reads give the same items (see `common.rs`).
#![no_main]

#[path = "common.rs"]
mod common;

use amibus::ami::{AmiCodec, Decoded, Limits, Parser};
use bytes::BytesMut;
use common::{Item, Reads};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fn item(d: Decoded) -> Item {
    match d {
        Decoded::Frame(f) => {
            assert_eq!(f.bytes().as_ref(), f.frame().raw());
            Item::frame(&f.frame())
        }
        Decoded::Error(e) => Item::Error(e),
        Decoded::Truncated { bytes } => Item::Truncated(bytes),
    }
}

fn run(input: &[u8], limits: Limits, mut reads: Option<Reads>) -> Vec<Item> {
    let mut codec = AmiCodec::new(limits);
    let bound = Parser::new(limits).limits().max_frame_bytes + 2;
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    let mut next = 0;
    while next < input.len() {
        let n = reads.as_mut().map_or(input.len(), Reads::next_len);
        let end = (next + n).min(input.len());
        buf.extend_from_slice(&input[next..end]);
        next = end;
        while let Some(d) = codec.decode(&mut buf).expect("decode never fails") {
            items.push(item(d));
        }
        assert!(buf.len() <= bound, "{} bytes buffered", buf.len());
    }
    for _ in 0..3 {
        match codec.decode_eof(&mut buf).expect("decode_eof never fails") {
            Some(d) => items.push(item(d)),
            None => {
                assert!(buf.is_empty(), "bytes left after the end");
                let stats = codec.stats();
                assert_eq!(stats.frame_bytes + stats.skipped_bytes, input.len() as u64);
                return items;
            }
        }
    }
    panic!("decode_eof does not end");
}

fuzz_target!(|data: &[u8]| {
    let (limits, reads, input) = common::split(data);
    let whole = run(input, limits, None);
    let chunked = run(input, limits, Some(reads));
    assert_eq!(whole, chunked, "reads changed the result");
});
