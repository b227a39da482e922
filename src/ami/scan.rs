//! Structural classification of AMI bytes, 64 at a time: which bytes are `\n` and which are `:`.
//!
//! Owns: the SIMD kernels (AVX2 and SSE2 on x86-64, NEON on aarch64) and a portable `u64` SWAR
//! fallback, all behind [`Classifier`], which picks the best one the CPU has at run time. The
//! parser walks the two bit masks a block gives to find line ends and the first colon of each
//! line, instead of calling a search per line.
//!
//! The x86 kernels also prefetch the bytes 1 KiB ahead: on the machines measured, the hardware
//! prefetcher alone left a 33 MB stream waiting on memory at every block (parse 1.65 GB/s without,
//! 2.4 with, where the bare memchr split ran at 2.0).
//!
//! Must never: read outside the 64 bytes it is given, or be constructed for a CPU feature the
//! machine lacks. This is the only module of the crate allowed `unsafe`: the vector loads take a
//! raw pointer, and a `#[target_feature]` kernel is called only from a [`Classifier`] made after
//! the feature was detected. Every implementation gives the same masks for the same bytes (unit
//! tests here, and the parser's property tests run each one against a reference parser).
#![allow(unsafe_code)]

/// Bytes per classified block.
pub const BLOCK: usize = 64;

/// The masks of one block: bit `i` is set when byte `i` is `\n` (resp. `:`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Masks {
    pub lf: u64,
    pub colon: u64,
}

/// Which kernel classifies blocks. Only the constructors can make one, and they check the CPU,
/// so holding a `Classifier` proves its kernel may run here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Classifier(Kernel);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Swar,
    #[cfg(target_arch = "x86_64")]
    Sse2,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "aarch64")]
    Neon,
}

impl Default for Classifier {
    fn default() -> Self {
        Classifier::detect()
    }
}

impl Classifier {
    /// The fastest kernel this CPU runs. AVX-512 is taken only on CPUs that also have
    /// AVX512-VBMI (Intel Ice Lake and later, AMD Zen 4 and later): on the first AVX-512 cores
    /// (Skylake-SP) even these light 512-bit instructions lower the core's clock, a cost every
    /// other task of the process would pay.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(c) = Self::avx512()
            .filter(|_| std::arch::is_x86_feature_detected!("avx512vbmi"))
            .or_else(Self::avx2)
        {
            return c;
        }
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        if let Some(c) = Self::sse2().or_else(Self::neon) {
            return c;
        }
        Self::swar()
    }

    /// The portable fallback: eight bytes at a time in a `u64`.
    pub fn swar() -> Self {
        Classifier(Kernel::Swar)
    }

    /// SSE2 (part of every x86-64 CPU), if this is x86-64.
    pub fn sse2() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("sse2") {
            return Some(Classifier(Kernel::Sse2));
        }
        None
    }

    /// AVX2, if this CPU has it.
    pub fn avx2() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return Some(Classifier(Kernel::Avx2));
        }
        None
    }

    /// AVX-512BW, if this CPU has it (and the OS saves its registers).
    pub fn avx512() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512bw") {
            return Some(Classifier(Kernel::Avx512));
        }
        None
    }

    /// NEON (part of every aarch64 CPU), if this is aarch64.
    pub fn neon() -> Option<Self> {
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            return Some(Classifier(Kernel::Neon));
        }
        None
    }

    /// Every kernel this machine runs, the fallback first (for tests and benchmarks).
    pub fn available() -> Vec<Self> {
        let mut all = vec![Self::swar()];
        all.extend(Self::sse2());
        all.extend(Self::avx2());
        all.extend(Self::avx512());
        all.extend(Self::neon());
        all
    }

    /// A short name for reports: `swar`, `sse2`, `avx2`, `avx512` or `neon`.
    pub fn name(self) -> &'static str {
        match self.0 {
            Kernel::Swar => "swar",
            #[cfg(target_arch = "x86_64")]
            Kernel::Sse2 => "sse2",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => "avx512",
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => "neon",
        }
    }

    /// The masks of `block`.
    #[inline]
    pub fn classify(self, block: &[u8; BLOCK]) -> Masks {
        match self.0 {
            Kernel::Swar => swar(block),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a `Kernel::Sse2` is only made by `Classifier::sse2`, after SSE2 was detected.
            Kernel::Sse2 => unsafe { x86::sse2(block) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a `Kernel::Avx2` is only made by `Classifier::avx2`, after AVX2 was detected.
            Kernel::Avx2 => unsafe { x86::avx2(block) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a `Kernel::Avx512` is only made by `Classifier::avx512`, after AVX-512BW
            // was detected.
            Kernel::Avx512 => unsafe { x86::avx512(block) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: a `Kernel::Neon` is only made by `Classifier::neon`, after NEON was detected.
            Kernel::Neon => unsafe { arm::neon(block) },
        }
    }

    /// The masks of up to 64 bytes; bits past `bytes.len()` are clear.
    #[inline]
    pub fn classify_tail(self, bytes: &[u8]) -> Masks {
        let n = bytes.len().min(BLOCK);
        let mut block = [0u8; BLOCK];
        block[..n].copy_from_slice(&bytes[..n]);
        // Zero bytes are neither `\n` nor `:`, so the padding sets no bit.
        self.classify(&block)
    }
}

/// Eight bytes at a time: a byte equal to the needle becomes zero after XOR, and the exact
/// zero-byte test sets its high bit; a multiply gathers the eight high bits into one byte.
fn swar(block: &[u8; BLOCK]) -> Masks {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const LF: u64 = 0x0a0a_0a0a_0a0a_0a0a;
    const COLON: u64 = 0x3a3a_3a3a_3a3a_3a3a;
    /// 0x80 in each byte of `x` that is zero, with no false positives.
    #[inline(always)]
    fn zero_bytes(x: u64) -> u64 {
        !(((x & LOW7).wrapping_add(LOW7)) | x | LOW7)
    }
    /// One bit per byte from the high bits: bit `k` of the result is bit `8k + 7` of `m`.
    #[inline(always)]
    fn gather(m: u64) -> u64 {
        ((m >> 7).wrapping_mul(0x0102_0408_1020_4080)) >> 56
    }
    let mut masks = Masks::default();
    for (k, word) in block.chunks_exact(8).enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        let x = u64::from_le_bytes(w);
        masks.lf |= gather(zero_bytes(x ^ LF)) << (8 * k);
        masks.colon |= gather(zero_bytes(x ^ COLON)) << (8 * k);
    }
    masks
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK, Masks};

    /// # Safety
    /// The CPU must support SSE2 (every x86-64 CPU does).
    #[inline]
    #[target_feature(enable = "sse2")]
    pub unsafe fn sse2(block: &[u8; BLOCK]) -> Masks {
        // A hint: it reads nothing and never faults, wherever the address points.
        _mm_prefetch::<_MM_HINT_T0>(block.as_ptr().wrapping_add(1024).cast());
        let lf = _mm_set1_epi8(b'\n' as i8);
        let colon = _mm_set1_epi8(b':' as i8);
        let mut masks = Masks::default();
        for (k, part) in block.chunks_exact(16).enumerate() {
            // SAFETY: `part` is 16 readable bytes (`chunks_exact(16)`); `loadu` has no alignment
            // requirement.
            let v = unsafe { _mm_loadu_si128(part.as_ptr().cast()) };
            let l = _mm_movemask_epi8(_mm_cmpeq_epi8(v, lf)) as u16;
            let c = _mm_movemask_epi8(_mm_cmpeq_epi8(v, colon)) as u16;
            masks.lf |= u64::from(l) << (16 * k);
            masks.colon |= u64::from(c) << (16 * k);
        }
        masks
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn avx2(block: &[u8; BLOCK]) -> Masks {
        // A hint: it reads nothing and never faults, wherever the address points.
        _mm_prefetch::<_MM_HINT_T0>(block.as_ptr().wrapping_add(1024).cast());
        let (lo, hi) = block.split_at(32);
        // SAFETY: `lo` and `hi` are 32 readable bytes each (a 64-byte array split in half);
        // `loadu` has no alignment requirement.
        let (a, b) = unsafe {
            (
                _mm256_loadu_si256(lo.as_ptr().cast()),
                _mm256_loadu_si256(hi.as_ptr().cast()),
            )
        };
        Masks {
            lf: bits(a, b'\n') | bits(b, b'\n') << 32,
            colon: bits(a, b':') | bits(b, b':') << 32,
        }
    }

    /// One load and two compares straight into 64-bit masks.
    ///
    /// # Safety
    /// The CPU must support AVX-512BW.
    #[inline]
    #[target_feature(enable = "avx512bw")]
    pub unsafe fn avx512(block: &[u8; BLOCK]) -> Masks {
        // A hint: it reads nothing and never faults, wherever the address points.
        _mm_prefetch::<_MM_HINT_T0>(block.as_ptr().wrapping_add(1024).cast());
        // SAFETY: `block` is 64 readable bytes; `loadu` has no alignment requirement.
        let v = unsafe { _mm512_loadu_si512(block.as_ptr().cast()) };
        Masks {
            lf: _mm512_cmpeq_epi8_mask(v, _mm512_set1_epi8(b'\n' as i8)),
            colon: _mm512_cmpeq_epi8_mask(v, _mm512_set1_epi8(b':' as i8)),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn bits(v: __m256i, needle: u8) -> u64 {
        let n = _mm256_set1_epi8(needle as i8);
        u64::from(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, n)) as u32)
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    use super::{BLOCK, Masks};

    /// NEON has no movemask: each comparison byte keeps one bit of its position (`1 << (i % 8)`)
    /// and three rounds of pairwise adds fold 64 bytes into one `u64`.
    ///
    /// # Safety
    /// The CPU must support NEON (every aarch64 CPU does).
    #[inline]
    #[target_feature(enable = "neon")]
    pub unsafe fn neon(block: &[u8; BLOCK]) -> Masks {
        let mut v = [vdupq_n_u8(0); 4];
        for (slot, part) in v.iter_mut().zip(block.chunks_exact(16)) {
            // SAFETY: `part` is 16 readable bytes (`chunks_exact(16)`).
            *slot = unsafe { vld1q_u8(part.as_ptr()) };
        }
        Masks {
            lf: bits(&v, b'\n'),
            colon: bits(&v, b':'),
        }
    }

    #[inline]
    #[target_feature(enable = "neon")]
    fn bits(v: &[uint8x16_t; 4], needle: u8) -> u64 {
        const WEIGHTS: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
        // SAFETY: `WEIGHTS` is 16 readable bytes.
        let weights = unsafe { vld1q_u8(WEIGHTS.as_ptr()) };
        let n = vdupq_n_u8(needle);
        let m0 = vandq_u8(vceqq_u8(v[0], n), weights);
        let m1 = vandq_u8(vceqq_u8(v[1], n), weights);
        let m2 = vandq_u8(vceqq_u8(v[2], n), weights);
        let m3 = vandq_u8(vceqq_u8(v[3], n), weights);
        let s = vpaddq_u8(vpaddq_u8(m0, m1), vpaddq_u8(m2, m3));
        let s = vpaddq_u8(s, s);
        vgetq_lane_u64::<0>(vreinterpretq_u64_u8(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(block: &[u8]) -> Masks {
        let mut m = Masks::default();
        for (i, &b) in block.iter().enumerate().take(BLOCK) {
            m.lf |= u64::from(b == b'\n') << i;
            m.colon |= u64::from(b == b':') << i;
        }
        m
    }

    #[test]
    fn every_kernel_agrees_with_a_byte_loop() {
        // Every byte value at every position, next to the two needles and their neighbours.
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut blocks: Vec<[u8; BLOCK]> = Vec::new();
        for v in 0..=255u8 {
            let mut b = [v; BLOCK];
            b[v as usize % BLOCK] = b'\n';
            b[(v as usize * 7) % BLOCK] = b':';
            blocks.push(b);
        }
        for _ in 0..2000 {
            let mut b = [0u8; BLOCK];
            for x in &mut b {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *x = match seed % 5 {
                    0 => b'\n',
                    1 => b':',
                    2 => b'\n' ^ 0x80,
                    3 => b':' + 1,
                    _ => (seed >> 8) as u8,
                };
            }
            blocks.push(b);
        }
        let kernels = Classifier::available();
        assert!(kernels.len() >= 2 || cfg!(not(target_arch = "x86_64")));
        for b in &blocks {
            let want = reference(b);
            for k in &kernels {
                assert_eq!(
                    k.classify(b),
                    want,
                    "{} on {:?}",
                    k.name(),
                    b.escape_ascii()
                );
            }
        }
    }

    #[test]
    fn the_fastest_kernel_is_the_one_detected() {
        let name = Classifier::detect().name();
        #[cfg(target_arch = "aarch64")]
        assert_eq!(name, "neon");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            name,
            if std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vbmi")
            {
                "avx512"
            } else if std::arch::is_x86_feature_detected!("avx2") {
                "avx2"
            } else {
                "sse2"
            }
        );
        assert!(Classifier::available().iter().any(|k| k.name() == name));
    }

    #[test]
    fn a_tail_sets_no_bit_past_its_end() {
        let bytes = b"Event: X\r\nKey: v\n";
        for k in Classifier::available() {
            for n in 0..=bytes.len() {
                assert_eq!(
                    k.classify_tail(&bytes[..n]),
                    reference(&bytes[..n]),
                    "{}",
                    k.name()
                );
            }
        }
    }
}
