//! The pipeline: stamped records from the connections → envelopes → the spool.
//!
//! Owns: encoding each record (protobuf or JSON), its partition key and typed metadata, and
//! turning what the spool had to drop into `gap` records, so loss is visible on the bus.
//!
//! Every record's typed metadata ([`spool::Meta`]: server, event, kind, class, epoch, seq, a
//! snapshot id, a gap range) is filled here; the sinks render it as bus headers (see
//! [`crate::spool::Meta::each_header`]).
//!
//! Gap records made here (for records the spool dropped) carry `seq` 0: they are not part of
//! the connection's numbering; their `gap` detail names the lost epoch and sequence range.
//! Every gap record (these and the connection's) also carries that range in its metadata, so
//! that when the spool drops a gap record itself (it keeps only the metadata of what it
//! drops), the range is remembered again and reported in a later gap record: a loss is never
//! hidden by the loss of its report.
//!
//! Each gap record made here is counted for its server in [`DownstreamGaps`] (when given), so
//! the server's connection follows it with a state snapshot, as it does its own gap records.
//!
//! A gap record's `reason` says why: `spool full` for records the cap dropped, `spool damaged`
//! for records the spool found damaged on disk (their seqs are inferred by the spool, see
//! [`crate::spool::damage`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::ami::connection::DownstreamGaps;
use crate::ami::{ParseErrorRecord, Record as AmiRecord, Stamp, Stamped, record};
use crate::model::{self, PayloadFormat, json, pb};
use crate::spool::{self, Appended, Spool, SpoolError};

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
    /// Records too large for the spool, published as a `parse_error` record in their place.
    pub too_large: u64,
    /// Records the spool could not write (disk full, I/O error): dropped and reported as
    /// gaps once the spool can be written again. Counted in `dropped_newest` too.
    pub write_failures: u64,
    /// Seqs the spool found damaged on disk (named by `spool damaged` gap records).
    pub damaged_seqs: u64,
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
        self.too_large += o.too_large;
        self.write_failures += o.write_failures;
        self.damaged_seqs += o.damaged_seqs;
    }
}

/// The counters of all pipelines together, readable from other tasks (the metrics endpoint);
/// each pipeline adds what changed after every batch.
#[derive(Debug, Default)]
pub struct SharedStats {
    records: std::sync::atomic::AtomicU64,
    gap_records: std::sync::atomic::AtomicU64,
    too_large: std::sync::atomic::AtomicU64,
    write_failures: std::sync::atomic::AtomicU64,
}

impl SharedStats {
    /// Add the change from `before` to `now` of one pipeline's counters.
    pub fn publish(&self, before: &PipelineStats, now: &PipelineStats) {
        use std::sync::atomic::Ordering::Relaxed;
        self.records
            .fetch_add(now.records - before.records, Relaxed);
        self.gap_records
            .fetch_add(now.gap_records - before.gap_records, Relaxed);
        self.too_large
            .fetch_add(now.too_large - before.too_large, Relaxed);
        self.write_failures
            .fetch_add(now.write_failures - before.write_failures, Relaxed);
    }

    pub fn snapshot(&self) -> PipelineStats {
        use std::sync::atomic::Ordering::Relaxed;
        PipelineStats {
            records: self.records.load(Relaxed),
            gap_records: self.gap_records.load(Relaxed),
            too_large: self.too_large.load(Relaxed),
            write_failures: self.write_failures.load(Relaxed),
            ..PipelineStats::default()
        }
    }
}

/// An inclusive range of sequence numbers.
type SeqRange = (u64, u64);

mod loss;
mod open_epochs;

pub use loss::{LossReason, LostRange, UNREPORTED_FILE, load_unreported, save_unreported};
pub use open_epochs::{LeftOpen, OPEN_EPOCHS_FILE, OpenEpochs, UNCLOSED_REASON};

/// See the module docs.
pub struct Pipeline {
    spool: Spool,
    format: PayloadFormat,
    stats: PipelineStats,
    /// Lost (server, epoch, why) → seq ranges not yet reported.
    lost: BTreeMap<(Arc<str>, u64, LossReason), Vec<SeqRange>>,
    payload: Vec<u8>,
    key: Vec<u8>,
    /// Where records' bytes are packed: see [`Pipeline::to_spool_record`].
    chunk: BytesMut,
    last_broadcast_event: bool,
    /// When a spool write error was last logged (one line per [`WRITE_ERROR_LOG_EVERY`]).
    last_write_error: Option<std::time::Instant>,
    /// Where logins and logouts are recorded, if anywhere.
    open_epochs: Option<OpenEpochs>,
    /// Where the gap records made here are counted per server, if anywhere: the server's
    /// connection then takes a snapshot, so consumers rebuild state after this loss too.
    gap_notices: Option<Arc<DownstreamGaps>>,
}

const WRITE_ERROR_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

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
            last_write_error: None,
            open_epochs: None,
            gap_notices: None,
        }
    }

    /// Count the gap records made here in `notices` (see [`DownstreamGaps`]).
    pub fn with_gap_notices(mut self, notices: Arc<DownstreamGaps>) -> Self {
        self.gap_notices = Some(notices);
        self
    }

    pub fn stats(&self) -> PipelineStats {
        self.stats
    }

    /// Record logins and logouts in `open` (see [`OPEN_EPOCHS_FILE`]).
    pub fn with_open_epochs(mut self, open: OpenEpochs) -> Self {
        self.open_epochs = Some(open);
        self
    }

    /// Publish a `connection_down` (seq 0, reason [`UNCLOSED_REASON`]) for each epoch an
    /// earlier run left open.
    pub fn close_unclosed(&mut self, left: &[(String, u64)]) {
        for (server, epoch) in left {
            tracing::warn!(%server, epoch, "an earlier run stopped without closing this AMI session; publishing its connection_down");
            self.accept(&Stamped {
                stamp: Stamp {
                    server: Arc::from(server.as_str()),
                    epoch: *epoch,
                    seq: 0,
                    received_at_ns: record::now_ns(),
                },
                record: AmiRecord::ConnectionDown {
                    reason: UNCLOSED_REASON.to_owned(),
                },
            });
        }
    }

    /// Whether the record last accepted was an event a server broadcast (not the per-session
    /// `FullyBooted`), as the simulator counts what it sent.
    pub fn last_was_broadcast_event(&self) -> bool {
        self.last_broadcast_event
    }

    /// Hand what was appended to the OS, so a SIGKILL loses none of it. A failure (disk full)
    /// is logged at most every few seconds; what was appended stays buffered and is written by
    /// a later flush, and readers take it from the spool's memory meanwhile.
    pub fn flush(&mut self) {
        if let Err(e) = self.spool.flush()
            && self
                .last_write_error
                .is_none_or(|t| t.elapsed() >= WRITE_ERROR_LOG_EVERY)
        {
            tracing::error!(error = %e, "cannot write the spool; retrying");
            self.last_write_error = Some(std::time::Instant::now());
        }
    }

    /// Encode one record and append it to the spool; report anything lost so far.
    ///
    /// Nothing the spool refuses stops the pipeline: a record too large for it is replaced by
    /// a `parse_error` record with the same (server, epoch, seq), and a record it cannot write
    /// (disk full, I/O error) is dropped and reported as a gap once it can write again.
    pub fn accept(&mut self, stamped: &Stamped) {
        self.stats.records += 1;
        self.last_broadcast_event = false;
        if let Some(open) = &self.open_epochs {
            match &stamped.record {
                AmiRecord::ConnectionUp { .. } => {
                    open.change(&stamped.stamp.server, stamped.stamp.epoch, true);
                }
                AmiRecord::ConnectionDown { .. } => {
                    open.change(&stamped.stamp.server, stamped.stamp.epoch, false);
                }
                _ => {}
            }
        }
        let record = Arc::new(self.to_spool_record(stamped));
        let stored = match self.append(&record) {
            Err(SpoolError::TooLarge { bytes }) => self.accept_too_large(stamped, bytes),
            Err(e) => {
                self.write_failed(&record, &e);
                false
            }
            Ok(stored) => stored,
        };
        if stored && !self.lost.is_empty() {
            self.report_gaps();
        }
    }

    /// `stamped` encodes to `bytes`, more than the spool can hold: a `parse_error` record
    /// takes its place, so its seq is accounted for and its neighbours go on.
    fn accept_too_large(&mut self, stamped: &Stamped, bytes: usize) -> bool {
        self.stats.too_large += 1;
        let cap = self.spool.config().max_bytes;
        tracing::warn!(
            server = %stamped.stamp.server,
            epoch = stamped.stamp.epoch,
            seq = stamped.stamp.seq,
            bytes,
            cap,
            "a record is too large for the spool; a parse_error record takes its place"
        );
        let instead = Stamped {
            stamp: stamped.stamp.clone(),
            record: AmiRecord::ParseError(ParseErrorRecord {
                reason: "record_too_large",
                message: format!(
                    "the record encodes to {bytes} bytes, more than the spool holds (spool.max_bytes = {cap}); lower pipeline.max_frame_bytes or raise spool.max_bytes"
                ),
            }),
        };
        let record = Arc::new(self.to_spool_record(&instead));
        match self.append(&record) {
            Ok(stored) => stored,
            Err(e) => {
                self.write_failed(&record, &e);
                false
            }
        }
    }

    /// The spool could not write `record`: it is lost, reported as a gap once it can.
    fn write_failed(&mut self, record: &spool::Record, e: &SpoolError) {
        self.stats.write_failures += 1;
        self.stats.dropped_newest += 1;
        self.remember_lost(record, LossReason::SpoolWriteFailed);
        if self.stats.write_failures == 1
            || self
                .last_write_error
                .is_none_or(|t| t.elapsed() >= WRITE_ERROR_LOG_EVERY)
        {
            tracing::error!(error = %e, failures = self.stats.write_failures, "cannot write the spool; dropping records (reported as gaps once it can write again)");
            self.last_write_error = Some(std::time::Instant::now());
        }
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
                self.remember_lost(record, LossReason::SpoolFull);
                Ok(false)
            }
            Appended::StoredDroppingOldest { dropped, .. } => {
                self.stats.stored += 1;
                self.stats.dropped_oldest += dropped.len() as u64;
                for r in &dropped {
                    self.remember_lost(r, LossReason::SpoolFull);
                }
                Ok(true)
            }
        }
    }

    fn remember_lost(&mut self, r: &spool::Record, reason: LossReason) {
        let m = &r.meta;
        let server: Arc<str> = String::from_utf8_lossy(&m.server).into();
        // A gap record that is lost: what it named is lost again, not forgotten. If the gap
        // record was in doubt, it may have arrived too: the range is named again in doubt.
        if let Some(g) = m.gap {
            let again = match reason {
                LossReason::SpoolFullInDoubt => LossReason::SpoolFullInDoubt,
                _ => LossReason::SpoolFull,
            };
            let key = (server.clone(), g.epoch, again);
            add_range(self.lost.entry(key).or_default(), (g.first_seq, g.last_seq));
        }
        let (epoch, seq) = (m.epoch, m.seq);
        if seq == 0 {
            // Not part of the connection's numbering.
            self.stats.dropped_gap_records += 1;
            return;
        }
        let key = (server, epoch, reason);
        add_range(self.lost.entry(key).or_default(), (seq, seq));
    }

    /// Take what the spool lost since the last call: records deleted while in flight that the
    /// sink then did not confirm (reported as `spool full (in doubt)`: the broker may have
    /// stored them though its confirmation never came), and what damaged records held
    /// (reported as `spool damaged`). Returns whether there was any.
    pub fn collect_spool_losses(&mut self) -> bool {
        let lost = self.spool.take_lost();
        self.stats.dropped_oldest += lost.len() as u64;
        for r in &lost {
            self.remember_lost(r, LossReason::SpoolFullInDoubt);
        }
        let damaged = self.spool.take_damaged();
        for d in &damaged {
            self.remember_damaged(d);
        }
        !lost.is_empty() || !damaged.is_empty()
    }

    /// Remember seqs damaged records held, except those already waiting to be reported for
    /// another reason (a drop not reported yet leaves the same hole in the seqs the spool
    /// inferred them from): a seq is named by one gap record.
    fn remember_damaged(&mut self, d: &spool::DamagedRange) {
        let server: Arc<str> = Arc::from(d.server.as_str());
        let mut ranges = vec![(d.first_seq, d.last_seq)];
        for ((s, epoch, _), pending) in &self.lost {
            if *s != server || *epoch != d.epoch {
                continue;
            }
            for &p in pending {
                ranges = ranges
                    .into_iter()
                    .flat_map(|r| subtract_range(r, p))
                    .collect();
            }
        }
        self.stats.damaged_seqs += ranges.iter().map(|(f, l)| l - f + 1).sum::<u64>();
        let entry = self
            .lost
            .entry((server, d.epoch, LossReason::SpoolDamaged))
            .or_default();
        for r in ranges {
            add_range(entry, r);
        }
    }

    /// Loss not reported yet, to carry over to the next run ([`save_unreported`]).
    pub fn unreported(&self) -> Vec<LostRange> {
        self.lost
            .iter()
            .flat_map(|((server, epoch, reason), ranges)| {
                ranges.iter().map(|&(first_seq, last_seq)| LostRange {
                    server: server.to_string(),
                    epoch: *epoch,
                    first_seq,
                    last_seq,
                    reason: *reason,
                })
            })
            .collect()
    }

    /// Remember a loss to report (one an earlier run could not).
    pub fn remember_range(&mut self, l: &LostRange) {
        let ranges = self
            .lost
            .entry((Arc::from(l.server.as_str()), l.epoch, l.reason))
            .or_default();
        add_range(ranges, (l.first_seq, l.last_seq));
    }

    /// Whether some loss is not yet reported (the spool had no room for its gap record, or no
    /// record was stored since).
    pub fn has_unreported_gaps(&self) -> bool {
        !self.lost.is_empty()
    }

    /// Report what is lost and not yet reported, without waiting for the next record: when
    /// the connections are idle, and at shutdown. What does not fit stays remembered.
    pub fn report_unreported_gaps(&mut self) {
        if !self.lost.is_empty() {
            self.report_gaps();
        }
    }

    /// Store a gap record for every range lost so far, as long as the spool has room for them
    /// without dropping anything (a report must not push out what it could report next) and
    /// can write. The rest stays remembered for the next try.
    fn report_gaps(&mut self) {
        let lost = std::mem::take(&mut self.lost);
        let mut full = false;
        for ((server, epoch, reason), ranges) in lost {
            for (first_seq, last_seq) in ranges {
                if full {
                    add_range(
                        self.lost
                            .entry((server.clone(), epoch, reason))
                            .or_default(),
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
                        reason: reason.as_str().into(),
                    },
                };
                let record = self.to_spool_record(&gap);
                if let Ok(Some(_)) = self.spool.append_if_room(&record) {
                    self.stats.gap_records += 1;
                    if let Some(n) = &self.gap_notices {
                        n.note(&server);
                    }
                } else {
                    tracing::debug!(%server, epoch, first_seq, last_seq, "the spool is full; the gap will be reported later");
                    full = true;
                    add_range(
                        self.lost
                            .entry((server.clone(), epoch, reason))
                            .or_default(),
                        (first_seq, last_seq),
                    );
                }
            }
        }
    }

    /// Encode `stamped` as a spool record: payload, partition key and bus headers.
    pub fn to_spool_record(&mut self, stamped: &Stamped) -> spool::Record {
        let stamp = &stamped.stamp;
        self.payload.clear();
        self.key.clear();
        let mut snapshot_id: Option<Bytes> = None;
        let mut gap = None;
        // A snapshot's item is its frame's envelope plus `snapshot_id` (and the bus header
        // `snapshot`), keyed like any event of its call.
        let frame = match &stamped.record {
            AmiRecord::Frame(f) => Some((f, None)),
            AmiRecord::SnapshotItem { snapshot_id, frame } => Some((&**frame, Some(snapshot_id))),
            _ => None,
        };
        let (kind, event, class) = match frame {
            Some((f, snapshot)) => {
                let frame = f.frame();
                let n = model::normalize(&frame);
                model::partition_key(&stamp.server, &n, &mut self.key);
                match self.format {
                    PayloadFormat::Proto => {
                        model::encode_frame(stamp, &n, &frame, &mut self.payload);
                        if let Some(id) = snapshot {
                            model::encode::encode_snapshot_id(id, &mut self.payload);
                        }
                    }
                    PayloadFormat::Json => {
                        match snapshot {
                            // The common case, written from the frame without an Envelope.
                            None => json::write_frame_line(stamp, &n, &frame, &mut self.payload),
                            Some(id) => {
                                let mut env = model::to_envelope(stamp, &n, &frame);
                                env.snapshot_id = id.to_string();
                                json::write_json_line(&env, &mut self.payload)
                            }
                        }
                    }
                }
                if let Some(id) = snapshot {
                    snapshot_id = Some(Bytes::copy_from_slice(id.as_bytes()));
                }
                let class = n
                    .privilege
                    .map(|p| p.split(|&b| b == b',').next().unwrap_or_default())
                    .unwrap_or_default();
                self.last_broadcast_event =
                    snapshot.is_none() && n.kind == pb::Kind::Event && n.name != b"FullyBooted";
                (n.kind, n.name, class)
            }
            None => {
                let env = model::record_envelope(stamped);
                if !env.snapshot_id.is_empty() {
                    snapshot_id = Some(Bytes::from(env.snapshot_id.clone()));
                }
                if let Some(pb::envelope::Detail::Gap(g)) = &env.detail {
                    gap = Some(spool::GapRange {
                        epoch: g.epoch,
                        first_seq: g.first_seq,
                        last_seq: g.last_seq,
                    });
                }
                self.key.extend_from_slice(stamp.server.as_bytes());
                match self.format {
                    PayloadFormat::Proto => prost::Message::encode_raw(&env, &mut self.payload),
                    PayloadFormat::Json => json::write_json_line(&env, &mut self.payload),
                }
                let kind = env.kind();
                (kind, json::kind_name(kind).as_bytes(), &b"amibus"[..])
            }
        };
        // One record's bytes (key, payload, server, event and class) are written next to each
        // other into a chunk shared by many records, and handed out as slices of it: one
        // allocation per ~100 records instead of five per record. A chunk is freed when the last
        // record in it is (records leave the spool roughly in order).
        let server = stamp.server.as_bytes();
        let parts: [&[u8]; 5] = [&self.key, &self.payload, server, event, class];
        let need: usize = parts.iter().map(|p| p.len()).sum();
        if self.chunk.capacity() < need {
            self.chunk = BytesMut::with_capacity(CHUNK_BYTES.max(need));
        }
        let mut ends = [0usize; 5];
        for (part, end) in parts.iter().zip(&mut ends) {
            self.chunk.extend_from_slice(part);
            *end = self.chunk.len();
        }
        let all = self.chunk.split().freeze();
        let slice = |i: usize| all.slice(if i == 0 { 0 } else { ends[i - 1] }..ends[i]);
        spool::Record {
            key: slice(0),
            meta: spool::Meta {
                server: slice(2),
                event: slice(3),
                kind,
                class: slice(4),
                epoch: stamp.epoch,
                seq: stamp.seq,
                snapshot: snapshot_id,
                gap,
            },
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

/// `range` without the seqs of `other`: none, one or two ranges.
fn subtract_range((first, last): SeqRange, (of, ol): SeqRange) -> Vec<SeqRange> {
    if ol < first || of > last {
        return vec![(first, last)];
    }
    let mut out = Vec::new();
    if of > first {
        out.push((first, of - 1));
    }
    if ol < last {
        out.push((ol + 1, last));
    }
    out
}

/// Decode a spool payload back to an envelope (for tests and `tail`).
///
/// # Errors
/// The payload is not an `Envelope`.
pub fn decode_payload(payload: &[u8]) -> Result<pb::Envelope, prost::DecodeError> {
    prost::Message::decode(payload)
}

#[cfg(test)]
mod tests;
