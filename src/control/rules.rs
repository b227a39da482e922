//! The checks a request passes before it may reach Asterisk, as pure functions.
//!
//! Owns: decoding an [`ActionRequest`], the required fields, the route check (the body names
//! the server of its subject or key, [`check_route`]), header safety (through
//! [`Action::validate`]: no CR/LF, NUL or other control character, no `:` in a key, no line past Asterisk's 1024-byte input
//! buffer, no caller-set `ActionID`), the allow-list ([`AllowList`], read-only by default),
//! the deadline, and the stable rejection labels ([`RejectCode`]).
//!
//! Must never: do I/O or panic on anything that came off the bus. Every refusal is a value.

use std::collections::HashSet;
use std::time::Duration;

use prost::Message;

use crate::ami::Action;
use crate::model::pb::ActionRequest;

/// Actions allowed when a server configures no `allow_actions`: they only read state.
/// (`GetConfig` is left out on purpose: it reveals `manager.conf` secrets.)
pub const READ_ONLY_ACTIONS: &[&str] = &[
    "Ping",
    "CoreStatus",
    "CoreSettings",
    "CoreShowChannels",
    "CoreShowChannelMap",
    "Status",
    "Getvar",
    "QueueStatus",
    "QueueSummary",
    "ConfbridgeList",
    "ConfbridgeListRooms",
    "BridgeList",
    "BridgeInfo",
    "ExtensionState",
    "ExtensionStateList",
    "DeviceStateList",
    "PresenceState",
    "PresenceStateList",
    "ParkedCalls",
    "Parkinglots",
    "Agents",
    "ListCommands",
];

pub use crate::ami::server::READ_ONLY_ALIAS;

/// Actions that would change amibus's own session (log it out, change its event mask or
/// filters, block it); refused whatever the configuration says.
pub const NEVER_ALLOWED: &[&str] = &[
    "Login",
    "Logoff",
    "Challenge",
    "Events",
    "Filter",
    "WaitEvent",
];

/// The longest request id accepted, in bytes.
pub const MAX_REQUEST_ID: usize = 200;
/// The longest correlation data accepted, in bytes.
pub const MAX_CORRELATION: usize = 4096;

/// Why a request was not sent: a stable label for results and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectCode {
    /// Not a decodable `amibus.v1.ActionRequest`.
    Malformed,
    /// A required field is empty or a field is too long.
    MissingField,
    /// A header would break the AMI framing (CR/LF, `:` in a key, line too long, ActionID).
    InvalidHeader,
    /// The action is not on the server's allow-list.
    NotAllowed,
    /// This replica owns the server id but no such server is configured.
    UnknownServer,
    /// Another replica owns the server.
    NotOwned,
    /// The server's token bucket is empty.
    RateLimited,
    /// The server's AMI session is down.
    NotConnected,
    /// The server's connection queue stayed full.
    Busy,
    /// amibus is stopping.
    ShuttingDown,
    /// The idempotency journal could not record the action, so it was not sent (sending it
    /// unjournaled could run it twice after a restart).
    JournalUnavailable,
    /// The request's `server` is not the server its NATS subject (or Kafka key) names. Refused
    /// so that permissions granted per subject cannot be bypassed by the body.
    ServerMismatch,
}

impl RejectCode {
    pub const ALL: [RejectCode; 12] = [
        RejectCode::Malformed,
        RejectCode::MissingField,
        RejectCode::InvalidHeader,
        RejectCode::NotAllowed,
        RejectCode::UnknownServer,
        RejectCode::NotOwned,
        RejectCode::RateLimited,
        RejectCode::NotConnected,
        RejectCode::Busy,
        RejectCode::ShuttingDown,
        RejectCode::JournalUnavailable,
        RejectCode::ServerMismatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::Malformed => "malformed",
            RejectCode::MissingField => "missing_field",
            RejectCode::InvalidHeader => "invalid_header",
            RejectCode::NotAllowed => "not_allowed",
            RejectCode::UnknownServer => "unknown_server",
            RejectCode::NotOwned => "not_owned",
            RejectCode::RateLimited => "rate_limited",
            RejectCode::NotConnected => "not_connected",
            RejectCode::Busy => "busy",
            RejectCode::ShuttingDown => "shutting_down",
            RejectCode::JournalUnavailable => "journal_unavailable",
            RejectCode::ServerMismatch => "server_mismatch",
        }
    }

    /// Whether the same request can succeed later (nothing is wrong with the request itself).
    /// Such rejections are not remembered under the request id, so a retry runs.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            RejectCode::RateLimited
                | RejectCode::NotConnected
                | RejectCode::Busy
                | RejectCode::ShuttingDown
                | RejectCode::JournalUnavailable
        )
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// A refusal with its reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub code: RejectCode,
    pub reason: String,
}

impl Rejection {
    pub fn new(code: RejectCode, reason: impl Into<String>) -> Self {
        Rejection {
            code,
            reason: reason.into(),
        }
    }
}

/// The action names one server accepts (ASCII case ignored, as Asterisk does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowList {
    names: HashSet<String>,
}

impl Default for AllowList {
    fn default() -> Self {
        AllowList::read_only()
    }
}

impl AllowList {
    /// [`READ_ONLY_ACTIONS`].
    pub fn read_only() -> Self {
        AllowList::new(READ_ONLY_ACTIONS.iter().copied())
    }

    /// Exactly these names; [`READ_ONLY_ALIAS`] expands to the read-only set and
    /// [`NEVER_ALLOWED`] names are dropped.
    ///
    /// ```
    /// use amibus::control::AllowList;
    /// let allow = AllowList::new(["read-only", "Originate"]);
    /// assert!(allow.allows("originate") && allow.allows("Ping"));
    /// assert!(!allow.allows("Hangup"));
    /// assert!(!AllowList::new(["Logoff"]).allows("Logoff"));
    /// ```
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut set = HashSet::new();
        for n in names {
            if n.eq_ignore_ascii_case(READ_ONLY_ALIAS) {
                set.extend(READ_ONLY_ACTIONS.iter().map(|a| a.to_ascii_lowercase()));
            } else {
                set.insert(n.to_ascii_lowercase());
            }
        }
        set.retain(|n| !is_never_allowed(n));
        AllowList { names: set }
    }

    pub fn allows(&self, action: &str) -> bool {
        !is_never_allowed(action) && self.names.contains(&action.to_ascii_lowercase())
    }
}

/// Whether `action` is one of [`NEVER_ALLOWED`].
pub fn is_never_allowed(action: &str) -> bool {
    NEVER_ALLOWED.iter().any(|n| n.eq_ignore_ascii_case(action))
}

/// Decode a request.
///
/// # Errors
/// [`RejectCode::Malformed`] if the bytes are not an `ActionRequest`.
pub fn parse_request(payload: &[u8]) -> Result<ActionRequest, Rejection> {
    ActionRequest::decode(payload).map_err(|e| {
        Rejection::new(
            RejectCode::Malformed,
            format!("not an amibus.v1.ActionRequest: {e}"),
        )
    })
}

/// Check the fields of a decoded request and build the action it asks for.
///
/// # Errors
/// [`RejectCode::MissingField`] or [`RejectCode::InvalidHeader`], naming the field.
pub fn check_request(req: &ActionRequest) -> Result<Action, Rejection> {
    let missing =
        |what: &str| Rejection::new(RejectCode::MissingField, format!("{what} is required"));
    if req.request_id.is_empty() {
        return Err(missing("request_id"));
    }
    if req.request_id.len() > MAX_REQUEST_ID {
        return Err(Rejection::new(
            RejectCode::MissingField,
            format!("request_id is longer than {MAX_REQUEST_ID} bytes"),
        ));
    }
    if req.server.is_empty() {
        return Err(missing("server"));
    }
    if req.action.is_empty() {
        return Err(missing("action"));
    }
    if req.deadline_ns <= 0 {
        return Err(missing("deadline_ns"));
    }
    if req.correlation.len() > MAX_CORRELATION {
        return Err(Rejection::new(
            RejectCode::MissingField,
            format!("correlation is longer than {MAX_CORRELATION} bytes"),
        ));
    }
    let mut action = Action::new(req.action.clone());
    action.headers.reserve(req.headers.len());
    for (i, h) in req.headers.iter().enumerate() {
        if h.key.eq_ignore_ascii_case("Action") {
            return Err(Rejection::new(
                RejectCode::InvalidHeader,
                format!("header {}: a second Action header is not allowed", i + 1),
            ));
        }
        action.headers.push((h.key.clone(), h.value.clone()));
    }
    action
        .validate()
        .map_err(|e| Rejection::new(RejectCode::InvalidHeader, e.to_string()))?;
    Ok(action)
}

/// Check that the request's `server` is the one its transport routed it by: the server token
/// of the NATS subject it arrived on, or its Kafka record key. No routing key: nothing to
/// compare (a Kafka record without a key).
///
/// # Errors
/// [`RejectCode::ServerMismatch`], naming both.
pub fn check_route(req: &ActionRequest, routed_to: Option<&str>) -> Result<(), Rejection> {
    match routed_to {
        Some(to) if to != req.server => Err(Rejection::new(
            RejectCode::ServerMismatch,
            format!(
                "the request names server {:?} but was sent to {to:?} (its subject or key); send it to the subject or key of {:?}",
                req.server, req.server
            ),
        )),
        _ => Ok(()),
    }
}

/// Check the action name against the allow-list.
///
/// # Errors
/// [`RejectCode::NotAllowed`], saying why.
pub fn check_allowed(allow: &AllowList, server: &str, action: &str) -> Result<(), Rejection> {
    if is_never_allowed(action) {
        return Err(Rejection::new(
            RejectCode::NotAllowed,
            format!("{action} would change amibus's own AMI session and is never allowed"),
        ));
    }
    if !allow.allows(action) {
        return Err(Rejection::new(
            RejectCode::NotAllowed,
            format!("{action} is not in allow_actions of server {server}"),
        ));
    }
    Ok(())
}

/// How long to wait for the reply once sent: the request's timeout (or `default`), capped by
/// `max` and by the time left to the deadline. `None` if the deadline has passed.
pub fn effective_timeout(
    req: &ActionRequest,
    now_ns: i64,
    default: Duration,
    max: Duration,
) -> Option<Duration> {
    let left = req.deadline_ns.checked_sub(now_ns).filter(|l| *l > 0)?;
    let asked = if req.timeout_ms == 0 {
        default
    } else {
        Duration::from_millis(u64::from(req.timeout_ms))
    };
    Some(asked.min(max).min(Duration::from_nanos(left as u64)))
}

/// The event to wait for besides the response: `OriginateResponse` for an `Async` Originate
/// (Asterisk's own truth values: yes, true, y, t, 1, on).
pub fn awaited_event(action: &Action) -> Option<&'static str> {
    if !action.name.eq_ignore_ascii_case("Originate") {
        return None;
    }
    let v = action.get("Async")?.trim();
    ["yes", "true", "y", "t", "1", "on"]
        .iter()
        .any(|t| v.eq_ignore_ascii_case(t))
        .then_some("OriginateResponse")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::pb::ActionHeader;

    fn req(action: &str, headers: &[(&str, &str)]) -> ActionRequest {
        ActionRequest {
            request_id: "r-1".into(),
            server: "pbx1".into(),
            action: action.into(),
            headers: headers
                .iter()
                .map(|(k, v)| ActionHeader {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
            deadline_ns: 2_000,
            ..ActionRequest::default()
        }
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for bytes in [&b"\xff\xff\xff\xff"[..], b"\x0a\x05ab", b"\x08"] {
            assert_eq!(
                parse_request(bytes).unwrap_err().code,
                RejectCode::Malformed
            );
        }
        // Empty bytes decode to an empty request, which then lacks its fields.
        let empty = parse_request(b"").unwrap();
        assert_eq!(
            check_request(&empty).unwrap_err().code,
            RejectCode::MissingField
        );
    }

    #[test]
    fn required_fields_are_named() {
        let mut r = req("Ping", &[]);
        r.deadline_ns = 0;
        assert_eq!(
            check_request(&r).unwrap_err().reason,
            "deadline_ns is required"
        );
        let mut r = req("Ping", &[]);
        r.server.clear();
        assert_eq!(check_request(&r).unwrap_err().reason, "server is required");
        let mut r = req("", &[]);
        r.request_id = "x".repeat(MAX_REQUEST_ID + 1);
        assert!(check_request(&r).unwrap_err().reason.contains("request_id"));
    }

    #[test]
    fn headers_keep_order_and_duplicates() {
        let a = check_request(&req(
            "Originate",
            &[
                ("Channel", "Local/1@c"),
                ("Variable", "A=1"),
                ("Variable", "B=2"),
            ],
        ))
        .unwrap();
        assert_eq!(
            a.headers,
            vec![
                ("Channel".to_owned(), "Local/1@c".to_owned()),
                ("Variable".to_owned(), "A=1".to_owned()),
                ("Variable".to_owned(), "B=2".to_owned())
            ]
        );
    }

    #[test]
    fn header_injection_is_refused() {
        for (k, v) in [
            ("Channel", "x\r\nAction: Logoff"),
            ("Channel", "x\nAction: Logoff"),
            ("Chan\rnel", "x"),
            ("A:B", "x"),
            ("ActionID", "mine"),
            ("Action", "Originate"),
        ] {
            let e = check_request(&req("Hangup", &[(k, v)])).unwrap_err();
            assert_eq!(e.code, RejectCode::InvalidHeader, "{k:?}: {v:?}");
        }
        let e = check_request(&req("Ping\r\nAction: Logoff", &[])).unwrap_err();
        assert_eq!(e.code, RejectCode::InvalidHeader);
    }

    #[test]
    fn nul_and_control_characters_are_refused() {
        for (k, v) in [
            ("Channel", "Local/1@a\0b"),
            ("Variable", "A=\x01"),
            ("K\0", "v"),
        ] {
            let e = check_request(&req("Originate", &[(k, v)])).unwrap_err();
            assert_eq!(e.code, RejectCode::InvalidHeader, "{k:?}: {v:?}");
            assert!(e.reason.contains("control character"), "{}", e.reason);
        }
        let mut r = req("Ping", &[]);
        r.action = "Ping\0".into();
        assert_eq!(
            check_request(&r).unwrap_err().code,
            RejectCode::InvalidHeader
        );
    }

    #[test]
    fn the_body_must_name_the_server_of_its_subject_or_key() {
        let r = req("Ping", &[]);
        assert!(check_route(&r, None).is_ok());
        assert!(check_route(&r, Some("pbx1")).is_ok());
        let e = check_route(&r, Some("pbx")).unwrap_err();
        assert_eq!(e.code, RejectCode::ServerMismatch);
        assert!(!e.code.is_retriable());
        assert!(
            e.reason.contains("\"pbx1\"") && e.reason.contains("\"pbx\""),
            "{}",
            e.reason
        );
    }

    #[test]
    fn lines_past_asterisks_buffer_are_refused() {
        let fits = "v".repeat(crate::ami::action::MAX_LINE - "Value: ".len());
        assert!(check_request(&req("Setvar", &[("Value", &fits)])).is_ok());
        let long = format!("{fits}v");
        let e = check_request(&req("Setvar", &[("Value", &long)])).unwrap_err();
        assert_eq!(e.code, RejectCode::InvalidHeader);
        assert!(e.reason.contains("longer than"), "{}", e.reason);
    }

    #[test]
    fn allow_list_is_read_only_by_default_and_case_blind() {
        let ro = AllowList::default();
        for a in [
            "Ping",
            "coreshowchannels",
            "QUEUESTATUS",
            "Getvar",
            "CoreSettings",
        ] {
            assert!(check_allowed(&ro, "pbx1", a).is_ok(), "{a}");
        }
        for a in [
            "Originate",
            "Redirect",
            "Hangup",
            "Command",
            "Setvar",
            "GetConfig",
        ] {
            let e = check_allowed(&ro, "pbx1", a).unwrap_err();
            assert_eq!(e.code, RejectCode::NotAllowed);
            assert_eq!(
                e.reason,
                format!("{a} is not in allow_actions of server pbx1")
            );
        }
        let rw = AllowList::new(["read-only", "Originate", "hangup"]);
        assert!(rw.allows("Hangup") && rw.allows("ORIGINATE") && rw.allows("Ping"));
        assert!(!rw.allows("Redirect"));
        let only = AllowList::new(["Redirect"]);
        assert!(only.allows("Redirect") && !only.allows("Ping"));
        let e = check_allowed(&AllowList::new(["Logoff", "Events"]), "pbx1", "logoff").unwrap_err();
        assert!(e.reason.contains("never allowed"));
    }

    #[test]
    fn timeout_is_capped_by_max_and_deadline() {
        let s = Duration::from_secs;
        let mut r = req("Ping", &[]);
        r.deadline_ns = 10_000_000_000;
        assert_eq!(effective_timeout(&r, 0, s(5), s(60)), Some(s(5)));
        r.timeout_ms = 120_000;
        assert_eq!(effective_timeout(&r, 0, s(5), s(60)), Some(s(10)));
        assert_eq!(effective_timeout(&r, 0, s(5), s(3)), Some(s(3)));
        assert_eq!(
            effective_timeout(&r, 9_000_000_000, s(5), s(60)),
            Some(s(1))
        );
        assert_eq!(effective_timeout(&r, 10_000_000_000, s(5), s(60)), None);
    }

    #[test]
    fn async_originate_awaits_its_originate_response() {
        let a = |v: &str| Action::new("Originate").header("Async", v);
        assert_eq!(awaited_event(&a("true")), Some("OriginateResponse"));
        assert_eq!(awaited_event(&a(" Yes ")), Some("OriginateResponse"));
        assert_eq!(awaited_event(&a("false")), None);
        assert_eq!(awaited_event(&Action::new("Originate")), None);
        assert_eq!(
            awaited_event(&Action::new("Ping").header("Async", "true")),
            None
        );
    }
}
