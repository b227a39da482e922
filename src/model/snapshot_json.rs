//! The JSON form of the snapshot details (`snapshot_begin`, `snapshot_end`), next to
//! [`super::json`], which writes the rest of the envelope.
//!
//! Shape: `"snapshot_begin":{"snapshot_id":"1795671272021-1","trigger":"login","lists":
//! ["CoreShowChannels",...]}` and `"snapshot_end":{"snapshot_id":"...","trigger":"gap",
//! "complete":false,"reason":"timeout","duration_us":"1234","lists":[{"action":
//! "CoreShowChannels","items":"12","complete":true,"error":""},...]}`; 64-bit counts are
//! decimal strings, as everywhere in this JSON.

use super::json::{field, int64, string};
use super::pb;

fn trigger_name(t: i32) -> &'static str {
    match pb::SnapshotTrigger::try_from(t) {
        Ok(pb::SnapshotTrigger::Login) => "login",
        Ok(pb::SnapshotTrigger::Gap) => "gap",
        _ => "unspecified",
    }
}

pub(super) fn begin(out: &mut Vec<u8>, b: &pb::SnapshotBegin) {
    field(out, "snapshot_begin", false);
    out.push(b'{');
    field(out, "snapshot_id", true);
    string(out, &b.snapshot_id);
    field(out, "trigger", false);
    string(out, trigger_name(b.trigger));
    field(out, "lists", false);
    out.push(b'[');
    for (i, l) in b.lists.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, l);
    }
    out.extend_from_slice(b"]}");
}

pub(super) fn end(out: &mut Vec<u8>, e: &pb::SnapshotEnd) {
    field(out, "snapshot_end", false);
    out.push(b'{');
    field(out, "snapshot_id", true);
    string(out, &e.snapshot_id);
    field(out, "trigger", false);
    string(out, trigger_name(e.trigger));
    field(out, "complete", false);
    out.extend_from_slice(if e.complete { b"true" } else { b"false" });
    field(out, "reason", false);
    string(out, &e.reason);
    field(out, "duration_us", false);
    int64(out, e.duration_us);
    field(out, "lists", false);
    out.push(b'[');
    for (i, l) in e.lists.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'{');
        field(out, "action", true);
        string(out, &l.action);
        field(out, "items", false);
        int64(out, l.items);
        field(out, "complete", false);
        out.extend_from_slice(if l.complete { b"true" } else { b"false" });
        field(out, "error", false);
        string(out, &l.error);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
}

#[cfg(test)]
mod tests {
    use super::super::json::write_json_line;
    use super::*;

    #[test]
    fn snapshot_records_are_valid_json_with_their_details() {
        let env = pb::Envelope {
            server: "pbx1".into(),
            epoch: 1,
            seq: 2,
            kind: pb::Kind::SnapshotEnd as i32,
            snapshot_id: "1-1".into(),
            detail: Some(pb::envelope::Detail::SnapshotEnd(pb::SnapshotEnd {
                snapshot_id: "1-1".into(),
                trigger: pb::SnapshotTrigger::Gap as i32,
                lists: vec![pb::SnapshotList {
                    action: "QueueStatus".into(),
                    items: 0,
                    complete: false,
                    error: "Permission \"denied\"".into(),
                }],
                complete: false,
                reason: "refused: QueueStatus".into(),
                duration_us: 12,
            })),
            ..Default::default()
        };
        let mut out = Vec::new();
        write_json_line(&env, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["kind"], "snapshot_end");
        assert_eq!(v["snapshot_id"], "1-1");
        assert_eq!(v["snapshot_end"]["trigger"], "gap");
        assert_eq!(
            v["snapshot_end"]["lists"][0]["error"],
            "Permission \"denied\""
        );
        assert_eq!(v["snapshot_end"]["lists"][0]["items"], "0");
        assert_eq!(v["snapshot_end"]["complete"], false);

        let env = pb::Envelope {
            kind: pb::Kind::SnapshotBegin as i32,
            detail: Some(pb::envelope::Detail::SnapshotBegin(pb::SnapshotBegin {
                snapshot_id: "1-2".into(),
                trigger: pb::SnapshotTrigger::Login as i32,
                lists: vec!["CoreShowChannels".into(), "BridgeList".into()],
            })),
            ..Default::default()
        };
        out.clear();
        write_json_line(&env, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["snapshot_begin"]["lists"][1], "BridgeList");
        assert_eq!(v["snapshot_begin"]["trigger"], "login");
    }
}
