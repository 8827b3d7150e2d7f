//! Recall@K both ways from one image x caption similarity matrix.
//!
//! The similarities come from one matrix product of the L2-normalised
//! image and caption embeddings ([`similarity`]); the ranks are one pass
//! over each row and each column of that matrix (no sorting).
//!
//! - **image -> text**: image `i` is a hit at K when *any* of its captions
//!   ranks within the first K of all captions (the rule of the usual
//!   benchmarks, which have five captions per image). Its rank is the
//!   number of *other* images' captions scoring at least as high as its
//!   best caption.
//! - **text -> image**: caption `c` of image `i` is a hit at K when fewer
//!   than K other images score at least as high as `i` for it.
//!
//! **Ties are pessimistic**: a wrong item with exactly the right item's
//! score counts as ranked above it, so a model that scores everything the
//! same gets no hit beyond K by luck of ordering (a constant score gives
//! R@K = 0 whenever there are at least K wrong items). Recall values are
//! percentages; `rsum` is the sum of the six (at most 600).

use crate::fit::error::FitError;
use crate::Result;

/// The K of Recall@K, in the order of [`Recall`]'s arrays.
pub const KS: [usize; 3] = [1, 5, 10];

/// Recall@1/5/10 (percent) both ways and their sum.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Recall {
    /// Image queries: R@1, R@5, R@10 (%).
    pub i2t: [f64; 3],
    /// Caption queries: R@1, R@5, R@10 (%).
    pub t2i: [f64; 3],
    /// Sum of the six.
    pub rsum: f64,
    /// Image queries.
    pub images: usize,
    /// Caption queries.
    pub captions: usize,
}

/// Ranks (0 = first) of each image query and each caption query in the
/// row-major `images x captions` matrix `sim`, where `owner[c]` is the image
/// of caption `c`. Pessimistic ties (module docs). Refuses a shape that does
/// not match, an image without a caption, and a non-finite score.
pub fn ranks(sim: &[f32], images: usize, owner: &[usize]) -> Result<(Vec<usize>, Vec<usize>)> {
    let captions = owner.len();
    if sim.len() != images * captions {
        return Err(FitError::settings(format!(
            "similarity matrix has {} values, not {images} images x {captions} captions",
            sim.len()
        )));
    }
    if let Some(c) = owner.iter().position(|&i| i >= images) {
        return Err(FitError::settings(format!(
            "caption {c} belongs to image {}, but there are {images} images",
            owner[c]
        )));
    }
    if let Some(k) = sim.iter().position(|v| !v.is_finite()) {
        return Err(FitError::settings(format!(
            "similarity of image {} and caption {} is {}",
            k / captions.max(1),
            k % captions.max(1),
            sim[k]
        )));
    }
    // Best score of each image's own captions.
    let mut best = vec![f32::NEG_INFINITY; images];
    let mut has = vec![false; images];
    for (c, &i) in owner.iter().enumerate() {
        has[i] = true;
        best[i] = best[i].max(sim[i * captions + c]);
    }
    if let Some(i) = has.iter().position(|h| !h) {
        return Err(FitError::settings(format!(
            "image {i} has no caption: every image query needs at least one"
        )));
    }
    let i2t = (0..images)
        .map(|i| {
            let row = &sim[i * captions..(i + 1) * captions];
            row.iter()
                .zip(owner)
                .filter(|&(&s, &o)| o != i && s >= best[i])
                .count()
        })
        .collect();
    let t2i = owner
        .iter()
        .enumerate()
        .map(|(c, &i)| {
            let right = sim[i * captions + c];
            (0..images)
                .filter(|&j| j != i && sim[j * captions + c] >= right)
                .count()
        })
        .collect();
    Ok((i2t, t2i))
}

/// Recall@1/5/10 both ways from the row-major `images x captions`
/// similarity matrix `sim` (`owner[c]`: the image of caption `c`).
pub fn recall(sim: &[f32], images: usize, owner: &[usize]) -> Result<Recall> {
    let (i2t, t2i) = ranks(sim, images, owner)?;
    let at = |r: &[usize]| -> [f64; 3] {
        KS.map(|k| 100.0 * r.iter().filter(|&&x| x < k).count() as f64 / r.len().max(1) as f64)
    };
    let (a, b) = (at(&i2t), at(&t2i));
    Ok(Recall {
        i2t: a,
        t2i: b,
        rsum: a.iter().sum::<f64>() + b.iter().sum::<f64>(),
        images,
        captions: owner.len(),
    })
}

/// The `images x captions` similarity matrix of L2-normalised embeddings
/// (`[images, J]` and `[captions, J]`), row-major: one matrix product.
pub fn similarity(
    images: &candle_core::Tensor,
    captions: &candle_core::Tensor,
) -> Result<Vec<f32>> {
    let s = images.matmul(&captions.t()?)?;
    Ok(s.flatten_all()?.to_vec1::<f32>()?)
}
