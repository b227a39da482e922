//! Format 1 of a segment record's metadata: a list of bus headers, read only to drain a spool
//! an older amibus wrote (see [`super::segment`] for both formats).
//!
//! This is the one place a header is parsed back into typed metadata, once per record of an
//! old spool. Names the pipeline never wrote (and `schema`, which is a constant) are dropped; a
//! number that does not parse reads as 0, as a missing one does.

use bytes::{Buf, Bytes};

use super::{GapRange, Kind, Meta};
use crate::model::json;

/// The headers after a format 1 record's `count`, as [`Meta`]; `None` if they do not fit.
pub(super) fn decode_headers(body: &mut Bytes, count: u16) -> Option<Meta> {
    let mut meta = Meta::default();
    let (mut gap_epoch, mut gap_first, mut gap_last) = (None, None, None);
    for _ in 0..count {
        if body.remaining() < 2 {
            return None;
        }
        let name_len = body.get_u16_le() as usize;
        if body.remaining() < name_len + 4 {
            return None;
        }
        let name = body.split_to(name_len);
        let value_len = body.get_u32_le() as usize;
        if body.remaining() < value_len {
            return None;
        }
        let value = body.split_to(value_len);
        let num = || -> u64 {
            std::str::from_utf8(&value)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        match &name[..] {
            b"server" => meta.server = value,
            b"event" => meta.event = value,
            b"class" => meta.class = value,
            b"kind" => meta.kind = kind_named(&value),
            b"epoch" => meta.epoch = num(),
            b"seq" => meta.seq = num(),
            b"snapshot" => meta.snapshot = Some(value),
            b"gap_epoch" => gap_epoch = Some(num()),
            b"gap_first_seq" => gap_first = Some(num()),
            b"gap_last_seq" => gap_last = Some(num()),
            _ => {}
        }
    }
    if let (Some(epoch), Some(first_seq), Some(last_seq)) = (gap_epoch, gap_first, gap_last)
        && first_seq <= last_seq
    {
        meta.gap = Some(GapRange {
            epoch,
            first_seq,
            last_seq,
        });
    }
    Some(meta)
}

/// The kind whose `kind` header value is `name`; `Unspecified` if none is.
fn kind_named(name: &[u8]) -> Kind {
    (0..)
        .map_while(|i| Kind::try_from(i).ok())
        .find(|&k| json::kind_name(k).as_bytes() == name)
        .unwrap_or(Kind::Unspecified)
}

/// Format 1's writer, kept to test that what it wrote is still read: `meta`'s bus headers, in
/// the order the pipeline wrote them then (the order of [`Meta::each_header`]).
#[cfg(test)]
pub(super) fn encode(id: u64, key: &[u8], meta: &Meta, payload: &[u8], out: &mut Vec<u8>) {
    use bytes::BufMut;
    let start = crate::durable::begin_frame(out);
    out.put_u64_le(id);
    out.put_u32_le(key.len() as u32);
    out.put_slice(key);
    let count_at = out.len();
    out.put_u16_le(0);
    let mut count = 0u16;
    meta.each_header(|name, value| {
        out.put_u16_le(name.len() as u16);
        out.put_slice(name.as_bytes());
        out.put_u32_le(value.len() as u32);
        out.put_slice(value);
        count += 1;
    });
    out[count_at..count_at + 2].copy_from_slice(&count.to_le_bytes());
    out.put_slice(payload);
    crate::durable::end_frame(out, start);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_found_by_its_header_value() {
        for k in (0..).map_while(|i| Kind::try_from(i).ok()) {
            assert_eq!(kind_named(json::kind_name(k).as_bytes()), k);
        }
        assert_eq!(kind_named(b"no such kind"), Kind::Unspecified);
    }

    #[test]
    fn headers_become_typed_metadata() {
        let meta = Meta {
            server: Bytes::from_static(b"pbx1"),
            event: Bytes::from_static(b"Newchannel"),
            kind: Kind::Gap,
            class: Bytes::from_static(b"amibus"),
            epoch: 7,
            seq: 0,
            snapshot: Some(Bytes::from_static(b"s-1")),
            gap: Some(GapRange {
                epoch: 6,
                first_seq: 3,
                last_seq: 5,
            }),
        };
        let mut framed = Vec::new();
        encode(1, b"", &meta, b"payload", &mut framed);
        // The body: past the frame head, the id, the key length and the header count.
        let count = u16::from_le_bytes([framed[8 + 12], framed[8 + 13]]);
        let raw = framed[8 + 14..].to_vec();
        let mut body = Bytes::from(raw);
        let got = decode_headers(&mut body, count).expect("decodes");
        assert_eq!(got, meta);
        assert_eq!(&body[..], b"payload", "the payload is what follows");
        // A count beyond the bytes there: not a record.
        let mut short = Bytes::from_static(b"\x06\x00server");
        assert_eq!(decode_headers(&mut short, 1), None);
    }
}
