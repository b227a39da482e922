//! Reconnect pacing: backoff with full jitter above a floor, and the process instance id that
//! begins every ActionID.

use super::*;

/// Random per process: the first part of every ActionID, so two amibus processes (or a
/// restarted one) logged in to the same Asterisk never mistake each other's
/// `OriginateResponse` for their own.
pub fn instance_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| format!("{:012x}", random_u64() & 0xffff_ffff_ffff))
}

pub(super) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i64(now_ns());
    h.write_u32(std::process::id());
    h.finish()
}

/// Backoff jitter.
pub(super) struct Rng(crate::mix::SplitMix64);

impl Rng {
    pub(super) fn new() -> Self {
        Rng(crate::mix::SplitMix64::new(random_u64()))
    }

    pub(super) fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `[lo, hi]`.
    pub(super) fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_nanos().min(u128::from(u64::MAX)) as u64;
        if span == 0 {
            return lo;
        }
        lo + Duration::from_nanos(self.next() % span)
    }
}

/// The delay before attempt `attempt` (0-based): uniform between `min` and
/// `min(max, min · 2^attempt)` ("full jitter" above a floor, so a thousand connections dropped
/// together do not come back together).
pub fn backoff_delay(min: Duration, max: Duration, attempt: u32, rng_value: u64) -> Duration {
    let cap = min
        .saturating_mul(1u32 << attempt.min(20))
        .min(max)
        .max(min);
    let span = cap.saturating_sub(min).as_nanos().min(u128::from(u64::MAX)) as u64;
    if span == 0 {
        return min;
    }
    min + Duration::from_nanos(rng_value % span)
}
