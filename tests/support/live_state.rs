//! What a consumer that keeps state builds from the stream, per server: the channels up, the
//! bridges and the device states. Include with `#[path = "support/live_state.rs"] mod live_state;`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use amibus::model::pb::{self, envelope::Detail};

#[derive(Debug, Default, PartialEq, serde::Serialize)]
pub struct LiveState {
    pub channels: BTreeSet<String>,
    pub bridges: BTreeSet<String>,
    pub devices: BTreeMap<String, String>,
}

impl LiveState {
    /// Apply one envelope. With `snapshots`, a `snapshot_begin` forgets everything and a
    /// snapshot's list items are facts (README "Rebuilding state"); without, snapshot records
    /// are skipped and only live events count (the truth when none was missed).
    pub fn apply(&mut self, e: &pb::Envelope, snapshots: bool) {
        if !snapshots && !e.snapshot_id.is_empty() {
            return;
        }
        if let Some(Detail::SnapshotBegin(_)) = &e.detail {
            *self = LiveState::default();
            return;
        }
        if e.kind() != pb::Kind::Event {
            return;
        }
        let get = |k: &str| {
            e.headers
                .iter()
                .find(|h| h.key == k.as_bytes())
                .and_then(|h| h.value.as_deref())
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        match e.name.as_str() {
            "CoreShowChannel" | "Newchannel" => {
                self.channels.insert(e.channel.clone());
            }
            "Hangup" => {
                self.channels.remove(&e.channel);
            }
            "BridgeListItem" | "BridgeCreate" => {
                self.bridges.insert(get("BridgeUniqueid"));
            }
            "BridgeDestroy" => {
                self.bridges.remove(&get("BridgeUniqueid"));
            }
            "DeviceStateChange" => {
                self.devices.insert(get("Device"), get("State"));
            }
            _ => {}
        }
    }
}
