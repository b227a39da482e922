//! Per request id, how many actions a simulated server received: what a test needs to check
//! that a request reached "Asterisk" at most once, whatever happened to amibus in between.
//!
//! A client marks an action with a header `Variable: amibus_request_id=<id>` (Asterisk takes
//! `Variable` on Originate, where one line may carry several `name=value` pairs separated by
//! commas, and ignores headers it does not know on other actions). The ActionID cannot be the
//! key: amibus makes a new one per attempt. Only actions of a logged-in session are counted,
//! once per action even if it names the id twice.
//!
//! Owns: the counts of one server. Must never: grow without bound: at most [`MAX_IDS`] ids are
//! kept per server; an action for an id past that is counted in `untracked` only.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::ami::Frame;

/// The variable that carries the request id.
pub const REQUEST_ID_VARIABLE: &str = "amibus_request_id";

/// Ids kept per server, at most.
pub const MAX_IDS: usize = 1 << 20;

/// What [`crate::sim::SimHandle::actions_seen`] returns: over all servers, the actions
/// received per request id, and the actions whose id was not kept (past [`MAX_IDS`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActionsSeen {
    pub by_id: HashMap<String, u64>,
    pub untracked: u64,
}

/// The counts of one server.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    seen: Mutex<ActionsSeen>,
}

impl Tally {
    /// Count `f` under its request id, if it carries one.
    pub fn record(&self, f: &Frame<'_>) {
        let Some(id) = request_id(f) else { return };
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = seen.by_id.get_mut(id.as_str()) {
            *n += 1;
        } else if seen.by_id.len() < MAX_IDS {
            seen.by_id.insert(id, 1);
        } else {
            seen.untracked += 1;
        }
    }

    /// Add this server's counts to `into`.
    pub fn add_to(&self, into: &mut ActionsSeen) {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        for (id, n) in &seen.by_id {
            *into.by_id.entry(id.clone()).or_default() += n;
        }
        into.untracked += seen.untracked;
    }
}

/// The first `amibus_request_id=<id>` among the `Variable` headers of `f`.
fn request_id(f: &Frame<'_>) -> Option<String> {
    f.headers()
        .filter(|h| h.is("Variable"))
        .filter_map(|h| h.value)
        .flat_map(|v| v.split(|&b| b == b','))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let (name, value) = pair.split_at(pair.iter().position(|&b| b == b'=')?);
            name.eq_ignore_ascii_case(REQUEST_ID_VARIABLE.as_bytes())
                .then(|| String::from_utf8_lossy(&value[1..]).into_owned())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ami::{AmiCodec, Decoded, Limits};
    use bytes::BytesMut;
    use tokio_util::codec::Decoder;

    fn count(raw: &[&[u8]]) -> ActionsSeen {
        let tally = Tally::default();
        let mut codec = AmiCodec::new(Limits::default());
        for r in raw {
            let mut buf = BytesMut::from(*r);
            match codec.decode(&mut buf) {
                Ok(Some(Decoded::Frame(f))) => tally.record(&f.frame()),
                other => panic!("not a frame: {other:?}"),
            }
        }
        let mut out = ActionsSeen::default();
        tally.add_to(&mut out);
        out
    }

    #[test]
    fn counts_by_the_request_id_variable_only() {
        let seen = count(&[
            b"Action: Ping\r\nActionID: 1\r\nVariable: amibus_request_id=a\r\n\r\n",
            // Another attempt (new ActionID), among other variables on one line.
            b"Action: Originate\r\nActionID: 2\r\nVariable: x=1, AMIBUS_REQUEST_ID=a,y=2\r\n\r\n",
            b"Action: Command\r\nActionID: 3\r\nVariable: x=1\r\nVariable: amibus_request_id=b\r\n\r\n",
            // No id, or a value without '=': not counted.
            b"Action: Ping\r\nActionID: 4\r\n\r\n",
            b"Action: Ping\r\nActionID: 5\r\nVariable: amibus_request_id\r\n\r\n",
        ]);
        assert_eq!(
            seen.by_id,
            HashMap::from([("a".to_owned(), 2), ("b".to_owned(), 1)])
        );
        assert_eq!(seen.untracked, 0);
    }
}
