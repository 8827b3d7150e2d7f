//! One pre-trained BERT encoder layer in candle, with real (seeded) dropout,
//! loaded by checkpoint name and frozen or trainable.
//!
//! candle-transformers' `BertLayer` cannot be reused: its `forward` is
//! private and its dropout is a no-op. This follows `modeling_bert.py`
//! (transformers v4.8.2: `BertSelfAttention`, `BertSelfOutput`,
//! `BertIntermediate`, `BertOutput`) with the same parameter names, so a
//! checkpoint loads without a renaming table; `tests/fit.rs` checks it
//! against ONNX Runtime's `hidden_states.N`.

use candle_core::{Device, Tensor};

use super::layers::{dropout, layer_norm, linear, softmax, Mode};
use super::params::{Group, Params};
use crate::backbone::{Activation, BertConfig, Checkpoint};
use crate::Result;

type Lin = (Tensor, Tensor);

/// A BERT layer.
#[derive(Debug, Clone)]
pub struct BertLayer {
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    ln1: Lin,
    inter: Lin,
    out: Lin,
    ln2: Lin,
    heads: usize,
    eps: f64,
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

impl BertLayer {
    /// Load layer `index` (0-based, as in `encoder.layer.{index}`; it
    /// produces `hidden_states.{index + 1}`) from `ckpt`.
    pub fn load(
        ckpt: &Checkpoint,
        cfg: &BertConfig,
        index: usize,
        params: &mut Params,
        trainable: bool,
        dropout_p: (f32, f32),
        dev: &Device,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        let p = format!("encoder.layer.{index}");
        let group = trainable.then_some(Group::Pretrained);
        let mut get = |name: String, shape: &[usize]| -> Result<Tensor> {
            let v = ckpt.tensor_f32_shaped(&name, shape)?;
            params.add(&name, Tensor::from_vec(v, shape, dev)?, group)
        };
        let mut lin = |name: String, din: usize, dout: usize| -> Result<Lin> {
            Ok((
                get(format!("{name}.weight"), &[dout, din])?,
                get(format!("{name}.bias"), &[dout])?,
            ))
        };
        let q = lin(format!("{p}.attention.self.query"), d, d)?;
        let k = lin(format!("{p}.attention.self.key"), d, d)?;
        let v = lin(format!("{p}.attention.self.value"), d, d)?;
        let o = lin(format!("{p}.attention.output.dense"), d, d)?;
        let inter = lin(format!("{p}.intermediate.dense"), d, cfg.intermediate_size)?;
        let out = lin(format!("{p}.output.dense"), cfg.intermediate_size, d)?;
        let mut ln = |name: String| -> Result<Lin> {
            Ok((
                get(format!("{name}.weight"), &[d])?,
                get(format!("{name}.bias"), &[d])?,
            ))
        };
        let ln1 = ln(format!("{p}.attention.output.LayerNorm"))?;
        let ln2 = ln(format!("{p}.output.LayerNorm"))?;
        Ok(BertLayer {
            q,
            k,
            v,
            o,
            ln1,
            inter,
            out,
            ln2,
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps,
            act: cfg.activation().map_err(crate::Error::Config)?,
            attn_dropout: dropout_p.0,
            hidden_dropout: dropout_p.1,
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
        let q = split(linear(x, &self.q.0, &self.q.1)?)?;
        let k = split(linear(x, &self.k.0, &self.k.1)?)?;
        let v = split(linear(x, &self.v.0, &self.v.1)?)?;
        let scores =
            (q.matmul(&k.t()?.contiguous()?)? / (hd as f64).sqrt())?.broadcast_add(bias)?;
        let probs = dropout(&softmax(&scores)?, self.attn_dropout, mode)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, d))?;
        let a = dropout(
            &linear(&ctx, &self.o.0, &self.o.1)?,
            self.hidden_dropout,
            mode,
        )?;
        let h1 = layer_norm(&(a + x)?, &self.ln1.0, &self.ln1.1, self.eps)?;
        let i = linear(&h1, &self.inter.0, &self.inter.1)?;
        let i = match self.act {
            Activation::Gelu => i.gelu_erf()?,
            Activation::GeluTanh => i.gelu()?,
            Activation::Relu => i.relu()?,
        };
        let o = dropout(
            &linear(&i, &self.out.0, &self.out.1)?,
            self.hidden_dropout,
            mode,
        )?;
        layer_norm(&(o + h1)?, &self.ln2.0, &self.ln2.1, self.eps)
    }
}
