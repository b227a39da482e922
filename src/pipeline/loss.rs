//! Loss the pipeline has yet to report as gap records, and the file that carries it across
//! restarts.

/// Why records were lost in the spool: the `reason` of their gap record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LossReason {
    /// Dropped by the spool's cap (or a gap record naming them was).
    #[default]
    SpoolFull,
    /// Damaged on disk (a flipped byte, a truncated segment).
    SpoolDamaged,
    /// The spool could not write them (disk full, I/O error).
    SpoolWriteFailed,
    /// Dropped by the spool's cap while in flight to the broker, and not confirmed: the broker
    /// may have stored them all the same (its confirmation lost with the connection), so a
    /// consumer can find such a record both delivered and in this gap.
    SpoolFullInDoubt,
}

impl LossReason {
    /// The gap record's `reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::SpoolFull => "spool full",
            LossReason::SpoolDamaged => "spool damaged",
            LossReason::SpoolWriteFailed => "spool write failed",
            LossReason::SpoolFullInDoubt => "spool full (in doubt)",
        }
    }

    /// The word in [`UNREPORTED_FILE`].
    fn token(self) -> &'static str {
        match self {
            LossReason::SpoolFull => "spool-full",
            LossReason::SpoolDamaged => "spool-damaged",
            LossReason::SpoolWriteFailed => "spool-write-failed",
            LossReason::SpoolFullInDoubt => "spool-full-in-doubt",
        }
    }

    fn parse_token(s: &str) -> Option<LossReason> {
        [
            LossReason::SpoolFull,
            LossReason::SpoolDamaged,
            LossReason::SpoolWriteFailed,
            LossReason::SpoolFullInDoubt,
        ]
        .into_iter()
        .find(|r| r.token() == s)
    }
}

/// A loss not reported yet.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LostRange {
    pub server: String,
    pub epoch: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub reason: LossReason,
}

/// The file in the spool directory that carries unreported loss from one run to the next. It
/// is read at start and replaced only at a clean stop, so a crash in between reports the loss
/// twice rather than never.
pub const UNREPORTED_FILE: &str = "unreported-gaps";

/// Write `lost` to [`UNREPORTED_FILE`] in `dir` (one `server epoch first last [reason]` line
/// each; the reason is left out for `spool-full`, as files written before it existed read), or
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
        .map(|l| {
            let (server, epoch, first, last) = (&l.server, l.epoch, l.first_seq, l.last_seq);
            match l.reason {
                LossReason::SpoolFull => format!("{server} {epoch} {first} {last}\n"),
                r => format!("{server} {epoch} {first} {last} {}\n", r.token()),
            }
        })
        .collect();
    crate::durable::replace(&dir.join(UNREPORTED_FILE), text.as_bytes(), false)
}

/// Read [`UNREPORTED_FILE`] from `dir`: the ranges, and the lines that are not ranges. A line
/// without a reason (every line of a file written before reasons) is `spool-full`.
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
        let reason = match f.get(4) {
            None => Some(LossReason::SpoolFull),
            Some(token) => LossReason::parse_token(token),
        };
        match (f.first(), num(1), num(2), num(3), reason, f.len()) {
            (Some(server), Some(epoch), Some(first), Some(last), Some(reason), 4 | 5)
                if first <= last =>
            {
                ranges.push(LostRange {
                    server: (*server).to_owned(),
                    epoch,
                    first_seq: first,
                    last_seq: last,
                    reason,
                });
            }
            _ => bad.push(line.to_owned()),
        }
    }
    Ok((ranges, bad))
}
