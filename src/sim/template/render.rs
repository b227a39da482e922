//! The lifecycles of the simulated calls: which events a call of each kind emits, in order.

use super::builder::{Builder, Chan, or_unknown};
use super::*;
use crate::sim::filter::class;

/// Which kind of call a template plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// Dialled, answered, bridged, hung up.
    Answered,
    /// Dialled, rang, not answered (NOANSWER or BUSY).
    Unanswered,
    /// Into a queue, answered by an agent.
    Queue,
    /// Into a ConfBridge room.
    Conference,
}

impl CallKind {
    pub const ALL: [CallKind; 4] = [
        CallKind::Answered,
        CallKind::Unanswered,
        CallKind::Queue,
        CallKind::Conference,
    ];
    /// How often each kind starts, out of 16.
    pub fn weight(self) -> u32 {
        match self {
            CallKind::Answered => 8,
            CallKind::Unanswered => 4,
            CallKind::Queue => 2,
            CallKind::Conference => 2,
        }
    }
}

/// The caller of a template.
pub struct Caller<'a> {
    pub name: &'a [u8],
    pub num: u32,
}

pub(super) const APPS: &[(&str, &[u8])] = &[
    ("Set", b"__CALLTYPE=internal"),
    ("NoOp", b"Incoming call"),
    ("Gosub", b"sub-record-check,s,1(out,2000,)"),
    ("Set", b"CDR(userfield)=sim"),
    ("GotoIf", b"$[\"${BLKVM}\" = \"\"]?skip"),
    ("Set", b"CHANNEL(language)=en"),
    (
        "ExecIf",
        b"$[\"${CALLERID(name)}\" = \"\"]?Set(CALLERID(name)=unknown)",
    ),
    ("Return", b""),
];

pub(super) const VARS: &[(&str, &[u8])] = &[
    ("__CALLTYPE", b"internal"),
    ("MACRO_DEPTH", b"0"),
    ("RECORD_POLICY", b"dontcare"),
    ("CDR(userfield)", b"sim"),
    ("__FROMEXTEN", b"1000"),
    ("GOSUB_RETVAL", b""),
    ("TIMEOUT(absolute)", b"3600"),
    ("CHANNEL(language)", b"en"),
    ("DIALEDPEERNUMBER", b"2000"),
    ("RINGTIME", b"3"),
];

/// Render one call of `kind` for `caller`.
pub fn render(kind: CallKind, caller: &Caller<'_>) -> Template {
    let mut b = Builder::new();
    let anum = caller.num.to_string().into_bytes();
    let bnum = (caller.num + 1000).to_string().into_bytes();
    let mut a = Chan {
        slot: 0,
        pair: 0,
        prefix: [b"PJSIP/".as_slice(), &anum, b"-"].concat(),
        suffix: b"",
        state: 4,
        cid_num: anum.clone(),
        cid_name: caller.name.to_vec(),
        con_num: Vec::new(),
        con_name: Vec::new(),
        account: b"acct1".to_vec(),
        context: b"from-internal".to_vec(),
        exten: match kind {
            CallKind::Queue => b"600".to_vec(),
            CallKind::Conference => b"800".to_vec(),
            _ => bnum.clone(),
        },
        prio: 1,
    };
    let dev_a = [b"PJSIP/".as_slice(), &anum].concat();
    b.slot(&a, "PJSIP", "Dial", b"PJSIP/2000,30");
    b.chan_event("Newchannel", class::CALL, &a, &[], Effect::Create(0));
    b.cel(&a, "CHAN_START", b"", b"", b"", b"");
    b.device(&dev_a, "INUSE");
    // The dialplan: most of the VarSet/Newexten volume.
    let steps = match kind {
        CallKind::Answered | CallKind::Unanswered => 7,
        CallKind::Queue => 8,
        CallKind::Conference => 6,
    };
    for i in 0..steps {
        let (app, data) = APPS[i % APPS.len()];
        b.newexten(&mut a, app, data);
        let (var, val) = VARS[i % VARS.len()];
        b.varset(&a, var, val);
        if i % 2 == 0 {
            let (var, val) = VARS[(i + 3) % VARS.len()];
            b.varset(&a, var, val);
        }
        if i == 2 {
            b.chan_event("NewAccountCode", class::CALL, &a, &[], Effect::None);
            b.cel(&a, "APP_START", app.as_bytes(), data, b"", b"");
        }
    }
    match kind {
        CallKind::Conference => {
            b.newexten(&mut a, "ConfBridge", b"sim-room");
            a.state = 6;
            b.chan_event("Newstate", class::CALL, &a, &[], Effect::State(0, 6));
            b.cel(&a, "ANSWER", b"ConfBridge", b"sim-room", b"", b"");
            b.ev("BridgeCreate", class::CALL);
            b.bridge_head(b"ConfBridge", b"sim-room", 0, b"softmix");
            b.end(Effect::None);
            b.t.has_bridge = true;
            b.ev("ConfbridgeJoin", class::CALL);
            b.kv("Conference", b"sim-room");
            b.bridge_head(b"ConfBridge", b"sim-room", 1, b"softmix");
            b.snap("", &a);
            b.kv("Admin", b"No");
            b.kv("Muted", b"No");
            b.end(Effect::None);
            b.ev("BridgeEnter", class::CALL);
            b.bridge_head(b"ConfBridge", b"sim-room", 1, b"softmix");
            b.snap("", &a);
            b.end(Effect::None);
            b.cel(&a, "BRIDGE_ENTER", b"ConfBridge", b"sim-room", b"", b"");
            for st in [b"on".as_slice(), b"off"] {
                b.ev("ConfbridgeTalking", class::CALL);
                b.kv("Conference", b"sim-room");
                b.bridge_head(b"ConfBridge", b"sim-room", 1, b"softmix");
                b.snap("", &a);
                b.kv("TalkingStatus", st);
                b.kv("Admin", b"No");
                b.end(Effect::None);
            }
            b.varset(&a, "CONFBRIDGE_RESULT", b"HANGUP");
            b.ev("ConfbridgeLeave", class::CALL);
            b.kv("Conference", b"sim-room");
            b.bridge_head(b"ConfBridge", b"sim-room", 0, b"softmix");
            b.snap("", &a);
            b.kv("Admin", b"No");
            b.end(Effect::None);
            b.ev("BridgeLeave", class::CALL);
            b.bridge_head(b"ConfBridge", b"sim-room", 0, b"softmix");
            b.snap("", &a);
            b.end(Effect::None);
            b.cel(&a, "BRIDGE_EXIT", b"ConfBridge", b"sim-room", b"", b"");
            b.ev("BridgeDestroy", class::CALL);
            b.bridge_head(b"ConfBridge", b"sim-room", 0, b"softmix");
            b.end(Effect::None);
            b.chan_event(
                "SoftHangupRequest",
                class::CALL,
                &a,
                &[("Cause", b"16")],
                Effect::None,
            );
            b.hangup(&a, b"16", b"Normal Clearing");
            b.cel(
                &a,
                "HANGUP",
                b"",
                b"",
                b"",
                b"{\"hangupcause\":16,\"hangupsource\":\"\",\"dialstatus\":\"\"}",
            );
            b.cel(&a, "CHAN_END", b"", b"", b"", b"");
            b.cdr(&a, None, b"ANSWERED", 4, 4);
            b.cel(&a, "LINKEDID_END", b"", b"", b"", b"");
            b.device(&dev_a, "NOT_INUSE");
            return b.finish();
        }
        CallKind::Queue => {
            b.newexten(&mut a, "Queue", b"support,t");
            b.ev("QueueCallerJoin", class::AGENT);
            b.snap("", &a);
            b.kv("Queue", b"support");
            b.kv("Position", b"1");
            b.kv("Count", b"1");
            b.end(Effect::None);
        }
        _ => {
            b.newexten(&mut a, "Dial", b"PJSIP/2000,30");
        }
    }
    // The called side.
    let mut c = Chan {
        slot: 1,
        pair: 1,
        prefix: [b"PJSIP/".as_slice(), &bnum, b"-"].concat(),
        suffix: b"",
        state: 0,
        cid_num: bnum.clone(),
        cid_name: b"Agent".to_vec(),
        con_num: a.cid_num.clone(),
        con_name: a.cid_name.clone(),
        account: b"acct1".to_vec(),
        context: b"from-internal".to_vec(),
        exten: bnum.clone(),
        prio: 1,
    };
    let dev_c = [b"PJSIP/".as_slice(), &bnum].concat();
    b.slot(&c, "PJSIP", "AppDial", b"(Outgoing Line)");
    b.chan_event("Newchannel", class::CALL, &c, &[], Effect::Create(1));
    b.cel(&c, "CHAN_START", b"", b"", b"", b"");
    b.chan_event(
        "NewCallerid",
        class::CALL,
        &c,
        &[("CID-CallingPres", b"0 (Presentation Allowed, Not Screened)")],
        Effect::None,
    );
    b.chan_event("NewConnectedLine", class::CALL, &c, &[], Effect::None);
    b.chan_event("NewAccountCode", class::CALL, &c, &[], Effect::None);
    if kind == CallKind::Queue {
        b.ev("AgentCalled", class::AGENT);
        b.snap("", &a);
        b.snap("Dest", &c);
        b.kv("Queue", b"support");
        b.kv("MemberName", &dev_c);
        b.kv("Interface", &dev_c);
        b.end(Effect::None);
    }
    b.ev("DialBegin", class::CALL);
    b.snap("", &a);
    b.snap("Dest", &c);
    b.kv("DialString", &bnum);
    b.end(Effect::None);
    b.newstate(&mut c, 5);
    b.device(&dev_c, "RINGING");
    b.ev("DialState", class::CALL);
    b.snap("", &a);
    b.snap("Dest", &c);
    b.kv("DialStatus", b"RINGING");
    b.end(Effect::None);
    b.chan_event(
        "NewCallerid",
        class::CALL,
        &a,
        &[("CID-CallingPres", b"0 (Presentation Allowed, Not Screened)")],
        Effect::None,
    );
    if kind == CallKind::Unanswered {
        let (status, cause, txt) = if caller.num.is_multiple_of(2) {
            (
                b"NOANSWER".as_slice(),
                b"19".as_slice(),
                b"No user responding".as_slice(),
            )
        } else {
            (
                b"BUSY".as_slice(),
                b"17".as_slice(),
                b"User busy".as_slice(),
            )
        };
        b.ev("DialEnd", class::CALL);
        b.snap("", &a);
        b.snap("Dest", &c);
        b.kv("DialStatus", status);
        b.end(Effect::None);
        b.chan_event(
            "HangupRequest",
            class::CALL,
            &c,
            &[("Cause", cause)],
            Effect::None,
        );
        b.hangup(&c, cause, txt);
        b.cel(
            &c,
            "HANGUP",
            b"",
            b"",
            b"",
            b"{\"hangupcause\":19,\"hangupsource\":\"\",\"dialstatus\":\"\"}",
        );
        b.cel(&c, "CHAN_END", b"", b"", b"", b"");
        b.device(&dev_c, "NOT_INUSE");
        b.varset(&a, "DIALSTATUS", status);
        b.newexten(&mut a, "Voicemail", b"2000,u");
        b.varset(&a, "VMSTATUS", b"SUCCESS");
        b.newexten(&mut a, "Hangup", b"");
        b.chan_event(
            "SoftHangupRequest",
            class::CALL,
            &a,
            &[("Cause", b"16")],
            Effect::None,
        );
        b.hangup(&a, b"16", b"Normal Clearing");
        b.cel(
            &a,
            "HANGUP",
            b"",
            b"",
            b"",
            b"{\"hangupcause\":16,\"hangupsource\":\"\",\"dialstatus\":\"NOANSWER\"}",
        );
        b.cel(&a, "CHAN_END", b"", b"", b"", b"");
        b.cdr(&a, None, status, 12, 0);
        b.cel(&a, "LINKEDID_END", b"", b"", b"", b"");
        b.device(&dev_a, "NOT_INUSE");
        return b.finish();
    }
    b.newstate(&mut c, 6);
    b.cel(&c, "ANSWER", b"AppDial", b"(Outgoing Line)", b"", b"");
    b.ev("DialEnd", class::CALL);
    b.snap("", &a);
    b.snap("Dest", &c);
    b.kv("DialStatus", b"ANSWER");
    b.end(Effect::None);
    b.newstate(&mut a, 6);
    b.cel(&a, "ANSWER", b"Dial", b"PJSIP/2000,30", b"", b"");
    b.device(&dev_c, "INUSE");
    b.varset(&a, "DIALEDPEERNAME", &c.prefix);
    b.varset(&a, "DIALEDPEERNUMBER", &bnum);
    b.ev("BridgeCreate", class::CALL);
    b.bridge_head(b"<unknown>", b"<unknown>", 0, b"simple_bridge");
    b.end(Effect::None);
    b.t.has_bridge = true;
    for (n, ch) in [(1, &a), (2, &c)] {
        b.ev("BridgeEnter", class::CALL);
        b.bridge_head(b"<unknown>", b"<unknown>", n, b"simple_bridge");
        b.snap("", ch);
        b.end(Effect::None);
        b.cel(ch, "BRIDGE_ENTER", b"Dial", b"PJSIP/2000,30", b"", b"");
    }
    b.varset(&a, "BRIDGEPEER", &c.prefix);
    b.varset(&c, "BRIDGEPEER", &a.prefix);
    b.varset(&a, "BRIDGEPVTCALLID", b"");
    if kind == CallKind::Queue {
        b.ev("AgentConnect", class::AGENT);
        b.snap("", &a);
        b.snap("Dest", &c);
        b.kv("Queue", b"support");
        b.kv("MemberName", &dev_c);
        b.kv("Interface", &dev_c);
        b.kv("HoldTime", b"3");
        b.kv("RingTime", b"2");
        b.end(Effect::None);
        b.ev("QueueCallerLeave", class::AGENT);
        b.snap("", &a);
        b.kv("Queue", b"support");
        b.kv("Position", b"1");
        b.kv("Count", b"0");
        b.end(Effect::None);
    } else {
        b.ev("DTMFBegin", class::DTMF);
        b.snap("", &a);
        b.kv("Digit", b"5");
        b.kv("Direction", b"Received");
        b.end(Effect::None);
        b.ev("DTMFEnd", class::DTMF);
        b.snap("", &a);
        b.kv("Digit", b"5");
        b.kv("DurationMs", b"120");
        b.kv("Direction", b"Received");
        b.end(Effect::None);
        b.ev("UserEvent", class::USER);
        b.snap("", &a);
        b.kv("UserEvent", b"SimProgress");
        b.kv("Step", b"bridged");
        b.end(Effect::None);
    }
    b.chan_event(
        "HangupRequest",
        class::CALL,
        &c,
        &[("Cause", b"16")],
        Effect::None,
    );
    for (n, ch) in [(1, &c), (0, &a)] {
        b.ev("BridgeLeave", class::CALL);
        b.bridge_head(b"<unknown>", b"<unknown>", n, b"simple_bridge");
        b.snap("", ch);
        b.end(Effect::None);
        b.cel(ch, "BRIDGE_EXIT", b"Dial", b"PJSIP/2000,30", b"", b"");
    }
    b.ev("BridgeDestroy", class::CALL);
    b.bridge_head(b"<unknown>", b"<unknown>", 0, b"simple_bridge");
    b.end(Effect::None);
    b.hangup(&c, b"16", b"Normal Clearing");
    b.cel(
        &c,
        "HANGUP",
        b"",
        b"",
        b"",
        b"{\"hangupcause\":16,\"hangupsource\":\"\",\"dialstatus\":\"\"}",
    );
    b.cel(&c, "CHAN_END", b"", b"", b"", b"");
    b.device(&dev_c, "NOT_INUSE");
    if kind == CallKind::Queue {
        b.ev("AgentComplete", class::AGENT);
        b.snap("", &a);
        b.snap("Dest", &c);
        b.kv("Queue", b"support");
        b.kv("MemberName", &dev_c);
        b.kv("Interface", &dev_c);
        b.kv("HoldTime", b"3");
        b.kv("TalkTime", b"42");
        b.kv("Reason", b"agent");
        b.end(Effect::None);
        b.ev("QueueMemberStatus", class::AGENT);
        b.kv("Queue", b"support");
        b.kv("MemberName", &dev_c);
        b.kv("Interface", &dev_c);
        b.kv("StateInterface", &dev_c);
        b.kv("Membership", b"dynamic");
        b.kv("Penalty", b"0");
        b.kv("CallsTaken", b"1");
        b.kv("LastCall", b"0");
        b.kv("LastPause", b"0");
        b.kv("LoginTime", b"0");
        b.kv("InCall", b"0");
        b.kv("Status", b"1");
        b.kv("Paused", b"0");
        b.kv("PausedReason", b"");
        b.kv("Ringinuse", b"0");
        b.kv("Wrapuptime", b"0");
        b.end(Effect::None);
    }
    b.varset(&a, "DIALSTATUS", b"ANSWER");
    b.newexten(&mut a, "Hangup", b"");
    b.chan_event(
        "SoftHangupRequest",
        class::CALL,
        &a,
        &[("Cause", b"16")],
        Effect::None,
    );
    b.hangup(&a, b"16", b"Normal Clearing");
    b.cel(
        &a,
        "HANGUP",
        b"",
        b"",
        b"",
        b"{\"hangupcause\":16,\"hangupsource\":\"dialplan/builtin\",\"dialstatus\":\"ANSWER\"}",
    );
    b.cel(&a, "CHAN_END", b"", b"", b"", b"");
    b.cdr(&a, Some(&c), b"ANSWERED", 45, 42);
    b.cel(&a, "LINKEDID_END", b"", b"", b"", b"");
    b.device(&dev_a, "NOT_INUSE");
    b.finish()
}

/// An originated call (the `Originate` action): the channel comes up, the `OriginateResponse`
/// carrying `action_id` follows, then the dialplan at `context`/`exten` runs and hangs up.
/// `channel` is what the request named (`PJSIP/1001`, `Local/100@ctx`).
pub fn render_originate(
    channel: &[u8],
    context: &[u8],
    exten: &[u8],
    action_id: Option<&[u8]>,
    cid_name: &[u8],
    cid_num: &[u8],
) -> Template {
    let mut b = Builder::new();
    let local = channel.starts_with(b"Local/");
    let tech = if local { "Local" } else { "PJSIP" };
    let mut prefix = channel.to_vec();
    prefix.push(b'-');
    let mut a = Chan {
        slot: 0,
        pair: 0,
        prefix,
        suffix: if local { b";1" } else { b"" },
        state: 0,
        cid_num: cid_num.to_vec(),
        cid_name: cid_name.to_vec(),
        con_num: Vec::new(),
        con_name: Vec::new(),
        account: Vec::new(),
        context: context.to_vec(),
        exten: exten.to_vec(),
        prio: 1,
    };
    b.slot(&a, tech, "AppDial2", b"(Outgoing Line)");
    b.chan_event("Newchannel", class::CALL, &a, &[], Effect::Create(0));
    b.cel(&a, "CHAN_START", b"", b"", b"", b"");
    let mut half = None;
    if local {
        let mut h = a.clone();
        h.slot = 1;
        h.suffix = b";2";
        b.slot(&h, tech, "", b"");
        b.chan_event("Newchannel", class::CALL, &h, &[], Effect::Create(1));
        b.cel(&h, "CHAN_START", b"", b"", b"", b"");
        half = Some(h);
    }
    b.newstate(&mut a, 5);
    b.newstate(&mut a, 6);
    b.cel(&a, "ANSWER", b"AppDial2", b"(Outgoing Line)", b"", b"");
    b.ev("OriginateResponse", class::CALL);
    if let Some(id) = action_id {
        b.kv("ActionID", id);
    }
    b.kv("Response", b"Success");
    b.chan_name("Channel", &a);
    b.kv("Context", context);
    b.kv("Exten", exten);
    b.kv("Reason", b"4");
    b.kpatch("Uniqueid", PatchKind::Uid(0));
    b.kv("CallerIDNum", or_unknown(cid_num));
    b.kv("CallerIDName", or_unknown(cid_name));
    let mut name = a.prefix.clone();
    name.extend_from_slice(b"00000000");
    for v in [
        b"BENCH_RUN=amibus-sim".as_slice(),
        b"BENCH_TAG=",
        b"CHANNEL(accountcode)=",
    ] {
        b.lit(b"ChanVariable(");
        b.lit(&a.prefix);
        b.patch(PatchKind::Hex(0));
        b.lit(a.suffix);
        b.lit(b"): ");
        b.lit(v);
        b.lit(b"\r\n");
    }
    b.end(Effect::Originated);
    for i in 0..4 {
        let (app, data) = APPS[i % APPS.len()];
        b.newexten(&mut a, app, data);
        let (var, val) = VARS[i % VARS.len()];
        b.varset(&a, var, val);
    }
    b.newexten(&mut a, "Wait", b"1");
    b.newexten(&mut a, "Hangup", b"");
    b.chan_event(
        "SoftHangupRequest",
        class::CALL,
        &a,
        &[("Cause", b"16")],
        Effect::None,
    );
    if let Some(h) = &half {
        b.hangup(h, b"16", b"Normal Clearing");
        b.cel(h, "HANGUP", b"", b"", b"", b"");
        b.cel(h, "CHAN_END", b"", b"", b"", b"");
    }
    b.hangup(&a, b"16", b"Normal Clearing");
    b.cel(&a, "HANGUP", b"", b"", b"", b"");
    b.cel(&a, "CHAN_END", b"", b"", b"", b"");
    b.cdr(&a, None, b"ANSWERED", 1, 1);
    b.cel(&a, "LINKEDID_END", b"", b"", b"", b"");
    b.finish()
}
