//! The way everyone but the connection task talks to an AMI server.
//!
//! Owns: [`Handle`] (cloneable; a bounded channel to the task that owns the socket), the request
//! and reply types, and [`ActionError`].
//!
//! Must never: touch the socket, or retry an action. Whether an action ran is only known from
//! its response: once an action may have reached the server, a failure is reported as
//! [`ActionError::OutcomeUnknown`] or [`ActionError::TimedOut`], never re-sent.
//!
//! # The contract between a caller and the connection, as types
//! A [`Command`] carries a [`Replier`]: while the command waits in the channel, the connection
//! can only [refuse](Replier::refuse) it with a reason that means "not sent" ([`NotSent`]) or
//! [accept](Replier::accept) it. Accepting (done in the same step as writing the action into
//! the session's write buffer) turns it into an [`Accepted`], which answers exactly once: the
//! reply, an [`Unknown`] outcome, or, if it is dropped unanswered (a deadline sweep, a session
//! that ends, a task that dies), [`Unknown::ConnectionLost`]. So the only way a caller sees its
//! reply channel closed without an answer ([`ActionError::Closed`], "certainly not sent") is a
//! command that was never accepted: still queued when the connection task ended.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::action::{Action, EncodeError};
use super::frame::OwnedFrame;

/// One action request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub action: Action,
    /// How long the caller waits for the whole reply (response, list, awaited event).
    pub timeout: Duration,
    /// Also wait for the first event of this name carrying the action's ActionID, such as
    /// `OriginateResponse` after an `Async: true` Originate. The event still goes downstream too.
    pub await_event: Option<String>,
}

impl Request {
    pub fn new(action: Action, timeout: Duration) -> Self {
        Request {
            action,
            timeout,
            await_event: None,
        }
    }

    /// Wait for the event `name` (e.g. `OriginateResponse`) as well as the response.
    pub fn await_event(mut self, name: impl Into<String>) -> Self {
        self.await_event = Some(name.into());
        self
    }
}

/// What the server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActionReply {
    /// The `Response:` frame.
    pub response: OwnedFrame,
    /// For an `EventList: start` response: the list items and, last, the completion event
    /// (`EventList: Complete`), in wire order.
    pub events: Vec<OwnedFrame>,
    /// The awaited event, if [`Request::await_event`] was set and the response was a success.
    pub awaited: Option<OwnedFrame>,
    /// List items were dropped: past the connection's `max_list_items` per reply, or past its
    /// `max_reply_bytes` for all replies in flight together.
    pub truncated: bool,
}

impl ActionReply {
    /// `Response: Success`.
    pub fn is_success(&self) -> bool {
        self.response
            .frame()
            .get("Response")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"Success"))
    }

    /// The response's `Message:`, if any.
    pub fn message(&self) -> Option<String> {
        self.response
            .frame()
            .get("Message")
            .map(|m| String::from_utf8_lossy(m).into_owned())
    }
}

/// Why an action has no reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// The action cannot be written (CR/LF, line too long, …). Not sent.
    #[error("invalid action: {0}")]
    Invalid(#[from] EncodeError),
    /// No session is logged in right now. Not sent.
    #[error("not connected")]
    NotConnected,
    /// The connection's queue or in-flight table stayed full until the deadline. Not sent.
    #[error("connection busy; the action was not sent")]
    Busy,
    /// The connection task has ended (shutdown). Not sent.
    #[error("the connection task has ended")]
    Closed,
    /// The action was (or may have been) written, then the connection dropped before the full
    /// reply arrived. It may or may not have run; it is not re-sent.
    #[error("connection lost after sending; the outcome is unknown")]
    OutcomeUnknown,
    /// The deadline passed after the action was handed to the connection. It may have run.
    #[error("no complete reply before the deadline; the outcome is unknown")]
    TimedOut,
}

impl ActionError {
    /// Whether the action certainly did not reach the server, so sending it again is safe.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            ActionError::NotConnected | ActionError::Busy | ActionError::Closed
        )
    }

    /// Whether the action may have run.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, ActionError::OutcomeUnknown | ActionError::TimedOut)
    }
}

/// Why the connection refused a command it had not accepted: nothing was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NotSent {
    NotConnected,
    /// Taken off the queue at or past its deadline.
    Busy,
    Invalid(EncodeError),
}

/// Why an accepted command has no complete reply: it may have run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unknown {
    /// The deadline passed first.
    TimedOut,
    /// The session ended (or the connection let go of the command) first.
    ConnectionLost,
}

/// What travels back to the caller: a refusal (not sent) or the outcome of an accepted
/// command, which can never be "not sent".
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "a reply holds frames, which carry the parser's noted header slots (36 bytes) so \
              normalization needs no second pass; one answer per action is not worth a box"
)]
pub(crate) enum Answer {
    Refused(NotSent),
    Accepted(Result<ActionReply, Unknown>),
}

impl From<NotSent> for ActionError {
    fn from(n: NotSent) -> Self {
        match n {
            NotSent::NotConnected => ActionError::NotConnected,
            NotSent::Busy => ActionError::Busy,
            NotSent::Invalid(e) => ActionError::Invalid(e),
        }
    }
}

impl From<Unknown> for ActionError {
    fn from(u: Unknown) -> Self {
        match u {
            Unknown::TimedOut => ActionError::TimedOut,
            Unknown::ConnectionLost => ActionError::OutcomeUnknown,
        }
    }
}

/// The answer slot of a command the connection has not accepted (yet). Dropping it unanswered
/// tells the caller the command was never accepted ([`ActionError::Closed`]).
#[derive(Debug)]
pub(crate) struct Replier(oneshot::Sender<Answer>);

impl Replier {
    /// Whether the caller has stopped waiting.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    /// Refuse the command; nothing of it may have been written.
    pub fn refuse(self, why: NotSent) {
        let _ = self.0.send(Answer::Refused(why));
    }

    /// Accept the command: from here on it is answered with a reply or an unknown outcome,
    /// whatever happens (see [`Accepted`]). Call it in the same step that writes the action.
    pub fn accept(self) -> Accepted {
        Accepted { tx: Some(self.0) }
    }
}

/// The answer slot of an accepted command: answers exactly once, and if dropped unanswered,
/// with [`Unknown::ConnectionLost`], never with silence (which would read as "not sent").
#[derive(Debug)]
pub(crate) struct Accepted {
    tx: Option<oneshot::Sender<Answer>>,
}

impl Accepted {
    /// Whether the caller has stopped waiting.
    pub fn is_closed(&self) -> bool {
        self.tx.as_ref().is_none_or(oneshot::Sender::is_closed)
    }

    /// The complete reply.
    pub fn reply(mut self, reply: ActionReply) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Answer::Accepted(Ok(reply)));
        }
    }

    /// No complete reply: the action may have run.
    pub fn unknown(mut self, why: Unknown) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Answer::Accepted(Err(why)));
        }
    }
}

impl Drop for Accepted {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Answer::Accepted(Err(Unknown::ConnectionLost)));
        }
    }
}

/// A request on its way to the connection task.
#[derive(Debug)]
pub(crate) struct Command {
    pub action: Action,
    pub await_event: Option<String>,
    pub deadline: Instant,
    pub reply: Replier,
}

/// A cloneable handle to one server's connection task.
#[derive(Clone, Debug)]
pub struct Handle {
    server: std::sync::Arc<str>,
    tx: mpsc::Sender<Command>,
}

impl Handle {
    pub(crate) fn new(server: std::sync::Arc<str>, tx: mpsc::Sender<Command>) -> Self {
        Handle { server, tx }
    }

    /// The server id.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Send `action` and wait up to `timeout` for its reply.
    ///
    /// # Errors
    /// [`ActionError`]; [`ActionError::is_retriable`] tells whether the action certainly was
    /// not sent.
    pub async fn send(
        &self,
        action: Action,
        timeout: Duration,
    ) -> Result<ActionReply, ActionError> {
        self.request(Request::new(action, timeout)).await
    }

    /// Send a request and wait for its reply.
    ///
    /// # Errors
    /// As [`Handle::send`].
    pub async fn request(&self, req: Request) -> Result<ActionReply, ActionError> {
        req.action.validate()?;
        let deadline = Instant::now() + req.timeout;
        let (reply, rx) = oneshot::channel();
        let cmd = Command {
            action: req.action,
            await_event: req.await_event,
            deadline,
            reply: Replier(reply),
        };
        match tokio::time::timeout_at(deadline, self.tx.send(cmd)).await {
            Err(_) => return Err(ActionError::Busy),
            Ok(Err(_)) => return Err(ActionError::Closed),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(ActionError::TimedOut),
            // Dropped unanswered: only a command never accepted can be (an accepted one
            // answers on drop), so it was still queued when the task ended.
            Ok(Err(_)) => Err(ActionError::Closed),
            Ok(Ok(Answer::Refused(why))) => Err(why.into()),
            Ok(Ok(Answer::Accepted(Ok(reply)))) => Ok(reply),
            Ok(Ok(Answer::Accepted(Err(why)))) => Err(why.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll};

    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(std::task::Waker::noop()))
    }

    fn handle(cap: usize) -> (Handle, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(cap);
        (Handle::new("pbx1".into(), tx), rx)
    }

    /// The race of issue 14, forced: the connection lets go of an accepted command at its
    /// deadline before the caller's own timer is polled. The caller must not read that as
    /// "not sent" (before, it got `Closed`, then `shutting_down, retriable`, and a retry ran
    /// the action a second time).
    #[tokio::test(start_paused = true)]
    async fn an_accepted_command_dropped_at_its_deadline_is_never_not_sent() {
        let (h, mut rx) = handle(1);
        let timeout = Duration::from_secs(1);
        let mut call = pin!(h.send(Action::new("Originate"), timeout));
        assert!(poll_once(call.as_mut()).is_pending(), "queued, waiting");
        let cmd = rx.try_recv().expect("queued");
        let accepted = cmd.reply.accept();
        tokio::time::advance(timeout * 2).await;
        // The connection's sweep runs first and drops what is past its deadline.
        drop(accepted);
        let err = call.await.expect_err("no reply");
        assert!(err.outcome_unknown() && !err.is_retriable(), "{err:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn every_answer_of_an_accepted_command_is_an_outcome_not_a_refusal() {
        for how in 0..3 {
            let (h, mut rx) = handle(1);
            let mut call = pin!(h.send(Action::new("Command"), Duration::from_secs(5)));
            assert!(poll_once(call.as_mut()).is_pending());
            let accepted = rx.try_recv().expect("queued").reply.accept();
            match how {
                0 => accepted.unknown(Unknown::TimedOut),
                1 => accepted.unknown(Unknown::ConnectionLost),
                // The connection task ends, dropping everything it holds.
                _ => {
                    drop(rx);
                    drop(accepted);
                    let err = call.await.expect_err("no reply");
                    assert_eq!(err, ActionError::OutcomeUnknown);
                    continue;
                }
            }
            let err = call.await.expect_err("no reply");
            assert!(
                err.outcome_unknown() && !err.is_retriable(),
                "{how}: {err:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_command_never_accepted_is_not_sent() {
        let (h, rx) = handle(1);
        let mut call = pin!(h.send(Action::new("Ping"), Duration::from_secs(5)));
        assert!(poll_once(call.as_mut()).is_pending());
        // The task ends with the command still queued.
        drop(rx);
        let err = call.await.expect_err("no reply");
        assert_eq!(err, ActionError::Closed);
        assert!(err.is_retriable());

        let (h, mut rx) = handle(1);
        let mut call = pin!(h.send(Action::new("Ping"), Duration::from_secs(5)));
        assert!(poll_once(call.as_mut()).is_pending());
        rx.try_recv()
            .expect("queued")
            .reply
            .refuse(NotSent::NotConnected);
        assert_eq!(call.await, Err(ActionError::NotConnected));
    }
}
