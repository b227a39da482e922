//! The AMI sessions open right now, kept on disk so that the start after a crash can close
//! each one the crashed run left open.

use super::*;

/// The file in the spool directory naming each (server, epoch) whose `connection_up` was
/// accepted and whose `connection_down` was not yet: one `server epoch` line each. A run that
/// ends without closing them (SIGKILL, a crash, the machine gone) leaves them there, and the
/// next start closes each with a `connection_down` record, so consumers can tell "no calls"
/// from "amibus was dead".
pub const OPEN_EPOCHS_FILE: &str = "open-epochs";

/// The `reason` of the `connection_down` a start publishes for an epoch an earlier run left
/// open (its `seq` is 0: the epoch's own numbering ended with that run, unknown where).
pub const UNCLOSED_REASON: &str = "amibus stopped without closing this session (killed or crashed): records read after the last one published were lost";

/// The epochs open right now, shared by the pipelines, mirrored in [`OPEN_EPOCHS_FILE`].
/// Written on every login and logout (rare), with tmp + rename.
#[derive(Clone)]
pub struct OpenEpochs {
    dir: std::path::PathBuf,
    open: Arc<std::sync::Mutex<EpochSet>>,
}

type EpochSet = std::collections::BTreeSet<(Arc<str>, u64)>;

/// What an earlier run left in [`OPEN_EPOCHS_FILE`].
#[derive(Debug, Default)]
pub struct LeftOpen {
    /// (server, epoch) of each session it did not close.
    pub epochs: Vec<(String, u64)>,
    /// Lines that are not `server epoch`.
    pub bad_lines: Vec<String>,
}

impl OpenEpochs {
    /// Read what an earlier run left open in `dir` (the lines that are not `server epoch` are
    /// returned apart), and start with nothing open.
    ///
    /// # Errors
    /// The file exists but cannot be read.
    pub fn load(dir: &std::path::Path) -> std::io::Result<(OpenEpochs, LeftOpen)> {
        let text = match std::fs::read_to_string(dir.join(OPEN_EPOCHS_FILE)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let mut left = LeftOpen::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split_whitespace().collect();
            match (f.as_slice(), f.get(1).and_then(|e| e.parse::<u64>().ok())) {
                ([server, _], Some(epoch)) => left.epochs.push(((*server).to_owned(), epoch)),
                _ => left.bad_lines.push(line.to_owned()),
            }
        }
        let open = OpenEpochs {
            dir: dir.to_owned(),
            open: Arc::default(),
        };
        Ok((open, left))
    }

    /// Write the set as it is now: at start, once what an earlier run left open is closed
    /// (in the spool), so the next start does not close it again.
    pub fn persist(&self) {
        let open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.write(&open);
    }

    pub(super) fn change(&self, server: &Arc<str>, epoch: u64, up: bool) {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = if up {
            open.insert((server.clone(), epoch))
        } else {
            open.remove(&(server.clone(), epoch))
        };
        if changed {
            self.write(&open);
        }
    }

    fn write(&self, open: &EpochSet) {
        let text: String = open
            .iter()
            .map(|(server, epoch)| format!("{server} {epoch}\n"))
            .collect();
        // Under the lock: two pipelines writing at once must not leave the older set behind.
        if let Err(e) =
            crate::durable::replace(&self.dir.join(OPEN_EPOCHS_FILE), text.as_bytes(), false)
        {
            tracing::warn!(error = %e, file = OPEN_EPOCHS_FILE, "cannot record the open AMI sessions; after a crash their close may not be published");
        }
    }
}
