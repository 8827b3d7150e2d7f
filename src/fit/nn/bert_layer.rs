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

use super::layer_extras::{LayerExtras, Projection};
use super::ops::{dropout, dropout_mask, softmax, Mode};
use super::{Builder, LayerNorm, Linear};
use crate::backbone::{Activation, BertConfig, LayerNames};
use crate::fit::error::FitError;
use crate::fit::kernels::fused::cpu_f32;
use crate::fit::kernels::fused_layer::{BertLayerOp, Masks};
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
/// in the fused op's order ([`PACKED_ORDER`](crate::fit::kernels::fused_layer::PACKED_ORDER)).
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
        if !layer.trained() && cpu_f32(&layer.attention.query.weight) {
            layer.packed = Some(Arc::new(layer.flat_weights()?.to_vec1::<f32>()?));
        }
        Ok(layer)
    }

    /// A fresh layer of `cfg`'s sizes under `vb`'s prefix, trained in
    /// [`crate::fit::params::Group::New`] as one packed variable (the fused
    /// op's order): every weight matrix uniform with standard deviation
    /// 0.02 (BERT's `initializer_range`, drawn uniform in
    /// ±0.02·sqrt(3)), biases 0, LayerNorms weight 1 and bias 0; the
    /// matrices are drawn in [`PACKED_ORDER`](crate::fit::kernels::fused_layer::PACKED_ORDER).
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
    /// [`PACKED_ORDER`](crate::fit::kernels::fused_layer::PACKED_ORDER) through which the deltas'
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

    /// A layer from its 16 tensors in [`PACKED_ORDER`](crate::fit::kernels::fused_layer::PACKED_ORDER)
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

    /// The 16 weight tensors in [`PACKED_ORDER`](crate::fit::kernels::fused_layer::PACKED_ORDER).
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
    /// [`PACKED_ORDER`](crate::fit::kernels::fused_layer::PACKED_ORDER) (a concatenation: gradients flow
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
        if cpu_f32(x) && cpu_f32(&self.attention.query.weight) {
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
mod tests;
