//! SHERL's early route: the anti-redundancy consolidation of the cached
//! intermediate layers (the restore and gate are in [`super::restore_gate`]).
//!
//! Computes docs/method.md §4, steps 1-7 (the repository's restatement of
//! the paper, with the epsilons this code adds): per-layer projectors
//! `LayerNorm_d(W_j S_j + b_j)`; per token, the shallow set `E` (all but the
//! last entry) and the guide `e` (the last entry); redundancy `r` = row sums
//! of `relu(E' E'^T)` with `E'` the rows of `E` scaled to unit L2 norm
//! (divided by norm plus 1e-8); guided weights `u = relu(w_a . (E * e) +
//! b_a) / r`,
//! L1-normalised over layers (`alpha = u / (sum |u| + 1e-8)`, no softmax);
//! `g = sum alpha_j E_j + e`.

use candle_core::{Tensor, D};

use super::{Builder, Linear, Projector};
use crate::fit::error::FitError;
use crate::Result;

pub use super::linear::PROJ_LN_EPS;

/// Epsilon in the row normalisation and in the L1 normalisation.
pub const EPS: f64 = 1e-8;

/// Projectors, guided-weight scorer.
#[derive(Debug, Clone)]
pub struct Consolidation {
    proj: Vec<Projector>,
    score: Linear,
}

/// What the early route returns.
#[derive(Debug, Clone)]
pub struct Consolidated {
    /// `g`, `[B, S, d]`.
    pub g: Tensor,
    /// `alpha`, `[B, S, M-1]` (layer weights per token).
    pub alpha: Tensor,
}

impl super::Detach for Consolidation {
    fn detached(&self) -> Self {
        Consolidation {
            proj: self.proj.detached(),
            score: self.score.detached(),
        }
    }
}

impl Consolidation {
    /// Fresh parameters under `vb`'s prefix (`early`) for `m` entries of
    /// width `d_model`, side width `d`: the projectors, then `score`.
    pub fn load(mut vb: Builder, m: usize, d_model: usize, d: usize) -> Result<Self> {
        if m < 2 {
            return Err(FitError::settings(format!(
                "SHERL's early route needs at least 2 cached layers (got {m}): re-extract with more layers"
            )));
        }
        let proj = Projector::load_all(&mut vb, m, d_model, d)?;
        let score = vb.fresh_linear("score", d, 1)?;
        Ok(Consolidation { proj, score })
    }

    /// From explicit modules (for tests): one projector per entry and the
    /// guided-weight scorer `Linear(d -> 1)`.
    pub fn from_parts(proj: Vec<Projector>, score: Linear) -> Self {
        Consolidation { proj, score }
    }

    /// # Shapes
    /// `layers`: M tensors `[B, S, D]` (shallow first, guide last), `mask`
    /// `[B, S]` -> `g` `[B, S, d]` (0 at padding), `alpha` `[B, S, M-1]`.
    pub fn forward(&self, layers: &[Tensor], mask: &Tensor) -> Result<Consolidated> {
        let _span = tracing::trace_span!("consolidation").entered();
        if layers.len() != self.proj.len() {
            return Err(FitError::model(format!(
                "consolidation built for {} layers, given {}",
                self.proj.len(),
                layers.len()
            )));
        }
        let (b, s, _) = layers[0].dims3()?;
        let m = layers.len();
        let f = Projector::forward_all(&self.proj, layers)?;
        let d = f[0].dim(D::Minus1)?;
        let n = b * s;
        // shallow set E [N, M-1, d], guide e [N, 1, d]
        let e_set = Tensor::stack(&f[..m - 1], 2)?.reshape((n, m - 1, d))?;
        let guide = f[m - 1].reshape((n, 1, d))?;
        // redundancy
        let norm = (e_set.sqr()?.sum_keepdim(D::Minus1)? + 1e-16)?.sqrt()?;
        let unit = e_set.broadcast_div(&(norm + EPS)?)?;
        let c = unit.matmul(&unit.transpose(1, 2)?.contiguous()?)?.relu()?; // [N, M-1, M-1]
        let r = c.sum_keepdim(D::Minus1)?.clamp(EPS, f64::MAX)?; // [N, M-1, 1]
                                                                 // guided weights
        let a = self.score.forward(&e_set.broadcast_mul(&guide)?)?; // [N, M-1, 1]
        let u = a.relu()?.div(&r)?;
        let alpha = u.broadcast_div(&(u.abs()?.sum_keepdim(1)? + EPS)?)?; // [N, M-1, 1]
        let g = (alpha.broadcast_mul(&e_set)?.sum(1)? + guide.squeeze(1)?)?; // [N, d]
        let g = g.reshape((b, s, d))?.broadcast_mul(&mask.unsqueeze(2)?)?;
        Ok(Consolidated {
            g,
            alpha: alpha.reshape((b, s, m - 1))?,
        })
    }
}
