//! Shared by the fuzz targets: how an input picks its limits and its reads.
//!
//! The first four bytes steer, the rest is the stream:
//! - `ctl[0] & 3 == 0` keeps the default limits; otherwise the frame limit is `ctl[1]` scaled by
//!   `ctl[0] >> 2` (so 0..=16,320 bytes; the parser clamps tiny ones) and the header limit is
//!   `ctl[2] & 31`;
//! - `ctl[3]` seeds the read sizes: its low nibble picks the largest read, the rest varies them.

use amibus::ami::{Known, Limits};

const KNOWN: [Known; 8] = [
    Known::Channel,
    Known::Uniqueid,
    Known::Linkedid,
    Known::ActionId,
    Known::Privilege,
    Known::Timestamp,
    Known::Extension,
    Known::PrefixedLinkedid,
];

fn is(key: &[u8], k: Known) -> bool {
    let named = |name: &str| key.eq_ignore_ascii_case(name.as_bytes());
    match k {
        Known::Channel => named("Channel"),
        Known::Uniqueid => named("Uniqueid"),
        Known::Linkedid => named("Linkedid"),
        Known::ActionId => named("ActionID"),
        Known::Privilege => named("Privilege"),
        Known::Timestamp => named("Timestamp"),
        Known::Extension => named("Extension"),
        Known::PrefixedLinkedid => {
            key.len() > 8 && key[key.len() - 8..].eq_ignore_ascii_case(b"Linkedid")
        }
    }
}

pub fn split(data: &[u8]) -> (Limits, Reads, &[u8]) {
    let (head, input) = data.split_at(data.len().min(4));
    let mut ctl = [0u8; 4];
    ctl[..head.len()].copy_from_slice(head);
    let limits = if ctl[0] & 3 == 0 {
        Limits::default()
    } else {
        Limits {
            max_frame_bytes: usize::from(ctl[1]) * (usize::from(ctl[0] >> 2) + 1),
            max_headers: usize::from(ctl[2] & 31),
        }
    };
    const LARGEST: [u32; 16] = [1, 1, 2, 2, 3, 4, 5, 7, 8, 13, 16, 31, 64, 100, 512, 4096];
    let reads = Reads {
        state: u32::from(ctl[3]).wrapping_mul(0x9E37_79B9) | 1,
        largest: LARGEST[usize::from(ctl[3] & 15)],
    };
    (limits, reads, input)
}

/// A cheap, deterministic sequence of read sizes in `1..=largest`.
#[derive(Clone, Copy)]
pub struct Reads {
    state: u32,
    largest: u32,
}

impl Reads {
    pub fn next_len(&mut self) -> usize {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        (self.state % self.largest + 1) as usize
    }
}

/// An owned copy of what the parser reported, to compare two runs.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    Frame {
        kind: amibus::ami::FrameKind,
        headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        body: Option<Vec<u8>>,
        raw: Vec<u8>,
        /// The value the parser noted for each known header (checked against a search).
        known: Vec<Option<Vec<u8>>>,
    },
    Error(amibus::ami::ParseError),
    #[allow(dead_code, reason = "only the codec target ends a stream")]
    Truncated(usize),
}

impl Item {
    pub fn frame(frame: &amibus::ami::Frame<'_>) -> Item {
        Item::Frame {
            kind: frame.kind(),
            headers: frame
                .headers()
                .map(|h| (h.key.to_vec(), h.value.map(<[u8]>::to_vec)))
                .collect(),
            body: frame.body().map(<[u8]>::to_vec),
            raw: frame.raw().to_vec(),
            known: KNOWN
                .iter()
                .map(|&k| {
                    let noted = frame.known(k).map(<[u8]>::to_vec);
                    // The first header after the first line with that key and a value.
                    let searched = frame
                        .headers()
                        .skip(1)
                        .find(|h| h.value.is_some() && is(h.key, k))
                        .and_then(|h| h.value.map(<[u8]>::to_vec));
                    assert_eq!(noted, searched, "{k:?}");
                    noted
                })
                .collect(),
        }
    }
}
