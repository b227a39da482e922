//! The simulator's state lists: what `CoreShowChannels`, `Status`, `QueueStatus`,
//! `DeviceStateList` and `BridgeList` answer, built from the calls up at that moment, so they
//! agree with the events the simulator sent before the answer.
//!
//! Owns: [`Tracker`], the server-wide state the events change (device states, queue callers
//! and members, bridges), updated from the very bytes of each event that changes it
//! ([`Effect::List`](super::template::Effect::List)), and the list responses, laid out as
//! Asterisk 22 writes them (`tests/fixtures/asterisk22-actions.ami`): `Response: Success`,
//! `ActionID`, `EventList: start`, `Message`; items without `Privilege` (except `Status`), with
//! `ActionID` where Asterisk puts it (second line, or last for `QueueParams`, `QueueMember`,
//! `QueueEntry` and `Status`); then `<Action>Complete` with `EventList: Complete` and
//! `ListItems`.
//!
//! Must never: parse on the hot path (only the few events marked [`Effect::List`]), or grow
//! without bound (devices, members and queues are keyed by names the templates use; callers
//! and bridges leave with their call).
//!
//! [`Effect::List`]: super::template::Effect::List

use std::collections::BTreeMap;

use super::session::{Resp, error, push_kv};
use super::source::ChannelInfo;
pub(super) use super::template::state_desc;
use crate::ami::{Frame, Parsed, Parser};

/// The queue every simulated queue call joins; listed from the start, as a configured queue is.
const QUEUE: &[u8] = b"support";

#[derive(Clone, Debug)]
struct Entry {
    queue: Vec<u8>,
    channel: Vec<u8>,
    uniqueid: Vec<u8>,
    cid_num: Vec<u8>,
    cid_name: Vec<u8>,
    joined_us: u64,
}

#[derive(Clone, Debug, Default)]
struct Member {
    name: Vec<u8>,
    calls_taken: u64,
    last_call: u64,
}

#[derive(Clone, Debug, Default)]
struct Queue {
    completed: u64,
    /// By interface.
    members: BTreeMap<Vec<u8>, Member>,
}

#[derive(Clone, Debug)]
struct Bridge {
    kind: Vec<u8>,
    technology: Vec<u8>,
    creator: Vec<u8>,
    name: Vec<u8>,
    channels: Vec<u8>,
    video: Vec<u8>,
}

/// Server-wide state the events change.
#[derive(Debug)]
pub struct Tracker {
    devices: BTreeMap<Vec<u8>, Vec<u8>>,
    queues: BTreeMap<Vec<u8>, Queue>,
    /// Callers waiting in a queue, in join order.
    entries: Vec<Entry>,
    /// By BridgeUniqueid, in creation order of ids (sorted).
    bridges: BTreeMap<Vec<u8>, Bridge>,
}

impl Default for Tracker {
    fn default() -> Self {
        let mut queues = BTreeMap::new();
        queues.insert(QUEUE.to_vec(), Queue::default());
        Tracker {
            devices: BTreeMap::new(),
            queues,
            entries: Vec::new(),
            bridges: BTreeMap::new(),
        }
    }
}

fn get(f: &Frame<'_>, k: &str) -> Vec<u8> {
    f.get(k).unwrap_or_default().to_vec()
}

impl Tracker {
    /// Apply one emitted event (whole, patched) at virtual time `now_us`.
    pub fn observe(&mut self, event: &[u8], now_us: u64) {
        let mut p = Parser::default();
        let Parsed::Frame { frame: f, .. } = p.parse(event) else {
            return;
        };
        let Some(name) = f.get("Event") else { return };
        match name {
            b"DeviceStateChange" => {
                self.devices.insert(get(&f, "Device"), get(&f, "State"));
            }
            b"QueueCallerJoin" => self.entries.push(Entry {
                queue: get(&f, "Queue"),
                channel: get(&f, "Channel"),
                uniqueid: get(&f, "Uniqueid"),
                cid_num: get(&f, "CallerIDNum"),
                cid_name: get(&f, "CallerIDName"),
                joined_us: now_us,
            }),
            b"QueueCallerLeave" => {
                let uid = f.get("Uniqueid").unwrap_or_default();
                self.entries.retain(|e| e.uniqueid != uid);
            }
            b"AgentCalled" | b"AgentComplete" => {
                let q = self.queues.entry(get(&f, "Queue")).or_default();
                let m = q.members.entry(get(&f, "Interface")).or_default();
                m.name = get(&f, "MemberName");
                if name == b"AgentComplete" {
                    m.calls_taken += 1;
                    m.last_call = now_us / 1_000_000;
                    q.completed += 1;
                }
            }
            b"BridgeCreate" => {
                let b = Bridge {
                    kind: get(&f, "BridgeType"),
                    technology: get(&f, "BridgeTechnology"),
                    creator: get(&f, "BridgeCreator"),
                    name: get(&f, "BridgeName"),
                    channels: get(&f, "BridgeNumChannels"),
                    video: get(&f, "BridgeVideoSourceMode"),
                };
                self.bridges.insert(get(&f, "BridgeUniqueid"), b);
            }
            b"BridgeEnter" | b"BridgeLeave" => {
                if let Some(b) = self
                    .bridges
                    .get_mut(f.get("BridgeUniqueid").unwrap_or_default())
                {
                    b.channels = get(&f, "BridgeNumChannels");
                }
            }
            b"BridgeDestroy" => {
                self.bridges
                    .remove(f.get("BridgeUniqueid").unwrap_or_default());
            }
            _ => {}
        }
    }

    /// The answer to `QueueStatus` (optionally one `Queue:`), at virtual time `now_us`.
    pub fn queue_status(&self, aid: Option<&[u8]>, only: Option<&[u8]>, now_us: u64) -> Vec<u8> {
        let mut out = list_start(aid, "Queue status will follow");
        let mut n = 0;
        for (qname, q) in &self.queues {
            if only.is_some_and(|o| o != qname.as_slice()) {
                continue;
            }
            let waiting: Vec<&Entry> = self.entries.iter().filter(|e| &e.queue == qname).collect();
            item(&mut out, "QueueParams");
            push_kv(&mut out, "Queue", qname);
            for (k, v) in [
                ("Max", "0"),
                ("Strategy", "ringall"),
                ("Calls", &waiting.len().to_string()),
                ("Holdtime", "0"),
                ("TalkTime", "0"),
                ("Completed", &q.completed.to_string()),
                ("Abandoned", "0"),
                ("ServiceLevel", "0"),
                ("ServicelevelPerf", "0.0"),
                ("ServicelevelPerf2", "0.0"),
                ("Weight", "0"),
            ] {
                push_kv(&mut out, k, v.as_bytes());
            }
            item_end(&mut out, aid);
            n += 1;
            for (iface, m) in &q.members {
                let status = self.member_status(iface);
                item(&mut out, "QueueMember");
                push_kv(&mut out, "Queue", qname);
                push_kv(&mut out, "Name", &m.name);
                push_kv(&mut out, "Location", iface);
                push_kv(&mut out, "StateInterface", iface);
                push_kv(&mut out, "Membership", b"dynamic");
                push_kv(&mut out, "Penalty", b"0");
                push_kv(&mut out, "CallsTaken", m.calls_taken.to_string().as_bytes());
                push_kv(&mut out, "LastCall", m.last_call.to_string().as_bytes());
                push_kv(&mut out, "LastPause", b"0");
                push_kv(&mut out, "LoginTime", b"0");
                let in_call: &[u8] = if status == 2 { b"1" } else { b"0" };
                push_kv(&mut out, "InCall", in_call);
                push_kv(&mut out, "Status", status.to_string().as_bytes());
                push_kv(&mut out, "Paused", b"0");
                push_kv(&mut out, "PausedReason", b"");
                push_kv(&mut out, "Wrapuptime", b"0");
                item_end(&mut out, aid);
                n += 1;
            }
            for (pos, e) in waiting.iter().enumerate() {
                item(&mut out, "QueueEntry");
                push_kv(&mut out, "Queue", qname);
                push_kv(&mut out, "Position", (pos + 1).to_string().as_bytes());
                push_kv(&mut out, "Channel", &e.channel);
                push_kv(&mut out, "Uniqueid", &e.uniqueid);
                push_kv(&mut out, "CallerIDNum", &e.cid_num);
                push_kv(&mut out, "CallerIDName", &e.cid_name);
                push_kv(&mut out, "ConnectedLineNum", b"unknown");
                push_kv(&mut out, "ConnectedLineName", b"unknown");
                let wait = now_us.saturating_sub(e.joined_us) / 1_000_000;
                push_kv(&mut out, "Wait", wait.to_string().as_bytes());
                push_kv(&mut out, "Priority", b"0");
                item_end(&mut out, aid);
                n += 1;
            }
        }
        list_complete(&mut out, "QueueStatusComplete", aid, n);
        out
    }

    /// The `Status:` number of a queue member, from its device's state (`AST_DEVICE_*`).
    fn member_status(&self, iface: &[u8]) -> u8 {
        match self.devices.get(iface).map(Vec::as_slice) {
            Some(b"NOT_INUSE") => 1,
            Some(b"INUSE") => 2,
            Some(b"BUSY") => 3,
            Some(b"INVALID") => 4,
            Some(b"UNAVAILABLE") => 5,
            Some(b"RINGING") => 6,
            Some(b"RINGINUSE") => 7,
            Some(b"ONHOLD") => 8,
            _ => 0,
        }
    }

    /// The answer to `DeviceStateList`: every device whose state an event reported, with the
    /// last state reported.
    pub fn device_state_list(&self, aid: Option<&[u8]>) -> Vec<u8> {
        let mut out = list_start(aid, "Device State Changes will follow");
        for (dev, state) in &self.devices {
            item_with_id(&mut out, "DeviceStateChange", aid);
            push_kv(&mut out, "Device", dev);
            push_kv(&mut out, "State", state);
            out.extend_from_slice(b"\r\n");
        }
        list_complete(&mut out, "DeviceStateListComplete", aid, self.devices.len());
        out
    }

    /// The answer to `BridgeList` (optionally of one `BridgeType:`).
    pub fn bridge_list(&self, aid: Option<&[u8]>, kind: Option<&[u8]>) -> Vec<u8> {
        let mut out = list_start(aid, "Bridge listing will follow");
        let mut n = 0;
        for (id, b) in &self.bridges {
            if kind.is_some_and(|k| k != b.kind.as_slice()) {
                continue;
            }
            item_with_id(&mut out, "BridgeListItem", aid);
            push_kv(&mut out, "BridgeUniqueid", id);
            push_kv(&mut out, "BridgeType", &b.kind);
            push_kv(&mut out, "BridgeTechnology", &b.technology);
            push_kv(&mut out, "BridgeCreator", &b.creator);
            push_kv(&mut out, "BridgeName", &b.name);
            push_kv(&mut out, "BridgeNumChannels", &b.channels);
            push_kv(&mut out, "BridgeVideoSourceMode", &b.video);
            out.extend_from_slice(b"\r\n");
            n += 1;
        }
        list_complete(&mut out, "BridgeListComplete", aid, n);
        out
    }
}

fn list_start(aid: Option<&[u8]>, message: &str) -> Vec<u8> {
    Resp::new("Success", aid)
        .kv("EventList", b"start")
        .kv("Message", message.as_bytes())
        .done()
}

/// An item whose `ActionID` comes last ([`item_end`]).
fn item(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(b"Event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn item_end(out: &mut Vec<u8>, aid: Option<&[u8]>) {
    if let Some(id) = aid {
        push_kv(out, "ActionID", id);
    }
    out.extend_from_slice(b"\r\n");
}

/// An item whose `ActionID` is its second line; the caller ends it.
fn item_with_id(out: &mut Vec<u8>, name: &str, aid: Option<&[u8]>) {
    item(out, name);
    if let Some(id) = aid {
        push_kv(out, "ActionID", id);
    }
}

fn list_complete(out: &mut Vec<u8>, name: &str, aid: Option<&[u8]>, n: usize) {
    item_with_id(out, name, aid);
    push_kv(out, "EventList", b"Complete");
    push_kv(out, "ListItems", n.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A channel snapshot's headers, as `CoreShowChannel` and `Status` carry them.
fn channel_snapshot(v: &mut Vec<u8>, c: &ChannelInfo) {
    let unk = |x: &[u8]| -> Vec<u8> {
        if x.is_empty() {
            b"<unknown>".to_vec()
        } else {
            x.to_vec()
        }
    };
    push_kv(v, "Channel", &c.name);
    push_kv(v, "ChannelState", c.state.to_string().as_bytes());
    push_kv(v, "ChannelStateDesc", state_desc(c.state));
    push_kv(v, "CallerIDNum", &unk(&c.cid_num));
    push_kv(v, "CallerIDName", &unk(&c.cid_name));
    push_kv(v, "ConnectedLineNum", b"<unknown>");
    push_kv(v, "ConnectedLineName", b"<unknown>");
    push_kv(v, "Language", b"en");
    push_kv(v, "AccountCode", b"acct1");
    push_kv(v, "Context", &c.context);
    push_kv(v, "Exten", &c.exten);
    push_kv(v, "Priority", b"1");
    push_kv(v, "Uniqueid", &c.uniqueid);
    push_kv(v, "Linkedid", &c.linkedid);
    push_kv(v, "ChanVariable", b"BENCH_RUN=amibus-sim");
    push_kv(v, "ChanVariable", b"BENCH_TAG=");
    push_kv(v, "ChanVariable", b"CHANNEL(accountcode)=acct1");
}

/// The answer to `CoreShowChannels`.
pub fn core_show_channels(aid: Option<&[u8]>, chans: &[ChannelInfo]) -> Vec<u8> {
    let mut out = list_start(aid, "Channels will follow");
    for c in chans {
        item_with_id(&mut out, "CoreShowChannel", aid);
        channel_snapshot(&mut out, c);
        push_kv(&mut out, "Application", c.app.as_bytes());
        push_kv(&mut out, "ApplicationData", &c.app_data);
        let d = format!(
            "{:02}:{:02}:{:02}",
            c.seconds / 3600,
            c.seconds / 60 % 60,
            c.seconds % 60
        );
        push_kv(&mut out, "Duration", d.as_bytes());
        push_kv(
            &mut out,
            "BridgeId",
            c.bridge.as_deref().unwrap_or_default(),
        );
        out.extend_from_slice(b"\r\n");
    }
    list_complete(&mut out, "CoreShowChannelsComplete", aid, chans.len());
    out
}

/// The answer to `Status` (all channels, or `want` only; `vars` from `Variables:`).
pub fn status(
    aid: Option<&[u8]>,
    chans: &[ChannelInfo],
    want: Option<&[u8]>,
    vars: &[Vec<u8>],
) -> Vec<u8> {
    let chosen: Vec<&ChannelInfo> = chans
        .iter()
        .filter(|c| want.is_none_or(|w| w == c.name.as_slice()))
        .collect();
    if want.is_some() && chosen.is_empty() {
        return error(aid, "No such channel");
    }
    let mut out = list_start(aid, "Channel status will follow");
    for c in &chosen {
        out.extend_from_slice(b"Event: Status\r\nPrivilege: Call\r\n");
        channel_snapshot(&mut out, c);
        push_kv(&mut out, "Type", c.tech.as_bytes());
        push_kv(&mut out, "DNID", b"");
        push_kv(&mut out, "EffectiveConnectedLineNum", b"<unknown>");
        push_kv(&mut out, "EffectiveConnectedLineName", b"<unknown>");
        push_kv(&mut out, "TimeToHangup", b"0");
        push_kv(
            &mut out,
            "BridgeID",
            c.bridge.as_deref().unwrap_or_default(),
        );
        push_kv(&mut out, "Application", c.app.as_bytes());
        push_kv(&mut out, "Data", &c.app_data);
        push_kv(&mut out, "Nativeformats", b"(ulaw)");
        push_kv(&mut out, "Readformat", b"ulaw");
        push_kv(&mut out, "Readtrans", b"");
        push_kv(&mut out, "Writeformat", b"ulaw");
        push_kv(&mut out, "Writetrans", b"");
        push_kv(&mut out, "Callgroup", b"0");
        push_kv(&mut out, "Pickupgroup", b"0");
        push_kv(&mut out, "Seconds", c.seconds.to_string().as_bytes());
        for v in vars {
            let mut line = v.clone();
            line.extend_from_slice(b"=(null)");
            push_kv(&mut out, "Variable", &line);
        }
        item_end(&mut out, aid);
    }
    item_with_id(&mut out, "StatusComplete", aid);
    push_kv(&mut out, "EventList", b"Complete");
    let n = chosen.len().to_string();
    push_kv(&mut out, "ListItems", n.as_bytes());
    push_kv(&mut out, "Items", n.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(bytes: &[u8]) -> Vec<Vec<(String, String)>> {
        let mut p = Parser::default();
        let mut rest = bytes;
        let mut out = Vec::new();
        while let Parsed::Frame { frame, consumed } = p.parse(rest) {
            out.push(
                frame
                    .headers()
                    .map(|h| {
                        (
                            String::from_utf8_lossy(h.key).into_owned(),
                            String::from_utf8_lossy(h.value_or_empty()).into_owned(),
                        )
                    })
                    .collect(),
            );
            rest = &rest[consumed..];
        }
        assert!(
            rest.is_empty(),
            "left over: {:?}",
            String::from_utf8_lossy(rest)
        );
        out
    }

    #[test]
    fn events_build_the_lists_and_leaving_ones_empty_them() {
        let mut t = Tracker::default();
        let ev = |s: &str| s.replace('\n', "\r\n").into_bytes();
        t.observe(&ev("Event: DeviceStateChange\nPrivilege: call,all\nDevice: PJSIP/1001\nState: INUSE\n\n"), 0);
        t.observe(&ev("Event: QueueCallerJoin\nPrivilege: agent,all\nChannel: PJSIP/1001-00000001\nUniqueid: 1.1\nCallerIDNum: 1001\nCallerIDName: Alice\nQueue: support\n\n"), 1_000_000);
        t.observe(&ev("Event: AgentCalled\nPrivilege: agent,all\nQueue: support\nMemberName: PJSIP/2001\nInterface: PJSIP/2001\n\n"), 0);
        t.observe(&ev("Event: BridgeCreate\nPrivilege: call,all\nBridgeUniqueid: b-1\nBridgeType: basic\nBridgeTechnology: simple_bridge\nBridgeCreator: <unknown>\nBridgeName: <unknown>\nBridgeNumChannels: 0\nBridgeVideoSourceMode: none\n\n"), 0);
        t.observe(&ev("Event: BridgeEnter\nPrivilege: call,all\nBridgeUniqueid: b-1\nBridgeNumChannels: 1\n\n"), 0);

        let q = frames(&t.queue_status(Some(b"q-1"), None, 4_000_000));
        let names: Vec<&str> = q.iter().map(|f| f[0].1.as_str()).collect();
        assert_eq!(
            names,
            [
                "Success",
                "QueueParams",
                "QueueMember",
                "QueueEntry",
                "QueueStatusComplete"
            ]
        );
        assert_eq!(
            q[1].last().unwrap(),
            &("ActionID".into(), "q-1".into()),
            "ActionID last, as Asterisk"
        );
        assert!(q[1].contains(&("Calls".into(), "1".into())));
        assert!(q[3].contains(&("Wait".into(), "3".into())));
        assert!(q[4].contains(&("ListItems".into(), "3".into())));

        let b = frames(&t.bridge_list(Some(b"b"), None));
        assert_eq!(b[1][0].1, "BridgeListItem");
        assert_eq!(
            b[1][1],
            ("ActionID".into(), "b".into()),
            "ActionID second, as Asterisk"
        );
        assert!(b[1].contains(&("BridgeNumChannels".into(), "1".into())));

        let d = frames(&t.device_state_list(Some(b"d")));
        assert_eq!(
            d[1][2..],
            [
                ("Device".into(), "PJSIP/1001".into()),
                ("State".into(), "INUSE".into())
            ]
        );

        t.observe(
            &ev("Event: QueueCallerLeave\nPrivilege: agent,all\nUniqueid: 1.1\nQueue: support\n\n"),
            0,
        );
        t.observe(
            &ev("Event: BridgeDestroy\nPrivilege: call,all\nBridgeUniqueid: b-1\n\n"),
            0,
        );
        assert_eq!(
            frames(&t.bridge_list(None, None)).len(),
            2,
            "start and complete only"
        );
        let q = frames(&t.queue_status(None, None, 0));
        assert!(q.iter().all(|f| f[0].1 != "QueueEntry"));
    }
}
