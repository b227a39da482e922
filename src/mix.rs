//! Small, fixed mixing functions, the same on every build and platform (unlike `DefaultHasher`):
//! FNV-1a for stable hashes (shard ownership, NATS message ids, which must not change across a
//! restart), SplitMix64 for jitter and the simulator's seeded randomness. Not for cryptography.

/// FNV-1a, 64 bits.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64's increment (the golden ratio in 64 bits).
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's finalizer: spreads every input bit over the output.
pub fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A seedable SplitMix64 generator.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// The sequence of `seed`: equal seeds give equal sequences.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed ^ GOLDEN)
    }

    /// The generator in state `state`, as the reference implementation is seeded (a sequence
    /// recorded from such a generator reproduces with the same number).
    pub fn from_state(state: u64) -> Self {
        SplitMix64(state)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        splitmix(self.0)
    }

    /// Uniform in `0..n` (`n > 0`; 0 is taken as 1).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n.max(1))) >> 64) as u64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        // From the FNV reference (http://www.isthe.com/chongo/tech/comp/fnv/).
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn splitmix64_matches_its_reference_sequence() {
        // The reference implementation (Vigna's splitmix64.c) seeded with state 0 gives these
        // first outputs; `new` xors the seed with the increment, so state 0 is seed GOLDEN.
        assert_eq!(SplitMix64::new(GOLDEN).next_u64(), 0xe220_a839_7b1d_cdaf);
        let mut r = SplitMix64::from_state(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        let below: Vec<u64> = (0..1000).map(|_| r.below(7)).collect();
        assert!(below.iter().all(|&v| v < 7));
        assert!((0..7).all(|v| below.contains(&v)));
    }
}
