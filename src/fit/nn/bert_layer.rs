//! One pre-trained BERT encoder layer in candle, with real (seeded) dropout,
//! loaded by checkpoint name and frozen or trainable.
//!
//! candle-transformers' `BertLayer` cannot be reused: its `forward` is
//! private and its dropout is a no-op. This follows `modeling_bert.py`
//! (transformers v4.8.2: `BertSelfAttention`, `BertSelfOutput`,
//! `BertIntermediate`, `BertOutput`) with the same parameter names, so a
//! checkpoint loads without a renaming table; `tests/fit.rs` checks it
//! against ONNX Runtime's `hidden_states.N`.

use std::sync::Arc;

use candle_core::Tensor;

use super::fused_layer::{BertLayerOp, Masks};
use super::ops::{dropout, dropout_mask, softmax, Mode};
use super::{Builder, LayerNorm, Linear};
use crate::backbone::{Activation, BertConfig, LayerNames};
use crate::fit::error::FitError;
use crate::Result;

/// A projection inside a BERT layer (what a LoRA update can target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    /// Attention query.
    Query,
    /// Attention key.
    Key,
    /// Attention value.
    Value,
    /// Attention output dense.
    Output,
    /// FFN intermediate dense (`D -> F`).
    FfnIn,
    /// FFN output dense (`F -> D`).
    FfnOut,
}

/// Trained modules inside a frozen layer ([`BertLayer::forward_with`]):
/// low-rank updates of its projections (LoRA) and modules on its
/// sub-layers' outputs (adapters).
pub trait LayerExtras {
    /// Added to projection `p`'s output, computed from its input `x`;
    /// `None` adds nothing.
    fn delta(&self, p: Projection, x: &Tensor, mode: &mut Mode<'_>) -> Result<Option<Tensor>>;
    /// Applied to the attention sub-layer's output (after its dropout),
    /// before the residual and the LayerNorm.
    fn after_attention(&self, a: Tensor, mode: &mut Mode<'_>) -> Result<Tensor>;
    /// Applied to the FFN's output (after its dropout), before the
    /// residual and the LayerNorm.
    fn after_ffn(&self, o: Tensor, mode: &mut Mode<'_>) -> Result<Tensor>;
}

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
    eps: f64,
    /// A frozen layer's weights in the fused op's order, read once.
    packed: Option<Arc<Vec<f32>>>,
    /// A trained layer's weights as one variable in the fused op's order
    /// (the parameters above are views of it): the op takes it as is.
    flat: Option<Tensor>,
}

/// Additive attention bias from a `[B, S]` mask (1 real, 0 padding):
/// `[B, 1, 1, S]` with 0 at real keys and -1e9 at padded keys.
pub fn attention_bias(mask: &Tensor) -> Result<Tensor> {
    let (b, s) = mask.dims2()?;
    Ok(((mask.ones_like()? - mask)? * -1e9)?.reshape((b, 1, 1, s))?)
}

/// The values of `bias` for the fused op, flattened once per tensor: every
/// layer of a forward pass gets the same bias tensor, and each trained
/// layer's op keeps its copy until the backward pass, so with MPNet's
/// `[B, H, S, S]` bias (25 MB at 32 x 12 heads x 128 tokens) one copy per
/// layer would add up. The last tensor's values are kept per thread, by
/// candle's tensor id (unique for the process's life).
fn shared_bias(bias: &Tensor) -> Result<Arc<Vec<f32>>> {
    use std::cell::RefCell;
    thread_local! {
        static LAST: RefCell<Option<(candle_core::TensorId, Arc<Vec<f32>>)>> =
            const { RefCell::new(None) };
    }
    let id = bias.id();
    if let Some(v) = LAST.with(|l| {
        l.borrow()
            .as_ref()
            .filter(|(i, _)| *i == id)
            .map(|(_, v)| v.clone())
    }) {
        return Ok(v);
    }
    let v = Arc::new(bias.flatten_all()?.to_vec1::<f32>()?);
    LAST.with(|l| *l.borrow_mut() = Some((id, v.clone())));
    Ok(v)
}

/// Checkpoint names and shapes of a layer of width `d` and FFN width `f`,
/// in the fused op's order ([`super::fused_layer::PACKED_ORDER`]).
fn packed_names(d: usize, f: usize) -> Vec<(String, Vec<usize>)> {
    [
        ("attention.self.query.weight", vec![d, d]),
        ("attention.self.key.weight", vec![d, d]),
        ("attention.self.value.weight", vec![d, d]),
        ("attention.self.query.bias", vec![d]),
        ("attention.self.key.bias", vec![d]),
        ("attention.self.value.bias", vec![d]),
        ("attention.output.dense.weight", vec![d, d]),
        ("attention.output.dense.bias", vec![d]),
        ("attention.output.LayerNorm.weight", vec![d]),
        ("attention.output.LayerNorm.bias", vec![d]),
        ("intermediate.dense.weight", vec![f, d]),
        ("intermediate.dense.bias", vec![f]),
        ("output.dense.weight", vec![d, f]),
        ("output.dense.bias", vec![d]),
        ("output.LayerNorm.weight", vec![d]),
        ("output.LayerNorm.bias", vec![d]),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s))
    .collect()
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
            eps: self.eps,
            packed: self.packed.clone(),
            flat: self.flat.as_ref().map(|f| f.detach()),
        }
    }
}

impl BertLayer {
    /// Load the layer under `vb`'s prefix (`encoder.layer.{i}`, which
    /// produces `hidden_states.{i + 1}`), trained or frozen as `vb` says,
    /// with the dropout probabilities of `cfg`. An MPNet layer is read
    /// under MPNet's names; its relative-position bias is not part of the
    /// layer but of the `bias` its forward pass gets
    /// ([`super::relative::RelativeBias`]).
    pub fn load(mut vb: Builder, cfg: &BertConfig) -> Result<Self> {
        // the checkpoint's own names (MPNet names its attention differently)
        let family = LayerNames::of(cfg.family());
        let names: Vec<(String, Vec<usize>)> = packed_names(cfg.hidden_size, cfg.intermediate_size)
            .into_iter()
            .map(|(n, s)| (family.map(&n), s))
            .collect();
        let (flat, t) = vb.pretrained_packed(&names)?;
        let mut layer = BertLayer::assemble(t, flat, cfg.num_attention_heads, cfg.layer_norm_eps)?;
        layer.configure(cfg)?;
        if !layer.trained() && super::fused::cpu_f32(&layer.attention.query.weight) {
            layer.packed = Some(Arc::new(layer.flat_weights()?.to_vec1::<f32>()?));
        }
        Ok(layer)
    }

    /// A fresh layer of `cfg`'s sizes under `vb`'s prefix, trained in
    /// [`crate::fit::params::Group::New`] as one packed variable (the fused
    /// op's order): every weight matrix uniform with standard deviation
    /// 0.02 (BERT's `initializer_range`, drawn uniform in
    /// ±0.02·sqrt(3)), biases 0, LayerNorms weight 1 and bias 0; the
    /// matrices are drawn in [`super::fused_layer::PACKED_ORDER`].
    pub fn fresh(mut vb: Builder, cfg: &BertConfig) -> Result<Self> {
        let bound = 0.02 * 3f32.sqrt();
        let dev = vb.device().clone();
        let members = packed_names(cfg.hidden_size, cfg.intermediate_size)
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let v = if shape.len() == 2 {
                    vb.uniform(n, bound)
                } else if name.ends_with("LayerNorm.weight") {
                    vec![1f32; n]
                } else {
                    vec![0f32; n]
                };
                Ok((name, Tensor::from_vec(v, shape.as_slice(), &dev)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let (flat, t) = vb.fresh_packed(members)?;
        let mut layer =
            BertLayer::assemble(t, Some(flat), cfg.num_attention_heads, cfg.layer_norm_eps)?;
        layer.configure(cfg)?;
        Ok(layer)
    }

    /// A fresh, trained layer of `side`'s sizes whose weights are the
    /// backbone layer `source` (`encoder.layer.{i}`, sizes `cfg`)
    /// structurally pruned (LST's pruned initialisation, by weight
    /// magnitude): the residual dimensions `hidden` (of `D`, in order);
    /// in every head, the query/key dimensions with the largest
    /// `|W_q row|^2 + |W_k row|^2` and the value dimensions with the
    /// largest `|W_v row|^2` (the side layer keeps the backbone's head
    /// count); the FFN units with the largest `|W_1 row|^2`. Registered
    /// in [`crate::fit::params::Group::New`] as [`BertLayer::fresh`] does.
    pub fn pruned(
        mut vb: Builder,
        cfg: &BertConfig,
        side: &BertConfig,
        source: &str,
        hidden: &[usize],
    ) -> Result<Self> {
        let (d, f, h) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
        );
        let (ds, fs) = (side.hidden_size, side.intermediate_size);
        if side.num_attention_heads != h || hidden.len() != ds || ds % h != 0 {
            return Err(FitError::settings(format!(
                "--lst-init prune keeps the backbone's {h} heads, but a side width of {ds} \
                 cannot hold them; choose --side-dim (or --reduction) so that the width is a \
                 multiple of {h}, or --lst-init random"
            )));
        }
        let family = LayerNames::of(cfg.family());
        let read = |name: &str, shape: &[usize]| {
            vb.read_checkpoint(&format!("{source}.{}", family.map(name)), shape)
        };
        let row_norms = |w: &[f32], cols: usize| -> Vec<f32> {
            w.chunks_exact(cols)
                .map(|r| r.iter().map(|v| v * v).sum())
                .collect()
        };
        // the `keep` largest scores among `candidates`, in index order
        let top = |scores: &[f32], candidates: std::ops::Range<usize>, keep: usize| {
            let mut idx: Vec<usize> = candidates.collect();
            idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            idx.truncate(keep);
            idx.sort_unstable();
            idx
        };
        // rows `rows` and columns `cols` of a row-major matrix `w` of `n` columns
        let take = |w: &[f32], n: usize, rows: &[usize], cols: &[usize]| -> Vec<f32> {
            rows.iter()
                .flat_map(|&r| cols.iter().map(move |&c| w[r * n + c]))
                .collect()
        };
        let pick = |v: &[f32], idx: &[usize]| -> Vec<f32> { idx.iter().map(|&i| v[i]).collect() };
        let wq = read("attention.self.query.weight", &[d, d])?;
        let wk = read("attention.self.key.weight", &[d, d])?;
        let wv = read("attention.self.value.weight", &[d, d])?;
        let (hd, hds) = (d / h, ds / h);
        let qk: Vec<f32> = row_norms(&wq, d)
            .iter()
            .zip(row_norms(&wk, d))
            .map(|(a, b)| a + b)
            .collect();
        let vn = row_norms(&wv, d);
        let (mut qk_keep, mut v_keep) = (Vec::new(), Vec::new());
        for head in 0..h {
            qk_keep.extend(top(&qk, head * hd..(head + 1) * hd, hds));
            v_keep.extend(top(&vn, head * hd..(head + 1) * hd, hds));
        }
        let w1 = read("intermediate.dense.weight", &[f, d])?;
        let ffn_keep = top(&row_norms(&w1, d), 0..f, fs);
        let mut values: Vec<Vec<f32>> = Vec::with_capacity(16);
        values.push(take(&wq, d, &qk_keep, hidden));
        values.push(take(&wk, d, &qk_keep, hidden));
        values.push(take(&wv, d, &v_keep, hidden));
        values.push(pick(&read("attention.self.query.bias", &[d])?, &qk_keep));
        values.push(pick(&read("attention.self.key.bias", &[d])?, &qk_keep));
        values.push(pick(&read("attention.self.value.bias", &[d])?, &v_keep));
        let wo = read("attention.output.dense.weight", &[d, d])?;
        values.push(take(&wo, d, hidden, &v_keep));
        values.push(pick(&read("attention.output.dense.bias", &[d])?, hidden));
        values.push(pick(
            &read("attention.output.LayerNorm.weight", &[d])?,
            hidden,
        ));
        values.push(pick(
            &read("attention.output.LayerNorm.bias", &[d])?,
            hidden,
        ));
        values.push(take(&w1, d, &ffn_keep, hidden));
        values.push(pick(&read("intermediate.dense.bias", &[f])?, &ffn_keep));
        let w2 = read("output.dense.weight", &[d, f])?;
        values.push(take(&w2, f, hidden, &ffn_keep));
        values.push(pick(&read("output.dense.bias", &[d])?, hidden));
        values.push(pick(&read("output.LayerNorm.weight", &[d])?, hidden));
        values.push(pick(&read("output.LayerNorm.bias", &[d])?, hidden));
        let dev = vb.device().clone();
        let members = packed_names(ds, fs)
            .into_iter()
            .zip(values)
            .map(|((name, shape), v)| Ok((name, Tensor::from_vec(v, shape.as_slice(), &dev)?)))
            .collect::<Result<Vec<_>>>()?;
        let (flat, t) = vb.fresh_packed(members)?;
        let mut layer = BertLayer::assemble(t, Some(flat), h, side.layer_norm_eps)?;
        layer.configure(side)?;
        Ok(layer)
    }

    /// This layer with `deltas` added to some of its weight matrices
    /// (`W + delta`, LoRA merged), all 16 tensors as one flat tensor in
    /// [`super::fused_layer::PACKED_ORDER`] through which the deltas'
    /// gradients flow: [`BertLayer::forward`] then runs it as a trained
    /// layer (on the CPU the fused op, whose saved activations are fewer
    /// than the composed layer's).
    pub fn merged(&self, deltas: &[(Projection, Tensor)]) -> Result<Self> {
        let slot = |p: Projection| match p {
            Projection::Query => 0,
            Projection::Key => 1,
            Projection::Value => 2,
            Projection::Output => 6,
            Projection::FfnIn => 10,
            Projection::FfnOut => 12,
        };
        let parts = self.parts();
        let flat = parts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let t = match deltas.iter().find(|(p, _)| slot(*p) == i) {
                    Some((_, delta)) => (*t + delta)?,
                    None => (*t).clone(),
                };
                Ok(t.flatten_all()?)
            })
            .collect::<Result<Vec<_>>>()?;
        let flat = Tensor::cat(&flat, 0)?;
        let mut offset = 0;
        let views = parts
            .iter()
            .map(|t| {
                let n = t.elem_count();
                let v = flat.narrow(0, offset, n)?.reshape(t.shape())?;
                offset += n;
                Ok(v)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut layer = BertLayer::assemble(views, Some(flat), self.heads, self.eps)?;
        layer.act = self.act;
        layer.attn_dropout = self.attn_dropout;
        layer.hidden_dropout = self.hidden_dropout;
        Ok(layer)
    }

    /// The activation and dropout probabilities of `cfg`.
    fn configure(&mut self, cfg: &BertConfig) -> Result<()> {
        self.act = cfg.activation().map_err(FitError::backbone)?;
        self.attn_dropout = cfg.attention_probs_dropout_prob as f32;
        self.hidden_dropout = cfg.hidden_dropout_prob as f32;
        Ok(())
    }

    /// The layer without the frozen weights' packed copy (only the fused
    /// op reads it): for a frozen layer that only runs composed
    /// ([`BertLayer::forward_with`]), whose weights then live once.
    pub fn without_packed_copy(mut self) -> Self {
        self.packed = None;
        self
    }

    /// A layer from its 16 tensors in [`super::fused_layer::PACKED_ORDER`]
    /// and, when trained as one variable, that variable (GELU, dropout 0.1;
    /// the caller sets what its config says).
    fn assemble(t: Vec<Tensor>, flat: Option<Tensor>, heads: usize, eps: f64) -> Result<Self> {
        let t: [Tensor; 16] = t
            .try_into()
            .map_err(|_| FitError::model("a BERT layer has 16 weight tensors"))?;
        let [wq, wk, wv, bq, bk, bv, wo, bo, g1, be1, w1, b1, w2, b2, g2, be2] = t;
        Ok(BertLayer {
            attention: Attention {
                query: Linear::from_parts(wq, bq),
                key: Linear::from_parts(wk, bk),
                value: Linear::from_parts(wv, bv),
                output: Linear::from_parts(wo, bo),
                norm: LayerNorm::from_parts(g1, be1, eps),
            },
            intermediate: Linear::from_parts(w1, b1),
            output: Linear::from_parts(w2, b2),
            norm: LayerNorm::from_parts(g2, be2, eps),
            heads,
            act: Activation::Gelu,
            attn_dropout: 0.1,
            hidden_dropout: 0.1,
            eps,
            packed: None,
            flat,
        })
    }

    /// The 16 weight tensors in [`super::fused_layer::PACKED_ORDER`].
    fn parts(&self) -> [&Tensor; 16] {
        let a = &self.attention;
        [
            &a.query.weight,
            &a.key.weight,
            &a.value.weight,
            &a.query.bias,
            &a.key.bias,
            &a.value.bias,
            &a.output.weight,
            &a.output.bias,
            &a.norm.weight,
            &a.norm.bias,
            &self.intermediate.weight,
            &self.intermediate.bias,
            &self.output.weight,
            &self.output.bias,
            &self.norm.weight,
            &self.norm.bias,
        ]
    }

    /// Whether the weights are trained (candle variables).
    fn trained(&self) -> bool {
        self.attention.query.weight.track_op()
    }

    /// The weights as one flat vector in
    /// [`super::fused_layer::PACKED_ORDER`] (a concatenation: gradients flow
    /// back to each parameter).
    fn flat_weights(&self) -> Result<Tensor> {
        if let Some(f) = &self.flat {
            return Ok(f.clone());
        }
        let parts = self.parts();
        let flat = parts
            .iter()
            .map(|t| t.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&flat, 0)?)
    }

    /// # Shapes
    /// `x` `[B, S, D]`, `bias` `[B, 1, 1, S]` (see [`attention_bias`]) or,
    /// with MPNet's relative-position bias added, `[B, H, S, S]` ->
    /// `[B, S, D]`.
    ///
    /// On the CPU with f32 tensors, one fused op ([`BertLayerOp`]); else
    /// [`BertLayer::forward_composed`]. Both draw the same dropout masks in
    /// the same order.
    pub fn forward(&self, x: &Tensor, bias: &Tensor, mode: &mut Mode<'_>) -> Result<Tensor> {
        if super::fused::cpu_f32(x) && super::fused::cpu_f32(&self.attention.query.weight) {
            return self.forward_fused(x, bias, mode);
        }
        self.forward_composed(x, bias, mode)
    }

    fn forward_fused(&self, x: &Tensor, bias: &Tensor, mode: &mut Mode<'_>) -> Result<Tensor> {
        let _span = tracing::trace_span!("bert_layer_fused").entered();
        let (b, s, d) = x.dims3()?;
        let h = self.heads;
        let masks = Masks {
            attn: dropout_mask(&[b, h, s, s], self.attn_dropout, mode),
            attn_out: dropout_mask(&[b, s, d], self.hidden_dropout, mode),
            out: dropout_mask(&[b, s, d], self.hidden_dropout, mode),
        };
        let key_bias = shared_bias(bias)?;
        let ffn = self.intermediate.weight.dim(0)?;
        let x2 = x.reshape((b * s, d))?.contiguous()?;
        let op = move |frozen: Option<Arc<Vec<f32>>>, keep: bool| {
            BertLayerOp::new(
                b,
                s,
                d,
                h,
                ffn,
                self.act,
                self.eps as f32,
                key_bias,
                masks,
                frozen,
                keep,
            )
        };
        let y = if self.trained() {
            x2.apply_op2(&self.flat_weights()?, op(None, true))?
        } else {
            let w = match &self.packed {
                Some(p) => p.clone(),
                // a trained layer's detached weights (evaluation)
                None => Arc::new(self.flat_weights()?.to_vec1::<f32>()?),
            };
            x2.apply_op1(op(Some(w), x2.track_op()))?
        };
        Ok(y.reshape((b, s, d))?)
    }

    /// The layer composed from candle ops (any device; the reference the
    /// fused op is tested against).
    pub fn forward_composed(
        &self,
        x: &Tensor,
        bias: &Tensor,
        mode: &mut Mode<'_>,
    ) -> Result<Tensor> {
        self.forward_with(x, bias, mode, None)
    }

    /// [`BertLayer::forward_composed`] with `extras` (LoRA updates,
    /// adapters) inside the layer; with `None` exactly the composed layer.
    pub fn forward_with(
        &self,
        x: &Tensor,
        bias: &Tensor,
        mode: &mut Mode<'_>,
        extras: Option<&dyn LayerExtras>,
    ) -> Result<Tensor> {
        let _span = tracing::trace_span!("bert_layer").entered();
        let (b, s, d) = x.dims3()?;
        let h = self.heads;
        let hd = d / h;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, s, h, hd))?.transpose(1, 2)?.contiguous()?)
        };
        // a projection, plus the extras' update of it
        let project =
            |lin: &Linear, p: Projection, x: &Tensor, mode: &mut Mode<'_>| -> Result<Tensor> {
                let y = lin.forward(x)?;
                Ok(match extras {
                    Some(e) => match e.delta(p, x, mode)? {
                        Some(delta) => (y + delta)?,
                        None => y,
                    },
                    None => y,
                })
            };
        let att = &self.attention;
        let q = split(project(&att.query, Projection::Query, x, mode)?)?;
        let k = split(project(&att.key, Projection::Key, x, mode)?)?;
        let v = split(project(&att.value, Projection::Value, x, mode)?)?;
        let scores =
            (q.matmul(&k.t()?.contiguous()?)? / (hd as f64).sqrt())?.broadcast_add(bias)?;
        let probs = dropout(&softmax(&scores)?, self.attn_dropout, mode)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, d))?;
        let a = project(&att.output, Projection::Output, &ctx, mode)?;
        let mut a = dropout(&a, self.hidden_dropout, mode)?;
        if let Some(e) = extras {
            a = e.after_attention(a, mode)?;
        }
        let h1 = att.norm.forward(&(a + x)?)?;
        let i = project(&self.intermediate, Projection::FfnIn, &h1, mode)?;
        let i = match self.act {
            Activation::Gelu => i.gelu_erf()?,
            Activation::GeluTanh => i.gelu()?,
            Activation::Relu => i.relu()?,
        };
        let o = project(&self.output, Projection::FfnOut, &i, mode)?;
        let mut o = dropout(&o, self.hidden_dropout, mode)?;
        if let Some(e) = extras {
            o = e.after_ffn(o, mode)?;
        }
        self.norm.forward(&(o + h1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::nn::test_util::{close, flat};
    use crate::fit::nn::Detach;
    use crate::rng::SplitMix64;
    use candle_core::{Device, Var};

    const D: usize = 8;
    const H: usize = 2;
    const F: usize = 12;

    /// A layer with random weights: candle variables when `trained`, plain
    /// tensors (frozen) otherwise; the variables are returned.
    fn layer(act: Activation, trained: bool, seed: u64) -> (BertLayer, Vec<Var>) {
        let dev = Device::Cpu;
        let mut rng = SplitMix64::new(seed);
        let mut vars = Vec::new();
        let mut t = |shape: &[usize], base: f32, spread: f32| -> Tensor {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| base + rng.symmetric_f32(spread)).collect();
            if trained {
                let var = Var::from_vec(v, shape, &dev).unwrap();
                vars.push(var.clone());
                var.as_tensor().clone()
            } else {
                Tensor::from_vec(v, shape, &dev).unwrap()
            }
        };
        let mut lin =
            |i: usize, o: usize| Linear::from_parts(t(&[o, i], 0.0, 0.5), t(&[o], 0.0, 0.1));
        let (query, key, value, output) = (lin(D, D), lin(D, D), lin(D, D), lin(D, D));
        let (intermediate, out) = (lin(D, F), lin(F, D));
        let mut norm = || LayerNorm {
            weight: t(&[D], 1.0, 0.2),
            bias: t(&[D], 0.0, 0.1),
            eps: 1e-12,
        };
        let (n1, n2) = (norm(), norm());
        let mut l = BertLayer {
            attention: Attention {
                query,
                key,
                value,
                output,
                norm: n1,
            },
            intermediate,
            output: out,
            norm: n2,
            heads: H,
            act,
            attn_dropout: 0.1,
            hidden_dropout: 0.1,
            eps: 1e-12,
            packed: None,
            flat: None,
        };
        if !trained {
            l.packed = Some(Arc::new(l.flat_weights().unwrap().to_vec1().unwrap()));
        }
        (l, vars)
    }

    /// The gradients of the loss `sum(probe * y)`.
    fn probe_grads(y: Tensor, probe: &Tensor) -> candle_core::backprop::GradStore {
        (y * probe).unwrap().sum_all().unwrap().backward().unwrap()
    }

    /// A copy of the trained layer `l` with its weights packed into one
    /// variable (as `load` builds a trained layer), and that variable.
    fn packed_copy(l: &BertLayer) -> (BertLayer, Tensor) {
        use crate::fit::params::{Group, Params};
        let mut params = Params::new();
        let members = l
            .parts()
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("w{i}"), t.detach().copy().unwrap()))
            .collect();
        let (flat_var, views) = params.add_packed(members, Group::Pretrained).unwrap();
        let mut lp = BertLayer::assemble(views, Some(flat_var.clone()), H, 1e-12).unwrap();
        lp.act = l.act;
        (lp, flat_var)
    }

    /// Inputs: `x` (a variable) `[3, 5, D]`, the attention bias of a mask
    /// with padding, and a probe for the loss `sum(probe * y)`.
    fn inputs() -> (Var, Tensor, Tensor) {
        let dev = Device::Cpu;
        let mut rng = SplitMix64::new(99);
        let (b, s) = (3, 5);
        let mut r = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.symmetric_f32(1.0)).collect() };
        let x = Var::from_vec(r(b * s * D), (b, s, D), &dev).unwrap();
        let mask = Tensor::new(
            &[
                [1f32, 1., 1., 1., 1.],
                [1., 1., 1., 0., 0.],
                [1., 0., 0., 0., 0.],
            ],
            &dev,
        )
        .unwrap();
        let probe = Tensor::from_vec(r(b * s * D), (b, s, D), &dev).unwrap();
        (x, attention_bias(&mask).unwrap(), probe)
    }

    /// The fused op against the composed layer: outputs and every gradient
    /// (input, and weights when trained) within 1e-5 relative, in training
    /// mode with dropout (the same masks drawn, the generator left in the
    /// same state) and in evaluation, for every activation.
    /// A trained layer packed as one variable (as `load` builds it) computes
    /// what the same layer with one variable per tensor does, and the
    /// packed variable's gradient is their gradients in PACKED_ORDER.
    #[test]
    fn packed_trained_layer_equals_the_unpacked_one() {
        let (l, _) = layer(Activation::Gelu, true, 9);
        let (lp, flat_var) = packed_copy(&l);
        let (x, bias, probe) = inputs();
        let (mut g1, mut g2) = (SplitMix64::new(4), SplitMix64::new(4));
        let y = l
            .forward_fused(x.as_tensor(), &bias, &mut Mode::Train(&mut g1))
            .unwrap();
        let yp = lp
            .forward_fused(x.as_tensor(), &bias, &mut Mode::Train(&mut g2))
            .unwrap();
        assert_eq!(flat(&y), flat(&yp));
        let g = probe_grads(y, &probe);
        let gp = probe_grads(yp, &probe);
        let want: Vec<f32> = l
            .parts()
            .iter()
            .flat_map(|t| flat(g.get(t).unwrap()))
            .collect();
        assert_eq!(flat(gp.get(&flat_var).unwrap()), want);
        assert_eq!(flat(g.get(&x).unwrap()), flat(gp.get(&x).unwrap()));
    }

    /// With a gradient collector on the thread, a packed trained layer's
    /// weight gradient bypasses candle's store and, merged in, equals the
    /// store's own bit for bit; two parts' collections add up to the sum of
    /// their stores' gradients; without a collector nothing changes.
    #[test]
    fn collected_weight_gradients_equal_the_stores() {
        use crate::fit::nn::direct_grads::{Collected, Collector};
        let (l, _) = layer(Activation::Gelu, true, 12);
        let (lp, flat_var) = packed_copy(&l);
        let (x, bias, probe) = inputs();
        let run = |seed: u64, collect: bool| {
            let mut g = SplitMix64::new(seed);
            let y = lp
                .forward_fused(x.as_tensor(), &bias, &mut Mode::Train(&mut g))
                .unwrap();
            let loss = (y * &probe).unwrap().sum_all().unwrap();
            if collect {
                let c = Collector::start();
                let grads = loss.backward().unwrap();
                (grads, c.finish().unwrap())
            } else {
                (loss.backward().unwrap(), Collected::default())
            }
        };
        let (plain, none) = run(5, false);
        assert!(none.is_empty());
        let (mut store, collected) = run(5, true);
        assert!(store.get(&flat_var).is_none(), "bypassed the store");
        assert!(!collected.is_empty());
        assert_eq!(flat(store.get(&x).unwrap()), flat(plain.get(&x).unwrap()));
        collected.merge_into(&mut store).unwrap();
        let want = flat(plain.get(&flat_var).unwrap());
        assert_eq!(flat(store.get(&flat_var).unwrap()), want);
        // two parts: in-place sum against the stores' sum
        let (other_plain, _) = run(6, false);
        let (mut summed, mut first) = run(5, true);
        let (_, second) = run(6, true);
        first.add(second).unwrap();
        first.merge_into(&mut summed).unwrap();
        let want = (plain.get(&flat_var).unwrap() + other_plain.get(&flat_var).unwrap()).unwrap();
        assert_eq!(flat(summed.get(&flat_var).unwrap()), flat(&want));
    }

    /// A frozen layer with LoRA updates (no dropout) merged into its
    /// weights and run fused computes what the updates beside the
    /// projections compute composed: outputs, the generator's state, and
    /// the gradients of the inputs and of every `A` and `B` (1e-5
    /// relative); in evaluation too.
    #[test]
    fn merged_lora_layer_matches_the_composed_updates() {
        use crate::fit::nn::lora::{LoraLayer, LoraUpdate};
        let (l, _) = layer(Activation::Gelu, false, 6);
        let mut rng = SplitMix64::new(21);
        let mut var = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.symmetric_f32(0.3)).collect();
            Var::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        let r = 2;
        let vars = [
            var(&[r, D]),
            var(&[D, r]),
            var(&[r, D]),
            var(&[F, r]),
            var(&[r, F]),
            var(&[D, r]),
        ];
        let up = |a: &Var, b: &Var| {
            LoraUpdate::from_parts(a.as_tensor().clone(), b.as_tensor().clone(), 4.0, 0.0)
        };
        let lora = LoraLayer::from_updates(vec![
            (Projection::Query, up(&vars[0], &vars[1])),
            (Projection::FfnIn, up(&vars[2], &vars[3])),
            (Projection::FfnOut, up(&vars[4], &vars[5])),
        ]);
        let deltas = lora
            .merged_deltas()
            .unwrap()
            .expect("no dropout: mergeable");
        let merged = l.merged(&deltas).unwrap();
        let (x, bias, probe) = inputs();
        let (mut g1, mut g2) = (SplitMix64::new(3), SplitMix64::new(3));
        let yc = l
            .forward_with(x.as_tensor(), &bias, &mut Mode::Train(&mut g1), Some(&lora))
            .unwrap();
        let ym = merged
            .forward(x.as_tensor(), &bias, &mut Mode::Train(&mut g2))
            .unwrap();
        close(&flat(&ym), &flat(&yc), 1e-5, "y");
        assert_eq!(g1.next_u64(), g2.next_u64(), "generator state");
        let gc = probe_grads(yc, &probe);
        let gm = probe_grads(ym, &probe);
        close(
            &flat(gm.get(&x).unwrap()),
            &flat(gc.get(&x).unwrap()),
            1e-5,
            "dx",
        );
        for (i, v) in vars.iter().enumerate() {
            close(
                &flat(gm.get(v).unwrap()),
                &flat(gc.get(v).unwrap()),
                1e-5,
                &format!("lora var {i}"),
            );
        }
        let ec = l
            .forward_with(
                x.as_tensor(),
                &bias,
                &mut Mode::Eval,
                Some(&lora.detached()),
            )
            .unwrap();
        let dm = l
            .merged(&lora.detached().merged_deltas().unwrap().unwrap())
            .unwrap();
        let em = dm.forward(x.as_tensor(), &bias, &mut Mode::Eval).unwrap();
        close(&flat(&em), &flat(&ec), 1e-5, "eval");
        // with dropout on an update, nothing is merged
        let drop = LoraLayer::from_updates(vec![(
            Projection::Value,
            LoraUpdate::from_parts(
                vars[0].as_tensor().clone(),
                vars[1].as_tensor().clone(),
                4.0,
                0.1,
            ),
        )]);
        assert!(drop.merged_deltas().unwrap().is_none());
    }

    #[test]
    fn fused_layer_matches_the_composed_layer() {
        for act in [Activation::Gelu, Activation::GeluTanh, Activation::Relu] {
            for trained in [false, true] {
                let (l, vars) = layer(act, trained, 5);
                let (x, bias, probe) = inputs();
                let (mut g1, mut g2) = (SplitMix64::new(3), SplitMix64::new(3));
                let yf = l
                    .forward_fused(x.as_tensor(), &bias, &mut Mode::Train(&mut g1))
                    .unwrap();
                let yc = l
                    .forward_composed(x.as_tensor(), &bias, &mut Mode::Train(&mut g2))
                    .unwrap();
                let what = format!("{act:?} trained={trained}");
                close(&flat(&yf), &flat(&yc), 1e-5, &format!("{what} y"));
                assert_eq!(g1.next_u64(), g2.next_u64(), "{what}: generator state");
                let gf = probe_grads(yf, &probe);
                let gc = probe_grads(yc, &probe);
                close(
                    &flat(gf.get(&x).unwrap()),
                    &flat(gc.get(&x).unwrap()),
                    1e-5,
                    &format!("{what} dx"),
                );
                for (i, v) in vars.iter().enumerate() {
                    close(
                        &flat(gf.get(v).unwrap()),
                        &flat(gc.get(v).unwrap()),
                        1e-5,
                        &format!("{what} dW{i}"),
                    );
                }
                let ef = l
                    .detached()
                    .forward_fused(x.as_tensor(), &bias, &mut Mode::Eval)
                    .unwrap();
                let ec = l
                    .detached()
                    .forward_composed(x.as_tensor(), &bias, &mut Mode::Eval)
                    .unwrap();
                close(&flat(&ef), &flat(&ec), 1e-5, &format!("{what} eval"));
            }
        }
    }

    /// A trained layer on a constant input (the late-layer baseline reads
    /// cached hidden states) skips the input's gradient and gives the same
    /// weight gradients, bit for bit, as on a variable input.
    #[test]
    fn constant_input_gets_no_gradient_and_the_same_weight_gradients() {
        let (l, vars) = layer(Activation::Gelu, true, 6);
        let (x, bias, probe) = inputs();
        let constant = x.as_tensor().detach();
        assert!(!constant.track_op());
        let (mut g1, mut g2) = (SplitMix64::new(7), SplitMix64::new(7));
        let yv = l
            .forward_fused(x.as_tensor(), &bias, &mut Mode::Train(&mut g1))
            .unwrap();
        let yc = l
            .forward_fused(&constant, &bias, &mut Mode::Train(&mut g2))
            .unwrap();
        assert_eq!(flat(&yv), flat(&yc));
        let gv = probe_grads(yv, &probe);
        let gc = probe_grads(yc, &probe);
        assert!(gv.get(&x).is_some());
        assert!(gc.get(&constant).is_none());
        for (i, v) in vars.iter().enumerate() {
            assert_eq!(flat(gv.get(v).unwrap()), flat(gc.get(v).unwrap()), "dW{i}");
        }
    }

    /// The fused backward pass against central finite differences of the
    /// fused forward pass (evaluation mode, f64 loss accumulation).
    #[test]
    fn fused_layer_gradient_by_finite_differences() {
        let (l, vars) = layer(Activation::Gelu, true, 8);
        let (x, bias, probe) = inputs();
        let loss = |xt: &Tensor| -> f64 {
            let y = l
                .detached()
                .forward_fused(xt, &bias, &mut Mode::Eval)
                .unwrap();
            flat(&y)
                .iter()
                .zip(flat(&probe))
                .map(|(a, b)| f64::from(*a) * f64::from(b))
                .sum()
        };
        let y = l
            .forward_fused(x.as_tensor(), &bias, &mut Mode::Eval)
            .unwrap();
        let g = probe_grads(y, &probe);
        let dx = flat(g.get(&x).unwrap());
        let x0 = flat(x.as_tensor());
        let h = 1e-2f32;
        for i in (0..x0.len()).step_by(7) {
            let mut a = x0.clone();
            let mut c = x0.clone();
            a[i] += h;
            c[i] -= h;
            let shape = x.as_tensor().shape().clone();
            let ta = Tensor::from_vec(a, &shape, &Device::Cpu).unwrap();
            let tc = Tensor::from_vec(c, &shape, &Device::Cpu).unwrap();
            let fd = (loss(&ta) - loss(&tc)) / (2.0 * f64::from(h));
            assert!(
                (fd - f64::from(dx[i])).abs() < 2e-2 * (1.0 + fd.abs()),
                "dx[{i}]: finite differences {fd} vs {}",
                dx[i]
            );
        }
        // one weight matrix (the intermediate one) the same way
        let w = &vars[8];
        let dw = flat(g.get(w).unwrap());
        let w0 = flat(w.as_tensor());
        for i in (0..w0.len()).step_by(11) {
            let mut vals = w0.clone();
            let base = w.as_tensor().clone();
            vals[i] += h;
            w.set(&Tensor::from_vec(vals.clone(), base.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let up = loss(x.as_tensor());
            vals[i] -= 2.0 * h;
            w.set(&Tensor::from_vec(vals, base.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let down = loss(x.as_tensor());
            w.set(&Tensor::from_vec(w0.clone(), base.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let fd = (up - down) / (2.0 * f64::from(h));
            assert!(
                (fd - f64::from(dw[i])).abs() < 2e-2 * (1.0 + fd.abs()),
                "dW1[{i}]: finite differences {fd} vs {}",
                dw[i]
            );
        }
    }
}
