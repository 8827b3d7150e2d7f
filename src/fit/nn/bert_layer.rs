//! One pre-trained BERT encoder layer in candle, with real (seeded) dropout,
//! loaded by checkpoint name and frozen or trainable.
//!
//! candle-transformers' `BertLayer` cannot be reused: its `forward` is
//! private and its dropout is a no-op. This follows `modeling_bert.py`
//! (transformers v4.8.2: `BertSelfAttention`, `BertSelfOutput`,
//! `BertIntermediate`, `BertOutput`) with the same parameter names, so a
//! checkpoint loads without a renaming table; `tests/fit.rs` checks it
//! against ONNX Runtime's `hidden_states.N`.

use candle_core::Tensor;

use super::ops::{dropout, softmax, Mode};
use super::{Builder, LayerNorm, Linear};
use crate::backbone::{Activation, BertConfig};
use crate::fit::error::FitError;
use crate::Result;

/// Self-attention: query, key, value and output projections.
#[derive(Debug, Clone)]
struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    norm: LayerNorm,
}

/// A BERT layer.
#[derive(Debug, Clone)]
pub struct BertLayer {
    attention: Attention,
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
    heads: usize,
    act: Activation,
    attn_dropout: f32,
    hidden_dropout: f32,
}

/// Additive attention bias from a `[B, S]` mask (1 real, 0 padding):
/// `[B, 1, 1, S]` with 0 at real keys and -1e9 at padded keys.
pub fn attention_bias(mask: &Tensor) -> Result<Tensor> {
    let (b, s) = mask.dims2()?;
    Ok(((mask.ones_like()? - mask)? * -1e9)?.reshape((b, 1, 1, s))?)
}

impl super::Detach for BertLayer {
    fn detached(&self) -> Self {
        let a = &self.attention;
        BertLayer {
            attention: Attention {
                query: a.query.detached(),
                key: a.key.detached(),
                value: a.value.detached(),
                output: a.output.detached(),
                norm: a.norm.detached(),
            },
            intermediate: self.intermediate.detached(),
            output: self.output.detached(),
            norm: self.norm.detached(),
            heads: self.heads,
            act: self.act,
            attn_dropout: self.attn_dropout,
            hidden_dropout: self.hidden_dropout,
        }
    }
}

impl BertLayer {
    /// Load the layer under `vb`'s prefix (`encoder.layer.{i}`, which
    /// produces `hidden_states.{i + 1}`), trained or frozen as `vb` says,
    /// with the dropout probabilities of `cfg`.
    pub fn load(mut vb: Builder, cfg: &BertConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let attention = Attention {
            query: vb.pretrained_linear("attention.self.query", d, d)?,
            key: vb.pretrained_linear("attention.self.key", d, d)?,
            value: vb.pretrained_linear("attention.self.value", d, d)?,
            output: vb.pretrained_linear("attention.output.dense", d, d)?,
            norm: vb.pretrained_layer_norm("attention.output.LayerNorm", d, eps)?,
        };
        let intermediate = vb.pretrained_linear("intermediate.dense", d, cfg.intermediate_size)?;
        let output = vb.pretrained_linear("output.dense", cfg.intermediate_size, d)?;
        let norm = vb.pretrained_layer_norm("output.LayerNorm", d, eps)?;
        Ok(BertLayer {
            attention,
            intermediate,
            output,
            norm,
            heads: cfg.num_attention_heads,
            act: cfg.activation().map_err(FitError::backbone)?,
            attn_dropout: cfg.attention_probs_dropout_prob as f32,
            hidden_dropout: cfg.hidden_dropout_prob as f32,
        })
    }

    /// # Shapes
    /// `x` `[B, S, D]`, `bias` `[B, 1, 1, S]` (see [`attention_bias`]) ->
    /// `[B, S, D]`.
    pub fn forward(&self, x: &Tensor, bias: &Tensor, mode: &mut Mode<'_>) -> Result<Tensor> {
        let _span = tracing::trace_span!("bert_layer").entered();
        let (b, s, d) = x.dims3()?;
        let h = self.heads;
        let hd = d / h;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, s, h, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let att = &self.attention;
        let q = split(att.query.forward(x)?)?;
        let k = split(att.key.forward(x)?)?;
        let v = split(att.value.forward(x)?)?;
        let scores =
            (q.matmul(&k.t()?.contiguous()?)? / (hd as f64).sqrt())?.broadcast_add(bias)?;
        let probs = dropout(&softmax(&scores)?, self.attn_dropout, mode)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, d))?;
        let a = dropout(&att.output.forward(&ctx)?, self.hidden_dropout, mode)?;
        let h1 = att.norm.forward(&(a + x)?)?;
        let i = self.intermediate.forward(&h1)?;
        let i = match self.act {
            Activation::Gelu => i.gelu_erf()?,
            Activation::GeluTanh => i.gelu()?,
            Activation::Relu => i.relu()?,
        };
        let o = dropout(&self.output.forward(&i)?, self.hidden_dropout, mode)?;
        self.norm.forward(&(o + h1)?)
    }
}
