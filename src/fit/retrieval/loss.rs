//! The two contrastive losses of `--task retrieval`, as candle ops (with
//! autograd), over a batch of `B` matching (image, caption) pairs: row `i`
//! of the image embeddings matches row `i` of the caption embeddings, and
//! every other row of the batch is a negative. Both take L2-normalised
//! `[B, J]` embeddings, so `S = images x captions^T` holds cosine
//! similarities.
//!
//! - [`infonce`] (CLIP): logits `S * t` with `t = exp(min(log_scale,
//!   ln 100))`, the learnable log-scale starting at `ln(1 / 0.07)` as in
//!   CLIP and capped at a scale of 100 (CLIP clamps the parameter after each
//!   step; the cap here is in the forward pass, which has the same effect on
//!   the loss and leaves the optimiser alone); the mean of the
//!   cross-entropy of the rows (image -> caption) and of the columns
//!   (caption -> image), each against the diagonal.
//! - [`hinge`] (VSE++'s max violation): for each image `i`, the hardest
//!   negative caption's violation `max_{j != i} [m + S_ij - S_ii]_+`, and for
//!   each caption `j` the hardest negative image's `max_{i != j} [m + S_ij -
//!   S_jj]_+`, summed, divided by `B` (VSE++ sums over the batch; the mean
//!   keeps the learning rate independent of the batch size).

use candle_core::{DType, Tensor, D};

use crate::Result;

/// CLIP's initial log-scale, `ln(1 / 0.07)`.
pub const INIT_LOG_SCALE: f64 = 2.659_260_036_932_778_4;
/// The largest scale the log-scale may give, 100 (CLIP's clamp).
pub const MAX_SCALE: f64 = 100.0;
/// VSE++'s margin.
pub const DEFAULT_MARGIN: f64 = 0.2;

/// Which loss (`--loss`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Loss {
    /// Symmetric InfoNCE with a learnable temperature (CLIP).
    Infonce,
    /// VSE++ max-violation hinge (margin `--margin`, 0.2).
    Hinge,
}

impl Loss {
    /// Name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Loss::Infonce => "infonce",
            Loss::Hinge => "hinge",
        }
    }
}

/// Cosine similarities `[B, B]` of matching rows (diagonal) and all others.
fn scores(images: &Tensor, captions: &Tensor) -> Result<Tensor> {
    Ok(images.matmul(&captions.t()?.contiguous()?)?)
}

/// The temperature's scale `exp(min(log_scale, ln 100))` of a scalar
/// log-scale tensor.
pub fn scale(log_scale: &Tensor) -> Result<Tensor> {
    Ok(log_scale.minimum(MAX_SCALE.ln())?.exp()?)
}

/// Symmetric InfoNCE (module docs); `log_scale` a scalar (0-d) tensor.
pub fn infonce(images: &Tensor, captions: &Tensor, log_scale: &Tensor) -> Result<Tensor> {
    let b = images.dim(0)?;
    let logits = scores(images, captions)?.broadcast_mul(&scale(log_scale)?)?;
    let target = Tensor::arange(0u32, b as u32, images.device())?;
    let rows = candle_nn::loss::cross_entropy(&logits, &target)?;
    let cols = candle_nn::loss::cross_entropy(&logits.t()?.contiguous()?, &target)?;
    Ok(((rows + cols)? * 0.5)?)
}

/// VSE++ max-violation hinge with margin `margin` (module docs). A batch of
/// one pair has no negative: 0.
pub fn hinge(images: &Tensor, captions: &Tensor, margin: f64) -> Result<Tensor> {
    let b = images.dim(0)?;
    let s = scores(images, captions)?;
    let eye = Tensor::eye(b, DType::F32, images.device())?;
    let off = (1.0 - &eye)?;
    // diag[i] = S_ii
    let diag = (&s * &eye)?.sum(1)?;
    // Image i as query, caption j a negative: m + S_ij - S_ii.
    let by_image = ((s.broadcast_sub(&diag.unsqueeze(1)?)? + margin)?.relu()? * &off)?;
    // Caption j as query, image i a negative: m + S_ij - S_jj.
    let by_caption = ((s.broadcast_sub(&diag.unsqueeze(0)?)? + margin)?.relu()? * &off)?;
    let hardest = (by_image.max(D::Minus1)?.sum_all()? + by_caption.max(0)?.sum_all()?)?;
    Ok((hardest / b as f64)?)
}

/// L2-normalise the rows of `x` (`[B, J]`), with `1e-12` under the square
/// root so a zero row stays finite.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}
