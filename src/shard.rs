//! Sharding: which replica reads which Asterisk server, by rendezvous (highest random weight)
//! hashing.
//!
//! Owns: [`Shard`] and [`Shard::owns`]. Every replica computes the same answer for any server
//! id, configured or not, without talking to the others: the owner of `id` is the replica `r`
//! with the highest `weight(id, r)`. Changing the replica count moves only the servers whose
//! highest weight changes: going from `n` to `n + 1` replicas moves about `1 / (n + 1)` of them,
//! all to the new replica.
//!
//! Must never: depend on anything but the id and the replica index (no per-process hash seeds,
//! no std `DefaultHasher`, whose output may change between Rust releases).

use crate::mix::{fnv1a64, splitmix as mix};

/// This replica's place among `count` replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

impl Shard {
    /// Whether this replica reads server `id` (and takes its action requests).
    pub fn owns(&self, id: &str) -> bool {
        self.count <= 1 || owner(id, self.count) == self.index
    }
}

/// The replica (0-based, of `count`) that owns server `id`.
pub fn owner(id: &str, count: u32) -> u32 {
    let key = fnv1a64(id.as_bytes());
    (0..count.max(1))
        .max_by_key(|&r| (mix(key ^ mix(u64::from(r) + 1)), r))
        .unwrap_or(0)
}

/// The ordinal at the end of a StatefulSet pod name (`amibus-2` → 2).
pub fn ordinal_from_hostname(hostname: &str) -> Option<u32> {
    hostname.rsplit_once('-')?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers() -> Vec<String> {
        (0..300).map(|i| format!("pbx-{i:03}")).collect()
    }

    #[test]
    fn three_replicas_own_every_server_exactly_once_and_evenly() {
        let servers = servers();
        let mut per_replica = [0usize; 3];
        for s in &servers {
            let owners: Vec<u32> = (0..3)
                .filter(|&i| Shard { index: i, count: 3 }.owns(s))
                .collect();
            assert_eq!(owners.len(), 1, "{s} is owned by {owners:?}");
            per_replica[owners[0] as usize] += 1;
        }
        for n in per_replica {
            assert!((70..=130).contains(&n), "uneven split: {per_replica:?}");
        }
    }

    #[test]
    fn growing_moves_only_what_must_move() {
        let servers = servers();
        let mut moved = 0;
        for s in &servers {
            let (before, after) = (owner(s, 3), owner(s, 4));
            if before != after {
                assert_eq!(after, 3, "{s} moved between old replicas");
                moved += 1;
            }
        }
        // About a quarter move, all to the new replica.
        assert!((45..=105).contains(&moved), "{moved} of 300 moved");
        // Shrinking back moves exactly those back.
        for s in &servers {
            if owner(s, 4) != 3 {
                assert_eq!(owner(s, 4), owner(s, 3));
            }
        }
    }

    #[test]
    fn one_replica_owns_everything_and_answers_are_stable() {
        assert!(Shard::default().owns("anything"));
        // Fixed answers: a change here would reshuffle every deployment.
        assert_eq!(
            ["pbx-000", "pbx-001", "pbx-002", "vicidial-7"].map(|s| owner(s, 3)),
            [0, 1, 2, 0]
        );
        assert_eq!(ordinal_from_hostname("amibus-12"), Some(12));
        assert_eq!(ordinal_from_hostname("amibus"), None);
    }
}
