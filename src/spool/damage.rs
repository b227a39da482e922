//! Damaged records: which (server, epoch, seq) they held, inferred from their neighbours.
//!
//! Owns: reading the spool's segments around damaged ids and turning those ids into the seq
//! ranges they held. A damaged record's own bytes cannot be trusted, so the answer comes from
//! the records that can be read:
//! - records of one (server, epoch) are appended in increasing seq order (the pipeline numbers
//!   them; seq 0 marks the pipeline's own spool-drop gap records, which are not part of the
//!   numbering and are skipped);
//! - for each (server, epoch), two consecutive records with damaged ids between them whose
//!   seqs `before` and `after` have `after > before + 1` lost `before + 1..=after - 1`, except
//!   the seqs a gap record in the window names (a loss reported already, by the connection or
//!   the pipeline, is not named twice);
//! - lost ids that no such hole explains (a key with records on one side of the damage only):
//!   if exactly one key has records on one side only, the remainder is its seqs next to the
//!   damage (a key's seqs are contiguous); otherwise it is counted as unattributed.
//!
//! The window is every segment still on disk, from the oldest to the end of the spool: this
//! runs only when damage is found, and reading files then is cheap next to losing records
//! silently.
//!
//! Must never: hold the spool's lock (it reads files), or fail: a segment that cannot be read
//! (deleted meanwhile by drop_oldest) narrows the window, and what it cannot explain is counted.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::Bytes;

use super::Meta;
use super::segment::{self, SegmentReader};

/// Ids lost to damage: first and last, inclusive.
pub type IdSpan = (u64, u64);

/// Seqs of one (server, epoch) that damaged records held.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DamagedRange {
    pub server: String,
    pub epoch: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// What [`infer`] made of some damaged ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inferred {
    pub ranges: Vec<DamagedRange>,
    /// Lost ids no range accounts for.
    pub unattributed: u64,
}

/// One (server, epoch) as the window shows it: (id, seq) of its first and last records, and
/// the seq holes that have damaged ids between their records.
struct Key {
    first: (u64, u64),
    last: (u64, u64),
    holes: Vec<(u64, u64)>,
}

/// Infer the (server, epoch, seq) ranges of the `damaged` id spans from the records of
/// `segments` (paths in id order).
pub fn infer(segments: &[PathBuf], damaged: &[IdSpan]) -> Inferred {
    let lost_ids: u64 = damaged.iter().map(|&(f, l)| l - f + 1).sum();
    if lost_ids == 0 {
        return Inferred::default();
    }
    let between = |a: u64, b: u64| damaged.iter().any(|&(f, l)| f < b && l > a);
    let mut keys: BTreeMap<(Bytes, u64), Key> = BTreeMap::new();
    let mut named: BTreeMap<(Bytes, u64), Vec<(u64, u64)>> = BTreeMap::new();
    read_window(segments, |id, meta| {
        if let Some(g) = meta.gap {
            named
                .entry((meta.server.clone(), g.epoch))
                .or_default()
                .push((g.first_seq, g.last_seq));
        }
        if meta.seq == 0 {
            return;
        }
        let seq = meta.seq;
        match keys.get_mut(&(meta.server.clone(), meta.epoch)) {
            None => {
                keys.insert(
                    (meta.server, meta.epoch),
                    Key {
                        first: (id, seq),
                        last: (id, seq),
                        holes: Vec::new(),
                    },
                );
            }
            Some(k) => {
                let (last_id, last_seq) = k.last;
                if seq > last_seq {
                    if seq > last_seq + 1 && between(last_id, id) {
                        k.holes.push((last_seq + 1, seq - 1));
                    }
                    k.last = (id, seq);
                }
            }
        }
    });
    let mut out = Inferred::default();
    let mut attributed = 0;
    for ((server, epoch), key) in &keys {
        let mut known = named
            .get(&(server.clone(), *epoch))
            .cloned()
            .unwrap_or_default();
        known.sort_unstable();
        for &hole in &key.holes {
            for (first_seq, last_seq) in subtract(hole, &known) {
                attributed += last_seq - first_seq + 1;
                out.ranges.push(DamagedRange {
                    server: String::from_utf8_lossy(server).into_owned(),
                    epoch: *epoch,
                    first_seq,
                    last_seq,
                });
            }
        }
    }
    if attributed > lost_ids {
        tracing::warn!(
            lost_ids,
            seqs = attributed,
            "spool damage: the seq holes around it are larger than the damaged records; \
             some of that loss has no gap record in the spool and is named again"
        );
    }
    let rest = lost_ids.saturating_sub(attributed);
    if rest > 0 {
        let lo = damaged.iter().map(|d| d.0).min().unwrap_or(0);
        let hi = damaged.iter().map(|d| d.1).max().unwrap_or(0);
        // Keys seen on one side of the damage only, and the seqs next to it they would have lost.
        let candidates: Vec<DamagedRange> = keys
            .iter()
            .filter_map(|((server, epoch), k)| {
                let (first_seq, last_seq) = if k.last.0 < lo {
                    (k.last.1 + 1, k.last.1 + rest)
                } else if k.first.0 > hi && k.first.1 > rest {
                    (k.first.1 - rest, k.first.1 - 1)
                } else {
                    return None;
                };
                Some(DamagedRange {
                    server: String::from_utf8_lossy(server).into_owned(),
                    epoch: *epoch,
                    first_seq,
                    last_seq,
                })
            })
            .collect();
        match <[DamagedRange; 1]>::try_from(candidates) {
            Ok([only]) => out.ranges.push(only),
            Err(candidates) => {
                tracing::warn!(
                    records = rest,
                    candidates = candidates.len(),
                    "spool damage: lost records that cannot be attributed to a (server, epoch); \
                     counted in amibus_spool_damaged_unattributed_records_total"
                );
                out.unattributed = rest;
            }
        }
    }
    out.ranges.sort();
    out
}

/// Call `f` with the id and metadata of every readable record of `segments`, skipping damage.
fn read_window(segments: &[PathBuf], mut f: impl FnMut(u64, Meta)) {
    for path in segments {
        let mut reader = match SegmentReader::open(path) {
            Ok(r) => r,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(segment = %path.display(), error = %e, "spool damage: a segment cannot be read to infer what was lost");
                }
                continue;
            }
        };
        let mut next = segment::parse_file_name(path).unwrap_or(0);
        loop {
            match reader.read_next() {
                Ok(Some((id, record))) => {
                    next = id + 1;
                    f(id, record.meta);
                }
                Ok(None) => break,
                Err(Ok(_)) => match reader.resync(next..u64::MAX) {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(segment = %path.display(), error = %e, "spool damage: a segment cannot be read to infer what was lost");
                        break;
                    }
                },
                Err(Err(e)) => {
                    tracing::warn!(segment = %path.display(), error = %e, "spool damage: a segment cannot be read to infer what was lost");
                    break;
                }
            }
        }
    }
}

/// `range` without the seqs in `known` (sorted).
fn subtract((mut first, last): (u64, u64), known: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(kf, kl) in known {
        if kl < first || kf > last {
            continue;
        }
        if kf > first {
            out.push((first, kf - 1));
        }
        if kl >= last {
            return out;
        }
        first = kl + 1;
    }
    out.push((first, last));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_loss_is_cut_out_of_a_hole() {
        assert_eq!(subtract((5, 10), &[]), vec![(5, 10)]);
        assert_eq!(subtract((5, 10), &[(1, 4), (11, 12)]), vec![(5, 10)]);
        assert_eq!(subtract((5, 10), &[(3, 6), (8, 8)]), vec![(7, 7), (9, 10)]);
        assert_eq!(subtract((5, 10), &[(5, 10)]), vec![]);
        assert_eq!(subtract((5, 10), &[(2, 12)]), vec![]);
        assert_eq!(subtract((5, 10), &[(7, 12)]), vec![(5, 6)]);
    }
}
