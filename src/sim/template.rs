//! Pre-rendered call lifecycles: the bytes of every event of one call, with the offsets of the
//! few fields that change per call (Uniqueids, channel suffixes, bridge id) or per event
//! (`Timestamp:`, CEL/CDR dates). The generator copies an event's bytes and patches those
//! fixed-width fields in place, so nothing is formatted per event on the hot path.
//!
//! Owns: the header order and header sets of each event type, copied from the Asterisk 22
//! recording (`shared/fixtures/asterisk22-events.ami`), and the event order of a call.
//!
//! Must never: do I/O, or produce a field whose width depends on a per-call value (a patch can
//! only overwrite bytes of the same width).
//!
//! # Where the mix comes from
//! Counting the 7,702 events of `asterisk22-events.ami` (a Python one-off over `\r\n\r\n` blocks):
//! VarSet 24.2 %, Newexten 19.2 %, CEL 14.9 %, DeviceStateChange 6.2 %, NewCallerid 3.3 %,
//! Newstate 3.2 %, Newchannel 3.1 %, Hangup 2.6 %, Cdr 2.5 %, SoftHangupRequest 2.1 %,
//! NewAccountCode 1.9 %, NewConnectedLine 1.8 %, DialBegin/DialEnd 1.5 % each, HangupRequest 1.3 %,
//! BridgeEnter/Leave ~0.9 %, UserEvent 0.7 %, then queue, agent, ConfBridge, DTMF, MusicOnHold,
//! MixMonitor events below 0.4 % each. Median frame 553 bytes. The lifecycles below are tuned so
//! the generated mix lands near those shares (see the `mix_resembles_recording` test), with the
//! same three `ChanVariable` lines per channel snapshot as the recording.

/// A field patched per call or per event. Each has a fixed width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchKind {
    /// `<sec>.<usec>`, 17 bytes: the event's `Timestamp:`.
    Ts,
    /// `YYYY-MM-DD HH:MM:SS`, 19 bytes: CEL `EventTime`, CDR times.
    Date,
    /// A channel's Uniqueid, 17 bytes (`<sec>.<6 digits>`); the argument is the channel slot.
    Uid(u8),
    /// The 8 hex digits of a channel name (`PJSIP/1001-0000002a`); the argument is the pair
    /// (both halves of a Local channel share one).
    Hex(u8),
    /// The call's bridge id, 36 bytes (UUID form).
    Bridge,
}

impl PatchKind {
    pub const fn width(self) -> usize {
        match self {
            PatchKind::Ts | PatchKind::Uid(_) => 17,
            PatchKind::Date => 19,
            PatchKind::Hex(_) => 8,
            PatchKind::Bridge => 36,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Patch {
    pub off: u32,
    pub kind: PatchKind,
}

/// What an event does to the live-channel table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    None,
    Create(u8),
    State(u8, u8),
    Gone(u8),
    /// The `OriginateResponse` of an originated call (sync originates wait for it).
    Originated,
    /// Changes a state list (devices, queues, bridges): the generator hands the emitted event
    /// to the list tracker (`sim::list`). Set by [`Builder::end`] on the events that do.
    List,
}

/// Events that change what `QueueStatus`, `DeviceStateList` or `BridgeList` answer.
const LIST_EVENTS: [&str; 9] = [
    "DeviceStateChange",
    "QueueCallerJoin",
    "QueueCallerLeave",
    "AgentCalled",
    "AgentComplete",
    "BridgeCreate",
    "BridgeEnter",
    "BridgeLeave",
    "BridgeDestroy",
];

#[derive(Clone, Copy, Debug)]
pub struct EventMeta {
    pub start: u32,
    pub end: u32,
    pub class: u32,
    pub patch_lo: u32,
    pub patch_hi: u32,
    pub effect: Effect,
}

/// Static facts of one channel of a template, for CoreShowChannels/Status and action lookups.
#[derive(Clone, Debug)]
pub struct SlotInfo {
    pub prefix: Vec<u8>,
    pub suffix: &'static [u8],
    pub pair: u8,
    pub tech: &'static str,
    pub cid_num: Vec<u8>,
    pub cid_name: Vec<u8>,
    pub context: Vec<u8>,
    pub exten: Vec<u8>,
    pub app: &'static str,
    pub app_data: Vec<u8>,
}

/// One call, rendered.
#[derive(Debug, Default)]
pub struct Template {
    pub bytes: Vec<u8>,
    pub events: Vec<EventMeta>,
    pub patches: Vec<Patch>,
    pub slots: Vec<SlotInfo>,
    pub pairs: u8,
    pub has_bridge: bool,
}

use super::filter::class;

#[derive(Clone)]
struct Chan {
    slot: u8,
    pair: u8,
    prefix: Vec<u8>,
    suffix: &'static [u8],
    state: u8,
    cid_num: Vec<u8>,
    cid_name: Vec<u8>,
    con_num: Vec<u8>,
    con_name: Vec<u8>,
    account: Vec<u8>,
    context: Vec<u8>,
    exten: Vec<u8>,
    prio: u32,
}

/// `ChannelStateDesc` of a channel state number.
pub(super) fn state_desc(s: u8) -> &'static [u8] {
    match s {
        0 => b"Down",
        4 => b"Ring",
        5 => b"Ringing",
        6 => b"Up",
        _ => b"Unknown",
    }
}

fn priv_str(c: u32) -> &'static [u8] {
    match c {
        class::CALL => b"call,all",
        class::DIALPLAN => b"dialplan,all",
        class::CDR => b"cdr,all",
        class::AGENT => b"agent,all",
        class::DTMF => b"dtmf,all",
        class::USER => b"user,all",
        class::SYSTEM => b"system,all",
        class::AGI => b"agi,all",
        class::SECURITY => b"security,all",
        _ => b"all",
    }
}

/// Builds a [`Template`] event by event.
pub struct Builder {
    t: Template,
    start: usize,
    patch_lo: usize,
    class: u32,
    /// The event being built changes a state list.
    list: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    pub fn new() -> Self {
        Builder {
            t: Template::default(),
            start: 0,
            patch_lo: 0,
            class: 0,
            list: false,
        }
    }

    fn lit(&mut self, b: &[u8]) {
        self.t.bytes.extend_from_slice(b);
    }

    fn patch(&mut self, kind: PatchKind) {
        self.t.patches.push(Patch {
            off: self.t.bytes.len() as u32,
            kind,
        });
        self.t.bytes.extend(std::iter::repeat_n(b'0', kind.width()));
    }

    /// Start an event: `Event`, `Privilege`, `Timestamp`.
    pub fn ev(&mut self, name: &str, class: u32) {
        self.start = self.t.bytes.len();
        self.patch_lo = self.t.patches.len();
        self.class = class;
        self.list = LIST_EVENTS.contains(&name);
        self.lit(b"Event: ");
        self.lit(name.as_bytes());
        self.lit(b"\r\nPrivilege: ");
        self.lit(priv_str(class));
        self.lit(b"\r\nTimestamp: ");
        self.patch(PatchKind::Ts);
        self.lit(b"\r\n");
    }

    pub fn kv(&mut self, k: &str, v: &[u8]) {
        self.lit(k.as_bytes());
        self.lit(b": ");
        self.lit(v);
        self.lit(b"\r\n");
    }

    fn kpatch(&mut self, k: &str, p: PatchKind) {
        self.lit(k.as_bytes());
        self.lit(b": ");
        self.patch(p);
        self.lit(b"\r\n");
    }

    /// Close the event with its blank line. An event that changes a state list and has no other
    /// effect gets [`Effect::List`].
    pub fn end(&mut self, effect: Effect) {
        let effect = if effect == Effect::None && self.list {
            Effect::List
        } else {
            effect
        };
        self.lit(b"\r\n");
        self.t.events.push(EventMeta {
            start: self.start as u32,
            end: self.t.bytes.len() as u32,
            class: self.class,
            patch_lo: self.patch_lo as u32,
            patch_hi: self.t.patches.len() as u32,
            effect,
        });
    }

    fn chan_name(&mut self, k: &str, c: &Chan) {
        self.lit(k.as_bytes());
        self.lit(b": ");
        self.lit(&c.prefix);
        self.patch(PatchKind::Hex(c.pair));
        self.lit(c.suffix);
        self.lit(b"\r\n");
    }

    fn k2(&mut self, p: &str, k: &str, v: &[u8]) {
        self.lit(p.as_bytes());
        self.kv(k, v);
    }

    /// A channel snapshot with header prefix `p` (`""`, `"Dest"`, ...).
    fn snap(&mut self, p: &str, c: &Chan) {
        self.lit(p.as_bytes());
        self.chan_name("Channel", c);
        let st = c.state.to_string();
        self.k2(p, "ChannelState", st.as_bytes());
        self.k2(p, "ChannelStateDesc", state_desc(c.state));
        self.k2(p, "CallerIDNum", or_unknown(&c.cid_num));
        self.k2(p, "CallerIDName", or_unknown(&c.cid_name));
        self.k2(p, "ConnectedLineNum", or_unknown(&c.con_num));
        self.k2(p, "ConnectedLineName", or_unknown(&c.con_name));
        self.k2(p, "Language", b"en");
        self.k2(p, "AccountCode", &c.account);
        self.k2(p, "Context", &c.context);
        self.k2(p, "Exten", &c.exten);
        let pr = c.prio.to_string();
        self.k2(p, "Priority", pr.as_bytes());
        self.lit(p.as_bytes());
        self.kpatch("Uniqueid", PatchKind::Uid(c.slot));
        self.lit(p.as_bytes());
        self.kpatch("Linkedid", PatchKind::Uid(0));
        self.k2(p, "ChanVariable", b"BENCH_RUN=amibus-sim");
        self.k2(p, "ChanVariable", b"BENCH_TAG=");
        let mut acct = b"CHANNEL(accountcode)=".to_vec();
        acct.extend_from_slice(&c.account);
        self.k2(p, "ChanVariable", &acct);
    }

    fn cel(&mut self, c: &Chan, name: &str, app: &[u8], data: &[u8], peer: &[u8], extra: &[u8]) {
        self.ev("CEL", class::CALL);
        self.kv("EventName", name.as_bytes());
        self.kv("AccountCode", &c.account);
        self.kv("CallerIDnum", &c.cid_num);
        self.kv("CallerIDname", &c.cid_name);
        self.kv("CallerIDani", &c.cid_num);
        self.kv("CallerIDrdnis", b"");
        self.kv("CallerIDdnid", b"");
        self.kv("Exten", &c.exten);
        self.kv("Context", &c.context);
        self.chan_name("Channel", c);
        self.kv("Application", app);
        self.kv("AppData", data);
        self.kpatch("EventTime", PatchKind::Date);
        self.kv("AMAFlags", b"DOCUMENTATION");
        self.kpatch("UniqueID", PatchKind::Uid(c.slot));
        self.kpatch("LinkedID", PatchKind::Uid(0));
        self.kv("Userfield", b"");
        self.kv("Peer", peer);
        self.kv("PeerAccount", b"");
        self.kv("Extra", extra);
        self.end(Effect::None);
    }

    fn chan_event(&mut self, name: &str, cl: u32, c: &Chan, body: &[(&str, &[u8])], e: Effect) {
        self.ev(name, cl);
        self.snap("", c);
        for (k, v) in body {
            self.kv(k, v);
        }
        self.end(e);
    }

    fn newexten(&mut self, c: &mut Chan, app: &str, data: &[u8]) {
        self.chan_event(
            "Newexten",
            class::DIALPLAN,
            c,
            &[
                ("Extension", &c.exten.clone()),
                ("Application", app.as_bytes()),
                ("AppData", data),
            ],
            Effect::None,
        );
        c.prio += 1;
    }

    fn varset(&mut self, c: &Chan, var: &str, val: &[u8]) {
        self.chan_event(
            "VarSet",
            class::DIALPLAN,
            c,
            &[("Variable", var.as_bytes()), ("Value", val)],
            Effect::None,
        );
    }

    fn newstate(&mut self, c: &mut Chan, st: u8) {
        c.state = st;
        self.chan_event("Newstate", class::CALL, c, &[], Effect::State(c.slot, st));
    }

    fn device(&mut self, dev: &[u8], state: &str) {
        self.ev("DeviceStateChange", class::CALL);
        self.kv("Device", dev);
        self.kv("State", state.as_bytes());
        self.end(Effect::None);
    }

    fn bridge_head(&mut self, creator: &[u8], name: &[u8], n: u32, tech: &[u8]) {
        self.kpatch("BridgeUniqueid", PatchKind::Bridge);
        self.kv("BridgeType", b"basic");
        self.kv("BridgeTechnology", tech);
        self.kv("BridgeCreator", creator);
        self.kv("BridgeName", name);
        self.kv("BridgeNumChannels", n.to_string().as_bytes());
        self.kv("BridgeVideoSourceMode", b"none");
    }

    fn hangup(&mut self, c: &Chan, cause: &[u8], txt: &[u8]) {
        self.chan_event(
            "Hangup",
            class::CALL,
            c,
            &[("Cause", cause), ("Cause-txt", txt)],
            Effect::Gone(c.slot),
        );
    }

    fn cdr(&mut self, a: &Chan, b: Option<&Chan>, disp: &[u8], dur: u32, bill: u32) {
        self.ev("Cdr", class::CDR);
        self.kv("AccountCode", &a.account);
        self.kv("Source", &a.cid_num);
        self.kv("Destination", &a.exten);
        self.kv("DestinationContext", &a.context);
        let mut cid = b"\"".to_vec();
        cid.extend_from_slice(&a.cid_name);
        cid.extend_from_slice(b"\" <");
        cid.extend_from_slice(&a.cid_num);
        cid.push(b'>');
        self.kv("CallerID", &cid);
        self.chan_name("Channel", a);
        match b {
            Some(b) => self.chan_name("DestinationChannel", b),
            None => self.kv("DestinationChannel", b""),
        }
        self.kv("LastApplication", b"Dial");
        self.kv("LastData", b"PJSIP/2000,30");
        self.kpatch("StartTime", PatchKind::Date);
        if bill > 0 {
            self.kpatch("AnswerTime", PatchKind::Date);
        } else {
            self.kv("AnswerTime", b"");
        }
        self.kpatch("EndTime", PatchKind::Date);
        self.kv("Duration", dur.to_string().as_bytes());
        self.kv("BillableSeconds", bill.to_string().as_bytes());
        self.kv("Disposition", disp);
        self.kv("AMAFlags", b"DOCUMENTATION");
        self.kpatch("UniqueID", PatchKind::Uid(a.slot));
        self.kv("UserField", b"");
        self.end(Effect::None);
    }

    fn slot(&mut self, c: &Chan, tech: &'static str, app: &'static str, data: &[u8]) {
        self.t.slots.push(SlotInfo {
            prefix: c.prefix.clone(),
            suffix: c.suffix,
            pair: c.pair,
            tech,
            cid_num: c.cid_num.clone(),
            cid_name: c.cid_name.clone(),
            context: c.context.clone(),
            exten: c.exten.clone(),
            app,
            app_data: data.to_vec(),
        });
        self.t.pairs = self.t.pairs.max(c.pair + 1);
    }

    pub fn finish(self) -> Template {
        self.t
    }
}

fn or_unknown(v: &[u8]) -> &[u8] {
    if v.is_empty() { b"<unknown>" } else { v }
}

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

const APPS: &[(&str, &[u8])] = &[
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

const VARS: &[(&str, &[u8])] = &[
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
        let (status, cause, txt) = if caller.num % 2 == 0 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn events_are_framed_and_patches_inside_their_event() {
        for kind in CallKind::ALL {
            let t = render(
                kind,
                &Caller {
                    name: b"Alice",
                    num: 1001,
                },
            );
            let mut prev = 0;
            for e in &t.events {
                assert_eq!(e.start, prev);
                let bytes = &t.bytes[e.start as usize..e.end as usize];
                assert!(bytes.starts_with(b"Event: "));
                assert!(bytes.ends_with(b"\r\n\r\n"));
                assert_eq!(
                    memchr::memmem::find(bytes, b"\r\n\r\n"),
                    Some(bytes.len() - 4)
                );
                for p in &t.patches[e.patch_lo as usize..e.patch_hi as usize] {
                    assert!(
                        p.off >= e.start && (p.off as usize + p.kind.width()) <= e.end as usize
                    );
                }
                prev = e.end;
            }
            assert_eq!(prev as usize, t.bytes.len());
        }
    }

    #[test]
    fn mix_resembles_recording() {
        let mut counts: HashMap<String, usize> = HashMap::new();
        let mut total = 0usize;
        let mut sizes = Vec::new();
        for kind in CallKind::ALL {
            let t = render(
                kind,
                &Caller {
                    name: b"Alice Smith",
                    num: 1001,
                },
            );
            for e in &t.events {
                let bytes = &t.bytes[e.start as usize..e.end as usize];
                let line = bytes.split(|&b| b == b'\r').next().unwrap();
                let name = String::from_utf8_lossy(&line[7..]).into_owned();
                *counts.entry(name).or_default() += kind.weight() as usize;
                total += kind.weight() as usize;
                for _ in 0..kind.weight() {
                    sizes.push(bytes.len());
                }
            }
        }
        let share = |n: &str| counts.get(n).copied().unwrap_or(0) as f64 / total as f64;
        // Recording: VarSet 24 %, Newexten 19 %, CEL 15 %.
        assert!(
            (0.15..0.32).contains(&share("VarSet")),
            "VarSet {}",
            share("VarSet")
        );
        assert!(
            (0.12..0.26).contains(&share("Newexten")),
            "Newexten {}",
            share("Newexten")
        );
        assert!((0.10..0.22).contains(&share("CEL")), "CEL {}", share("CEL"));
        sizes.sort_unstable();
        let median = sizes[sizes.len() / 2];
        assert!((400..750).contains(&median), "median {median}");
    }
}
