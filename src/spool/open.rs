//! Opening the spool: scanning the segments on disk, skipping and counting damage, cutting
//! a torn tail, and finding the floor.

use super::*;

/// Bytes of a segment that hold no readable record, and the ids that were in them.
struct DamagedSpan {
    /// The segment's first id.
    segment: u64,
    offset: u64,
    bytes: u64,
    ids: Range<u64>,
}

/// What [`scan_at_open`] found in one segment.
struct Scanned {
    end_id: u64,
    bytes: u64,
    torn_bytes: u64,
}

/// Read a segment through on open, adding its damaged spans to `spans`. A bad record with
/// nothing valid after it is a torn tail in the last segment (`next_first` is `None`), cut off;
/// in a closed segment, the rest of it up to the next segment's first id is lost (never cut:
/// the bytes stay for whoever wants to look at them, and go with the segment).
fn scan_at_open(
    path: &Path,
    first_id: u64,
    next_first: Option<u64>,
    spans: &mut Vec<DamagedSpan>,
) -> Result<Scanned, SpoolError> {
    let mut reader = SegmentReader::open(path).map_err(SpoolError::io(path))?;
    // The id the next record should have.
    let mut next = first_id;
    let torn = loop {
        match reader.read_next() {
            Ok(Some((id, _))) => next = id + 1,
            Ok(None) => break None,
            Err(Ok(torn)) => {
                let ids = next..next_first.unwrap_or(u64::MAX);
                match reader.resync(ids).map_err(SpoolError::io(path))? {
                    Some(r) => {
                        spans.push(DamagedSpan {
                            segment: first_id,
                            offset: r.offset,
                            bytes: r.bytes,
                            ids: next..r.next_id,
                        });
                        next = r.next_id;
                    }
                    None => break Some(torn),
                }
            }
            Err(Err(e)) => return Err(SpoolError::io(path)(e)),
        }
    };
    let len = fs::metadata(path).map_err(SpoolError::io(path))?.len();
    let Some(next_first) = next_first else {
        let Some(torn) = torn else {
            return Ok(Scanned {
                end_id: next,
                bytes: len,
                torn_bytes: 0,
            });
        };
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(torn.offset))
            .map_err(SpoolError::io(path))?;
        return Ok(Scanned {
            end_id: next,
            bytes: torn.offset,
            torn_bytes: len - torn.offset,
        });
    };
    // A closed segment holds every id up to the next one's first: what it lacks (from a bad
    // record on, or past a truncation) is lost.
    if next < next_first {
        let offset = torn.map_or(reader.offset(), |t| t.offset);
        spans.push(DamagedSpan {
            segment: first_id,
            offset,
            bytes: len - offset,
            ids: next..next_first,
        });
    }
    Ok(Scanned {
        end_id: next.max(next_first),
        bytes: len,
        torn_bytes: 0,
    })
}

impl Spool {
    /// Open (or create) the spool in `cfg.dir`: find the floor, skip and count damaged records
    /// (acknowledging their ids; what they held is inferred for [`Spool::take_damaged`]), and
    /// cut off a torn tail of the last segment.
    ///
    /// # Errors
    /// The directory or a segment cannot be read or written.
    pub fn open(cfg: SpoolConfig) -> Result<(Spool, Recovery), SpoolError> {
        let dir = cfg.dir.clone();
        fs::create_dir_all(&dir).map_err(SpoolError::io(&dir))?;
        let paths = segment::list(&dir).map_err(SpoolError::io(&dir))?;
        let mut recovery = Recovery::default();
        let mut segments = VecDeque::new();
        let mut spans = Vec::new();
        for (i, (first_id, path)) in paths.iter().enumerate() {
            let next_first = paths.get(i + 1).map(|p| p.0);
            let scanned = scan_at_open(path, *first_id, next_first, &mut spans)?;
            recovery.torn_bytes += scanned.torn_bytes;
            segments.push_back(Segment {
                first_id: *first_id,
                end_id: scanned.end_id,
                bytes: scanned.bytes,
                path: path.clone(),
            });
        }
        let ack_path = dir.join(ACK_FILE);
        let stored_floor = match fs::read_to_string(&ack_path) {
            Ok(s) => s.trim().parse::<u64>().ok(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(SpoolError::io(&ack_path)(e)),
        };
        let next_id = segments
            .back()
            .map(|s| s.end_id)
            .unwrap_or(1)
            .max(stored_floor.unwrap_or(1));
        let first_id = segments.front().map_or(next_id, |s| s.first_id);
        let stored_floor = stored_floor.unwrap_or(first_id).clamp(first_id, next_id);
        let mut acked_floor = stored_floor;
        // Damaged records not acknowledged before the stop: acknowledged now, so the floor
        // passes them, and what they held is inferred from the records around them (read
        // before the segments below the floor are deleted: they are neighbours too).
        let mut acked_above = BTreeSet::new();
        let mut damage_seen = BTreeSet::new();
        let mut lost_ids = Vec::new();
        for span in &spans {
            damage_seen.insert((span.segment, span.offset));
            let ids = span.ids.start.max(acked_floor)..span.ids.end.min(next_id);
            if ids.is_empty() {
                continue;
            }
            tracing::warn!(
                segment = %segment::file_name(span.segment),
                offset = span.offset,
                bytes = span.bytes,
                first_id = ids.start,
                last_id = ids.end - 1,
                records = ids.end - ids.start,
                "spool: damaged records skipped on open; reported as lost"
            );
            recovery.damaged_records += ids.end - ids.start;
            recovery.damaged_bytes += span.bytes;
            lost_ids.push((ids.start, ids.end - 1));
            acked_above.extend(ids);
        }
        let inferred = if lost_ids.is_empty() {
            damage::Inferred::default()
        } else {
            let window: Vec<PathBuf> = segments.iter().map(|s| s.path.clone()).collect();
            damage::infer(&window, &lost_ids)
        };
        while acked_above.first() == Some(&acked_floor) {
            acked_above.pop_first();
            acked_floor += 1;
        }
        // Segments wholly below the floor are done.
        while segments.len() > 1 && segments.front().is_some_and(|s| s.end_id <= acked_floor) {
            if let Some(s) = segments.pop_front() {
                let _ = fs::remove_file(&s.path);
            }
        }
        // Append to a new segment unless the last one is still empty.
        let active_path = dir.join(segment::file_name(next_id));
        let active = if segments.back().is_some_and(|s| s.first_id == next_id) {
            OpenOptions::new().append(true).open(&active_path)
        } else {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&active_path)
        }
        .map_err(SpoolError::io(&active_path))?;
        if segments.back().is_none_or(|s| s.first_id != next_id) {
            segments.push_back(Segment {
                first_id: next_id,
                end_id: next_id,
                bytes: 0,
                path: active_path,
            });
        }
        recovery.pending = next_id - acked_floor - acked_above.len() as u64;
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        let state = State {
            segments,
            next_id,
            flushed_id: next_id,
            pending: VecDeque::new(),
            pending_bytes: 0,
            spare: Vec::new(),
            unwritten_dead: Vec::new(),
            total_bytes,
            acked_floor,
            acked_above,
            // A floor moved past damage here is persisted by the first checkpoint.
            persisted_floor: stored_floor,
            stats: SpoolStats {
                damaged_records: recovery.damaged_records,
                damaged_bytes: recovery.damaged_bytes,
                damaged_unattributed: inferred.unattributed,
                ..SpoolStats::default()
            },
            // Records found on disk at open count as appended now: their age is at least that.
            age_samples: VecDeque::from([(acked_floor, Instant::now())]),
            tail: VecDeque::new(),
            tail_bytes: 0,
            reader_waiting: false,
            handed_out: acked_floor,
            in_doubt: BTreeMap::new(),
            in_doubt_bytes: 0,
            lost_later: Vec::new(),
            damaged: inferred.ranges,
            damage_seen,
        };
        let file = FileState {
            active,
            segment: next_id,
            unsynced: false,
            to_sync: Vec::new(),
            writing: VecDeque::new(),
            recycled: Vec::new(),
            #[cfg(test)]
            fault: None,
        };
        let spool = Spool {
            shared: Arc::new(Shared {
                cfg,
                state: Mutex::new(state),
                file: Mutex::new(file),
                checkpointing: Mutex::new(()),
                changed: Notify::new(),
            }),
        };
        Ok((spool, recovery))
    }
}
