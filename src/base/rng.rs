//! The one seeded random-number generator of sherl: SplitMix64 (Steele, Lea,
//! Flood 2014), tiny, fast and fixed forever, so a split, a weight
//! initialisation or a dropout mask never changes with a dependency upgrade
//! (candle's CPU generator cannot be seeded at all).
//!
//! Every use derives its generator from the user's seed in one place:
//! [`SplitMix64::new`] seeds the state directly (the dataset split),
//! [`SplitMix64::for_stream`] separates the independent uses in training by
//! a named [`Stream`]. The callers draw with different sampling rules, and
//! each rule is a method of its own, so that the numbers each caller gets
//! stay exactly what they were when the golden caches and the seeded
//! metrics were recorded:
//!
//! - [`SplitMix64::below_scaled`] / [`SplitMix64::shuffle_scaled`]: the top
//!   53 bits scaled to `0..n` (training: chunk order, shuffle buffer);
//! - [`SplitMix64::below_unbiased`] / [`SplitMix64::shuffle_unbiased`]:
//!   Lemire's multiply with rejection, no bias at all (the dataset split);
//! - [`SplitMix64::below_modulo`]: `next % n` (generated test fixtures).

/// Which independent use of the seed a training generator serves; each maps
/// to a fixed stream number (the numbers are part of the seeded results:
/// never change them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Initial weights of the new modules (in parameter creation order).
    Init,
    /// The seeded subset of whole chunks (`--train-examples`).
    ChunkSubset,
    /// Chunk order and shuffle buffer of one training epoch.
    Epoch(u64),
    /// Dropout masks during training.
    Dropout,
}

impl Stream {
    /// The stream number mixed into the seed.
    pub fn number(self) -> u64 {
        match self {
            Stream::Init => 0x1417,
            Stream::ChunkSubset => 0x5B5E7,
            Stream::Epoch(epoch) => 0xBA7C_0000 + epoch,
            Stream::Dropout => 0xD409,
        }
    }
}

/// SplitMix64 state.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

/// What the state moves by per output.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The output for a state.
#[inline(always)]
fn mix(state: u64) -> u64 {
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    /// A generator whose state starts at `state` (the first output is
    /// `mix(state + golden gamma)`).
    pub fn new(state: u64) -> Self {
        SplitMix64(state)
    }

    /// The training generator for `seed` and `stream`: the stream number is
    /// spread over the state by a multiply, and the first output is
    /// discarded.
    pub fn for_stream(seed: u64, stream: Stream) -> Self {
        let mut r = SplitMix64(seed ^ stream.number().wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next_u64();
        r
    }

    /// The current state: [`SplitMix64::new`] of it continues the same
    /// sequence (a training checkpoint saves the dropout stream this way).
    pub fn state(&self) -> u64 {
        self.0
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix(self.0)
    }

    /// Skip `n` outputs in O(1): the state moves by a constant per output.
    pub fn skip(&mut self, n: u64) {
        self.0 = self.0.wrapping_add(n.wrapping_mul(GAMMA));
    }

    /// Uniform in [0, 1), from the top 24 bits.
    pub fn unit_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [-bound, bound).
    pub fn symmetric_f32(&mut self, bound: f32) -> f32 {
        (self.unit_f32() * 2.0 - 1.0) * bound
    }

    /// Integer in `0..n` from the top 53 bits, scaled (bias below 2^-53 *
    /// n); 0 for `n == 0`. The training rule.
    pub fn below_scaled(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (((self.next_u64() >> 11) as u128 * n as u128) >> 53) as usize
    }

    /// Integer in `0..n` (`n > 0`) without bias (Lemire 2019: multiply,
    /// reject the few draws that would bias). The dataset-split rule.
    pub fn below_unbiased(&mut self, n: u64) -> u64 {
        let mut m = u128::from(self.next_u64()) * u128::from(n);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = u128::from(self.next_u64()) * u128::from(n);
            }
        }
        (m >> 64) as u64
    }

    /// `next % n` (`n > 0`): slightly biased, used only by generated test
    /// fixtures.
    pub fn below_modulo(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fisher-Yates shuffle drawing with [`SplitMix64::below_scaled`].
    pub fn shuffle_scaled<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below_scaled(i + 1);
            v.swap(i, j);
        }
    }

    /// Fisher-Yates shuffle drawing with [`SplitMix64::below_unbiased`].
    pub fn shuffle_unbiased<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below_unbiased(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }

    /// Inverted-dropout mask: each entry is 0 with probability `p`, else
    /// `1 / (1 - p)`.
    ///
    /// The values of `n` calls of [`SplitMix64::unit_f32`], computed from
    /// the state each call would see (the state only moves by a constant),
    /// so that the loop has no chain from one value to the next and
    /// vectorises.
    pub fn dropout_mask(&mut self, n: usize, p: f32) -> Vec<f32> {
        let keep = 1.0 / (1.0 - p);
        let start = self.0;
        let mut mask = vec![0f32; n];
        for (k, m) in mask.iter_mut().enumerate() {
            let state = start.wrapping_add((k as u64).wrapping_add(1).wrapping_mul(GAMMA));
            let unit = (mix(state) >> 40) as f32 / (1u64 << 24) as f32;
            *m = if unit < p { 0.0 } else { keep };
        }
        self.skip(n as u64);
        mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(mut r: SplitMix64, n: usize) -> Vec<u64> {
        (0..n).map(|_| r.next_u64()).collect()
    }

    // Moved from data/split.rs with the generator.
    #[test]
    fn splitmix_reference_values() {
        // Reference output of splitmix64.c (Vigna) seeded with 0.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        let mut rng = SplitMix64::new(1);
        for _ in 0..1000 {
            assert!(rng.below_unbiased(3) < 3);
        }
        assert_eq!(rng.below_unbiased(1), 0);
    }

    // Moved from data/split.rs with the generator.
    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let shuffled = |seed| {
            let mut v: Vec<u32> = (0..20).collect();
            SplitMix64::new(seed).shuffle_unbiased(&mut v);
            v
        };
        let a = shuffled(1);
        assert_eq!(a, shuffled(1));
        assert_ne!(a, shuffled(2));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn streams_are_fixed_and_separated() {
        assert_eq!(Stream::Init.number(), 0x1417);
        assert_eq!(Stream::ChunkSubset.number(), 0x5B5E7);
        assert_eq!(Stream::Epoch(3).number(), 0xBA7C_0003);
        assert_eq!(Stream::Dropout.number(), 0xD409);
        let a = take(SplitMix64::for_stream(1, Stream::Init), 4);
        assert_eq!(a, take(SplitMix64::for_stream(1, Stream::Init), 4));
        assert_ne!(a, take(SplitMix64::for_stream(1, Stream::Dropout), 4));
        assert_ne!(a, take(SplitMix64::for_stream(2, Stream::Init), 4));
    }

    #[test]
    fn below_rules_stay_in_range() {
        let mut r = SplitMix64::for_stream(5, Stream::Init);
        for _ in 0..1000 {
            assert!(r.below_scaled(7) < 7);
            assert!(r.below_unbiased(3) < 3);
            assert!(r.below_modulo(5) < 5);
        }
        assert_eq!(r.below_scaled(0), 0);
        assert_eq!(r.below_unbiased(1), 0);
    }

    #[test]
    fn shuffles_are_seeded_permutations() {
        for unbiased in [false, true] {
            let shuffled = |seed| {
                let mut v: Vec<usize> = (0..50).collect();
                let mut r = SplitMix64::new(seed);
                if unbiased {
                    r.shuffle_unbiased(&mut v);
                } else {
                    r.shuffle_scaled(&mut v);
                }
                v
            };
            let a = shuffled(1);
            assert_eq!(a, shuffled(1));
            assert_ne!(a, shuffled(2));
            let mut s = a.clone();
            s.sort_unstable();
            assert_eq!(s, (0..50).collect::<Vec<_>>());
            assert_ne!(a, s);
        }
    }

    #[test]
    fn skip_equals_drawing() {
        let mut a = SplitMix64::for_stream(9, Stream::Dropout);
        let mut b = a.clone();
        for _ in 0..1234 {
            a.next_u64();
        }
        b.skip(1234);
        assert_eq!(take(a, 5), take(b, 5));
    }

    /// The mask is what `n` calls of `unit_f32` give, and leaves the
    /// generator where they would.
    #[test]
    fn dropout_mask_is_the_sequential_draws() {
        for (seed, n, p) in [(3u64, 1000usize, 0.1f32), (u64::MAX, 37, 0.5), (0, 0, 0.2)] {
            let (mut a, mut b) = (SplitMix64::new(seed), SplitMix64::new(seed));
            let want: Vec<f32> = (0..n)
                .map(|_| {
                    if b.unit_f32() < p {
                        0.0
                    } else {
                        1.0 / (1.0 - p)
                    }
                })
                .collect();
            assert_eq!(a.dropout_mask(n, p), want);
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn dropout_mask_mean_is_one() {
        let mut r = SplitMix64::for_stream(3, Stream::Dropout);
        let m = r.dropout_mask(100_000, 0.1);
        let mean: f32 = m.iter().sum::<f32>() / m.len() as f32;
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
        assert!(m.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.9).abs() < 1e-6));
    }
}
