//! SHERL's graph (docs/method.md §4, steps 1-9 up to the head): the early
//! route over the frozen backbone's hidden states, the restore and the
//! gate, then the backbone's last `K` layers (with `--late-trainable`'s
//! trained weights, which replace the checkpoint's before the graph is
//! built). The same formulas and epsilons as
//! [`crate::fit::nn::consolidation`] and [`crate::fit::nn::restore_gate`],
//! dropout off.
//!
//! The per-token part works on the shallow projections stacked as
//! `[B, S, M-1, d]`: the redundancy is one batched product of the unit rows
//! with their transpose (`[B, S, M-1, M-1]`), the scores one `MatMul` with
//! the scorer's weight, and the weighted sum a `ReduceSum` over the entries.
//!
//! Padding: the cached states `predict` feeds the candle model are 0 at
//! padded tokens, the backbone's hidden states in this graph are not. The
//! graph therefore zeroes `g` at padding (as the candle model does) and
//! gates the masked `X_{N-K}`, so every row of the late layers' input is
//! the candle model's; the late layers mask padded keys, and the head pools
//! real tokens only (or the first token).

use std::path::Path;

use super::super::body::Body;
use crate::extract::onnx::builder::{attr_int, attr_ints, Graph, TensorSource, Tensors};
use crate::fit::error::FitError;
use crate::fit::nn::consolidation::{EPS, PROJ_LN_EPS};
use crate::fit::nn::restore_gate::{GATE_TEMPERATURE, RESTORE_LN_EPS};
use crate::Result;

/// A scalar f32 constant `sherl/{name}`, shared by every use.
fn scalar(g: &mut Graph, name: &str, v: f32) -> String {
    g.const_f32_once(&format!("sherl/{name}"), v)
}

/// Refuse the run's settings unless they make a SHERL model on `n` layers:
/// `K` in `1..=n`, at least two early entries, the last `N-K`.
fn check(early: &[usize], late_layers: usize, n: usize, run: &Path) -> Result<usize> {
    let bad = |message: String| -> crate::Error {
        FitError::BadRun {
            path: run.to_path_buf(),
            message,
        }
        .into()
    };
    if late_layers == 0 || late_layers > n {
        return Err(bad(format!(
            "the run's late_layers {late_layers} is not between 1 and the backbone's {n} layers"
        )));
    }
    let last = n - late_layers;
    if early.len() < 2 || early.last() != Some(&last) || early.iter().any(|&i| i > last) {
        return Err(bad(format!(
            "the run's early layers {early:?} do not make an early route ending with \
             hidden_states.{last} (N - K) of at least 2 entries"
        )));
    }
    Ok(last)
}

/// SHERL on `body` with the trained tensors `trained` (`early.*`,
/// `late.*`): `early` the early-route hidden-state indices (last `N-K`),
/// `late_layers` `K`, `d` the side width. Returns the last late layer's
/// output `[B, S, D]` and `D`.
pub(super) fn build(
    body: &mut dyn Body,
    trained: &Tensors,
    early: &[usize],
    late_layers: usize,
    d: usize,
    run: &Path,
) -> Result<(String, usize)> {
    let (n, big_d) = (body.layers(), body.width());
    let last = check(early, late_layers, n, run)?;
    let m = early.len();
    let mask = body.mask();

    // step 1: F_j = LayerNorm(W_j x_j + b_j), each [B, S, d]
    let mut f = Vec::with_capacity(m);
    for (j, &i) in early.iter().enumerate() {
        let x = body.hidden(i)?;
        let g = body.g();
        let y = g.linear(trained, &format!("early.proj.{j}"), big_d, d, &x)?;
        let ln = format!("early.proj_ln.{j}");
        f.push(g.layer_norm(trained, &ln, d, PROJ_LN_EPS as f32, &y, None)?);
    }
    let x_last = body.hidden(last)?;
    let g = body.g();

    // step 2: the shallow set E [B, S, M-1, d] and the guide e [B, S, 1, d]
    let ax2 = g.axes(&[2]);
    let stacked: Vec<String> = f
        .iter()
        .map(|fj| g.node("Unsqueeze", &[fj, &ax2], vec![]))
        .collect();
    let shallow: Vec<&str> = stacked[..m - 1].iter().map(String::as_str).collect();
    let e_set = g.node("Concat", &shallow, vec![attr_int("axis", 2)]);
    let guide = &stacked[m - 1];

    // step 3: redundancy r [B, S, M-1, 1]
    let sq = g.node("Mul", &[&e_set, &e_set], vec![]);
    let ss = g.reduce_sum(&sq, -1, true);
    let tiny = scalar(g, "norm_eps", 1e-16);
    let ss = g.node("Add", &[&ss, &tiny], vec![]);
    let norm = g.node("Sqrt", &[&ss], vec![]);
    let eps = scalar(g, "eps", EPS as f32);
    let den = g.node("Add", &[&norm, &eps], vec![]);
    let unit = g.node("Div", &[&e_set, &den], vec![]);
    let unit_t = g.node(
        "Transpose",
        &[&unit],
        vec![attr_ints("perm", &[0, 1, 3, 2])],
    );
    let c = g.node("MatMul", &[&unit, &unit_t], vec![]);
    let c = g.node("Relu", &[&c], vec![]);
    let rsum = g.reduce_sum(&c, -1, true);
    let r = g.node("Max", &[&rsum, &eps], vec![]);

    // step 4: guided weights alpha [B, S, M-1, 1]
    let eg = g.node("Mul", &[&e_set, guide], vec![]);
    let a = g.linear(trained, "early.score", d, 1, &eg)?;
    let a = g.node("Relu", &[&a], vec![]);
    let u = g.node("Div", &[&a, &r], vec![]);
    let abs = g.node("Abs", &[&u], vec![]);
    let total = g.reduce_sum(&abs, 2, true);
    let total = g.node("Add", &[&total, &eps], vec![]);
    let alpha = g.node("Div", &[&u, &total], vec![]);

    // step 5: g = sum_j alpha_j E_j + e, 0 at padding
    let weighted = g.node("Mul", &[&alpha, &e_set], vec![]);
    let sum = g.reduce_sum(&weighted, 2, false);
    let mut side = g.node("Add", &[&sum, &f[m - 1]], vec![]);
    let mut x_gated = x_last;
    if let Some(mask) = &mask {
        side = g.node("Mul", &[&side, mask], vec![]);
        x_gated = g.node("Mul", &[&x_gated, mask], vec![]);
    }

    // step 6: Z = LayerNorm_1e-12(W_up relu(g) + b_up)
    let side = g.node("Relu", &[&side], vec![]);
    let up = g.linear(trained, "late.up", d, big_d, &side)?;
    let z = g.layer_norm(
        trained,
        "late.up_ln",
        big_d,
        RESTORE_LN_EPS as f32,
        &up,
        None,
    )?;

    // step 7: H = Z + tanh(gamma / 0.1) X_{N-K}, the gate computed as the
    // candle model does (gamma times 1 / 0.1 in f32, then tanh)
    let gamma = trained.tensor_f32_shaped("late.gate", &[1])?[0];
    let gate = (gamma * (1.0 / GATE_TEMPERATURE) as f32).tanh();
    let gate = scalar(g, "gate", gate);
    let gated = g.node("Mul", &[&x_gated, &gate], vec![]);
    let mut h = g.node("Add", &[&z, &gated], vec![]);

    // step 8: the backbone's layers N-K+1 .. N
    for i in last..n {
        h = body.layer(i, &h, &format!("sherl/late.{i}"))?;
    }
    Ok((h, big_d))
}
