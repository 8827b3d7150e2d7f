//! The UniPT side network (Diao et al., CVPR 2024), as docs/method.md §6
//! restates it: every hidden_states.0..=N projected to width d, the last as
//! anchor, each shallower one aggregated by relu'd, key-masked,
//! L1-normalised similarity to the anchor plus identity, weighted by a
//! softmax over per-layer confidences, added to the anchor through Linear +
//! LayerNorm.

use candle_core::Tensor;

use super::ops::{masked_mean, softmax};
use super::{Builder, LayerNorm, Linear, Projector};
use crate::Result;

/// LayerNorm epsilon of the output block.
const OUT_LN_EPS: f64 = 1e-5;

/// Projectors, per-layer confidence, output block.
#[derive(Debug, Clone)]
pub struct Unipt {
    proj: Vec<Projector>,
    confidence: Linear,
    out: Linear,
    out_norm: LayerNorm,
}

impl super::Detach for Unipt {
    fn detached(&self) -> Self {
        Unipt {
            proj: self.proj.detached(),
            confidence: self.confidence.detached(),
            out: self.out.detached(),
            out_norm: self.out_norm.detached(),
        }
    }
}

impl Unipt {
    /// Fresh parameters under `vb`'s prefix (`unipt`) for `m` entries of
    /// width `d_model`, side width `d`: projectors, `confidence`, `out`,
    /// `out_ln`.
    pub fn load(mut vb: Builder, m: usize, d_model: usize, d: usize) -> Result<Self> {
        let proj = Projector::load_all(&mut vb, m, d_model, d)?;
        let confidence = vb.fresh_linear("confidence", d, 1)?;
        let out = vb.fresh_linear("out", d, d)?;
        let out_norm = vb.fresh_layer_norm("out_ln", d, OUT_LN_EPS)?;
        Ok(Unipt {
            proj,
            confidence,
            out,
            out_norm,
        })
    }

    /// # Shapes
    /// `layers`: hidden_states.0..=N, each `[B, S, D]`; `mask` `[B, S]` -> `[B, S, d]`.
    pub fn forward(&self, layers: &[Tensor], mask: &Tensor) -> Result<Tensor> {
        let _span = tracing::trace_span!("unipt").entered();
        let a = Projector::forward_all(&self.proj, layers)?;
        let n = a.len() - 1;
        let anchor = &a[n];
        let key_mask = mask.unsqueeze(1)?; // [B, 1, S]
        let anchor_mean = masked_mean(anchor, mask)?; // [B, d]
        let mut ms = Vec::with_capacity(n);
        let mut cs = Vec::with_capacity(n);
        for aj in &a[..n] {
            let sim = anchor
                .matmul(&aj.transpose(1, 2)?.contiguous()?)?
                .relu()?
                .broadcast_mul(&key_mask)?; // [B, S, S]
            let norm = sim.broadcast_div(&(sim.sum_keepdim(2)? + 1e-8)?)?;
            ms.push((norm.matmul(aj)? + aj)?); // W A_j with W = normalised + identity
            cs.push(
                self.confidence
                    .forward(&(&anchor_mean * masked_mean(aj, mask)?)?)?,
            ); // [B, 1]
        }
        let w = softmax(&Tensor::cat(&cs, 1)?)?; // [B, n]
        let mut agg = ms[0].broadcast_mul(&w.narrow(1, 0, 1)?.unsqueeze(2)?)?;
        for (j, m) in ms.iter().enumerate().skip(1) {
            agg = (agg + m.broadcast_mul(&w.narrow(1, j, 1)?.unsqueeze(2)?)?)?;
        }
        let o = self.out_norm.forward(&self.out.forward(&agg)?)?;
        Ok((anchor + o)?)
    }
}
