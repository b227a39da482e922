//! Builds a call's events one by one: header sets and order as Asterisk 22 writes them, and
//! the patch table of every per-call or per-event field.

use super::*;

use crate::sim::filter::class;

#[derive(Clone)]
pub(super) struct Chan {
    pub(super) slot: u8,
    pub(super) pair: u8,
    pub(super) prefix: Vec<u8>,
    pub(super) suffix: &'static [u8],
    pub(super) state: u8,
    pub(super) cid_num: Vec<u8>,
    pub(super) cid_name: Vec<u8>,
    pub(super) con_num: Vec<u8>,
    pub(super) con_name: Vec<u8>,
    pub(super) account: Vec<u8>,
    pub(super) context: Vec<u8>,
    pub(super) exten: Vec<u8>,
    pub(super) prio: u32,
}

/// `ChannelStateDesc` of a channel state number.
pub(in crate::sim) fn state_desc(s: u8) -> &'static [u8] {
    match s {
        0 => b"Down",
        4 => b"Ring",
        5 => b"Ringing",
        6 => b"Up",
        _ => b"Unknown",
    }
}

pub(super) fn priv_str(c: u32) -> &'static [u8] {
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
    pub(super) t: Template,
    pub(super) start: usize,
    pub(super) patch_lo: usize,
    pub(super) class: u32,
    /// The event being built changes a state list.
    pub(super) list: bool,
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

    pub(super) fn lit(&mut self, b: &[u8]) {
        self.t.bytes.extend_from_slice(b);
    }

    pub(super) fn patch(&mut self, kind: PatchKind) {
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

    pub(super) fn kpatch(&mut self, k: &str, p: PatchKind) {
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

    pub(super) fn chan_name(&mut self, k: &str, c: &Chan) {
        self.lit(k.as_bytes());
        self.lit(b": ");
        self.lit(&c.prefix);
        self.patch(PatchKind::Hex(c.pair));
        self.lit(c.suffix);
        self.lit(b"\r\n");
    }

    pub(super) fn k2(&mut self, p: &str, k: &str, v: &[u8]) {
        self.lit(p.as_bytes());
        self.kv(k, v);
    }

    /// A channel snapshot with header prefix `p` (`""`, `"Dest"`, ...).
    pub(super) fn snap(&mut self, p: &str, c: &Chan) {
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

    pub(super) fn cel(
        &mut self,
        c: &Chan,
        name: &str,
        app: &[u8],
        data: &[u8],
        peer: &[u8],
        extra: &[u8],
    ) {
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

    pub(super) fn chan_event(
        &mut self,
        name: &str,
        cl: u32,
        c: &Chan,
        body: &[(&str, &[u8])],
        e: Effect,
    ) {
        self.ev(name, cl);
        self.snap("", c);
        for (k, v) in body {
            self.kv(k, v);
        }
        self.end(e);
    }

    pub(super) fn newexten(&mut self, c: &mut Chan, app: &str, data: &[u8]) {
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

    pub(super) fn varset(&mut self, c: &Chan, var: &str, val: &[u8]) {
        self.chan_event(
            "VarSet",
            class::DIALPLAN,
            c,
            &[("Variable", var.as_bytes()), ("Value", val)],
            Effect::None,
        );
    }

    pub(super) fn newstate(&mut self, c: &mut Chan, st: u8) {
        c.state = st;
        self.chan_event("Newstate", class::CALL, c, &[], Effect::State(c.slot, st));
    }

    pub(super) fn device(&mut self, dev: &[u8], state: &str) {
        self.ev("DeviceStateChange", class::CALL);
        self.kv("Device", dev);
        self.kv("State", state.as_bytes());
        self.end(Effect::None);
    }

    pub(super) fn bridge_head(&mut self, creator: &[u8], name: &[u8], n: u32, tech: &[u8]) {
        self.kpatch("BridgeUniqueid", PatchKind::Bridge);
        self.kv("BridgeType", b"basic");
        self.kv("BridgeTechnology", tech);
        self.kv("BridgeCreator", creator);
        self.kv("BridgeName", name);
        self.kv("BridgeNumChannels", n.to_string().as_bytes());
        self.kv("BridgeVideoSourceMode", b"none");
    }

    pub(super) fn hangup(&mut self, c: &Chan, cause: &[u8], txt: &[u8]) {
        self.chan_event(
            "Hangup",
            class::CALL,
            c,
            &[("Cause", cause), ("Cause-txt", txt)],
            Effect::Gone(c.slot),
        );
    }

    pub(super) fn cdr(&mut self, a: &Chan, b: Option<&Chan>, disp: &[u8], dur: u32, bill: u32) {
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

    pub(super) fn slot(&mut self, c: &Chan, tech: &'static str, app: &'static str, data: &[u8]) {
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

pub(super) fn or_unknown(v: &[u8]) -> &[u8] {
    if v.is_empty() { b"<unknown>" } else { v }
}
