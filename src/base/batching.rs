//! Batching shared by both phases (core: no dependency on extract, cache or
//! fit): [`batch_ranges`], the one rule that cuts length-ordered examples into
//! batches under a token budget (extraction batches and training batches
//! follow it), [`PaddedBatch`], the padded `[batch, seq]` inputs a backbone
//! runs on (from [`Encoded`] token ids), and the inverse, per-example rows at real tokens only
//! ([`real_rows`], [`real_rows_slice`]).

use ndarray::{Array2, ArrayView2, ArrayView3};

/// One tokenized example (no padding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids, special tokens included.
    pub ids: Vec<u32>,
    /// Segment ids (0 for the first text, 1 for the pair).
    pub type_ids: Vec<u32>,
}

impl Encoded {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Inputs of one padded batch, each `[batch, seq]`, `seq` = longest example.
#[derive(Debug, Clone)]
pub struct PaddedBatch {
    /// Token ids (0 at padding).
    pub ids: Array2<i64>,
    /// 1 at real tokens, 0 at padding.
    pub mask: Array2<i64>,
    /// Segment ids (0 at padding).
    pub types: Array2<i64>,
    /// Real length of each example.
    pub lengths: Vec<usize>,
}

impl PaddedBatch {
    /// Pad `examples` to the longest one (or to `pad_to` if larger).
    pub fn new(examples: &[&Encoded], pad_to: Option<usize>) -> Self {
        let longest = examples.iter().map(|e| e.len()).max().unwrap_or(0);
        let seq = pad_to.map_or(longest, |p| p.max(longest)).max(1);
        let b = examples.len();
        let mut ids = Array2::<i64>::zeros((b, seq));
        let mut mask = Array2::<i64>::zeros((b, seq));
        let mut types = Array2::<i64>::zeros((b, seq));
        for (r, e) in examples.iter().enumerate() {
            for (c, (&id, &ty)) in e.ids.iter().zip(&e.type_ids).enumerate() {
                ids[[r, c]] = i64::from(id);
                types[[r, c]] = i64::from(ty);
                mask[[r, c]] = 1;
            }
        }
        PaddedBatch {
            ids,
            mask,
            types,
            lengths: examples.iter().map(|e| e.len()).collect(),
        }
    }

    /// Views of the three inputs.
    pub fn views(
        &self,
    ) -> (
        ArrayView2<'_, i64>,
        ArrayView2<'_, i64>,
        ArrayView2<'_, i64>,
    ) {
        (self.ids.view(), self.mask.view(), self.types.view())
    }

    /// Number of real tokens.
    pub fn real_tokens(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// Number of token slots including padding.
    pub fn padded_tokens(&self) -> usize {
        self.ids.len()
    }
}

/// Cut a sequence of examples (their token lengths, in order) into
/// consecutive batches of at most `max_batch` examples whose padded size
/// (count x longest) stays within `max_tokens`; a single example longer than
/// the budget still forms its own batch. The one batching rule of both
/// phases: extraction batches and training batches follow it.
pub fn batch_ranges(
    lengths: &[usize],
    max_tokens: usize,
    max_batch: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < lengths.len() {
        let mut end = start;
        let mut longest = 0usize;
        while end < lengths.len() && end - start < max_batch.max(1) {
            let l = longest.max(lengths[end]);
            if end > start && l * (end - start + 1) > max_tokens {
                break;
            }
            longest = l;
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// Rows `[0, len)` of example `b` of a `[batch, seq, hidden]` output, as a
/// contiguous row-major `len x hidden` vector.
pub fn real_rows(h: ArrayView3<'_, f32>, b: usize, len: usize) -> Vec<f32> {
    real_rows_slice(h, b, len).map_or_else(
        || {
            let hidden = h.shape()[2];
            let mut out = Vec::with_capacity(len * hidden);
            for t in 0..len {
                out.extend(h.slice(ndarray::s![b, t, ..]).iter().copied());
            }
            out
        },
        <[f32]>::to_vec,
    )
}

/// The same rows borrowed without copying, when `h` is in standard
/// (row-major, contiguous) layout, as ONNX Runtime's outputs are.
pub fn real_rows_slice(h: ArrayView3<'_, f32>, b: usize, len: usize) -> Option<&[f32]> {
    let (s, d) = (h.shape()[1], h.shape()[2]);
    h.to_slice().map(|all| &all[b * s * d..(b * s + len) * d])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(ids: &[u32]) -> Encoded {
        Encoded {
            ids: ids.to_vec(),
            type_ids: vec![0; ids.len()],
        }
    }

    #[test]
    fn pads_to_longest_and_masks() {
        let a = enc(&[101, 7, 102]);
        let b = enc(&[101, 102]);
        let p = PaddedBatch::new(&[&a, &b], None);
        assert_eq!(p.ids.shape(), &[2, 3]);
        assert_eq!(p.ids.row(1).to_vec(), vec![101, 102, 0]);
        assert_eq!(p.mask.row(1).to_vec(), vec![1, 1, 0]);
        assert_eq!(p.real_tokens(), 5);
        assert_eq!(p.padded_tokens(), 6);
        let p = PaddedBatch::new(&[&b], Some(4));
        assert_eq!(p.ids.shape(), &[1, 4]);
    }

    #[test]
    fn batch_ranges_respect_both_limits() {
        // a 4th example would make 4 x 5 = 20 > 10 padded tokens
        assert_eq!(batch_ranges(&[2, 2, 2, 5, 5], 10, 8), vec![0..3, 3..5]);
        assert_eq!(batch_ranges(&[1, 1, 1], 100, 2), vec![0..2, 2..3]);
        assert_eq!(batch_ranges(&[50], 10, 8), vec![0..1]);
        assert!(batch_ranges(&[], 10, 8).is_empty());
    }

    #[test]
    fn real_rows_strip_padding() {
        let h =
            ndarray::Array3::from_shape_fn((2, 3, 2), |(b, t, d)| (b * 100 + t * 10 + d) as f32);
        assert_eq!(real_rows(h.view(), 1, 2), vec![100.0, 101.0, 110.0, 111.0]);
    }
}
