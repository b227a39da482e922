//! The file side of the spool: writing queued chunks into segment files (under the file
//! mutex only, never the state lock), and reading back the metadata of detached segments.

use super::*;

pub(super) fn file_path(cfg: &SpoolConfig, segment: u64) -> PathBuf {
    cfg.dir.join(segment::file_name(segment))
}

impl FileState {
    /// Write the chunks in `writing`, in order, starting new segment files where a chunk
    /// belongs to a new segment; stops at the first failure, leaving what was not written
    /// (whole chunks, or the rest of one) in `writing`. Returns one past the last id written
    /// whole, and the failure.
    pub(super) fn write_queued(&mut self, cfg: &SpoolConfig) -> (Option<u64>, Option<SpoolError>) {
        let mut written_to = None;
        while let Some(mut chunk) = self.writing.pop_front() {
            if chunk.segment != self.segment
                && let Err(e) = self.start_file(cfg, chunk.segment)
            {
                self.writing.push_front(chunk);
                return (written_to, Some(e));
            }
            let (n, result) = self.write(&chunk.bytes[chunk.written..]);
            chunk.written += n;
            if let Err(e) = result {
                self.writing.push_front(chunk);
                let path = file_path(cfg, self.segment);
                return (written_to, Some(SpoolError::io(&path)(e)));
            }
            written_to = Some(chunk.end_id);
            chunk.bytes.clear();
            if chunk.bytes.capacity() <= SPARE_MAX && self.recycled.len() < 2 {
                self.recycled.push(chunk.bytes);
            }
        }
        (written_to, None)
    }

    /// Switch the active file to a new segment's.
    pub(super) fn start_file(&mut self, cfg: &SpoolConfig, segment: u64) -> Result<(), SpoolError> {
        let path = file_path(cfg, segment);
        let new = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(SpoolError::io(&path))?;
        let closed = std::mem::replace(&mut self.active, new);
        self.segment = segment;
        // Fsynced by the next checkpoint: an fsync here would stall every flush behind it.
        if std::mem::replace(&mut self.unsynced, false) && cfg.fsync != Fsync::Never {
            self.to_sync.push(closed);
        }
        Ok(())
    }

    /// Write `buf` whole: how many bytes got in, and the error if not all did (a later flush
    /// writes the rest, so the file never holds a record twice).
    pub(super) fn write(&mut self, buf: &[u8]) -> (usize, io::Result<()>) {
        #[cfg(test)]
        if let Some(fault) = self.fault.as_mut()
            && let Err(e) = fault()
        {
            return (0, Err(e));
        }
        let mut done = 0;
        while done < buf.len() {
            match self.active.write(&buf[done..]) {
                Ok(0) => return (done, Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    done += n;
                    self.unsynced = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (done, Err(e)),
            }
        }
        (done, Ok(()))
    }
}

/// `record` as drop_oldest reports it: its metadata and key copied out of the buffer they were
/// read into (which they would otherwise keep whole while they wait), payload left out.
pub(super) fn meta_only(record: Record) -> Record {
    copied_out(record, false)
}

/// `record` copied out of the buffer it was read into: with its payload (an in-doubt record,
/// held to be sent again) or without (see [`meta_only`]).
pub(super) fn copied_out(record: Record, with_payload: bool) -> Record {
    Record {
        key: Bytes::copy_from_slice(&record.key),
        meta: record.meta.detached(),
        payload: if with_payload {
            Bytes::copy_from_slice(&record.payload)
        } else {
            Bytes::new()
        },
    }
}

/// The records with `ids` in the segment file at `path`, whole where `whole(id)`, else metadata
/// only, skipping damage. A file that cannot be read gives what was read of it.
pub(super) fn read_records(
    path: &Path,
    ids: Range<u64>,
    whole: impl Fn(u64) -> bool,
    out: &mut Vec<(u64, Record)>,
) {
    let Ok(mut reader) = SegmentReader::open(path) else {
        return;
    };
    // The id the next record should have.
    let mut next = ids.start;
    while next < ids.end {
        match reader.read_next() {
            Ok(Some((id, rec))) => {
                if id >= ids.end {
                    break;
                }
                if id >= next {
                    out.push((id, copied_out(rec, whole(id))));
                    next = id + 1;
                }
            }
            Ok(None) | Err(Err(_)) => break,
            Err(Ok(_)) => match reader.resync(next..ids.end) {
                Ok(Some(r)) => next = r.next_id,
                _ => break,
            },
        }
    }
}
