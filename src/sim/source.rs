//! The event source of one simulated server: interleaved call lifecycles copied from
//! pre-rendered [`Template`]s and patched in place, or a replayed recording.
//!
//! Owns: the live-call table (which channels exist, their state and variables), the virtual
//! clock behind `Timestamp:`, Uniqueid and channel counters, and the fault injections that change
//! event bytes (malformed, oversized, non-UTF-8 caller names).
//!
//! Must never: do I/O or wait; format per event on the hot path (only fixed-width patches are
//! written); depend on anything but the seed and the calls made, so a seed gives one byte stream.

use std::collections::HashMap;
use std::sync::Arc;

use super::filter::class;
use super::template::{self, CallKind, Caller, Effect, PatchKind, Template};

pub use crate::mix::SplitMix64 as Rng;

const ASCII_NAMES: &[&[u8]] = &[
    b"Alice Smith",
    b"Bob Jones",
    b"Carol White",
    b"Dave Brown",
    b"Erin Black",
    b"Frank Green",
    b"Grace Hall",
    b"Heidi Clark",
];
const UTF8_NAMES: &[&[u8]] = &[
    "José Müller".as_bytes(),
    "Łukasz Wójcik".as_bytes(),
    "山田太郎".as_bytes(),
    "Zoë Ångström".as_bytes(),
    "Søren Kierkegård".as_bytes(),
    "Иван Петров".as_bytes(),
    "François Lefèvre".as_bytes(),
    "محمد علي".as_bytes(),
];
/// Latin-1 bytes, as a misconfigured phone sends them: not valid UTF-8.
const LATIN1_NAMES: &[&[u8]] = &[
    b"Jos\xe9 M\xfcller",
    b"Fran\xe7ois L\xe9vy",
    b"S\xf8ren Kj\xe6r",
];

/// The templates every server of a sim shares: one per (call kind, caller name).
#[derive(Debug)]
pub struct Library {
    /// `[pool][name][kind]`, pools: ASCII, UTF-8 non-ASCII, Latin-1.
    pools: [Vec<Vec<Arc<Template>>>; 3],
    kind_weights: Vec<(CallKind, u32)>,
}

impl Library {
    pub fn build() -> Library {
        let mut num = 1000;
        let pool = |names: &[&[u8]], num: &mut u32| -> Vec<Vec<Arc<Template>>> {
            names
                .iter()
                .map(|name| {
                    *num += 1;
                    CallKind::ALL
                        .iter()
                        .map(|&k| Arc::new(template::render(k, &Caller { name, num: *num })))
                        .collect()
                })
                .collect()
        };
        Library {
            pools: [
                pool(ASCII_NAMES, &mut num),
                pool(UTF8_NAMES, &mut num),
                pool(LATIN1_NAMES, &mut num),
            ],
            kind_weights: CallKind::ALL.iter().map(|&k| (k, k.weight())).collect(),
        }
    }
}

/// Knobs of a generator.
#[derive(Clone, Debug)]
pub struct GenConfig {
    pub seed: u64,
    /// Virtual clock start, microseconds since the epoch.
    pub epoch_us: u64,
    /// Virtual microseconds between two events.
    pub step_us: u64,
    pub concurrent_calls: usize,
    pub non_ascii_share: f64,
    pub non_utf8_share: f64,
    pub malformed_share: f64,
    pub oversized_every: Option<u64>,
    pub oversized_bytes: usize,
}

/// One live channel, as CoreShowChannels/Status report it.
#[derive(Clone, Debug)]
pub struct ChannelInfo {
    pub name: Vec<u8>,
    pub state: u8,
    pub uniqueid: Vec<u8>,
    pub linkedid: Vec<u8>,
    pub tech: &'static str,
    pub cid_num: Vec<u8>,
    pub cid_name: Vec<u8>,
    pub context: Vec<u8>,
    pub exten: Vec<u8>,
    pub app: &'static str,
    pub app_data: Vec<u8>,
    pub bridge: Option<Vec<u8>>,
    pub seconds: u64,
}

struct Call {
    tpl: Arc<Template>,
    pos: usize,
    uids: Vec<[u8; 17]>,
    hex: Vec<[u8; 8]>,
    bridge: [u8; 36],
    alive: Vec<bool>,
    state: Vec<u8>,
    vars: HashMap<Vec<u8>, Vec<u8>>,
    started_us: u64,
    in_bridge: bool,
    /// Emit the remaining events at once (Hangup action).
    fast_forward: bool,
}

/// An event batch shared by every session of a server.
#[derive(Debug, Default)]
pub struct Batch {
    /// Events the generator had emitted once this batch was taken (a running count): an answer
    /// computed when the count was `n` is written after the batches with `end <= n` and before
    /// the others, so it agrees with the events a session saw before it.
    pub end: u64,
    pub bytes: bytes::Bytes,
    /// `(end offset, class bits)` per event; each event starts where the previous ended.
    pub events: Vec<(u32, u32)>,
}

/// Collects events into one buffer.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    pub buf: Vec<u8>,
    pub events: Vec<(u32, u32)>,
}

impl BatchBuilder {
    pub fn with_capacity(n: usize) -> Self {
        BatchBuilder {
            buf: Vec::with_capacity(n),
            events: Vec::with_capacity(n / 256),
        }
    }
    pub fn push_event(&mut self, bytes: &[u8], class: u32) {
        self.buf.extend_from_slice(bytes);
        self.events.push((self.buf.len() as u32, class));
    }
    pub fn len_events(&self) -> usize {
        self.events.len()
    }
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
    /// Take what was collected, leaving an empty builder of the same capacity.
    pub fn take(&mut self) -> Batch {
        let cap = self.buf.capacity();
        let buf = std::mem::replace(&mut self.buf, Vec::with_capacity(cap));
        let events = std::mem::take(&mut self.events);
        Batch {
            end: 0,
            bytes: bytes::Bytes::from(buf),
            events,
        }
    }
}

fn write_digits(out: &mut [u8], mut v: u64) {
    for b in out.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// `YYYY-MM-DD HH:MM:SS` of a Unix time (UTC), Howard Hinnant's `civil_from_days`.
pub fn format_date(secs: u64, out: &mut [u8; 19]) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    out.copy_from_slice(b"0000-00-00 00:00:00");
    write_digits(&mut out[0..4], y.max(0) as u64);
    write_digits(&mut out[5..7], m as u64);
    write_digits(&mut out[8..10], d as u64);
    write_digits(&mut out[11..13], rem / 3600);
    write_digits(&mut out[14..16], rem / 60 % 60);
    write_digits(&mut out[17..19], rem % 60);
}

/// The synthetic event source of one server.
pub struct Generator {
    lib: Arc<Library>,
    cfg: GenConfig,
    rng: Rng,
    calls: Vec<Call>,
    clock_us: u64,
    uid_sec: u64,
    uid_counter: u32,
    chan_counter: u32,
    emitted: u64,
    ts_cache: (u64, [u8; 11]),
    date_cache: (u64, [u8; 19]),
    globals: HashMap<Vec<u8>, Vec<u8>>,
    kind_total: u32,
    /// Devices, queues and bridges, as the events emitted so far left them.
    lists: super::list::Tracker,
}

impl Generator {
    pub fn new(lib: Arc<Library>, cfg: GenConfig) -> Self {
        let kind_total = lib.kind_weights.iter().map(|k| k.1).sum();
        Generator {
            rng: Rng::new(cfg.seed),
            clock_us: cfg.epoch_us,
            uid_sec: cfg.epoch_us / 1_000_000,
            uid_counter: 100_000,
            chan_counter: 0,
            emitted: 0,
            ts_cache: (u64::MAX, [0; 11]),
            date_cache: (u64::MAX, [0; 19]),
            globals: HashMap::new(),
            calls: Vec::new(),
            lib,
            cfg,
            kind_total,
            lists: super::list::Tracker::default(),
        }
    }

    /// Events emitted so far (synthetic and injected).
    pub fn emitted(&self) -> u64 {
        self.emitted
    }

    /// The virtual clock, microseconds since the epoch.
    pub fn now_us(&self) -> u64 {
        self.clock_us
    }

    fn next_uid(&mut self) -> [u8; 17] {
        if self.uid_counter > 999_999 {
            self.uid_counter = 100_000;
            self.uid_sec += 1;
        }
        let mut u = [b'.'; 17];
        write_digits(&mut u[..10], self.uid_sec);
        write_digits(&mut u[11..], u64::from(self.uid_counter));
        self.uid_counter += 1;
        u
    }

    fn next_hex(&mut self) -> [u8; 8] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut h = [0u8; 8];
        let mut v = self.chan_counter;
        for b in h.iter_mut().rev() {
            *b = HEX[(v & 15) as usize];
            v >>= 4;
        }
        self.chan_counter = self.chan_counter.wrapping_add(1);
        h
    }

    fn start_call(&mut self, tpl: Arc<Template>) -> usize {
        let uids = (0..tpl.slots.len()).map(|_| self.next_uid()).collect();
        let hex = (0..tpl.pairs).map(|_| self.next_hex()).collect();
        let mut bridge = [0u8; 36];
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let (r1, r2) = (self.rng.next_u64(), self.rng.next_u64());
        for (i, b) in bridge.iter_mut().enumerate() {
            *b = if [8, 13, 18, 23].contains(&i) {
                b'-'
            } else {
                let r = if i < 18 { r1 } else { r2 };
                HEX[((r >> ((i % 16) * 4)) & 15) as usize]
            };
        }
        let n = tpl.slots.len();
        self.calls.push(Call {
            tpl,
            pos: 0,
            uids,
            hex,
            bridge,
            alive: vec![false; n],
            state: vec![0; n],
            vars: HashMap::new(),
            started_us: self.clock_us,
            in_bridge: false,
            fast_forward: false,
        });
        self.calls.len() - 1
    }

    fn start_random_call(&mut self) {
        let pool = if self.rng.chance(self.cfg.non_utf8_share) {
            2
        } else if self.rng.chance(self.cfg.non_ascii_share) {
            1
        } else {
            0
        };
        let names = &self.lib.pools[pool];
        let name = self.rng.below(names.len() as u64) as usize;
        let mut pick = self.rng.below(u64::from(self.kind_total)) as u32;
        let mut kind = 0;
        for (i, (_, w)) in self.lib.kind_weights.iter().enumerate() {
            if pick < *w {
                kind = i;
                break;
            }
            pick -= w;
        }
        let tpl = self.lib.pools[pool][name][kind].clone();
        self.start_call(tpl);
    }

    fn ts(&mut self, out: &mut [u8]) {
        let sec = self.clock_us / 1_000_000;
        if self.ts_cache.0 != sec {
            let mut s = [b'.'; 11];
            write_digits(&mut s[..10], sec);
            self.ts_cache = (sec, s);
        }
        out[..11].copy_from_slice(&self.ts_cache.1);
        write_digits(&mut out[11..17], self.clock_us % 1_000_000);
    }

    fn date(&mut self, out: &mut [u8]) {
        let sec = self.clock_us / 1_000_000;
        if self.date_cache.0 != sec {
            let mut d = [0u8; 19];
            format_date(sec, &mut d);
            self.date_cache = (sec, d);
        }
        out.copy_from_slice(&self.date_cache.1);
    }

    /// Emit the next event of call `ci` into `out`. Returns whether the call has ended.
    fn emit_from(&mut self, ci: usize, out: &mut BatchBuilder) -> (bool, Effect) {
        let Some(call) = self.calls.get(ci) else {
            return (true, Effect::None);
        };
        let tpl = call.tpl.clone();
        let Some(ev) = tpl.events.get(call.pos).copied() else {
            return (true, Effect::None);
        };
        let base = out.buf.len();
        let (s, e) = (ev.start as usize, ev.end as usize);
        out.buf.extend_from_slice(&tpl.bytes[s..e]);
        for p in &tpl.patches[ev.patch_lo as usize..ev.patch_hi as usize] {
            let at = base + (p.off as usize - s);
            let w = p.kind.width();
            let dst = &mut out.buf[at..at + w];
            match p.kind {
                PatchKind::Ts => self.ts(dst),
                PatchKind::Date => self.date(dst),
                PatchKind::Uid(slot) => {
                    if let Some(u) = self.calls[ci].uids.get(usize::from(slot)) {
                        dst.copy_from_slice(u);
                    }
                }
                PatchKind::Hex(pair) => {
                    if let Some(h) = self.calls[ci].hex.get(usize::from(pair)) {
                        dst.copy_from_slice(h);
                    }
                }
                PatchKind::Bridge => dst.copy_from_slice(&self.calls[ci].bridge),
            }
        }
        self.emitted += 1;
        self.clock_us += self.cfg.step_us;
        self.apply_faults(base, out);
        out.events.push((out.buf.len() as u32, ev.class));
        if ev.effect == Effect::List {
            self.lists.observe(&out.buf[base..], self.clock_us);
        }
        let call = &mut self.calls[ci];
        match ev.effect {
            Effect::Create(s) => {
                if let Some(a) = call.alive.get_mut(usize::from(s)) {
                    *a = true;
                }
                if let Some(st) = call.state.get_mut(usize::from(s)) {
                    *st = if s == 0 { 4 } else { 0 };
                }
            }
            Effect::State(s, v) => {
                if let Some(st) = call.state.get_mut(usize::from(s)) {
                    *st = v;
                }
            }
            Effect::Gone(s) => {
                if let Some(a) = call.alive.get_mut(usize::from(s)) {
                    *a = false;
                }
            }
            Effect::None | Effect::Originated | Effect::List => {}
        }
        if tpl.has_bridge {
            let b = &tpl.bytes[s..e];
            if b.starts_with(b"Event: BridgeEnter") {
                call.in_bridge = true;
            } else if b.starts_with(b"Event: BridgeDestroy") {
                call.in_bridge = false;
            }
        }
        call.pos += 1;
        (call.pos >= tpl.events.len(), ev.effect)
    }

    fn apply_faults(&mut self, base: usize, out: &mut BatchBuilder) {
        if self.cfg.malformed_share > 0.0 && self.rng.chance(self.cfg.malformed_share) {
            // A line without a colon and a bare LF line end, before the blank line.
            let end = out.buf.len() - 2;
            out.buf.truncate(end);
            out.buf
                .extend_from_slice(b"ThisLineHasNoColon\nBare: lf\n\r\n");
        }
        if let Some(n) = self.cfg.oversized_every
            && n > 0
            && self.emitted.is_multiple_of(n)
        {
            let end = out.buf.len() - 2;
            out.buf.truncate(end);
            let line = [b'x'; 900];
            let mut added = 0;
            while added < self.cfg.oversized_bytes {
                out.buf.extend_from_slice(b"Filler: ");
                out.buf.extend_from_slice(&line);
                out.buf.extend_from_slice(b"\r\n");
                added += 910;
            }
            out.buf.extend_from_slice(b"\r\n");
        }
        let _ = base;
    }

    /// Emit `n` interleaved synthetic events into `out`.
    pub fn generate(&mut self, n: usize, out: &mut BatchBuilder) {
        let want = self.cfg.concurrent_calls.max(1);
        for _ in 0..n {
            while self.calls.len() < want {
                self.start_random_call();
            }
            let ci = self.rng.below(self.calls.len() as u64) as usize;
            let (done, _) = self.emit_from(ci, out);
            if done {
                self.calls.swap_remove(ci);
            }
        }
    }

    /// Emit the events of calls marked by [`Generator::hangup`].
    pub fn flush_fast_forward(&mut self, out: &mut BatchBuilder) {
        let mut i = 0;
        while i < self.calls.len() {
            if self.calls[i].fast_forward {
                loop {
                    let (done, _) = self.emit_from(i, out);
                    if done {
                        break;
                    }
                }
                self.calls.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Start an originated call and emit its events up to its `OriginateResponse`.
    pub fn originate(
        &mut self,
        channel: &[u8],
        context: &[u8],
        exten: &[u8],
        action_id: Option<&[u8]>,
        out: &mut BatchBuilder,
    ) -> Option<Vec<u8>> {
        let tpl = Arc::new(template::render_originate(
            channel, context, exten, action_id, b"", b"",
        ));
        let ci = self.start_call(tpl);
        loop {
            let (done, effect) = self.emit_from(ci, out);
            if done {
                self.calls.swap_remove(ci);
                return None;
            }
            if effect == Effect::Originated {
                return self.calls[ci].uids.first().map(|u| u.to_vec());
            }
        }
    }

    /// Emit a single pre-built event (`OriginateResponse` failure, `UserEvent`, `VarSet`):
    /// `head` is the `Event:` line through the `Privilege:` line; a `Timestamp:` is inserted.
    pub fn inject(&mut self, head: &[u8], body: &[u8], class: u32, out: &mut BatchBuilder) {
        out.buf.extend_from_slice(head);
        out.buf.extend_from_slice(b"Timestamp: ");
        let at = out.buf.len();
        out.buf.extend_from_slice(&[b'0'; 17]);
        let mut ts = [0u8; 17];
        self.ts(&mut ts);
        out.buf[at..at + 17].copy_from_slice(&ts);
        out.buf.extend_from_slice(b"\r\n");
        out.buf.extend_from_slice(body);
        out.buf.extend_from_slice(b"\r\n");
        out.events.push((out.buf.len() as u32, class));
        self.emitted += 1;
        self.clock_us += self.cfg.step_us;
    }

    /// Count an event emitted by another source (replay) so stats stay in one place.
    pub fn count_external(&mut self, n: u64) {
        self.emitted += n;
    }

    fn channel_name(call: &Call, slot: usize) -> Vec<u8> {
        let s = &call.tpl.slots[slot];
        let mut name = s.prefix.clone();
        if let Some(h) = call.hex.get(usize::from(s.pair)) {
            name.extend_from_slice(h);
        }
        name.extend_from_slice(s.suffix);
        name
    }

    fn find(&self, channel: &[u8]) -> Option<(usize, usize)> {
        for (ci, call) in self.calls.iter().enumerate() {
            for slot in 0..call.tpl.slots.len() {
                if call.alive[slot] && Self::channel_name(call, slot) == channel {
                    return Some((ci, slot));
                }
            }
        }
        None
    }

    /// Whether a live channel of that exact name exists.
    pub fn exists(&self, channel: &[u8]) -> bool {
        self.find(channel).is_some()
    }

    /// Live channels, in call start order.
    pub fn channels(&self) -> Vec<ChannelInfo> {
        let mut v = Vec::new();
        for call in &self.calls {
            for (slot, s) in call.tpl.slots.iter().enumerate() {
                if !call.alive[slot] {
                    continue;
                }
                v.push(ChannelInfo {
                    name: Self::channel_name(call, slot),
                    state: call.state[slot],
                    uniqueid: call.uids[slot].to_vec(),
                    linkedid: call.uids[0].to_vec(),
                    tech: s.tech,
                    cid_num: s.cid_num.clone(),
                    cid_name: s.cid_name.clone(),
                    context: s.context.clone(),
                    exten: s.exten.clone(),
                    app: s.app,
                    app_data: s.app_data.clone(),
                    bridge: call.in_bridge.then(|| call.bridge.to_vec()),
                    seconds: (self.clock_us.saturating_sub(call.started_us)) / 1_000_000,
                });
            }
        }
        v
    }

    /// Devices, queues and bridges as the events emitted so far left them.
    pub(crate) fn lists(&self) -> &super::list::Tracker {
        &self.lists
    }

    /// Hang up the call owning `channel`: its remaining events go out with the next batch.
    pub fn hangup(&mut self, channel: &[u8]) -> bool {
        match self.find(channel) {
            Some((ci, _)) => {
                self.calls[ci].fast_forward = true;
                true
            }
            None => false,
        }
    }

    /// A channel variable (`Some(channel)`) or a global one. `Err(())` if the channel is gone.
    #[allow(clippy::result_unit_err)]
    pub fn getvar(&self, channel: Option<&[u8]>, var: &[u8]) -> Result<Vec<u8>, ()> {
        match channel {
            None => Ok(self.globals.get(var).cloned().unwrap_or_default()),
            Some(ch) => {
                let (ci, _) = self.find(ch).ok_or(())?;
                let call = &self.calls[ci];
                if let Some(v) = call.vars.get(var) {
                    return Ok(v.clone());
                }
                Ok(match var {
                    b"BENCH_RUN" => b"amibus-sim".to_vec(),
                    b"CHANNEL(name)" => ch.to_vec(),
                    _ => Vec::new(),
                })
            }
        }
    }

    /// Set a channel or global variable. `Err(())` if the channel is gone.
    #[allow(clippy::result_unit_err)]
    pub fn setvar(&mut self, channel: Option<&[u8]>, var: &[u8], value: &[u8]) -> Result<(), ()> {
        match channel {
            None => {
                self.globals.insert(var.to_vec(), value.to_vec());
                Ok(())
            }
            Some(ch) => {
                let (ci, _) = self.find(ch).ok_or(())?;
                self.calls[ci].vars.insert(var.to_vec(), value.to_vec());
                Ok(())
            }
        }
    }

    /// The class bits of a `Privilege:` line, for events built outside the templates.
    pub fn class_of(privilege: &[u8]) -> u32 {
        class::from_privilege(privilege)
    }
}

#[cfg(test)]
#[path = "source_tests.rs"]
mod tests;
