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
//! Every gap record (these and the connection's) also carries that range in the headers
//! `gap_epoch`, `gap_first_seq` and `gap_last_seq`, so that when the spool drops a gap record
//! itself (it keeps only the headers of what it drops), the range is remembered again and
//! reported in a later gap record: a loss is never hidden by the loss of its report.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

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
    /// Of the dropped records, gap records made here (seq 0): not AMI records themselves;
    /// the ranges they named are reported again.
    pub dropped_gap_records: u64,
    pub gap_records: u64,
}

impl PipelineStats {
    /// Add another pipeline's counters (several run in parallel).
    pub fn merge(&mut self, o: &PipelineStats) {
        self.records += o.records;
        self.stored += o.stored;
        self.dropped_newest += o.dropped_newest;
        self.dropped_oldest += o.dropped_oldest;
        self.dropped_gap_records += o.dropped_gap_records;
        self.gap_records += o.gap_records;
    }
}

/// The counters of all pipelines together, readable from other tasks (the metrics endpoint);
/// each pipeline adds what changed after every batch.
#[derive(Debug, Default)]
pub struct SharedStats {
    records: std::sync::atomic::AtomicU64,
    gap_records: std::sync::atomic::AtomicU64,
}

impl SharedStats {
    /// Add the change from `before` to `now` of one pipeline's counters.
    pub fn publish(&self, before: &PipelineStats, now: &PipelineStats) {
        use std::sync::atomic::Ordering::Relaxed;
        self.records
            .fetch_add(now.records - before.records, Relaxed);
        self.gap_records
            .fetch_add(now.gap_records - before.gap_records, Relaxed);
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

/// A loss not reported yet: server, epoch, first and last seq.
pub type LostRange = (String, u64, u64, u64);

/// The file in the spool directory that carries unreported loss from one run to the next. It
/// is read at start and replaced only at a clean stop, so a crash in between reports the loss
/// twice rather than never.
pub const UNREPORTED_FILE: &str = "unreported-gaps";

/// Write `lost` to [`UNREPORTED_FILE`] in `dir` (one `server epoch first last` line each), or
/// remove the file when there is nothing.
///
/// # Errors
/// The file cannot be written.
pub fn save_unreported(dir: &std::path::Path, lost: &[LostRange]) -> std::io::Result<()> {
    let path = dir.join(UNREPORTED_FILE);
    if lost.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let text: String = lost
        .iter()
        .map(|(server, epoch, first, last)| format!("{server} {epoch} {first} {last}\n"))
        .collect();
    let tmp = dir.join(format!("{UNREPORTED_FILE}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)
}

/// Read [`UNREPORTED_FILE`] from `dir`: the ranges, and the lines that are not ranges.
///
/// # Errors
/// The file exists but cannot be read.
pub fn load_unreported(dir: &std::path::Path) -> std::io::Result<(Vec<LostRange>, Vec<String>)> {
    let text = match std::fs::read_to_string(dir.join(UNREPORTED_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(e),
    };
    let (mut ranges, mut bad) = (Vec::new(), Vec::new());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        match (f.first(), num(1), num(2), num(3), f.len()) {
            (Some(server), Some(epoch), Some(first), Some(last), 4) if first <= last => {
                ranges.push(((*server).to_owned(), epoch, first, last));
            }
            _ => bad.push(line.to_owned()),
        }
    }
    Ok((ranges, bad))
}

/// See the module docs.
pub struct Pipeline {
    spool: Spool,
    format: PayloadFormat,
    stats: PipelineStats,
    /// Lost (server, epoch) → seq ranges not yet reported.
    lost: BTreeMap<(Arc<str>, u64), Vec<SeqRange>>,
    payload: Vec<u8>,
    key: Vec<u8>,
    /// Where records' bytes are packed: see [`Pipeline::to_spool_record`].
    chunk: BytesMut,
    last_broadcast_event: bool,
}

/// Records are packed into shared chunks of this size (or one record's size, if larger).
const CHUNK_BYTES: usize = 64 * 1024;

impl Pipeline {
    pub fn new(spool: Spool, format: PayloadFormat) -> Self {
        Pipeline {
            spool,
            format,
            stats: PipelineStats::default(),
            lost: BTreeMap::new(),
            payload: Vec::with_capacity(4096),
            key: Vec::with_capacity(64),
            chunk: BytesMut::new(),
            last_broadcast_event: false,
        }
    }

    pub fn stats(&self) -> PipelineStats {
        self.stats
    }

    /// Whether the record last accepted was an event a server broadcast (not the per-session
    /// `FullyBooted`), as the simulator counts what it sent.
    pub fn last_was_broadcast_event(&self) -> bool {
        self.last_broadcast_event
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
        self.last_broadcast_event = false;
        let record = Arc::new(self.to_spool_record(stamped));
        let stored = self.append(&record)?;
        if stored && !self.lost.is_empty() {
            self.report_gaps()?;
        }
        Ok(())
    }

    /// Append; returns whether the record was stored.
    fn append(&mut self, record: &Arc<spool::Record>) -> Result<bool, SpoolError> {
        match self.spool.append_shared(record)? {
            Appended::Stored { .. } => {
                self.stats.stored += 1;
                Ok(true)
            }
            Appended::DroppedNewest => {
                self.stats.dropped_newest += 1;
                self.remember_lost(record);
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
        // A gap record that is lost: what it named is lost again, not forgotten.
        if let (Some(gap_epoch), Some(first), Some(last)) =
            (num("gap_epoch"), num("gap_first_seq"), num("gap_last_seq"))
        {
            let ranges = self.lost.entry((Arc::from(server), gap_epoch)).or_default();
            add_range(ranges, (first, last));
        }
        if seq == 0 {
            // Not part of the connection's numbering.
            self.stats.dropped_gap_records += 1;
            return;
        }
        let ranges = self.lost.entry((Arc::from(server), epoch)).or_default();
        add_range(ranges, (seq, seq));
    }

    /// Take what the spool deleted while in flight and the sink then did not confirm: lost
    /// after all, reported like any other drop. Returns whether there was any.
    pub fn collect_spool_losses(&mut self) -> bool {
        let lost = self.spool.take_lost();
        self.stats.dropped_oldest += lost.len() as u64;
        for r in &lost {
            self.remember_lost(r);
        }
        !lost.is_empty()
    }

    /// Loss not reported yet, to carry over to the next run ([`save_unreported`]).
    pub fn unreported(&self) -> Vec<LostRange> {
        self.lost
            .iter()
            .flat_map(|((server, epoch), ranges)| {
                ranges
                    .iter()
                    .map(|&(first, last)| (server.to_string(), *epoch, first, last))
            })
            .collect()
    }

    /// Remember a loss to report (one an earlier run could not).
    pub fn remember_range(&mut self, (server, epoch, first, last): &LostRange) {
        let ranges = self
            .lost
            .entry((Arc::from(server.as_str()), *epoch))
            .or_default();
        add_range(ranges, (*first, *last));
    }

    /// Whether some loss is not yet reported (the spool had no room for its gap record, or no
    /// record was stored since).
    pub fn has_unreported_gaps(&self) -> bool {
        !self.lost.is_empty()
    }

    /// Report what is lost and not yet reported, without waiting for the next record: when
    /// the connections are idle, and at shutdown. What does not fit stays remembered.
    ///
    /// # Errors
    /// The spool cannot be written.
    pub fn report_unreported_gaps(&mut self) -> Result<(), SpoolError> {
        if !self.lost.is_empty() {
            self.report_gaps()?;
        }
        Ok(())
    }

    /// Store a gap record for every range lost so far, as long as the spool has room for them
    /// without dropping anything (a report must not push out what it could report next).
    /// The rest stays remembered for the next try.
    fn report_gaps(&mut self) -> Result<(), SpoolError> {
        let lost = std::mem::take(&mut self.lost);
        let mut full = false;
        for ((server, epoch), ranges) in lost {
            for (first_seq, last_seq) in ranges {
                if full {
                    add_range(
                        self.lost.entry((server.clone(), epoch)).or_default(),
                        (first_seq, last_seq),
                    );
                    continue;
                }
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
                if self.spool.append_if_room(&record)?.is_some() {
                    self.stats.gap_records += 1;
                } else {
                    tracing::debug!(%server, epoch, first_seq, last_seq, "the spool is full; the gap will be reported later");
                    full = true;
                    add_range(
                        self.lost.entry((server.clone(), epoch)).or_default(),
                        (first_seq, last_seq),
                    );
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
        let mut extra: Vec<(spool::HeaderName, Bytes)> = Vec::new();
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
                self.last_broadcast_event = n.kind == pb::Kind::Event && n.name != b"FullyBooted";
                (json::kind_name(n.kind), n.name, class)
            }
            _ => {
                let env = model::record_envelope(stamped);
                if let Some(pb::envelope::Detail::Gap(g)) = &env.detail {
                    for (name, v) in [
                        ("gap_epoch", g.epoch),
                        ("gap_first_seq", g.first_seq),
                        ("gap_last_seq", g.last_seq),
                    ] {
                        extra.push((name.into(), Bytes::from(v.to_string())));
                    }
                }
                self.key.extend_from_slice(stamp.server.as_bytes());
                match self.format {
                    PayloadFormat::Proto => prost::Message::encode_raw(&env, &mut self.payload),
                    PayloadFormat::Json => json::write_json_line(&env, &mut self.payload),
                }
                let kind = json::kind_name(env.kind());
                (kind, kind.as_bytes(), &b"amibus"[..])
            }
        };
        // One record's bytes (key, payload and the header values that are not constants) are
        // written next to each other into a chunk shared by many records, and handed out as
        // slices of it: one allocation per ~100 records instead of seven per record. A chunk is
        // freed when the last record in it is (records leave the spool roughly in order).
        let mut epoch = itoa::Buffer::new();
        let epoch = epoch.format(stamp.epoch).as_bytes();
        let mut seq = itoa::Buffer::new();
        let seq = seq.format(stamp.seq).as_bytes();
        let server = stamp.server.as_bytes();
        let parts: [&[u8]; 7] = [&self.key, &self.payload, server, event, class, epoch, seq];
        let need: usize = parts.iter().map(|p| p.len()).sum();
        if self.chunk.capacity() < need {
            self.chunk = BytesMut::with_capacity(CHUNK_BYTES.max(need));
        }
        let mut ends = [0usize; 7];
        for (part, end) in parts.iter().zip(&mut ends) {
            self.chunk.extend_from_slice(part);
            *end = self.chunk.len();
        }
        let all = self.chunk.split().freeze();
        let slice = |i: usize| all.slice(if i == 0 { 0 } else { ends[i - 1] }..ends[i]);
        let mut headers: Vec<(spool::HeaderName, Bytes)> = Vec::with_capacity(7 + extra.len());
        headers.extend([
            ("server".into(), slice(2)),
            ("event".into(), slice(3)),
            ("kind".into(), Bytes::from_static(kind.as_bytes())),
            ("class".into(), slice(4)),
            (
                "schema".into(),
                Bytes::from_static(model::SCHEMA_VERSION.as_bytes()),
            ),
            ("epoch".into(), slice(5)),
            ("seq".into(), slice(6)),
        ]);
        headers.extend(extra);
        spool::Record {
            key: slice(0),
            headers,
            payload: slice(1),
        }
    }
}

/// Add an inclusive range to sorted, disjoint, non-adjacent ranges, merging where they touch.
fn add_range(ranges: &mut Vec<SeqRange>, (first, last): SeqRange) {
    let at = ranges.partition_point(|&(_, l)| l.saturating_add(1) < first);
    let mut merged = (first, last);
    let mut end = at;
    while end < ranges.len() && ranges[end].0 <= merged.1.saturating_add(1) {
        merged = (merged.0.min(ranges[end].0), merged.1.max(ranges[end].1));
        end += 1;
    }
    ranges.splice(at..end, [merged]);
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
        assert_eq!(h("epoch").as_deref(), Some("5"));
        assert_eq!(h("server").as_deref(), Some("pbx1"));
        let env = decode_payload(&r.payload).expect("envelope");
        assert_eq!((env.server.as_str(), env.epoch, env.seq), ("pbx1", 5, 9));

        // Records share chunks: the next ones (one larger than a chunk) leave it intact.
        let big = format!(
            "Event: UserEvent\r\nData: {}\r\n\r\n",
            "x".repeat(CHUNK_BYTES)
        );
        let next = p.to_spool_record(&frame_record("pbx22", 6, 10, big.as_bytes()));
        let after = p.to_spool_record(&frame_record("pbx3", 7, 11, b"Event: Newexten\r\n\r\n"));
        assert_eq!(&r.key[..], b"pbx1/1.1");
        assert_eq!(decode_payload(&r.payload).expect("envelope").seq, 9);
        assert_eq!(next.header("server").map(|v| &v[..]), Some(&b"pbx22"[..]));
        assert_eq!(
            next.header("event").map(|v| &v[..]),
            Some(&b"UserEvent"[..])
        );
        let env = decode_payload(&next.payload).expect("big envelope");
        assert!(
            env.headers
                .iter()
                .any(|h| h.value.as_ref().map(Vec::len) == Some(CHUNK_BYTES))
        );
        assert_eq!(after.header("seq").map(|v| &v[..]), Some(&b"11"[..]));
        assert_eq!(&after.key[..], b"pbx3");
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
        // The sink catches up; the next record fits. The gap is reported once the spool is at
        // most half full with it: here, when the next record is delivered too.
        let mut reader = spool.reader();
        while let Some((id, _)) = reader.try_next().expect("read") {
            spool.ack(id);
        }
        p.accept(&frame_record("pbx1", 3, 8, frame))
            .expect("accept");
        assert!(p.has_unreported_gaps());
        let mut seqs = Vec::new();
        while let Some((id, r)) = reader.try_next().expect("read") {
            seqs.push(decode_payload(&r.payload).expect("envelope").seq);
            spool.ack(id);
        }
        assert_eq!(seqs, vec![8]);
        p.report_unreported_gaps().expect("report");
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

    #[test]
    fn unreported_loss_survives_a_restart_in_the_spool_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lost = vec![("pbx1".to_owned(), 3, 5, 9), ("pbx-2".to_owned(), 4, 1, 1)];
        save_unreported(dir.path(), &lost).expect("save");
        let (back, bad) = load_unreported(dir.path()).expect("load");
        assert_eq!((back, bad.len()), (lost.clone(), 0));
        // A damaged line is reported, not guessed at; the good ones still count.
        let path = dir.path().join(UNREPORTED_FILE);
        std::fs::write(&path, "pbx1 3 5 9\npbx1 x 1 2\npbx1 3 9 5\n\n").expect("write");
        let (back, bad) = load_unreported(dir.path()).expect("load");
        assert_eq!(back, vec![("pbx1".to_owned(), 3, 5, 9)]);
        assert_eq!(bad, vec!["pbx1 x 1 2".to_owned(), "pbx1 3 9 5".to_owned()]);
        // Nothing left to carry: no file.
        save_unreported(dir.path(), &[]).expect("save");
        assert!(!path.exists());
        assert_eq!(load_unreported(dir.path()).expect("load").0, vec![]);
        // A pipeline given the ranges reports them as gap records.
        let (spool, _) = Spool::open(SpoolConfig::new(dir.path().join("spool"))).expect("open");
        let mut p = Pipeline::new(spool.clone(), PayloadFormat::Proto);
        for r in &lost {
            p.remember_range(r);
        }
        assert_eq!(p.unreported().len(), 2);
        p.report_unreported_gaps().expect("report");
        assert!(!p.has_unreported_gaps());
        let mut reader = spool.reader();
        let mut gaps = Vec::new();
        while let Some((_, r)) = reader.try_next().expect("read") {
            if let Some(pb::envelope::Detail::Gap(g)) =
                decode_payload(&r.payload).expect("env").detail
            {
                let env_server =
                    String::from_utf8_lossy(r.header("server").expect("server")).into_owned();
                gaps.push((env_server, g.epoch, g.first_seq, g.last_seq));
            }
        }
        gaps.sort();
        let mut want = lost.clone();
        want.sort();
        assert_eq!(gaps, want);
    }

    #[test]
    fn ranges_merge_where_they_touch() {
        let mut r = Vec::new();
        for range in [
            (10, 12),
            (1, 2),
            (20, 20),
            (4, 5),
            (13, 13),
            (3, 3),
            (15, 19),
        ] {
            add_range(&mut r, range);
        }
        assert_eq!(r, vec![(1, 5), (10, 13), (15, 20)]);
        add_range(&mut r, (6, 16));
        assert_eq!(r, vec![(1, 20)]);
    }

    /// A long outage under drop_oldest: the spool wraps many times and drops its own gap
    /// records too. Whatever is left names every seq exactly once, delivered or in a gap.
    #[test]
    fn a_dropped_gap_record_is_reported_again() {
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
            max_bytes: one * 20,
            segment_bytes: one * 4,
            when_full: WhenFull::DropOldest,
            fsync: Fsync::Never,
            ..SpoolConfig::new(dir.path().join("spool"))
        })
        .expect("open");
        let mut p = Pipeline::new(spool.clone(), PayloadFormat::Proto);
        let (mut records, mut gaps, mut covered) = (0, 0, Vec::new());
        let mut reader = spool.reader();
        let mut deliver = |covered: &mut Vec<u64>| {
            while let Some((id, r)) = reader.try_next().expect("read") {
                spool.ack(id);
                let env = decode_payload(&r.payload).expect("envelope");
                match env.detail {
                    Some(pb::envelope::Detail::Gap(g)) => {
                        assert_eq!(g.epoch, 3);
                        covered.extend(g.first_seq..=g.last_seq);
                        gaps += 1;
                    }
                    _ => {
                        covered.push(env.seq);
                        records += 1;
                    }
                }
            }
        };
        let accept = |p: &mut Pipeline, seqs: std::ops::RangeInclusive<u64>| {
            for seq in seqs {
                p.accept(&frame_record("pbx1", 3, seq, frame))
                    .expect("accept");
            }
        };
        // An outage: the spool wraps; the loss waits, merged, in memory while it is full.
        accept(&mut p, 1..=100);
        assert_eq!(p.stats().gap_records, 0);
        assert!(
            p.lost.values().map(Vec::len).sum::<usize>() == 1,
            "{:?}",
            p.lost
        );
        // The sink catches up, but a new outage starts before the gap record is delivered.
        deliver(&mut covered);
        p.report_unreported_gaps().expect("report");
        assert_eq!(p.stats().gap_records, 1);
        accept(&mut p, 101..=300);
        assert_eq!(p.stats().dropped_gap_records, 1, "{:?}", p.stats());
        // Back again: what the dropped gap record named is named again.
        deliver(&mut covered);
        p.report_unreported_gaps().expect("report");
        assert!(!p.has_unreported_gaps());
        deliver(&mut covered);
        covered.sort_unstable();
        assert_eq!(covered, (1..=300).collect::<Vec<u64>>(), "each seq once");
        let st = p.stats();
        assert_eq!(
            records,
            300 - (st.dropped_oldest - st.dropped_gap_records),
            "{st:?}"
        );
        assert_eq!(gaps, st.gap_records - st.dropped_gap_records, "{st:?}");
    }
}
