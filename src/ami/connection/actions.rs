//! Actions on a session: ActionIDs, the table of pending actions, and routing replies to them.

use super::*;
use crate::ami::Known;

/// An action awaiting its reply.
pub(super) struct Pending {
    /// Answers on every path: a reply, `TimedOut` at the deadline sweep, `ConnectionLost` when
    /// the session ends or the entry is dropped.
    pub(super) reply: Accepted,
    pub(super) await_event: Option<String>,
    pub(super) deadline: Instant,
    pub(super) response: Option<OwnedFrame>,
    pub(super) list: bool,
    pub(super) list_done: bool,
    pub(super) events: Vec<OwnedFrame>,
    pub(super) awaited: Option<OwnedFrame>,
    pub(super) truncated: bool,
    /// Bytes of `events`, counted in [`Session::reply_bytes`].
    pub(super) bytes: usize,
}

impl Pending {
    pub(super) fn is_complete(&self) -> bool {
        self.response.is_some()
            && (!self.list || self.list_done)
            && (self.await_event.is_none() || self.awaited.is_some())
    }
}

/// ActionIDs of one session: `<instance>-<server>-<epoch>-<counter>`.
pub(super) struct Ids {
    /// `<instance>-<server>-`: any ActionID of this process and server.
    pub(super) ours: String,
    pub(super) prefix: String,
    pub(super) counter: u64,
}

impl Ids {
    pub(super) fn new(server: &str, epoch: u64) -> Self {
        let ours = format!("{}-{server}-", instance_id());
        Ids {
            prefix: format!("{ours}{epoch}-"),
            ours,
            counter: 0,
        }
    }

    pub(super) fn next(&mut self) -> String {
        self.counter += 1;
        format!("{}{}", self.prefix, self.counter)
    }
}

impl Task {
    /// Accept a command (write it and remember it) or refuse it as not sent. Accepting and
    /// writing are one step: nothing between them can fail or wait.
    pub(super) fn take_command(&mut self, s: &mut Session, c: Command) {
        if c.reply.is_closed() {
            return;
        }
        if Instant::now() >= c.deadline {
            c.reply.refuse(NotSent::Busy);
            return;
        }
        let id = s.ids.next();
        if let Err(e) = c.action.encode(Some(&id), &mut s.wbuf) {
            c.reply.refuse(NotSent::Invalid(e));
            return;
        }
        let reply = c.reply.accept();
        s.pending.insert(
            id,
            Pending {
                reply,
                await_event: c.await_event,
                deadline: c.deadline,
                response: None,
                list: false,
                list_done: false,
                events: Vec::new(),
                awaited: None,
                truncated: false,
                bytes: 0,
            },
        );
    }

    pub(super) fn dispatch(
        &mut self,
        s: &mut Session,
        item: Decoded,
        at: i64,
    ) -> Result<(), DownstreamClosed> {
        match item {
            Decoded::Frame(f) => {
                inc(&self.stats.frames);
                let f = match s.snapshot.route(f) {
                    Routed::Pass(f) => f,
                    Routed::Emit(r) => return self.out.emit(r, at),
                    Routed::Consumed => return Ok(()),
                };
                match self.route(s, f) {
                    Some(f) => self.out.emit(Record::Frame(f), at),
                    None => Ok(()),
                }
            }
            Decoded::Error(e) => {
                inc(&self.stats.parse_errors);
                self.out.emit(Record::ParseError(e.into()), at)
            }
            Decoded::Truncated { bytes } => {
                inc(&self.stats.parse_errors);
                let rec = ParseErrorRecord {
                    reason: "truncated",
                    message: format!("the connection ended inside a frame; {bytes} bytes dropped"),
                };
                self.out.emit(Record::ParseError(rec), at)
            }
        }
    }

    /// Give a frame to the action waiting for it. Returns the frame if it goes downstream.
    pub(super) fn route(&mut self, s: &mut Session, f: OwnedFrame) -> Option<OwnedFrame> {
        let view = f.frame();
        // The parser noted where ActionID is (a search of every header, on every frame, was a
        // visible share of the CPU per event); a first line is never one in practice, but
        // `get` found it there too.
        let action_id = match view.header(0) {
            Some(first) if first.is("ActionID") => first.value,
            _ => view.known(Known::ActionId),
        };
        let Some(id) = action_id.and_then(|v| std::str::from_utf8(v).ok()) else {
            return Some(f);
        };
        let is_response = view.header(0).is_some_and(|h| h.is("Response"));
        if is_response && s.ping.as_ref().is_some_and(|(p, _)| p == id) {
            s.ping = None;
            return None;
        }
        let Some(p) = s.pending.get_mut(id) else {
            // Ours but nobody waits (the caller timed out): a reply is dropped and counted; a
            // broadcast event (with `Privilege:`) still goes downstream.
            if id.starts_with(&s.ids.ours) && (is_response || view.get("Privilege").is_none()) {
                inc(&self.stats.late_replies);
                return None;
            }
            return Some(f);
        };
        let id = id.to_owned();
        let mut forward = None;
        if is_response {
            if p.response.is_some() {
                return Some(f);
            }
            p.list = view
                .get("EventList")
                .is_some_and(|v| v.eq_ignore_ascii_case(b"start"));
            let success = view
                .get("Response")
                .is_some_and(|v| v.eq_ignore_ascii_case(b"Success"));
            if !success {
                // A refused action sends no list and no event.
                p.list = false;
                p.await_event = None;
                p.awaited = None;
            }
            p.response = Some(f);
        } else if p.list && !p.list_done && p.response.is_some() {
            if view
                .get("EventList")
                .is_some_and(|v| v.eq_ignore_ascii_case(b"Complete"))
            {
                p.list_done = true;
                p.bytes += f.bytes().len();
                s.reply_bytes += f.bytes().len();
                p.events.push(f);
            } else if p.events.len() < self.opts.max_list_items
                && s.reply_bytes + f.bytes().len() <= self.opts.max_reply_bytes
            {
                p.bytes += f.bytes().len();
                s.reply_bytes += f.bytes().len();
                p.events.push(f);
            } else {
                p.truncated = true;
            }
        } else if p.awaited.is_none()
            && p.await_event.as_deref().is_some_and(|name| {
                view.get("Event")
                    .is_some_and(|e| e.eq_ignore_ascii_case(name.as_bytes()))
            })
        {
            // A broadcast event: the caller gets a copy, downstream gets it too.
            p.awaited = Some(f.clone());
            forward = Some(f);
        } else {
            return Some(f);
        }
        if p.is_complete()
            && let Some(p) = s.pending.remove(&id)
        {
            s.reply_bytes -= p.bytes;
            if let Some(response) = p.response {
                p.reply.reply(ActionReply {
                    response,
                    events: p.events,
                    awaited: p.awaited,
                    truncated: p.truncated,
                });
            }
        }
        forward
    }
}
