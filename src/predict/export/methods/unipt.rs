//! UniPT's graph (docs/method.md §6): every hidden state `X_0 .. X_N` of
//! the frozen backbone projected to width `d`, the last as anchor; per
//! shallower layer the relu'd similarity to the anchor with padded key
//! columns set to 0, normalised by its row sums, plus identity; weighted
//! by a softmax over the layers of per-example confidences (from masked
//! means); added to the anchor through Linear + LayerNorm. The same
//! formulas and epsilons as [`crate::fit::nn::unipt`].
//!
//! Padding: the backbone's hidden states in this graph are not 0 at padded
//! tokens as the cached states are, but nothing at a real token reads a
//! padded row here: padded key columns are zeroed before the row sums, the
//! means count real tokens only, and the head pools real tokens (or the
//! first). Without a padding mask (images) every token is real.

use super::super::body::Body;
use crate::extract::onnx::builder::{attr_int, attr_ints, Graph, Tensors};
use crate::fit::nn::linear::PROJ_LN_EPS;
use crate::fit::nn::unipt::OUT_LN_EPS;
use crate::Result;

/// Epsilon added to the similarity's row sums.
const ROW_EPS: f32 = 1e-8;

/// The mean of `x` (`[B, S, d]`) over the real tokens of `mask` (`[B, S,
/// 1]`; their count at least 1, as the candle model's), or over every
/// token without a mask: `[B, d]`.
fn mean(g: &mut Graph, x: &str, mask: Option<&str>) -> String {
    match mask {
        Some(m) => {
            let xm = g.node("Mul", &[x, m], vec![]);
            let sum = g.reduce_sum(&xm, 1, false);
            let count = g.reduce_sum(m, 1, false);
            let one = g.const_f32_once("unipt/one", 1.0);
            let count = g.node("Max", &[&count, &one], vec![]);
            g.node("Div", &[&sum, &count], vec![])
        }
        None => g.node(
            "ReduceMean",
            &[x],
            vec![attr_ints("axes", &[1]), attr_int("keepdims", 0)],
        ),
    }
}

/// UniPT on `body` with the trained tensors `trained` (`unipt.*`), side
/// width `d`: returns `O` `[B, S, d]` and `d`.
pub(super) fn build(body: &mut dyn Body, trained: &Tensors, d: usize) -> Result<(String, usize)> {
    let (n, big_d) = (body.layers(), body.width());
    let mask = body.mask();

    // A_j = LayerNorm(W_j X_j + b_j), j = 0 .. N; A_N is the anchor
    let mut a = Vec::with_capacity(n + 1);
    for j in 0..=n {
        let x = body.hidden(j)?;
        let g = body.g();
        let y = g.linear(trained, &format!("unipt.proj.{j}"), big_d, d, &x)?;
        let ln = format!("unipt.proj_ln.{j}");
        a.push(g.layer_norm(trained, &ln, d, PROJ_LN_EPS as f32, &y, None)?);
    }
    let g = body.g();
    let anchor = a[n].clone();
    let mask = mask.as_deref();
    // the key mask [B, 1, S]
    let keys = mask.map(|m| g.node("Transpose", &[m], vec![attr_ints("perm", &[0, 2, 1])]));
    let anchor_mean = mean(g, &anchor, mask);
    let ax1 = g.axes(&[1]);
    let row_eps = g.const_f32_once("unipt/row_eps", ROW_EPS);
    let mut mixed = Vec::with_capacity(n);
    let mut conf = Vec::with_capacity(n);
    for aj in &a[..n] {
        // W_j = rownorm(relu(A_N A_j^T) * keymask) [B, S, S]
        let at = g.node("Transpose", &[aj], vec![attr_ints("perm", &[0, 2, 1])]);
        let sim = g.node("MatMul", &[&anchor, &at], vec![]);
        let mut sim = g.node("Relu", &[&sim], vec![]);
        if let Some(k) = &keys {
            sim = g.node("Mul", &[&sim, k], vec![]);
        }
        let rows = g.reduce_sum(&sim, 2, true);
        let rows = g.node("Add", &[&rows, &row_eps], vec![]);
        let w = g.node("Div", &[&sim, &rows], vec![]);
        // M_j = W_j A_j + A_j, stacked on a new axis 1
        let wa = g.node("MatMul", &[&w, aj], vec![]);
        let mj = g.node("Add", &[&wa, aj], vec![]);
        mixed.push(g.node("Unsqueeze", &[&mj, &ax1], vec![]));
        // c_j = w_c . (mean A_N * mean A_j) + b_c [B, 1]
        let mean_j = mean(g, aj, mask);
        let prod = g.node("Mul", &[&anchor_mean, &mean_j], vec![]);
        conf.push(g.linear(trained, "unipt.confidence", d, 1, &prod)?);
    }
    // w = softmax over j, [B, N] -> [B, N, 1, 1]
    let conf: Vec<&str> = conf.iter().map(String::as_str).collect();
    let c = g.node("Concat", &conf, vec![attr_int("axis", 1)]);
    let w = g.node("Softmax", &[&c], vec![attr_int("axis", -1)]);
    let ax23 = g.axes(&[2, 3]);
    let w = g.node("Unsqueeze", &[&w, &ax23], vec![]);
    let mixed: Vec<&str> = mixed.iter().map(String::as_str).collect();
    let stacked = g.node("Concat", &mixed, vec![attr_int("axis", 1)]); // [B, N, S, d]
    let weighted = g.node("Mul", &[&stacked, &w], vec![]);
    let agg = g.reduce_sum(&weighted, 1, false);
    // O = A_N + LayerNorm(W_o agg + b_o)
    let o = g.linear(trained, "unipt.out", d, d, &agg)?;
    let o = g.layer_norm(trained, "unipt.out_ln", d, OUT_LN_EPS as f32, &o, None)?;
    let out = g.node("Add", &[&anchor, &o], vec![]);
    Ok((out, d))
}
