//! A whole BERT encoder layer as one CPU op with a hand-written backward
//! pass ([`BertLayerOp`]).
//!
//! Composed from candle ops, a BERT layer is about forty graph nodes: each
//! allocates its output, the backward pass zero-fills and accumulates a
//! gradient buffer per node, per-head attention needs transposed copies,
//! and softmax, GELU, dropout and the residual adds are separate passes over
//! memory. Here the forward pass is nine products (through [`super::gemm`],
//! on strided views: no transposed copies) and a few fused passes, it keeps
//! exactly what the backward pass needs, and the backward pass computes the
//! input's gradient and, for a trained layer, the weights' gradients in one
//! go. Frozen layers (SHERL's late layer, the linear probe's) never compute
//! a weight gradient.
//!
//! The formulas are those of [`crate::fit::nn::bert_layer::BertLayer::forward_composed`]
//! (post-LayerNorm BERT, `modeling_bert.py`), dropout masks drawn in the same
//! order from the same generator, so a seeded run gives the same numbers up
//! to float rounding; tests compare values and gradients with the composed
//! layer and finite differences.
//!
//! Products into freshly zeroed buffers are asked to accumulate: the same
//! values (`0 + x`), but OpenBLAS, told to overwrite (beta = 0), clears the
//! destination itself first, a second pass over memory already zero.
//!
//! The weights travel as one flat vector in [`PACKED_ORDER`]: a trained
//! layer passes them as the op's second input (the concatenation of its
//! parameters, so candle routes each slice of the flat gradient back to its
//! parameter); a frozen layer's op holds them.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor};

use super::fused::{contiguous_f32, lane_sums_ln_back, row_stats};
use super::gemm::{matmul, View};
use crate::backbone::Activation;

/// The order of the weights in the flat vector: query, key and value
/// weights (`[D, D]` each, so together `[3D, D]`), their biases, attention
/// output weight and bias, its LayerNorm weight and bias, intermediate
/// `[F, D]` and bias, output `[D, F]` and bias, output LayerNorm weight and
/// bias.
pub const PACKED_ORDER: &str = "wq wk wv bq bk bv wo bo ln1.w ln1.b w1 b1 w2 b2 ln2.w ln2.b";

/// Offsets of each weight in the flat vector.
#[derive(Debug, Clone, Copy)]
struct Offsets {
    d: usize,
    f: usize,
    wqkv: usize,
    bqkv: usize,
    wo: usize,
    bo: usize,
    g1: usize,
    be1: usize,
    w1: usize,
    b1: usize,
    w2: usize,
    b2: usize,
    g2: usize,
    be2: usize,
    len: usize,
}

impl Offsets {
    fn new(d: usize, f: usize) -> Offsets {
        let wqkv = 0;
        let bqkv = wqkv + 3 * d * d;
        let wo = bqkv + 3 * d;
        let bo = wo + d * d;
        let g1 = bo + d;
        let be1 = g1 + d;
        let w1 = be1 + d;
        let b1 = w1 + f * d;
        let w2 = b1 + f;
        let b2 = w2 + d * f;
        let g2 = b2 + d;
        let be2 = g2 + d;
        Offsets {
            d,
            f,
            wqkv,
            bqkv,
            wo,
            bo,
            g1,
            be1,
            w1,
            b1,
            w2,
            b2,
            g2,
            be2,
            len: be2 + d,
        }
    }

    /// The query, key and value projections, `D -> 3D`.
    fn qkv(&self) -> Dense {
        Dense {
            w: self.wqkv,
            b: self.bqkv,
            out: 3 * self.d,
            inp: self.d,
        }
    }

    /// The attention sub-layer's tail: output projection `D -> D`, LN1.
    fn attention_tail(&self) -> Tail {
        Tail {
            dense: Dense {
                w: self.wo,
                b: self.bo,
                out: self.d,
                inp: self.d,
            },
            g: self.g1,
            be: self.be1,
        }
    }

    /// The intermediate projection, `D -> F`.
    fn ffn_in(&self) -> Dense {
        Dense {
            w: self.w1,
            b: self.b1,
            out: self.f,
            inp: self.d,
        }
    }

    /// The FFN sub-layer's tail: output projection `F -> D`, LN2.
    fn output_tail(&self) -> Tail {
        Tail {
            dense: Dense {
                w: self.w2,
                b: self.b2,
                out: self.d,
                inp: self.f,
            },
            g: self.g2,
            be: self.be2,
        }
    }
}

/// A dense map `y = x W^T + b` in the flat weights: `W` `[out, in]` at
/// offset `w`, `b` `[out]` at offset `b`.
#[derive(Debug, Clone, Copy)]
struct Dense {
    w: usize,
    b: usize,
    out: usize,
    inp: usize,
}

impl Dense {
    /// `x W^T + b` for the `n` rows of `x` (`[n, in]`): `[n, out]`,
    /// starting from the bias.
    #[inline(always)]
    fn forward(
        self,
        x: &[f32],
        n: usize,
        weights: &[f32],
        t: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let mut y = bias_rows(&weights[self.b..self.b + self.out], n);
        matmul(
            &mut y,
            View::dense(n, self.out),
            x,
            View::dense(n, self.inp),
            weights,
            View::rows(self.w, self.out, self.inp, self.inp).t(),
            1.0,
            true,
            t,
        )?;
        Ok(y)
    }

    /// The backward pass for `n` rows from `dy` (`[n, out]`): with `dw`
    /// (the flat weight gradients and the kept input `x` of the forward
    /// product), `db += column sums of dy` and `dW += dy^T x`; then, with
    /// `dx`, `dx += dy W` (`[n, in]`).
    #[inline(always)]
    fn backward(
        self,
        dy: &[f32],
        n: usize,
        weights: &[f32],
        dw: Option<(&mut [f32], &[f32])>,
        dx: Option<&mut [f32]>,
        t: usize,
    ) -> candle_core::Result<()> {
        if let Some((dw, x)) = dw {
            col_sums(dy, &mut dw[self.b..self.b + self.out]);
            matmul(
                &mut dw[self.w..self.w + self.out * self.inp],
                View::dense(self.out, self.inp),
                dy,
                View::dense(n, self.out).t(),
                x,
                View::dense(n, self.inp),
                1.0,
                true,
                t,
            )?;
        }
        if let Some(dx) = dx {
            matmul(
                dx,
                View::dense(n, self.inp),
                dy,
                View::dense(n, self.out),
                weights,
                View::rows(self.w, self.out, self.inp, self.inp),
                1.0,
                true,
                t,
            )?;
        }
        Ok(())
    }
}

/// The tail of a sub-layer, `LN(dropout(x W^T + b) + r)` with the
/// residual `r`: its dense map, and the offsets of its LayerNorm's weight
/// and bias.
#[derive(Debug, Clone, Copy)]
struct Tail {
    dense: Dense,
    g: usize,
    be: usize,
}

/// What the backward pass of a [`Tail`] reads: its dropout mask, and its
/// LayerNorm's normalised input and reciprocal standard deviations kept
/// by the forward pass.
struct TailKept<'a> {
    mask: &'a Option<Vec<f32>>,
    xhat: &'a [f32],
    rstd: &'a [f32],
}

/// Number of values in the flat weight vector of a layer of width `d` and
/// intermediate width `f`.
pub fn packed_len(d: usize, f: usize) -> usize {
    Offsets::new(d, f).len
}

/// Dropout masks of one forward pass (0 or `1 / (1 - p)` each), `None`
/// where the probability is 0 or the pass evaluates.
#[derive(Debug, Clone, Default)]
pub struct Masks {
    /// On the attention probabilities, `[B, H, S, S]`.
    pub attn: Option<Vec<f32>>,
    /// After the attention output projection, `[B, S, D]`.
    pub attn_out: Option<Vec<f32>>,
    /// After the output projection, `[B, S, D]`.
    pub out: Option<Vec<f32>>,
}

/// What the forward pass keeps for the backward pass.
struct Saved {
    qkv: Vec<f32>,
    probs: Vec<f32>,
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    pre: Vec<f32>,
    /// What the activation's derivative needs ([`activate`]).
    kept: Vec<f32>,
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
    /// Only a trained layer needs these (for its weight gradients).
    trained: Option<TrainedSaved>,
}

/// The inputs of the weight products that only the forward pass computes,
/// for a trained layer (the layer's input and weights are read from the
/// op's arguments in the backward pass, not copied).
struct TrainedSaved {
    ctx: Vec<f32>,
    h1: Vec<f32>,
    act: Vec<f32>,
}

/// The input's gradient and the flat weight gradient, each where asked for.
type Grads = (Option<Vec<f32>>, Option<Vec<f32>>);

/// One BERT layer forward (and backward) on `x` `[B * S, D]`.
pub struct BertLayerOp {
    /// Batch size.
    pub batch: usize,
    /// Sequence length (padded).
    pub seq: usize,
    /// Width `D`.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// Intermediate width `F`.
    pub ffn: usize,
    /// Activation of the intermediate layer.
    pub act: Activation,
    /// LayerNorm epsilon.
    pub eps: f32,
    /// Additive attention bias per key, `[B, S]` (0 real, -1e9 padding),
    /// or per head, query and key, `[B, H, S, S]` (MPNet's relative
    /// positions added); a constant: no gradient flows to it. Shared: every
    /// layer of a forward pass holds the same values (see
    /// `bert_layer::shared_bias`).
    pub key_bias: Arc<Vec<f32>>,
    /// Dropout masks.
    pub masks: Masks,
    /// The frozen weights ([`CustomOp1`]); `None` when the weights are the
    /// op's second input ([`CustomOp2`]).
    pub frozen: Option<Arc<Vec<f32>>>,
    /// Whether to keep what the backward pass needs.
    pub keep: bool,
    saved: Mutex<Option<Saved>>,
}

fn err(msg: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(format!("sherl fused BERT layer: {}", msg.into()))
}

fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// Per row of `v` (`[rows, d]`), LayerNorm with weight `g` and bias `b`
/// into `out`; keeps `xhat` and `1 / sqrt(var + eps)`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn layer_norm_rows(
    v: &[f32],
    d: usize,
    g: &[f32],
    b: &[f32],
    eps: f32,
    out: &mut [f32],
    xhat: &mut [f32],
    rstd: &mut [f32],
) {
    for (r, ((vr, or), xr)) in v
        .chunks_exact(d)
        .zip(out.chunks_exact_mut(d))
        .zip(xhat.chunks_exact_mut(d))
        .enumerate()
    {
        let (mean, rs) = row_stats(vr, eps);
        rstd[r] = rs;
        for k in 0..d {
            let xh = (vr[k] - mean) * rs;
            xr[k] = xh;
            or[k] = xh * g[k] + b[k];
        }
    }
}

/// LayerNorm backward in place: `dy` becomes `dL/dx`; `dg`, `db` accumulate
/// when given.
#[inline(always)]
fn layer_norm_back(
    dy: &mut [f32],
    d: usize,
    xhat: &[f32],
    rstd: &[f32],
    g: &[f32],
    mut dgb: Option<(&mut [f32], &mut [f32])>,
) {
    for (r, (dr, xr)) in dy.chunks_exact_mut(d).zip(xhat.chunks_exact(d)).enumerate() {
        if let Some((dg, db)) = dgb.as_mut() {
            for k in 0..d {
                dg[k] += dr[k] * xr[k];
                db[k] += dr[k];
            }
        }
        let (s1, s2) = lane_sums_ln_back(dr, g, xr);
        let (m1, m2) = (s1 / d as f32, s2 / d as f32);
        let rs = rstd[r];
        for k in 0..d {
            dr[k] = rs * (dr[k] * g[k] - m1 - xr[k] * m2);
        }
    }
}

/// `e^x` for `x <= 0` (larger `x` is clamped to 0) in plain arithmetic
/// and bit operations, so that loops over it vectorise where libm's `expf`
/// is a call per element (4 % of a late-layer step, in the GELU's erf and
/// derivative and in the softmax): `x = k ln 2 + r` with `|r| <= ln 2 / 2`
/// (Cody and Waite's two-part ln 2, so `k ln 2` is subtracted exactly),
/// `e^r` by its Taylor polynomial of degree 7 (truncation below 6e-9
/// relative), `2^k` written into the exponent bits. Within 2 ulp of libm
/// (`exp_neg_is_close_to_libm`); exactly 0 below -87.3, where `e^x` leaves
/// the normal floats (a masked key's probability stays 0).
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4; // 355 / 512: k * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const MIN: f32 = -87.33;
    let xc = x.clamp(MIN, 0.0);
    let k = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    if x < MIN {
        0.0
    } else {
        p * scale
    }
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// The error function, Abramowitz and Stegun 7.1.26 (absolute error below
/// 1.5e-7 in exact arithmetic, 5.3e-7 in f32 against libm; one `exp`): a quarter of the time of libm's `erff`, which the
/// exact GELU spent 5 % of a SHERL step in.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_neg(-a * a);
    y.copysign(x)
}

/// `Phi(x)`, the standard normal CDF the exact GELU multiplies `x` by.
#[inline(always)]
fn gelu_cdf(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// The activation of `x`, and what its derivative needs (kept from the
/// forward pass): for the exact GELU `Phi(x)`, for the tanh form the tanh,
/// for ReLU nothing.
#[inline(always)]
fn activate(act: Activation, x: f32) -> (f32, f32) {
    match act {
        Activation::Gelu => {
            let cdf = gelu_cdf(x);
            (x * cdf, cdf)
        }
        Activation::GeluTanh => {
            let t = (SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x)).tanh();
            (0.5 * x * (1.0 + t), t)
        }
        Activation::Relu => (x.max(0.0), 0.0),
    }
}

/// The derivative at `x`, given what [`activate`] kept.
#[inline(always)]
fn activate_grad(act: Activation, x: f32, kept: f32) -> f32 {
    match act {
        Activation::Gelu => kept + x * INV_SQRT_2PI * exp_neg(-0.5 * x * x),
        Activation::GeluTanh => {
            let du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x);
            0.5 * (1.0 + kept) + 0.5 * x * (1.0 - kept * kept) * du
        }
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
    }
}

/// `rows` copies of `bias`, `[rows, bias.len()]`: the starting value of a
/// product that accumulates into it (one pass instead of zeroing and then
/// adding the bias).
#[inline(always)]
fn bias_rows(bias: &[f32], rows: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(rows * bias.len());
    for _ in 0..rows {
        v.extend_from_slice(bias);
    }
    v
}

/// Column sums of `v` (`[rows, acc.len()]`) added to `acc`.
#[inline(always)]
fn col_sums(v: &[f32], acc: &mut [f32]) {
    for row in v.chunks_exact(acc.len()) {
        for (a, x) in acc.iter_mut().zip(row) {
            *a += x;
        }
    }
}

/// The largest value of `v` (`-inf` if empty) with 16 running maxima,
/// so that the loop vectorises; a maximum does not depend on the order it
/// is taken in, so this is the sequential loop's value.
#[inline(always)]
fn lane_max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let mut m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for a in acc {
        m = m.max(a);
    }
    m
}

/// `v` times the dropout mask when there is one (a new buffer), else `v`.
#[inline(always)]
fn masked<'a>(v: &'a [f32], mask: &Option<Vec<f32>>) -> Cow<'a, [f32]> {
    match mask {
        Some(m) => Cow::Owned(v.iter().zip(m).map(|(x, k)| x * k).collect()),
        None => Cow::Borrowed(v),
    }
}

#[inline(always)]
fn mul_mask(v: &mut [f32], mask: &Option<Vec<f32>>) {
    if let Some(m) = mask {
        for (x, k) in v.iter_mut().zip(m) {
            *x *= k;
        }
    }
}

impl BertLayerOp {
    /// An op for a batch of `batch` sequences of `seq` tokens; `frozen`
    /// holds the flat weights of a frozen layer (else they are the op's
    /// second input), `keep` whether a backward pass follows.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        batch: usize,
        seq: usize,
        hidden: usize,
        heads: usize,
        ffn: usize,
        act: Activation,
        eps: f32,
        key_bias: impl Into<Arc<Vec<f32>>>,
        masks: Masks,
        frozen: Option<Arc<Vec<f32>>>,
        keep: bool,
    ) -> Self {
        BertLayerOp {
            batch,
            seq,
            hidden,
            heads,
            ffn,
            act,
            eps,
            key_bias: key_bias.into(),
            masks,
            frozen,
            keep,
            saved: Mutex::new(None),
        }
    }

    fn check(&self, x: &[f32], w: &[f32]) -> candle_core::Result<()> {
        let (b, s, d, h) = (self.batch, self.seq, self.hidden, self.heads);
        if h == 0 || d % h != 0 {
            return Err(err(format!("width {d} is not a multiple of {h} heads")));
        }
        if x.len() != b * s * d {
            return Err(err(format!(
                "input of {} values, want {b}x{s}x{d}",
                x.len()
            )));
        }
        if w.len() != packed_len(d, self.ffn) {
            return Err(err(format!(
                "{} weights, want {} ({PACKED_ORDER})",
                w.len(),
                packed_len(d, self.ffn)
            )));
        }
        if self.key_bias.len() != b * s && self.key_bias.len() != b * h * s * s {
            return Err(err("attention bias is neither [B, S] nor [B, H, S, S]"));
        }
        let n = b * s;
        for (m, len, what) in [
            (&self.masks.attn, b * h * s * s, "attention"),
            (&self.masks.attn_out, n * d, "attention output"),
            (&self.masks.out, n * d, "output"),
        ] {
            if m.as_ref().is_some_and(|m| m.len() != len) {
                return Err(err(format!("{what} dropout mask has the wrong size")));
            }
        }
        Ok(())
    }

    /// `trained`: the weights are the op's input and get gradients.
    fn forward(&self, x: &[f32], w: &[f32], trained: bool) -> candle_core::Result<Vec<f32>> {
        #[cfg(target_arch = "x86_64")]
        if super::simd::avx2_fma() {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX2 and FMA, checked at run time.
            return unsafe { self.forward_avx2(x, w, trained) };
        }
        self.forward_impl(x, w, trained)
    }

    /// [`BertLayerOp::forward`] compiled for AVX2 (see [`super::simd`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn forward_avx2(&self, x: &[f32], w: &[f32], trained: bool) -> candle_core::Result<Vec<f32>> {
        self.forward_impl(x, w, trained)
    }

    #[inline(always)]
    fn forward_impl(&self, x: &[f32], w: &[f32], trained: bool) -> candle_core::Result<Vec<f32>> {
        self.check(x, w)?;
        let (n, t) = (self.batch * self.seq, threads());
        let o = Offsets::new(self.hidden, self.ffn);

        // qkv = x Wqkv^T + bqkv, [N, 3D]
        let qkv = o.qkv().forward(x, n, w, t)?;
        // per sequence and head: softmax(q k^T * scale + bias) (dropped) v
        let (probs, ctx) = self.attention_forward(&qkv)?;
        // h1 = LN(dropout(ctx Wo^T + bo) + x)
        let attention = o.attention_tail();
        let (h1, xhat1, rstd1) =
            self.tail_forward(attention, &ctx, x, &self.masks.attn_out, w, t)?;
        // intermediate: act(h1 W1^T + b1), [N, F]
        let pre = o.ffn_in().forward(&h1, n, w, t)?;
        let (act, kept) = self.activation_forward(&pre);
        // y = LN(dropout(act W2^T + b2) + h1)
        let (y, xhat2, rstd2) =
            self.tail_forward(o.output_tail(), &act, &h1, &self.masks.out, w, t)?;

        if self.keep {
            let saved = Saved {
                qkv,
                probs,
                xhat1,
                rstd1,
                pre,
                kept,
                xhat2,
                rstd2,
                trained: trained.then_some(TrainedSaved { ctx, h1, act }),
            };
            *self.saved.lock().map_err(|_| err("saved state poisoned"))? = Some(saved);
        }
        Ok(y)
    }

    /// The attention probabilities `[B, H, S, S]` (before their dropout)
    /// and the context `[N, D]` from the packed `qkv` `[N, 3D]`.
    #[inline(always)]
    fn attention_forward(&self, qkv: &[f32]) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let (b, s, d, h) = (self.batch, self.seq, self.hidden, self.heads);
        let (n, hd) = (b * s, d / h);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut probs = vec![0f32; b * h * s * s];
        let mut dropped = vec![0f32; s * s];
        let mut ctx = vec![0f32; n * d];
        for bi in 0..b {
            for hi in 0..h {
                let blk = (bi * h + hi) * s * s;
                let q = View::rows(bi * s * 3 * d + hi * hd, s, hd, 3 * d);
                let k = View {
                    offset: q.offset + d,
                    ..q
                };
                let v = View {
                    offset: q.offset + 2 * d,
                    ..q
                };
                let p = &mut probs[blk..blk + s * s];
                matmul(p, View::dense(s, s), qkv, q, qkv, k.t(), scale, true, 1)?;
                let full = self.key_bias.len() == b * h * s * s;
                for (r, row) in p.chunks_exact_mut(s).enumerate() {
                    let kb = if full {
                        &self.key_bias[blk + r * s..blk + (r + 1) * s]
                    } else {
                        &self.key_bias[bi * s..(bi + 1) * s]
                    };
                    for (x, bb) in row.iter_mut().zip(kb) {
                        *x += bb;
                    }
                    let max = lane_max(row);
                    for x in row.iter_mut() {
                        *x = exp_neg(*x - max);
                    }
                    let mut sum = 0f32;
                    for x in row.iter() {
                        sum += *x;
                    }
                    let inv = 1.0 / sum;
                    for x in row.iter_mut() {
                        *x *= inv;
                    }
                }
                let pd: &[f32] = match &self.masks.attn {
                    Some(m) => {
                        for ((y, x), k) in
                            dropped.iter_mut().zip(p.iter()).zip(&m[blk..blk + s * s])
                        {
                            *y = x * k;
                        }
                        &dropped
                    }
                    None => p,
                };
                matmul(
                    &mut ctx,
                    View::rows(bi * s * d + hi * hd, s, hd, d),
                    pd,
                    View::dense(s, s),
                    qkv,
                    v,
                    1.0,
                    true,
                    1,
                )?;
            }
        }
        Ok((probs, ctx))
    }

    /// `LN(dropout(x W^T + b) + r)` of `tail` for the rows of `x`, dropout
    /// by `mask`: the output, and the LayerNorm's normalised input and
    /// reciprocal standard deviations (for the backward pass).
    #[inline(always)]
    fn tail_forward(
        &self,
        tail: Tail,
        x: &[f32],
        r: &[f32],
        mask: &Option<Vec<f32>>,
        w: &[f32],
        t: usize,
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (n, d) = (self.batch * self.seq, tail.dense.out);
        let mut a = tail.dense.forward(x, n, w, t)?;
        mul_mask(&mut a, mask);
        for (y, rv) in a.iter_mut().zip(r) {
            *y += rv;
        }
        let mut y = vec![0f32; n * d];
        let mut xhat = vec![0f32; n * d];
        let mut rstd = vec![0f32; n];
        layer_norm_rows(
            &a,
            d,
            &w[tail.g..tail.g + d],
            &w[tail.be..tail.be + d],
            self.eps,
            &mut y,
            &mut xhat,
            &mut rstd,
        );
        Ok((y, xhat, rstd))
    }

    /// The activation of the intermediate layer's `pre`, and what its
    /// derivative needs ([`activate`]; empty for ReLU).
    #[inline(always)]
    fn activation_forward(&self, pre: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let kind = self.act;
        let act: Vec<f32>;
        let kept: Vec<f32>;
        if kind == Activation::Relu {
            act = pre.iter().map(|&p| activate(kind, p).0).collect();
            kept = Vec::new();
        } else if kind == Activation::Gelu {
            // The same values as `activate`, in two loops that vectorise
            // (and write each value once: a zero-filled buffer written by
            // a loop of the AVX2 build was no faster, measured).
            let (mut k, mut a) = (Vec::with_capacity(pre.len()), Vec::with_capacity(pre.len()));
            k.extend(pre.iter().map(|&p| gelu_cdf(p)));
            a.extend(pre.iter().zip(&k).map(|(&p, &c)| p * c));
            (kept, act) = (k, a);
        } else {
            (act, kept) = pre.iter().map(|&p| activate(kind, p)).unzip();
        }
        (act, kept)
    }

    /// `dL/dx` when `want_dx` and `dL/dweights` (flat, [`PACKED_ORDER`])
    /// when `x` (the layer's input, needed for the first product's weight
    /// gradient) is given; `w` the weights of the forward pass.
    fn backward(
        &self,
        dy: &[f32],
        w: &[f32],
        x: Option<&[f32]>,
        want_dx: bool,
    ) -> candle_core::Result<Grads> {
        #[cfg(target_arch = "x86_64")]
        if super::simd::avx2_fma() {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX2 and FMA, checked at run time.
            return unsafe { self.backward_avx2(dy, w, x, want_dx) };
        }
        self.backward_impl(dy, w, x, want_dx)
    }

    /// [`BertLayerOp::backward`] compiled for AVX2 (see [`super::simd`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn backward_avx2(
        &self,
        dy: &[f32],
        w: &[f32],
        x: Option<&[f32]>,
        want_dx: bool,
    ) -> candle_core::Result<Grads> {
        self.backward_impl(dy, w, x, want_dx)
    }

    #[inline(always)]
    fn backward_impl(
        &self,
        dy: &[f32],
        w: &[f32],
        x: Option<&[f32]>,
        want_dx: bool,
    ) -> candle_core::Result<Grads> {
        let sv = self
            .saved
            .lock()
            .map_err(|_| err("saved state poisoned"))?
            .take()
            .ok_or_else(|| err("backward without a kept forward pass (or twice)"))?;
        let (n, d, t) = (self.batch * self.seq, self.hidden, threads());
        let o = Offsets::new(d, self.ffn);
        if dy.len() != n * d || w.len() != o.len || x.is_some_and(|x| x.len() != n * d) {
            return Err(err("gradient, weights or input of the wrong size"));
        }
        // Weight gradients need the kept inputs of the products.
        let mut dw = match (&sv.trained, x) {
            (Some(tr), Some(x)) => Some((vec![0f32; o.len], tr, x)),
            (None, Some(_)) => return Err(err("weight gradients of a frozen layer")),
            _ => None,
        };
        if dw.is_none() && !want_dx {
            return Ok((None, None));
        }

        // output LayerNorm; its input's gradient flows on into h1 through
        // the residual and, through the dropout, into the output projection
        let mut dh1 = dy.to_vec();
        let kept = TailKept {
            mask: &self.masks.out,
            xhat: &sv.xhat2,
            rstd: &sv.rstd2,
        };
        let grads = dw
            .as_mut()
            .map(|(g, tr, _)| (g.as_mut_slice(), tr.act.as_slice()));
        let mut dpre = self.tail_backward(o.output_tail(), &mut dh1, kept, w, grads, t)?;
        self.activation_backward(&mut dpre, &sv.pre, &sv.kept);
        let grads = dw
            .as_mut()
            .map(|(g, tr, _)| (g.as_mut_slice(), tr.h1.as_slice()));
        o.ffn_in().backward(&dpre, n, w, grads, Some(&mut dh1), t)?;
        drop(dpre);

        // attention LayerNorm and output projection
        let kept = TailKept {
            mask: &self.masks.attn_out,
            xhat: &sv.xhat1,
            rstd: &sv.rstd1,
        };
        let grads = dw
            .as_mut()
            .map(|(g, tr, _)| (g.as_mut_slice(), tr.ctx.as_slice()));
        let dctx = self.tail_backward(o.attention_tail(), &mut dh1, kept, w, grads, t)?;
        // dx is dh1 (the residual) plus what flows back through q, k, v
        let mut dx = want_dx.then_some(dh1);

        // attention
        let dqkv = self.attention_backward(&sv, &dctx)?;
        drop(dctx);
        let grads = dw.as_mut().map(|(g, _, x)| (g.as_mut_slice(), *x));
        o.qkv().backward(&dqkv, n, w, grads, dx.as_deref_mut(), t)?;
        Ok((dx, dw.map(|(dw, _, _)| dw)))
    }

    /// Backward through `tail`, `LN(dropout(x W^T + b) + r)`: `g` holds
    /// the gradient of its output and becomes, through the LayerNorm, the
    /// gradient of the residual `r`; returned is the gradient of `x`. With
    /// `dw`, the LayerNorm's and the dense map's weight gradients are
    /// added (see [`Dense::backward`]).
    #[inline(always)]
    fn tail_backward(
        &self,
        tail: Tail,
        g: &mut [f32],
        kept: TailKept<'_>,
        w: &[f32],
        mut dw: Option<(&mut [f32], &[f32])>,
        t: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let (n, d) = (self.batch * self.seq, tail.dense.out);
        {
            let dgb = dw.as_mut().map(|(dw, _)| {
                let (head, rest) = dw.split_at_mut(tail.be);
                (&mut head[tail.g..tail.g + d], &mut rest[..d])
            });
            layer_norm_back(g, d, kept.xhat, kept.rstd, &w[tail.g..tail.g + d], dgb);
        }
        let dz = masked(g, kept.mask);
        let mut dx = vec![0f32; n * tail.dense.inp];
        tail.dense.backward(&dz, n, w, dw, Some(&mut dx), t)?;
        Ok(dx)
    }

    /// `dpre` (the gradient of the activation's output) times the
    /// activation's derivative at `pre` (`kept`: see [`activate`]).
    #[inline(always)]
    fn activation_backward(&self, dpre: &mut [f32], pre: &[f32], kept: &[f32]) {
        if self.act == Activation::Gelu && kept.len() == dpre.len() {
            // The same values as below, in a loop that vectorises.
            for ((g, &p), &k) in dpre.iter_mut().zip(pre).zip(kept) {
                *g *= activate_grad(Activation::Gelu, p, k);
            }
        } else {
            for (i, (g, &p)) in dpre.iter_mut().zip(pre).enumerate() {
                *g *= activate_grad(self.act, p, kept.get(i).copied().unwrap_or(0.0));
            }
        }
    }

    /// The gradient of the packed `qkv` `[N, 3D]` from the context's
    /// `dctx` `[N, D]`, through the attention of every sequence and head.
    #[inline(always)]
    fn attention_backward(&self, sv: &Saved, dctx: &[f32]) -> candle_core::Result<Vec<f32>> {
        let (b, s, d, h) = (self.batch, self.seq, self.hidden, self.heads);
        let (n, hd) = (b * s, d / h);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut dqkv = vec![0f32; n * 3 * d];
        let mut dp = vec![0f32; s * s];
        let mut pd = vec![0f32; s * s];
        for bi in 0..b {
            for hi in 0..h {
                let blk = (bi * h + hi) * s * s;
                let q = View::rows(bi * s * 3 * d + hi * hd, s, hd, 3 * d);
                let k = View {
                    offset: q.offset + d,
                    ..q
                };
                let v = View {
                    offset: q.offset + 2 * d,
                    ..q
                };
                let dc = View::rows(bi * s * d + hi * hd, s, hd, d);
                let p = &sv.probs[blk..blk + s * s];
                let mask = self.masks.attn.as_ref().map(|m| &m[blk..blk + s * s]);
                let pdv: &[f32] = match mask {
                    Some(m) => {
                        for ((y, x), k) in pd.iter_mut().zip(p).zip(m) {
                            *y = x * k;
                        }
                        &pd
                    }
                    None => p,
                };
                // dv = pd^T dctx
                matmul(
                    &mut dqkv,
                    v,
                    pdv,
                    View::dense(s, s).t(),
                    dctx,
                    dc,
                    1.0,
                    true,
                    1,
                )?;
                // d(pd) = dctx v^T, then through the dropout mask
                matmul(
                    &mut dp,
                    View::dense(s, s),
                    dctx,
                    dc,
                    &sv.qkv,
                    v.t(),
                    1.0,
                    false,
                    1,
                )?;
                if let Some(m) = mask {
                    for (g, k) in dp.iter_mut().zip(m) {
                        *g *= k;
                    }
                }
                // softmax backward, times the scale
                for (gr, pr) in dp.chunks_exact_mut(s).zip(p.chunks_exact(s)) {
                    let dot: f32 = gr.iter().zip(pr).map(|(g, p)| g * p).sum();
                    for (g, p) in gr.iter_mut().zip(pr) {
                        *g = p * (*g - dot) * scale;
                    }
                }
                // dq = ds k, dk = ds^T q
                matmul(
                    &mut dqkv,
                    q,
                    &dp,
                    View::dense(s, s),
                    &sv.qkv,
                    k,
                    1.0,
                    true,
                    1,
                )?;
                matmul(
                    &mut dqkv,
                    k,
                    &dp,
                    View::dense(s, s).t(),
                    &sv.qkv,
                    q,
                    1.0,
                    true,
                    1,
                )?;
            }
        }
        Ok(dqkv)
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.batch * self.seq, self.hidden))
    }
}

/// `f` on the values of a contiguous f32 CPU tensor, in place.
fn with_f32<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(contiguous_f32(cpu, layout, what)?),
        _ => Err(err(format!("{what} is not on the CPU"))),
    }
}

impl CustomOp1 for BertLayerOp {
    fn name(&self) -> &'static str {
        "sherl-bert-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "input")?;
        let w = self
            .frozen
            .as_ref()
            .ok_or_else(|| err("a frozen-layer op without its weights"))?;
        let y = self.forward(x, w, false)?;
        Ok((CpuStorage::F32(y), self.out_shape()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let w = self
            .frozen
            .as_ref()
            .ok_or_else(|| err("a frozen-layer op without its weights"))?;
        // A constant input (cached hidden states) needs no gradient.
        let g = g.contiguous()?;
        let (dx, _) = with_f32(&g, "gradient", |dy| {
            self.backward(dy, w, None, x.track_op())
        })?;
        dx.map(|dx| Tensor::from_vec(dx, x.shape(), x.device()))
            .transpose()
    }
}

impl CustomOp2 for BertLayerOp {
    fn name(&self) -> &'static str {
        "sherl-bert-layer-trained"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "input")?;
        let w = contiguous_f32(s2, l2, "weights")?;
        let y = self.forward(x, w, true)?;
        Ok((CpuStorage::F32(y), self.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // The input and the weights are read where they are (nothing
        // writes them between the forward and the backward pass); a
        // constant input (cached hidden states) needs no gradient.
        let g = g.contiguous()?;
        let (dx, dw) = with_f32(&g, "gradient", |dy| {
            with_f32(w, "weights", |wv| {
                with_f32(x, "input", |xv| {
                    self.backward(dy, wv, w.track_op().then_some(xv), x.track_op())
                })
            })
        })?;
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), x.device()))
            .transpose()?;
        // The weights' gradient goes straight to the training step when it
        // collects them (super::direct_grads), else to candle's store.
        let dw = match dw {
            Some(v) => super::direct_grads::offer(w, v)?,
            None => None,
        };
        let dw = dw
            .map(|v| Tensor::from_vec(v, w.shape(), w.device()))
            .transpose()?;
        Ok((dx, dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast error function stays within 1e-6 of libm's (through
    /// candle) on [-6, 6]: the method's 1.5e-7 plus f32 rounding (5.3e-7
    /// measured).
    /// The vectorisable exp is within 2 ulp of libm's on [-87.3, 0] (every
    /// 1e-4), exact at 0, and 0 below the normal floats.
    #[test]
    fn exp_neg_is_close_to_libm() {
        let mut worst = 0f32;
        for i in 0..=873_000 {
            let x = -(i as f32) * 1e-4;
            let (got, want) = (exp_neg(x), x.exp());
            worst = worst.max((got - want).abs() / (want * f32::EPSILON));
        }
        assert!(worst <= 2.0, "largest difference {worst} ulp");
        assert_eq!(exp_neg(0.0), 1.0);
        assert_eq!(exp_neg(-100.0), 0.0);
        assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
    }

    /// The AVX2 build of the op (chosen at run time where the CPU has it,
    /// as on the development and CI machines) computes the baseline build's
    /// values bit for bit: outputs, input and weight gradients, for every
    /// activation, with dropout and a padded key. (On a CPU without AVX2
    /// both sides are the baseline build.)
    #[test]
    fn avx2_build_computes_what_the_baseline_build_does() {
        // 19 keys and a width of 40: full 16-lane chunks and a remainder
        let (b, s, d, h, f) = (2, 19, 40, 4, 72);
        let mut rng = crate::rng::SplitMix64::new(11);
        let mut r = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.symmetric_f32(1.0)).collect() };
        let (x, w, dy) = (r(b * s * d), r(packed_len(d, f)), r(b * s * d));
        let bias: Vec<f32> = (0..b * s)
            .map(|i| if i % s > 15 { -1e9 } else { 0.0 })
            .collect();
        let mut g = crate::rng::SplitMix64::new(12);
        let masks = Masks {
            attn: Some(g.dropout_mask(b * h * s * s, 0.1)),
            attn_out: Some(g.dropout_mask(b * s * d, 0.1)),
            out: Some(g.dropout_mask(b * s * d, 0.1)),
        };
        for act in [Activation::Gelu, Activation::GeluTanh, Activation::Relu] {
            let op = || {
                let bias = bias.clone();
                BertLayerOp::new(b, s, d, h, f, act, 1e-12, bias, masks.clone(), None, true)
            };
            let (fast, base) = (op(), op());
            assert_eq!(
                fast.forward(&x, &w, true).unwrap(),
                base.forward_impl(&x, &w, true).unwrap(),
                "{act:?} y"
            );
            assert_eq!(
                fast.backward(&dy, &w, Some(&x), true).unwrap(),
                base.backward_impl(&dy, &w, Some(&x), true).unwrap(),
                "{act:?} gradients"
            );
        }
    }

    #[test]
    fn erf_is_close_to_libm() {
        let mut worst = 0f32;
        for i in -6000..=6000 {
            let x = i as f32 * 1e-3;
            worst = worst.max((erf(x) - candle_core::cpu::erf::erf_f32(x)).abs());
        }
        assert!(worst < 1e-6, "largest difference {worst}");
    }
}
