//! Turning what happened to a request into its [`ActionResult`]: a reply, an error, a
//! rejection, an expiry.

use super::rules::{RejectCode, Rejection};
use crate::ami::record::now_ns;
use crate::ami::{ActionError, ActionReply, OwnedFrame};
use crate::model::pb::{
    self, ActionRequest, ActionResult, ActionStatus, ActionTimings, ReplyFrame,
};

/// The result of a complete reply: `success` or `error` from the response (and, for an
/// async Originate, from its OriginateResponse).
pub fn fill_reply(result: &mut ActionResult, reply: ActionReply) {
    let ok = reply.is_success();
    let message = reply.message();
    result.action_id = reply
        .response
        .frame()
        .get("ActionID")
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    result.response = Some(reply_frame(&reply.response));
    result.events = reply.events.iter().map(reply_frame).collect();
    result.events_truncated = reply.truncated;
    let mut status = if ok {
        ActionStatus::Success
    } else {
        ActionStatus::Error
    };
    let mut reason = if ok {
        String::new()
    } else {
        message.unwrap_or_default()
    };
    if reply.truncated && reason.is_empty() {
        reason = format!(
            "the list was truncated to {} items by amibus's reply limits (max items per reply, max bytes per connection)",
            reply.events.len().saturating_sub(1)
        );
    }
    if let Some(ev) = &reply.awaited {
        let f = ev.frame();
        let call_ok = f
            .get("Response")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"Success"));
        if !call_ok {
            status = ActionStatus::Error;
            reason = format!(
                "OriginateResponse: {} (Reason: {})",
                String::from_utf8_lossy(f.get("Response").unwrap_or(b"?")),
                String::from_utf8_lossy(f.get("Reason").unwrap_or(b"?"))
            );
        }
        result.originate_response = Some(reply_frame(ev));
    }
    result.status = status as i32;
    result.reason = reason;
}

/// The result of a failed send.
pub fn fill_error(result: &mut ActionResult, e: &ActionError, deadline_ns: i64) {
    let (status, code) = match e {
        ActionError::Invalid(_) => (ActionStatus::Rejected, Some(RejectCode::InvalidHeader)),
        ActionError::NotConnected => (ActionStatus::Rejected, Some(RejectCode::NotConnected)),
        // Not sent because the queue stayed full: past the request's deadline that is
        // simply expiry.
        ActionError::Busy if now_ns() >= deadline_ns => (ActionStatus::Expired, None),
        ActionError::Busy => (ActionStatus::Rejected, Some(RejectCode::Busy)),
        ActionError::Closed => (ActionStatus::Rejected, Some(RejectCode::ShuttingDown)),
        ActionError::OutcomeUnknown => (ActionStatus::OutcomeUnknown, None),
        ActionError::TimedOut => (ActionStatus::Timeout, None),
    };
    result.status = status as i32;
    result.reason = e.to_string();
    if let Some(code) = code {
        result.reject_code = code.as_str().to_owned();
        result.retriable = code.is_retriable();
    }
}

fn reply_frame(f: &OwnedFrame) -> ReplyFrame {
    ReplyFrame {
        headers: f
            .frame()
            .headers()
            .map(|h| pb::Header {
                key: h.key.to_vec(),
                value: h.value.map(<[u8]>::to_vec),
                normalized_key: String::new(),
            })
            .collect(),
    }
}

pub(super) fn base(req: &ActionRequest, received_ns: i64) -> ActionResult {
    ActionResult {
        request_id: req.request_id.clone(),
        server: req.server.clone(),
        action: req.action.clone(),
        correlation: req.correlation.clone(),
        timings: Some(ActionTimings {
            received_ns,
            sent_ns: 0,
            completed_ns: 0,
        }),
        ..ActionResult::default()
    }
}

pub(super) fn rejected(req: &ActionRequest, received_ns: i64, rej: Rejection) -> ActionResult {
    let mut r = base(req, received_ns);
    r.status = ActionStatus::Rejected as i32;
    r.retriable = rej.code.is_retriable();
    r.reject_code = rej.code.as_str().to_owned();
    r.reason = rej.reason;
    if let Some(t) = r.timings.as_mut() {
        t.completed_ns = now_ns();
    }
    r
}

pub(super) fn expired(req: &ActionRequest, received_ns: i64, why: &str) -> ActionResult {
    let mut r = base(req, received_ns);
    r.status = ActionStatus::Expired as i32;
    r.reason = why.to_owned();
    r
}
