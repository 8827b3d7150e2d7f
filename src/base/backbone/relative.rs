//! MPNet's relative-position buckets.
//!
//! Every MPNet layer adds to its attention scores a bias per head that
//! depends only on the key's offset from the query, `r = j - i`, through a
//! bucket index: one table `[buckets, heads]` shared by all layers
//! (`encoder.relative_attention_bias.weight`). With `B` buckets and maximum
//! distance 128 (fixed in MPNet), half the buckets are for keys after the
//! query (`r > 0`) and half for keys at or before it; within a half, with
//! `b = B / 2` and `e = b / 2`, a distance `n = |r|` below `e` is its own
//! bucket and a larger one goes to
//! `min(e + floor(ln(n / e) / ln(128 / e) * (b - e)), b - 1)`, so distances
//! grow logarithmically per bucket up to 128 and share the last bucket
//! beyond. This is `MPNetEncoder.relative_position_bucket` of
//! `transformers` restated; it is computed in f32 in the same order of
//! operations as PyTorch does, so the bucket of every offset (including the
//! exact powers of two where the logarithm lands on an integer) is the
//! same. The exporter writes these indices into the ONNX graph, and the
//! candle layers use them for the same bias.

/// MPNet's maximum distance (`max_distance` in `transformers`; not in
/// `config.json`).
pub const MAX_DISTANCE: usize = 128;

/// The bucket of key offset `rel = key - query` among `buckets` buckets.
pub fn bucket(rel: i64, buckets: usize) -> usize {
    let half = buckets / 2;
    let n = -rel;
    let mut ret = if n < 0 { half } else { 0 };
    let n = n.unsigned_abs() as usize;
    let max_exact = half / 2;
    if n < max_exact {
        return ret + n;
    }
    // f32 like PyTorch: log(n.float() / max_exact) / (f32) log(128 / e) * (b - e)
    let ratio = n as f32 / max_exact as f32;
    let scale = (MAX_DISTANCE as f64 / max_exact as f64).ln() as f32;
    let large = max_exact + (ratio.ln() / scale * (half - max_exact) as f32) as usize;
    ret += large.min(half - 1);
    ret
}

/// The bucket of every (query, key) pair of a sequence of `len` tokens,
/// row-major `[len, len]` (query `i`, key `j`).
pub fn bucket_table(len: usize, buckets: usize) -> Vec<usize> {
    let mut t = Vec::with_capacity(len * len);
    for i in 0..len {
        for j in 0..len {
            t.push(bucket(j as i64 - i as i64, buckets));
        }
    }
    t
}

/// The bias `[heads, len, len]` (row-major) of a sequence of `len` tokens
/// from the shared table `table` `[buckets, heads]`.
pub fn position_bias(table: &[f32], buckets: usize, heads: usize, len: usize) -> Vec<f32> {
    debug_assert_eq!(table.len(), buckets * heads);
    let idx = bucket_table(len, buckets);
    let mut out = vec![0f32; heads * len * len];
    for h in 0..heads {
        for (o, &b) in out[h * len * len..(h + 1) * len * len].iter_mut().zip(&idx) {
            *o = table[b * heads + h];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets worked out from the formula by hand for 32 buckets
    /// (b = 16, e = 8): exact below 8, then 8 + floor(8 ln(n/8) / ln 16),
    /// capped at 15; keys after the query add 16.
    #[test]
    fn buckets_by_hand() {
        let cases = [
            (0, 0),
            (-1, 1),
            (-7, 7),
            (-8, 8),
            (-11, 8),  // 8 ln(11/8)/ln 16 = 0.92
            (-12, 9),  // 1.17
            (-16, 10), // exactly 2
            (-32, 12), // exactly 4
            (-64, 14), // exactly 6
            (-127, 15),
            (-128, 15),
            (-500, 15),
            (1, 17),
            (7, 23),
            (8, 24),
            (16, 26),
            (64, 30),
            (1000, 31),
        ];
        for (rel, want) in cases {
            assert_eq!(bucket(rel, 32), want, "offset {rel}");
        }
    }

    #[test]
    fn table_and_bias_layout() {
        // 3 tokens: offsets j - i
        let t = bucket_table(3, 32);
        assert_eq!(t, vec![0, 17, 18, 1, 0, 17, 2, 1, 0]);
        // table [32, 2]: bucket b, head h -> 100 h + b
        let table: Vec<f32> = (0..32)
            .flat_map(|b| (0..2).map(move |h| (100 * h + b) as f32))
            .collect();
        let bias = position_bias(&table, 32, 2, 3);
        assert_eq!(&bias[..9], &[0., 17., 18., 1., 0., 17., 2., 1., 0.]);
        assert_eq!(bias[9 + 1], 117.0);
    }
}
