//! A spool record: what the pipeline hands to the sinks, its metadata typed.
//!
//! Owns: [`Record`] and [`Meta`], and the one rendering of `Meta` as bus headers
//! ([`Meta::each_header`]), which every sink uses. Nothing parses a header back into a number:
//! the spool reads (server, epoch, seq) and gap ranges from `Meta` (damage inference, what
//! drop_oldest lost), and the pipeline's loss accounting does too.
//!
//! Bus headers, in this order: `server`, `event` (the normalized event name, the response
//! value, or the synthetic kind), `kind`, `class` (the first privilege class, `amibus` for
//! synthetic records), `schema` (`amibus.v1`), `epoch` and `seq` (decimal); `snapshot` on a
//! snapshot's items and its begin and end records; `gap_epoch`, `gap_first_seq` and
//! `gap_last_seq` on a gap record.

use std::borrow::Cow;

use bytes::Bytes;

use crate::model::{SCHEMA_VERSION, json, pb};

/// The kind of a record (the envelope's `kind`).
pub type Kind = pb::Kind;

/// One record: a partition key, its metadata, and the payload (an encoded envelope).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub key: Bytes,
    pub meta: Meta,
    pub payload: Bytes,
}

/// What a record is and where it stands in its server's numbering.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// The server's configured name.
    pub server: Bytes,
    /// The normalized event name, the response value, or the synthetic kind's name.
    pub event: Bytes,
    pub kind: Kind,
    /// The first privilege class (`call`); `amibus` for records amibus makes.
    pub class: Bytes,
    /// The connection epoch the record was read in.
    pub epoch: u64,
    /// The record's place in its epoch; 0 for records outside a connection's numbering (the
    /// pipeline's gap records for what the spool dropped).
    pub seq: u64,
    /// The snapshot id, on a snapshot's items and its begin and end records.
    pub snapshot: Option<Bytes>,
    /// The range a gap record names.
    pub gap: Option<GapRange>,
}

/// The seqs a gap record names: `first_seq..=last_seq` of `epoch` (of the record's server).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GapRange {
    pub epoch: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// Every header name [`Meta::each_header`] can write, in its order.
pub const HEADER_NAMES: [&str; 11] = [
    "server",
    "event",
    "kind",
    "class",
    "schema",
    "epoch",
    "seq",
    "snapshot",
    "gap_epoch",
    "gap_first_seq",
    "gap_last_seq",
];

impl Meta {
    /// The `kind` header's value (`event`, `gap`, ...).
    pub fn kind_name(&self) -> &'static str {
        json::kind_name(self.kind)
    }

    /// Call `f` with each bus header, in the order of the module docs. Numbers are formatted on
    /// the stack: nothing is allocated.
    pub fn each_header(&self, mut f: impl FnMut(&'static str, &[u8])) {
        f("server", &self.server);
        f("event", &self.event);
        f("kind", self.kind_name().as_bytes());
        f("class", &self.class);
        f("schema", SCHEMA_VERSION.as_bytes());
        let mut n = itoa::Buffer::new();
        f("epoch", n.format(self.epoch).as_bytes());
        f("seq", n.format(self.seq).as_bytes());
        if let Some(id) = &self.snapshot {
            f("snapshot", id);
        }
        if let Some(g) = self.gap {
            f("gap_epoch", n.format(g.epoch).as_bytes());
            f("gap_first_seq", n.format(g.first_seq).as_bytes());
            f("gap_last_seq", n.format(g.last_seq).as_bytes());
        }
    }

    /// The value of the header `name`, if this record has it (sink templates; tests).
    pub fn header(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        let num = |v: u64| {
            Some(Cow::Owned(
                itoa::Buffer::new().format(v).as_bytes().to_vec(),
            ))
        };
        match name {
            "server" => Some(Cow::Borrowed(&self.server[..])),
            "event" => Some(Cow::Borrowed(&self.event[..])),
            "kind" => Some(Cow::Borrowed(self.kind_name().as_bytes())),
            "class" => Some(Cow::Borrowed(&self.class[..])),
            "schema" => Some(Cow::Borrowed(SCHEMA_VERSION.as_bytes())),
            "epoch" => num(self.epoch),
            "seq" => num(self.seq),
            "snapshot" => self.snapshot.as_deref().map(Cow::Borrowed),
            "gap_epoch" => self.gap.and_then(|g| num(g.epoch)),
            "gap_first_seq" => self.gap.and_then(|g| num(g.first_seq)),
            "gap_last_seq" => self.gap.and_then(|g| num(g.last_seq)),
            _ => None,
        }
    }

    /// Every header as owned pairs (allocates: for tests and tools; the sinks use
    /// [`Meta::each_header`]).
    pub fn headers(&self) -> Vec<(&'static str, Bytes)> {
        let mut out = Vec::with_capacity(HEADER_NAMES.len());
        self.each_header(|name, value| out.push((name, Bytes::copy_from_slice(value))));
        out
    }

    /// The same metadata owning its bytes (not slices of a larger buffer they would keep alive).
    pub fn detached(&self) -> Meta {
        Meta {
            server: Bytes::copy_from_slice(&self.server),
            event: Bytes::copy_from_slice(&self.event),
            class: Bytes::copy_from_slice(&self.class),
            snapshot: self.snapshot.as_deref().map(Bytes::copy_from_slice),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            server: Bytes::from_static(b"pbx1"),
            event: Bytes::from_static(b"Newchannel"),
            kind: Kind::Event,
            class: Bytes::from_static(b"call"),
            epoch: 7,
            seq: 12,
            snapshot: None,
            gap: None,
        }
    }

    fn rendered(m: &Meta) -> Vec<(&'static str, String)> {
        m.headers()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8(v.to_vec()).expect("utf-8")))
            .collect()
    }

    #[test]
    fn headers_render_in_their_documented_order() {
        let names: Vec<_> = rendered(&meta()).into_iter().collect();
        assert_eq!(
            names,
            [
                ("server", "pbx1"),
                ("event", "Newchannel"),
                ("kind", "event"),
                ("class", "call"),
                ("schema", "amibus.v1"),
                ("epoch", "7"),
                ("seq", "12"),
            ]
            .map(|(k, v)| (k, v.to_owned()))
        );
        let gap = Meta {
            kind: Kind::Gap,
            seq: 0,
            snapshot: Some(Bytes::from_static(b"s-1")),
            gap: Some(GapRange {
                epoch: 6,
                first_seq: 3,
                last_seq: 5,
            }),
            ..meta()
        };
        let all = rendered(&gap);
        assert_eq!(
            all.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            HEADER_NAMES,
            "every name, in HEADER_NAMES's order"
        );
        assert_eq!(
            all[7..],
            [
                ("snapshot", "s-1"),
                ("gap_epoch", "6"),
                ("gap_first_seq", "3"),
                ("gap_last_seq", "5"),
            ]
            .map(|(k, v)| (k, v.to_owned()))
        );
    }

    #[test]
    fn header_by_name_agrees_with_the_rendering() {
        let m = Meta {
            snapshot: Some(Bytes::from_static(b"s-9")),
            gap: Some(GapRange {
                epoch: 1,
                first_seq: 2,
                last_seq: 3,
            }),
            ..meta()
        };
        for (name, value) in m.headers() {
            assert_eq!(m.header(name).as_deref(), Some(&value[..]), "{name}");
        }
        assert_eq!(m.header("nope"), None);
        assert_eq!(meta().header("snapshot"), None);
        assert_eq!(meta().header("gap_epoch"), None);
    }

    #[test]
    fn detached_metadata_is_equal_and_owns_its_bytes() {
        let buf = Bytes::from_static(b"pbx1Newchannelcall");
        let m = Meta {
            server: buf.slice(0..4),
            event: buf.slice(4..14),
            class: buf.slice(14..),
            ..meta()
        };
        let d = m.detached();
        assert_eq!(d, m);
        assert_ne!(d.server.as_ptr(), m.server.as_ptr());
    }
}
