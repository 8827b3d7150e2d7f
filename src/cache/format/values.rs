//! FORMAT.md §3.2, §3.3: how hidden-state values are encoded (f16, bf16,
//! f32, int8 with per-token scales) and byte-shuffled before compression.

use super::Dtype;
use crate::cache::error::CacheError;

/// Split `bytes` into `width` byte planes (all first bytes, then all second
/// bytes, ...): the Blosc/HDF5 shuffle filter. `bytes.len()` must be a
/// multiple of `width`.
pub fn shuffle_bytes(bytes: &[u8], width: usize) -> Vec<u8> {
    let n = bytes.len() / width;
    let mut out = vec![0u8; bytes.len()];
    for (i, v) in bytes.chunks_exact(width).enumerate() {
        for (p, &b) in v.iter().enumerate() {
            out[p * n + i] = b;
        }
    }
    out
}

/// Inverse of [`shuffle_bytes`].
pub fn unshuffle_bytes(planes: &[u8], width: usize) -> Vec<u8> {
    let n = planes.len() / width;
    let mut out = vec![0u8; planes.len()];
    for p in 0..width {
        for i in 0..n {
            out[i * width + p] = planes[p * n + i];
        }
    }
    out
}

/// Encode `tokens x hidden` f32 values (row-major) in `dtype` (FORMAT.md §3.2).
pub fn encode_values(values: &[f32], hidden: usize, dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::Bf16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::Int8 => {
            let tokens = values.len() / hidden.max(1);
            let mut scales = Vec::with_capacity(tokens * 4);
            let mut q = Vec::with_capacity(values.len());
            for row in values.chunks_exact(hidden) {
                let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = if max > 0.0 && max.is_finite() {
                    max / 127.0
                } else {
                    0.0
                };
                scales.extend_from_slice(&scale.to_le_bytes());
                for v in row {
                    let x = if scale > 0.0 {
                        (v / scale).round().clamp(-127.0, 127.0)
                    } else {
                        0.0
                    };
                    q.push(x as i8 as u8);
                }
            }
            scales.extend_from_slice(&q);
            scales
        }
    }
}

/// Decode values written by [`encode_values`] into f32.
pub fn decode_values(
    raw: &[u8],
    tokens: usize,
    hidden: usize,
    dtype: Dtype,
) -> Result<Vec<f32>, CacheError> {
    let expect = dtype
        .raw_len(tokens as u64, hidden as u64)
        .ok_or(CacheError::Overflow)?;
    if raw.len() as u64 != expect {
        return Err(CacheError::Corrupt(format!(
            "layer frame holds {} bytes, expected {expect} for {tokens} tokens x {hidden} ({})",
            raw.len(),
            dtype.name()
        )));
    }
    Ok(match dtype {
        Dtype::F32 => crate::le::f32s(raw),
        Dtype::F16 => crate::le::f16s(raw),
        Dtype::Bf16 => crate::le::bf16s(raw),
        Dtype::Int8 => {
            let (scales, q) = raw.split_at(tokens * 4);
            let mut out = Vec::with_capacity(tokens * hidden);
            for (t, s) in scales.chunks_exact(4).enumerate() {
                let s = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                out.extend(
                    q[t * hidden..(t + 1) * hidden]
                        .iter()
                        .map(|&b| f32::from(b as i8) * s),
                );
            }
            out
        }
    })
}

/// The first `i` where `bad(lo[i], hi[i])`: whole blocks are tested
/// branch-free first (one pass over a clean frame), then the block that has
/// a hit is searched.
fn first_where(lo: &[u8], hi: &[u8], bad: impl Fn(u8, u8) -> bool) -> Option<usize> {
    const BLOCK: usize = 1024;
    (0..lo.len()).step_by(BLOCK).find_map(|at| {
        let end = (at + BLOCK).min(lo.len());
        let (l, h) = (&lo[at..end], &hi[at..end]);
        if l.iter().zip(h).fold(false, |a, (&l, &h)| a | bad(l, h)) {
            l.iter()
                .zip(h)
                .position(|(&l, &h)| bad(l, h))
                .map(|i| at + i)
        } else {
            None
        }
    })
}

/// One decoded layer frame of a chunk (`tokens x hidden` values,
/// row-major): byte-shuffled 16-bit frames stay in their stored form until
/// a caller widens the values it needs ([`LayerValues::append_f32`]); every
/// other encoding is decoded to f32 at once.
#[derive(Debug, Clone)]
pub enum LayerValues {
    /// Values already widened.
    F32(Vec<f32>),
    /// A shuffled f16 or bf16 frame.
    Planes16(Planes16),
}

impl LayerValues {
    /// Append values `range` as f32 to `out`.
    pub fn append_f32(&self, range: std::ops::Range<usize>, out: &mut Vec<f32>) {
        match self {
            LayerValues::F32(v) => out.extend_from_slice(&v[range]),
            LayerValues::Planes16(p) => p.append_f32(range, out),
        }
    }

    /// All values as f32.
    pub fn into_f32(self) -> Vec<f32> {
        match self {
            LayerValues::F32(v) => v,
            LayerValues::Planes16(p) => {
                let mut out = Vec::with_capacity(p.len());
                p.append_f32(0..p.len(), &mut out);
                out
            }
        }
    }
}

/// A decompressed, byte-shuffled 16-bit layer frame (`F16` or `Bf16`, low
/// bytes then high bytes: FORMAT.md §3.2), checked (size, every value
/// finite) but kept in its stored form, half the size of its f32 values:
/// [`Planes16::append_f32`] widens any range of values straight into a
/// caller's buffer (a training batch), so no f32 copy of the whole frame
/// is made.
#[derive(Debug, Clone)]
pub struct Planes16 {
    raw: Vec<u8>,
    dtype: Dtype,
}

impl Planes16 {
    /// Check `raw` as the frame of `tokens x hidden` values in `dtype`.
    /// `Ok(Err(i))`: value `i` is infinite or NaN.
    pub fn new(
        raw: Vec<u8>,
        tokens: usize,
        hidden: usize,
        dtype: Dtype,
    ) -> Result<Result<Self, usize>, CacheError> {
        let expect = dtype
            .raw_len(tokens as u64, hidden as u64)
            .ok_or(CacheError::Overflow)?;
        if raw.len() as u64 != expect || !matches!(dtype, Dtype::F16 | Dtype::Bf16) {
            return Err(CacheError::Corrupt(format!(
                "layer frame holds {} bytes, expected {expect} for {tokens} tokens x {hidden} ({})",
                raw.len(),
                dtype.name()
            )));
        }
        let planes = Planes16 { raw, dtype };
        Ok(match planes.first_non_finite() {
            Some(i) => Err(i),
            None => Ok(planes),
        })
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.raw.len() / 2
    }

    /// Whether the frame holds no value.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Index of the first infinite or NaN value (all exponent bits set).
    /// For f16 those bits (0x7c00) all sit in the high byte; for bf16
    /// (0x7f80) seven in the high byte and one in the low byte.
    fn first_non_finite(&self) -> Option<usize> {
        let (lo, hi) = self.raw.split_at(self.len());
        match self.dtype {
            Dtype::F16 => first_where(lo, hi, |_, h| h & 0x7c == 0x7c),
            _ => first_where(lo, hi, |l, h| h & 0x7f == 0x7f && l & 0x80 == 0x80),
        }
    }

    /// Append values `range` (indices into the frame's row-major values),
    /// widened to f32, to `out`. Panics if `range` is out of bounds (a
    /// caller's bug: ranges come from the chunk's own metadata).
    pub fn append_f32(&self, range: std::ops::Range<usize>, out: &mut Vec<f32>) {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        let n = self.len();
        let (lo, hi) = self.raw.split_at(n);
        let (lo, hi) = (&lo[range.clone()], &hi[range]);
        out.reserve(lo.len());
        let mut bits = [0u16; 512];
        let mut wide = [0f32; 512];
        for (l, h) in lo.chunks(bits.len()).zip(hi.chunks(bits.len())) {
            let m = l.len();
            for ((b, &l), &h) in bits[..m].iter_mut().zip(l).zip(h) {
                *b = u16::from(l) | (u16::from(h) << 8);
            }
            let dst = &mut wide[..m];
            if self.dtype == Dtype::F16 {
                bits[..m]
                    .reinterpret_cast::<half::f16>()
                    .convert_to_f32_slice(dst);
            } else {
                bits[..m]
                    .reinterpret_cast::<half::bf16>()
                    .convert_to_f32_slice(dst);
            }
            out.extend_from_slice(dst);
        }
    }
}

/// Width in bytes of the planes the shuffle filter uses for `dtype` (1 = no
/// shuffle: int8 values are single bytes).
pub fn shuffle_width(dtype: Dtype) -> usize {
    match dtype {
        Dtype::F16 | Dtype::Bf16 => 2,
        Dtype::F32 => 4,
        Dtype::Int8 => 1,
    }
}

/// f16 or bf16 values as two byte planes (low bytes, then high bytes).
/// Converted a block at a time through a stack buffer into the one output
/// allocation (a whole-layer f16 copy and a bits copy per frame before).
pub fn encode_half_planes(values: &[f32], dtype: Dtype) -> Vec<u8> {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    const BLOCK: usize = 4096;
    let n = values.len();
    let mut out = vec![0u8; 2 * n];
    let (lo, hi) = out.split_at_mut(n);
    let mut buf = [0u16; BLOCK];
    for ((v, l), h) in values
        .chunks(BLOCK)
        .zip(lo.chunks_mut(BLOCK))
        .zip(hi.chunks_mut(BLOCK))
    {
        let bits = &mut buf[..v.len()];
        if dtype == Dtype::F16 {
            bits.reinterpret_cast_mut::<half::f16>()
                .convert_from_f32_slice(v);
        } else {
            bits.reinterpret_cast_mut::<half::bf16>()
                .convert_from_f32_slice(v);
        }
        for ((b, l), h) in bits.iter().zip(l.iter_mut()).zip(h.iter_mut()) {
            let [a, c] = b.to_le_bytes();
            *l = a;
            *h = c;
        }
    }
    out
}

/// Shuffle the value bytes of a layer payload (int8: only its scales):
/// what a shard stores when its header's shuffle flag is set.
pub fn shuffle_payload(raw: &[u8], tokens: usize, dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::Int8 => {
            let (scales, q) = raw.split_at(tokens * 4);
            let mut out = shuffle_bytes(scales, 4);
            out.extend_from_slice(q);
            out
        }
        _ => shuffle_bytes(raw, shuffle_width(dtype)),
    }
}

/// Inverse of [`shuffle_payload`] for a payload of `tokens` rows.
pub fn unshuffle_payload(raw: &[u8], tokens: usize, dtype: Dtype) -> Result<Vec<u8>, CacheError> {
    match dtype {
        Dtype::Int8 => {
            let split = tokens
                .checked_mul(4)
                .filter(|&s| s <= raw.len())
                .ok_or(CacheError::Overflow)?;
            let (scales, q) = raw.split_at(split);
            let mut out = unshuffle_bytes(scales, 4);
            out.extend_from_slice(q);
            Ok(out)
        }
        _ => {
            let w = shuffle_width(dtype);
            if !raw.len().is_multiple_of(w) {
                return Err(CacheError::Corrupt(
                    "layer frame length is not a multiple of the value size".into(),
                ));
            }
            Ok(unshuffle_bytes(raw, w))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shuffled 16-bit frames widened from their planes (whole, or any
    /// range) give exactly the values of unshuffle + decode, and the check
    /// finds the first non-finite value.
    #[test]
    fn one_pass_16_bit_decode_equals_the_two_pass_one() {
        for dtype in [Dtype::F16, Dtype::Bf16] {
            let (tokens, hidden) = (7, 150); // 1,050 values: two blocks and a tail
            let v: Vec<f32> = (0..tokens * hidden)
                .map(|i| ((i as f32) * 0.37).sin() * 40.0 - 3.0)
                .collect();
            let shuffled = shuffle_bytes(&encode_values(&v, hidden, dtype), 2);
            let want = decode_values(
                &unshuffle_payload(&shuffled, tokens, dtype).unwrap(),
                tokens,
                hidden,
                dtype,
            )
            .unwrap();
            let planes = Planes16::new(shuffled.clone(), tokens, hidden, dtype)
                .unwrap()
                .unwrap();
            let got = LayerValues::Planes16(planes.clone()).into_f32();
            assert_eq!(got, want, "{dtype:?}");
            for range in [0..0, 3..4, 140..700, 511..1050] {
                let mut part = vec![-1.0];
                planes.append_f32(range.clone(), &mut part);
                assert_eq!(part[1..], want[range.clone()], "{dtype:?} {range:?}");
                assert_eq!(part[0], -1.0);
            }
            // Infinity, NaN, and the largest finite value (exponent one below
            // all ones) next to them, which must pass.
            for (at, x) in [
                (700, f32::INFINITY),
                (1049, f32::NEG_INFINITY),
                (0, f32::NAN),
            ] {
                let mut bad = v.clone();
                bad[at] = x;
                bad[900] = f32::NAN;
                let max = if dtype == Dtype::F16 { 65504.0 } else { 3.0e38 };
                bad[at.saturating_sub(1).max(1)] = max;
                bad[at.min(1000) + 3] = -max;
                let shuffled = shuffle_bytes(&encode_values(&bad, hidden, dtype), 2);
                let r = Planes16::new(shuffled, tokens, hidden, dtype).unwrap();
                assert_eq!(r.err(), Some(at.min(900)), "{dtype:?} {x}");
            }
            assert!(Planes16::new(shuffled[1..].to_vec(), tokens, hidden, dtype).is_err());
        }
    }

    #[test]
    fn shuffle_is_invertible() {
        let v: Vec<u8> = (0..=255).collect();
        for w in [1, 2, 4] {
            let s = shuffle_bytes(&v, w);
            assert_eq!(unshuffle_bytes(&s, w), v);
        }
        assert_eq!(shuffle_bytes(&[1, 2, 3, 4], 2), vec![1, 3, 2, 4]);
    }

    #[test]
    fn int8_bound_holds() {
        let vals: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let enc = encode_values(&vals, 16, Dtype::Int8);
        let dec = decode_values(&enc, 4, 16, Dtype::Int8).unwrap();
        for (row_v, row_d) in vals.chunks(16).zip(dec.chunks(16)) {
            let max = row_v.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in row_v.iter().zip(row_d) {
                assert!((a - b).abs() <= max / 254.0 + 1e-6, "{a} vs {b}");
            }
        }
        // zero rows stay zero
        let z = encode_values(&[0.0; 8], 8, Dtype::Int8);
        assert_eq!(decode_values(&z, 1, 8, Dtype::Int8).unwrap(), vec![0.0; 8]);
    }

    #[test]
    fn decode_rejects_wrong_sizes() {
        assert!(decode_values(&[0u8; 10], 2, 4, Dtype::F16).is_err());
    }
}
