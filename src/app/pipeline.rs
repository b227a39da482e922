//! The pipeline: stamped records from the connections → envelopes → the spool.
//!
//! Owns: encoding each record (protobuf or JSON), its partition key and bus headers, and
//! turning what the spool had to drop into `gap` records, so loss is visible on the bus.
//!
//! Bus headers of every record: `server`, `event` (the normalized event name, the response
//! value, or the synthetic kind), `kind`, `class` (the first privilege class, e.g. `call`;
//! `amibus` for synthetic records), `schema` (`amibus.v1`), `epoch` and `seq` (decimal).
//!
//! Gap records made here (for records the spool dropped) carry `seq` 0: they are not part of
//! the connection's numbering; their `gap` detail names the lost epoch and sequence range.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::ami::{Record as AmiRecord, Stamp, Stamped, record};
use crate::model::{self, json, pb};
use crate::spool::{self, Appended, Spool, SpoolError};

/// What goes into the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PayloadFormat {
    /// An encoded `amibus.v1.Envelope`.
    #[default]
    Proto,
    /// The envelope as one JSON object and a newline.
    Json,
}

/// Counters of one pipeline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipelineStats {
    pub records: u64,
    pub stored: u64,
    pub dropped_newest: u64,
    pub dropped_oldest: u64,
    pub gap_records: u64,
}

/// Pipeline counters readable from other tasks (the metrics endpoint); the pipeline publishes
/// its own counters here after every batch.
#[derive(Debug, Default)]
pub struct SharedStats {
    records: std::sync::atomic::AtomicU64,
    gap_records: std::sync::atomic::AtomicU64,
}

impl SharedStats {
    pub fn publish(&self, s: &PipelineStats) {
        use std::sync::atomic::Ordering::Relaxed;
        self.records.store(s.records, Relaxed);
        self.gap_records.store(s.gap_records, Relaxed);
    }

    pub fn snapshot(&self) -> PipelineStats {
        use std::sync::atomic::Ordering::Relaxed;
        PipelineStats {
            records: self.records.load(Relaxed),
            gap_records: self.gap_records.load(Relaxed),
            ..PipelineStats::default()
        }
    }
}

/// An inclusive range of sequence numbers.
type SeqRange = (u64, u64);

/// See the module docs.
pub struct Pipeline {
    spool: Spool,
    format: PayloadFormat,
    stats: PipelineStats,
    /// Lost (server, epoch) → seq ranges not yet reported.
    lost: BTreeMap<(Arc<str>, u64), Vec<SeqRange>>,
    payload: Vec<u8>,
    key: Vec<u8>,
}

impl Pipeline {
    pub fn new(spool: Spool, format: PayloadFormat) -> Self {
        Pipeline {
            spool,
            format,
            stats: PipelineStats::default(),
            lost: BTreeMap::new(),
            payload: Vec::with_capacity(4096),
            key: Vec::with_capacity(64),
        }
    }

    pub fn stats(&self) -> PipelineStats {
        self.stats
    }

    /// Hand what was appended to the OS, so a SIGKILL loses none of it.
    ///
    /// # Errors
    /// The spool cannot be written.
    pub fn flush(&self) -> Result<(), SpoolError> {
        self.spool.flush()
    }

    /// Encode one record and append it to the spool; report anything lost so far.
    ///
    /// # Errors
    /// The spool cannot be written.
    pub fn accept(&mut self, stamped: &Stamped) -> Result<(), SpoolError> {
        self.stats.records += 1;
        let record = self.to_spool_record(stamped);
        let stored = self.append(record)?;
        if stored && !self.lost.is_empty() {
            self.report_gaps()?;
        }
        Ok(())
    }

    /// Append; returns whether the record was stored.
    fn append(&mut self, record: spool::Record) -> Result<bool, SpoolError> {
        match self.spool.append(&record)? {
            Appended::Stored { .. } => {
                self.stats.stored += 1;
                Ok(true)
            }
            Appended::DroppedNewest => {
                self.stats.dropped_newest += 1;
                self.remember_lost(&record);
                Ok(false)
            }
            Appended::StoredDroppingOldest { dropped, .. } => {
                self.stats.stored += 1;
                self.stats.dropped_oldest += dropped.len() as u64;
                for r in &dropped {
                    self.remember_lost(r);
                }
                Ok(true)
            }
        }
    }

    fn remember_lost(&mut self, r: &spool::Record) {
        let num = |name: &str| {
            r.header(name)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        let (Some(server), Some(epoch), Some(seq)) = (
            r.header("server").and_then(|v| std::str::from_utf8(v).ok()),
            num("epoch"),
            num("seq"),
        ) else {
            return;
        };
        if seq == 0 {
            // A gap record itself was lost; the ranges it named are still remembered below
            // only if they were not yet reported. Nothing more to add.
            return;
        }
        let ranges = self.lost.entry((Arc::from(server), epoch)).or_default();
        match ranges.last_mut() {
            Some((_, last)) if *last + 1 == seq => *last = seq,
            _ => ranges.push((seq, seq)),
        }
    }

    fn report_gaps(&mut self) -> Result<(), SpoolError> {
        let lost = std::mem::take(&mut self.lost);
        for ((server, epoch), ranges) in lost {
            for (first_seq, last_seq) in ranges {
                let gap = Stamped {
                    stamp: Stamp {
                        server: server.clone(),
                        epoch,
                        seq: 0,
                        received_at_ns: record::now_ns(),
                    },
                    record: AmiRecord::Gap {
                        epoch,
                        first_seq,
                        last_seq,
                        reason: "spool full".into(),
                    },
                };
                let record = self.to_spool_record(&gap);
                self.stats.gap_records += 1;
                // A gap record that does not fit is not remembered again (its seq is 0): the
                // range goes to the log instead.
                if !self.append(record)? {
                    tracing::error!(%server, epoch, first_seq, last_seq, "records lost and the gap record could not be stored");
                }
            }
        }
        Ok(())
    }

    /// Encode `stamped` as a spool record: payload, partition key and bus headers.
    pub fn to_spool_record(&mut self, stamped: &Stamped) -> spool::Record {
        let stamp = &stamped.stamp;
        self.payload.clear();
        self.key.clear();
        let (kind, event, class) = match &stamped.record {
            AmiRecord::Frame(f) => {
                let frame = f.frame();
                let n = model::normalize(&frame);
                model::partition_key(&stamp.server, &n, &mut self.key);
                match self.format {
                    PayloadFormat::Proto => {
                        model::encode_frame(stamp, &n, &frame, &mut self.payload)
                    }
                    PayloadFormat::Json => json::write_json_line(
                        &model::to_envelope(stamp, &n, &frame),
                        &mut self.payload,
                    ),
                }
                let class = n
                    .privilege
                    .map(|p| p.split(|&b| b == b',').next().unwrap_or_default())
                    .unwrap_or_default();
                (
                    json::kind_name(n.kind),
                    Bytes::copy_from_slice(n.name),
                    Bytes::copy_from_slice(class),
                )
            }
            _ => {
                let env = model::record_envelope(stamped);
                self.key.extend_from_slice(stamp.server.as_bytes());
                match self.format {
                    PayloadFormat::Proto => prost::Message::encode_raw(&env, &mut self.payload),
                    PayloadFormat::Json => json::write_json_line(&env, &mut self.payload),
                }
                let kind = json::kind_name(env.kind());
                (
                    kind,
                    Bytes::from_static(kind.as_bytes()),
                    Bytes::from_static(b"amibus"),
                )
            }
        };
        spool::Record {
            key: Bytes::copy_from_slice(&self.key),
            headers: vec![
                (
                    "server".into(),
                    Bytes::copy_from_slice(stamp.server.as_bytes()),
                ),
                ("event".into(), event),
                ("kind".into(), Bytes::from_static(kind.as_bytes())),
                ("class".into(), class),
                (
                    "schema".into(),
                    Bytes::from_static(model::SCHEMA_VERSION.as_bytes()),
                ),
                ("epoch".into(), Bytes::from(stamp.epoch.to_string())),
                ("seq".into(), Bytes::from(stamp.seq.to_string())),
            ],
            payload: Bytes::copy_from_slice(&self.payload),
        }
    }
}

/// Decode a spool payload back to an envelope (for tests and `tail`).
///
/// # Errors
/// The payload is not an `Envelope`.
pub fn decode_payload(payload: &[u8]) -> Result<pb::Envelope, prost::DecodeError> {
    prost::Message::decode(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ami::{Parsed, Parser};
    use crate::spool::{Fsync, SpoolConfig, WhenFull};

    fn frame_record(server: &str, epoch: u64, seq: u64, bytes: &[u8]) -> Stamped {
        let mut p = Parser::default();
        let Parsed::Frame { frame, .. } = p.parse(bytes) else {
            panic!("frame")
        };
        Stamped {
            stamp: Stamp {
                server: Arc::from(server),
                epoch,
                seq,
                received_at_ns: 1,
            },
            record: AmiRecord::Frame(frame.to_owned()),
        }
    }

    #[test]
    fn records_carry_key_headers_and_an_envelope() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spool, _) = Spool::open(SpoolConfig::new(dir.path())).expect("open");
        let mut p = Pipeline::new(spool, PayloadFormat::Proto);
        let r = p.to_spool_record(&frame_record(
            "pbx1",
            5,
            9,
            b"Event: Hangup\r\nPrivilege: call,all\r\nUniqueid: 1.2\r\nLinkedid: 1.1\r\n\r\n",
        ));
        assert_eq!(&r.key[..], b"pbx1/1.1");
        let h = |n: &str| r.header(n).map(|v| String::from_utf8_lossy(v).into_owned());
        assert_eq!(h("event").as_deref(), Some("Hangup"));
        assert_eq!(h("class").as_deref(), Some("call"));
        assert_eq!(h("kind").as_deref(), Some("event"));
        assert_eq!(h("seq").as_deref(), Some("9"));
        let env = decode_payload(&r.payload).expect("envelope");
        assert_eq!((env.server.as_str(), env.epoch, env.seq), ("pbx1", 5, 9));
    }

    #[test]
    fn dropped_records_become_gap_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let frame = b"Event: VarSet\r\nPrivilege: dialplan,all\r\nVariable: X\r\nValue: 1\r\n\r\n";
        let one = {
            let (spool, _) = Spool::open(SpoolConfig::new(dir.path().join("probe"))).expect("open");
            let mut p = Pipeline::new(spool, PayloadFormat::Proto);
            crate::spool::segment::encoded_len(
                &p.to_spool_record(&frame_record("pbx1", 3, 1, frame)),
            ) as u64
        };
        let (spool, _) = Spool::open(SpoolConfig {
            max_bytes: one * 4 + one / 2,
            segment_bytes: one * 2,
            when_full: WhenFull::DropNewest,
            fsync: Fsync::Never,
            ..SpoolConfig::new(dir.path().join("spool"))
        })
        .expect("open");
        let mut p = Pipeline::new(spool.clone(), PayloadFormat::Proto);
        for seq in 1..=7 {
            p.accept(&frame_record("pbx1", 3, seq, frame))
                .expect("accept");
        }
        assert_eq!(p.stats().dropped_newest, 3);
        // The sink catches up; the next record fits, and the gap is reported behind it.
        let mut reader = spool.reader();
        while let Some((id, _)) = reader.try_next().expect("read") {
            spool.ack(id);
        }
        p.accept(&frame_record("pbx1", 3, 8, frame))
            .expect("accept");
        assert_eq!(p.stats().gap_records, 1);
        let mut gaps = Vec::new();
        while let Some((_, r)) = reader.try_next().expect("read") {
            let env = decode_payload(&r.payload).expect("envelope");
            if let Some(pb::envelope::Detail::Gap(g)) = env.detail {
                gaps.push((g.epoch, g.first_seq, g.last_seq));
            }
        }
        assert_eq!(gaps, vec![(3, 5, 7)]);
    }
}
