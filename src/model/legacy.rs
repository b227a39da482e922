//! Legacy (Asterisk 1.4-13) event names and fields mapped to their modern (12+, 22) equivalents.
//!
//! Owns: the rename table, taken from `shared/ami/renames.json` (each entry there cites the
//! UPGRADE/CHANGES text or code it comes from). Only renames with one clear modern equivalent
//! are applied; removed events (ModuleLoadReport, Masquerade, ...) keep their name.
//!
//! Must never: rename a modern event. Names shared by both eras (Hold, ParkedCall, LocalBridge,
//! ...) are only touched when the frame has the legacy shape (the legacy discriminator header,
//! or no modern marker header).

use crate::ami::Frame;

/// Field renames of one legacy event: (legacy key, modern key).
pub type FieldRenames = &'static [(&'static str, &'static str)];

/// What normalization does with one legacy event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The modern name (may equal the wire name when only fields changed).
    pub name: &'static str,
    pub fields: FieldRenames,
    /// Where the call's channel and unique id are, when not in `Channel`/`Uniqueid`.
    pub channel_key: Option<&'static str>,
    pub uniqueid_key: Option<&'static str>,
}

/// No renamed fields.
pub const NONE: FieldRenames = &[];
const DIAL: FieldRenames = &[
    ("Destination", "DestChannel"),
    ("UniqueID", "Uniqueid"),
    ("DestUniqueID", "DestUniqueid"),
    ("Dialstring", "DialString"),
];
const BRIDGE: FieldRenames = &[
    ("Channel1", "Channel"),
    ("Channel2", "Channel"),
    ("Uniqueid1", "Uniqueid"),
    ("Uniqueid2", "Uniqueid"),
    ("CallerID1", "CallerIDNum"),
    ("CallerID2", "CallerIDNum"),
    ("Bridgetype", "BridgeType"),
];
const CALLERID: FieldRenames = &[("CallerID", "CallerIDNum")];
const MOH: FieldRenames = &[("UniqueID", "Uniqueid")];
const QUEUE_PAUSED: FieldRenames = &[("Reason", "PausedReason")];
const LOCAL_BRIDGE: FieldRenames = &[
    ("Channel1", "LocalOneChannel"),
    ("Channel2", "LocalTwoChannel"),
    ("Uniqueid1", "LocalOneUniqueid"),
    ("Uniqueid2", "LocalTwoUniqueid"),
];
const PARKED: FieldRenames = &[
    ("Channel", "ParkeeChannel"),
    ("From", "ParkerDialString"),
    ("Exten", "ParkingSpace"),
];
const UNPARKED: FieldRenames = &[
    ("Channel", "ParkeeChannel"),
    ("From", "RetrieverChannel"),
    ("Exten", "ParkingSpace"),
];
const PARKINGLOT: FieldRenames = &[("StartExten", "StartSpace"), ("StopExten", "StopSpace")];
const DAHDI: FieldRenames = &[("Channel", "DAHDIChannel")];
const NEWEXTEN: FieldRenames = &[("Extension", "Exten")];

const fn to(name: &'static str, fields: FieldRenames) -> Mapping {
    Mapping {
        name,
        fields,
        channel_key: None,
        uniqueid_key: None,
    }
}

const fn bridge(name: &'static str) -> Mapping {
    Mapping {
        name,
        fields: BRIDGE,
        channel_key: Some("Channel1"),
        uniqueid_key: Some("Uniqueid1"),
    }
}

/// What the single pass over a frame's headers already knows, so hot events need no second
/// scan.
#[derive(Clone, Copy, Debug, Default)]
pub struct Hints {
    /// The frame has an `Extension` header (legacy Newexten).
    pub has_extension: bool,
}

/// The mapping for event `name` as found in `frame`, if it is a legacy event.
pub fn lookup(name: &[u8], frame: &Frame<'_>, hints: Hints) -> Option<Mapping> {
    let is =
        |v: Option<&[u8]>, want: &str| v.is_some_and(|v| v.eq_ignore_ascii_case(want.as_bytes()));
    let m = match name {
        b"Link" => bridge("BridgeEnter"),
        b"Unlink" => bridge("BridgeLeave"),
        b"Bridge" => {
            let state = frame.get("Bridgestate");
            if is(state, "Unlink") {
                bridge("BridgeLeave")
            } else {
                bridge("BridgeEnter")
            }
        }
        b"Dial" => {
            // 1.4 sent Dial only at the start; 1.6-11 added SubEvent: Begin|End.
            if is(frame.get("SubEvent"), "End") {
                to("DialEnd", DIAL)
            } else {
                to("DialBegin", DIAL)
            }
        }
        b"Newcallerid" => to("NewCallerid", CALLERID),
        b"Join" => to("QueueCallerJoin", CALLERID),
        b"Leave" => to("QueueCallerLeave", NONE),
        b"MusicOnHold" => {
            if is(frame.get("State"), "Stop") {
                to("MusicOnHoldStop", MOH)
            } else {
                to("MusicOnHoldStart", MOH)
            }
        }
        b"Hold" => match frame.get("Status") {
            Some(v) if v.eq_ignore_ascii_case(b"Off") => to("Unhold", NONE),
            _ => return None,
        },
        b"DTMF" => {
            if is(frame.get("End"), "Yes") {
                to("DTMFEnd", NONE)
            } else {
                to("DTMFBegin", NONE)
            }
        }
        b"AGIExec" => {
            if is(frame.get("SubEvent"), "End") {
                to("AGIExecEnd", NONE)
            } else {
                to("AGIExecStart", NONE)
            }
        }
        b"AsyncAGI" => match frame.get("SubEvent") {
            Some(v) if v.eq_ignore_ascii_case(b"Exec") => to("AsyncAGIExec", NONE),
            Some(v) if v.eq_ignore_ascii_case(b"End") => to("AsyncAGIEnd", NONE),
            _ => to("AsyncAGIStart", NONE),
        },
        b"Agentlogin" => to("AgentLogin", NONE),
        b"Agentlogoff" => to("AgentLogoff", NONE),
        b"FaxSent" => to("SendFAX", NONE),
        b"FaxReceived" => to("ReceiveFAX", NONE),
        b"QueueMemberPaused" => to("QueueMemberPause", QUEUE_PAUSED),
        b"ChannelReload" => to("Reload", NONE),
        b"NewPeerAccount" => to("NewAccountCode", NONE),
        b"Transfer" => match frame.get("TransferType") {
            Some(v) if v.eq_ignore_ascii_case(b"Attended") => to("AttendedTransfer", NONE),
            _ => to("BlindTransfer", NONE),
        },
        // Same name in both eras: only the legacy shape is touched.
        b"LocalBridge" if frame.get("LocalOneChannel").is_none() => Mapping {
            name: "LocalBridge",
            fields: LOCAL_BRIDGE,
            channel_key: Some("Channel1"),
            uniqueid_key: Some("Uniqueid1"),
        },
        b"ParkedCall" | b"ParkedCallTimeOut" | b"ParkedCallGiveUp"
            if frame.get("ParkeeChannel").is_none() =>
        {
            to(static_name(name)?, PARKED)
        }
        b"UnParkedCall" if frame.get("ParkeeChannel").is_none() => to("UnParkedCall", UNPARKED),
        b"Parkinglot" if frame.get("StartSpace").is_none() => to("Parkinglot", PARKINGLOT),
        b"Alarm" | b"AlarmClear" | b"DNDState" if frame.get("DAHDIChannel").is_none() => {
            to(static_name(name)?, DAHDI)
        }
        b"Newexten" if hints.has_extension => to("Newexten", NEWEXTEN),
        _ => return None,
    };
    Some(m)
}

fn static_name(name: &[u8]) -> Option<&'static str> {
    Some(match name {
        b"ParkedCall" => "ParkedCall",
        b"ParkedCallTimeOut" => "ParkedCallTimeOut",
        b"ParkedCallGiveUp" => "ParkedCallGiveUp",
        b"Alarm" => "Alarm",
        b"AlarmClear" => "AlarmClear",
        b"DNDState" => "DNDState",
        _ => return None,
    })
}

/// The modern key for legacy `key` under `mapping`, if it was renamed.
pub fn modern_key(mapping: &Mapping, key: &[u8]) -> Option<&'static str> {
    mapping
        .fields
        .iter()
        .find(|(legacy, _)| legacy.as_bytes() == key)
        .map(|&(_, modern)| modern)
}
