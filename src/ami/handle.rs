//! The way everyone but the connection task talks to an AMI server.
//!
//! Owns: [`Handle`] (cloneable; a bounded channel to the task that owns the socket), the request
//! and reply types, and [`ActionError`].
//!
//! Must never: touch the socket, or retry an action. Whether an action ran is only known from
//! its response: once an action may have reached the server, a failure is reported as
//! [`ActionError::OutcomeUnknown`] or [`ActionError::TimedOut`], never re-sent.

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
    /// List items past the connection's `max_list_items` were dropped.
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

/// A request on its way to the connection task.
#[derive(Debug)]
pub(crate) struct Command {
    pub action: Action,
    pub await_event: Option<String>,
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<ActionReply, ActionError>>,
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
            reply,
        };
        match tokio::time::timeout_at(deadline, self.tx.send(cmd)).await {
            Err(_) => return Err(ActionError::Busy),
            Ok(Err(_)) => return Err(ActionError::Closed),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(ActionError::TimedOut),
            // The task ended without answering: it answers everything it sent, so this was
            // still queued.
            Ok(Err(_)) => Err(ActionError::Closed),
            Ok(Ok(r)) => r,
        }
    }
}
