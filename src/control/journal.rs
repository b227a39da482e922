//! The durable idempotency journal: which actions were sent to Asterisk, and their results,
//! so a request delivered again after a restart is answered instead of run again.
//!
//! Owns: one append-only file of entries, each `[u32 body_len][u32 crc32(body)][body]`
//! (little endian), with `body = [u8 kind][u64 at_unix_ms][u32 len][server][u32 len]
//! [request_id][u32 len][action][result to the end]` (kind 1 = [`Entry::Begin`], kind 2 =
//! [`Entry::Done`], whose result is an encoded `ActionResult`, kind 3 = [`Entry::Forget`]).
//!
//! The controller writes `Begin` (handed to the OS with write(2); fsync only with
//! [`JournalFsync::Always`]) before an action is sent, and `Done` before its result is
//! published (so before the message is acknowledged). At start, [`Journal::open`] reads the
//! file back: every request within the dedupe window comes back as a [`Restored`] result
//! (its `Done` result, or `outcome_unknown` for a `Begin` without `Done`: it may have reached
//! Asterisk, so it is never sent again), and the file is rewritten with those entries only.
//!
//! Must never: crash or refuse to start on a torn or corrupt file (the bad tail is cut off and
//! counted in [`Journal::torn_bytes`]), grow without bound (past `max_bytes` it is compacted
//! to the entries within the window, atomically: tmp file, fsync, rename; if those are still
//! more than half of `max_bytes`, the oldest are dropped, as the memory drops results), or
//! make the appender wait on a compaction: [`Journal::begin_compaction`] hands out a
//! [`Compaction`] whose heavy part ([`Compaction::prepare`]: read, filter, write and fsync the
//! tmp file) runs without the journal (a blocking thread), and only
//! [`Journal::finish_compaction`] (copy the entries appended meanwhile, rename) runs with it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut};
use prost::Message;

use crate::durable::{self, FrameHead, sync_dir, tmp_path};
use crate::model::pb::{ActionResult, ActionStatus, ActionTimings};

/// The reason given for a request that was running when amibus stopped.
pub const RESTARTED_REASON: &str = "amibus restarted while this action ran; it is not sent again";

const FRAME_HEADER: usize = 8;
/// The largest entry body accepted when reading back; anything larger is corruption.
const MAX_ENTRY_BYTES: usize = 64 << 20;
const KIND_BEGIN: u8 = 1;
const KIND_DONE: u8 = 2;
const KIND_FORGET: u8 = 3;

/// When journal writes are forced to stable storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JournalFsync {
    /// Leave it to the OS: survives a crash of amibus, not of the machine.
    Never,
    /// After every entry (an fsync before each action is sent).
    Always,
}

/// Where the journal lives and how it is written; see `[control]` in the configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct JournalConfig {
    pub path: PathBuf,
    pub fsync: JournalFsync,
    /// Past this size the file is compacted.
    pub max_bytes: u64,
}

/// One journal entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// The action is about to be sent.
    Begin {
        server: String,
        request_id: String,
        action: String,
        at_unix_ms: u64,
    },
    /// Its result (an encoded `ActionResult`) is known and remembered.
    Done {
        server: String,
        request_id: String,
        at_unix_ms: u64,
        result: Vec<u8>,
    },
    /// Nothing ran (a retriable rejection such as `not_connected`): a retry may run it.
    Forget {
        server: String,
        request_id: String,
        at_unix_ms: u64,
    },
}

impl Entry {
    fn key(&self) -> (&str, &str) {
        match self {
            Entry::Begin {
                server, request_id, ..
            }
            | Entry::Done {
                server, request_id, ..
            }
            | Entry::Forget {
                server, request_id, ..
            } => (server, request_id),
        }
    }

    fn at_unix_ms(&self) -> u64 {
        match self {
            Entry::Begin { at_unix_ms, .. }
            | Entry::Done { at_unix_ms, .. }
            | Entry::Forget { at_unix_ms, .. } => *at_unix_ms,
        }
    }
}

/// Append `entry`, framed, to `out`.
pub fn encode(entry: &Entry, out: &mut Vec<u8>) {
    let start = durable::begin_frame(out);
    let (kind, server, id, action, at, result): (u8, &str, &str, &str, u64, &[u8]) = match entry {
        Entry::Begin {
            server,
            request_id,
            action,
            at_unix_ms,
        } => (KIND_BEGIN, server, request_id, action, *at_unix_ms, &[]),
        Entry::Done {
            server,
            request_id,
            at_unix_ms,
            result,
        } => (KIND_DONE, server, request_id, "", *at_unix_ms, result),
        Entry::Forget {
            server,
            request_id,
            at_unix_ms,
        } => (KIND_FORGET, server, request_id, "", *at_unix_ms, &[]),
    };
    out.put_u8(kind);
    out.put_u64_le(at);
    for s in [server, id, action] {
        out.put_u32_le(s.len() as u32);
        out.put_slice(s.as_bytes());
    }
    out.put_slice(result);
    durable::end_frame(out, start);
}

/// What [`parse`] found in a journal's bytes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub entries: Vec<Entry>,
    /// The bytes of whole, valid entries from the start; everything after is torn or corrupt.
    pub valid_len: usize,
}

/// Read entries from the start of `buf` until its end or the first entry that is cut short,
/// fails its checksum or does not decode.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut entries = Vec::new();
    let mut at = 0;
    while let Some(head) = FrameHead::read(&buf[at..]) {
        let len = head.len;
        if len > MAX_ENTRY_BYTES {
            break;
        }
        let Some(body) = buf.get(at + FRAME_HEADER..at + FRAME_HEADER + len) else {
            break;
        };
        if !head.matches(body) {
            break;
        }
        let Some(entry) = parse_body(body) else {
            break;
        };
        entries.push(entry);
        at += FRAME_HEADER + len;
    }
    Parsed {
        entries,
        valid_len: at,
    }
}

fn parse_body(mut body: &[u8]) -> Option<Entry> {
    if body.remaining() < 1 + 8 {
        return None;
    }
    let kind = body.get_u8();
    let at_unix_ms = body.get_u64_le();
    let mut text = || -> Option<String> {
        if body.remaining() < 4 {
            return None;
        }
        let len = body.get_u32_le() as usize;
        let s = std::str::from_utf8(body.get(..len)?).ok()?.to_owned();
        body.advance(len);
        Some(s)
    };
    let server = text()?;
    let request_id = text()?;
    let action = text()?;
    match kind {
        KIND_BEGIN if body.is_empty() => Some(Entry::Begin {
            server,
            request_id,
            action,
            at_unix_ms,
        }),
        KIND_FORGET if body.is_empty() => Some(Entry::Forget {
            server,
            request_id,
            at_unix_ms,
        }),
        KIND_DONE => Some(Entry::Done {
            server,
            request_id,
            at_unix_ms,
            result: body.to_vec(),
        }),
        _ => None,
    }
}

/// The time now, as the journal stores it.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The entries still live at `now`: the last entry of each request within `window`, oldest
/// first, then the newest that fit in `max_bytes` (encoded) when there is a bound.
fn live(entries: Vec<Entry>, window: Duration, now_ms: u64, max_bytes: Option<u64>) -> Vec<Entry> {
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    let fresh = |e: &Entry| now_ms.saturating_sub(e.at_unix_ms()) <= window_ms;
    // The last entry per request wins (a `Done` follows its `Begin`).
    let mut last: HashMap<(String, String), usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        let (s, r) = e.key();
        last.insert((s.to_owned(), r.to_owned()), i);
    }
    let mut keep: Vec<Entry> = entries
        .into_iter()
        .enumerate()
        .filter(|(i, e)| {
            let (s, r) = e.key();
            last.get(&(s.to_owned(), r.to_owned())) == Some(i)
                && fresh(e)
                && !matches!(e, Entry::Forget { .. })
        })
        .map(|(_, e)| e)
        .collect();
    keep.sort_by_key(Entry::at_unix_ms);
    if let Some(max) = max_bytes {
        let mut total = 0u64;
        let mut first = keep.len();
        for e in keep.iter().rev() {
            let mut buf = Vec::new();
            encode(e, &mut buf);
            if total + buf.len() as u64 > max {
                break;
            }
            total += buf.len() as u64;
            first -= 1;
        }
        keep.drain(..first);
    }
    keep
}

/// A request the journal remembers, to put back in the idempotency memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Restored {
    pub server: String,
    pub request_id: String,
    /// When it was written.
    pub at_unix_ms: u64,
    /// Its result; `outcome_unknown` ([`RESTARTED_REASON`]) when it was still running.
    pub result: ActionResult,
    /// It was running when amibus stopped (a `Begin` without a result): nothing was
    /// published for it yet, so its first answer is not a replay.
    pub running: bool,
}

/// The open journal; see the module docs.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    fsync: JournalFsync,
    max_bytes: u64,
    window: Duration,
    len: u64,
    /// Compact when the file grows past this (at least `max_bytes`).
    compact_at: u64,
    torn_bytes: u64,
    compactions: u64,
    /// A [`Compaction`] is out; no second one starts.
    compacting: bool,
}

/// The heavy half of a compaction, run without the journal; see [`Journal::begin_compaction`].
#[derive(Debug)]
pub struct Compaction {
    path: PathBuf,
    /// The file's length when it began: what is rewritten; later appends are copied after.
    upto: u64,
    window: Duration,
    max_bytes: u64,
}

/// A compaction's tmp file, written and synced, waiting for [`Journal::finish_compaction`].
#[derive(Debug)]
pub struct Prepared {
    tmp: PathBuf,
    file: File,
    len: u64,
    upto: u64,
}

impl Compaction {
    /// Read the journal up to where the compaction began, keep the live entries, write them
    /// to a tmp file next to it and sync it. Touches nothing the appender uses.
    ///
    /// # Errors
    /// Reading the journal or writing the tmp file failed.
    pub fn prepare(self) -> io::Result<Prepared> {
        use std::io::Read;
        let mut bytes = Vec::new();
        File::open(&self.path)?
            .take(self.upto)
            .read_to_end(&mut bytes)?;
        let keep = live(
            parse(&bytes).entries,
            self.window,
            unix_ms(SystemTime::now()),
            Some(self.max_bytes / 2),
        );
        let tmp = tmp_path(&self.path);
        let (file, len) = write_tmp(&tmp, &keep)?;
        Ok(Prepared {
            tmp,
            file,
            len,
            upto: self.upto,
        })
    }
}

impl Journal {
    /// Open (or create) the journal at `cfg.path`, read back what it remembers within
    /// `window` (cutting off a torn or corrupt tail), and rewrite it with those entries only.
    ///
    /// # Errors
    /// The file cannot be read, created or replaced (a missing directory is created).
    pub fn open(cfg: &JournalConfig, window: Duration) -> io::Result<(Journal, Vec<Restored>)> {
        if let Some(dir) = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let bytes = match std::fs::read(&cfg.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let parsed = parse(&bytes);
        let torn_bytes = (bytes.len() - parsed.valid_len) as u64;
        if torn_bytes > 0 {
            tracing::warn!(path = %cfg.path.display(), torn_bytes, "control journal: a torn or corrupt tail was cut off");
        }
        let now_ms = unix_ms(SystemTime::now());
        let keep = live(parsed.entries, window, now_ms, Some(cfg.max_bytes / 2));
        let restored = keep.iter().filter_map(restore).collect();
        let (file, len) = rewrite(&cfg.path, &keep)?;
        let mut journal = Journal {
            path: cfg.path.clone(),
            file,
            fsync: cfg.fsync,
            max_bytes: cfg.max_bytes,
            window,
            len,
            compact_at: 0,
            torn_bytes,
            compactions: 0,
            compacting: false,
        };
        journal.compact_at = journal.next_compaction();
        Ok((journal, restored))
    }

    /// Append `entry`. Past its limit the file wants a compaction: see
    /// [`Journal::begin_compaction`] (the append itself never compacts).
    ///
    /// # Errors
    /// The write (or fsync) failed; the entry may not be in the journal.
    pub fn append(&mut self, entry: &Entry) -> io::Result<()> {
        let mut buf = Vec::new();
        encode(entry, &mut buf);
        if let Err(e) = self.file.write_all(&buf) {
            // A partial write leaves a torn entry that later appends would hide behind:
            // cut back to what was whole.
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        if self.fsync == JournalFsync::Always {
            self.file.sync_data()?;
        }
        self.len += buf.len() as u64;
        Ok(())
    }

    /// If the file has grown past its limit and no compaction is out: the work of one, to
    /// [prepare](Compaction::prepare) away from the journal (appends go on meanwhile) and
    /// hand back to [`Journal::finish_compaction`].
    pub fn begin_compaction(&mut self) -> Option<Compaction> {
        if self.compacting || self.len <= self.compact_at {
            return None;
        }
        self.compacting = true;
        Some(Compaction {
            path: self.path.clone(),
            upto: self.len,
            window: self.window,
            max_bytes: self.max_bytes,
        })
    }

    /// Complete a compaction: copy what was appended since it began behind the prepared
    /// entries, sync, and rename the tmp file over the journal. A failure leaves the old file
    /// in place (it is logged by the caller and tried again once the file has doubled).
    ///
    /// # Errors
    /// The preparation failed, or copying the tail or replacing the file did.
    pub fn finish_compaction(&mut self, prepared: io::Result<Prepared>) -> io::Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        self.compacting = false;
        let result = prepared.and_then(|mut p| {
            let mut tail = Vec::new();
            let mut f = File::open(&self.path)?;
            f.seek(SeekFrom::Start(p.upto))?;
            f.take(self.len - p.upto).read_to_end(&mut tail)?;
            p.file.write_all(&tail)?;
            p.file.sync_all()?;
            std::fs::rename(&p.tmp, &self.path)?;
            sync_dir(&self.path);
            Ok((p.file, p.len + tail.len() as u64))
        });
        match result {
            Ok((file, len)) => {
                (self.file, self.len) = (file, len);
                self.compact_at = self.next_compaction();
                self.compactions += 1;
                Ok(())
            }
            Err(e) => {
                self.compact_at = self.len.saturating_mul(2);
                Err(e)
            }
        }
    }

    /// Compact now, in the caller (tests; the controller prepares on a blocking thread).
    ///
    /// # Errors
    /// Reading or replacing the file failed; the old file stays in place.
    pub fn compact(&mut self) -> io::Result<()> {
        self.compacting = true;
        let c = Compaction {
            path: self.path.clone(),
            upto: self.len,
            window: self.window,
            max_bytes: self.max_bytes,
        };
        self.finish_compaction(c.prepare())
    }

    /// At `max_bytes`; past it only when the file is already larger (live entries are kept
    /// to half of it, so a compaction always makes room, and this only guards a loop).
    fn next_compaction(&self) -> u64 {
        if self.len < self.max_bytes {
            self.max_bytes
        } else {
            self.len.saturating_mul(2)
        }
    }

    /// From now on every write fails (the file is reopened read-only).
    #[cfg(test)]
    pub(crate) fn break_writes(&mut self) -> io::Result<()> {
        self.file = File::open(&self.path)?;
        Ok(())
    }

    /// Bytes cut off a torn or corrupt tail when the journal was opened.
    pub fn torn_bytes(&self) -> u64 {
        self.torn_bytes
    }

    /// Compactions since the journal was opened (the one at open not counted).
    pub fn compactions(&self) -> u64 {
        self.compactions
    }

    /// The size of the file.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Write `entries` to a tmp file next to `path`, fsync it, rename it over `path`, and fsync
/// the directory; returns the file, open for the next appends (it is the renamed inode, so
/// nothing is written to the replaced one), and its size.
fn rewrite(path: &Path, entries: &[Entry]) -> io::Result<(File, u64)> {
    let tmp = tmp_path(path);
    let (file, len) = write_tmp(&tmp, entries)?;
    std::fs::rename(&tmp, path)?;
    sync_dir(path);
    Ok((file, len))
}

/// Write `entries` to `tmp` (created or truncated) and sync it; the file stays open for
/// appends.
fn write_tmp(tmp: &Path, entries: &[Entry]) -> io::Result<(File, u64)> {
    let mut buf = Vec::new();
    for e in entries {
        encode(e, &mut buf);
    }
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(tmp)?;
    file.write_all(&buf)?;
    file.sync_all()?;
    Ok((file, buf.len() as u64))
}

/// The result a live entry stands for; `None` for a `Done` whose result does not decode.
fn restore(entry: &Entry) -> Option<Restored> {
    match entry {
        Entry::Begin {
            server,
            request_id,
            action,
            at_unix_ms,
        } => Some(Restored {
            server: server.clone(),
            request_id: request_id.clone(),
            at_unix_ms: *at_unix_ms,
            result: ActionResult {
                request_id: request_id.clone(),
                server: server.clone(),
                action: action.clone(),
                status: ActionStatus::OutcomeUnknown as i32,
                reason: RESTARTED_REASON.to_owned(),
                timings: Some(ActionTimings {
                    received_ns: 0,
                    sent_ns: i64::try_from(*at_unix_ms)
                        .unwrap_or(i64::MAX)
                        .saturating_mul(1_000_000),
                    completed_ns: 0,
                }),
                ..ActionResult::default()
            },
            running: true,
        }),
        Entry::Done {
            server,
            request_id,
            at_unix_ms,
            result,
        } => Some(Restored {
            server: server.clone(),
            request_id: request_id.clone(),
            at_unix_ms: *at_unix_ms,
            result: ActionResult::decode(result.as_slice()).ok()?,
            running: false,
        }),
        Entry::Forget { .. } => None,
    }
}

#[cfg(test)]
#[path = "journal_tests.rs"]
mod tests;
