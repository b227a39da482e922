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

mod builder;
mod render;

pub use builder::Builder;
pub(super) use builder::state_desc;
pub use render::{CallKind, Caller, render, render_originate};

#[cfg(test)]
mod tests;
