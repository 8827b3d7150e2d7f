//! `lst`: Ladder Side Tuning ([`crate::fit::nn::lst`], formulas in
//! docs/lst.md). A side network of `N` post-norm BERT layers of width `d`
//! reads every backbone hidden state through a gated down-projection:
//!
//! ```text
//! h_0 = down_0(X_0)
//! mu_i = sigmoid(a_i / T)                      T = 0.1
//! h_i = side_i(mu_i * h_{i-1} + (1 - mu_i) * down_i(X_i))      i = 1 ..= N
//! Y = up(h_N)                                  d -> D
//! ```
//!
//! The side layers have the sizes [`side_config`] gives (the backbone's
//! activation and epsilon, FFN width `F d / D`, the largest head count up
//! to the backbone's that divides `d`), are named as BERT's under
//! `lst.layer.{i}` whatever the backbone's family, and attend under the
//! padding mask alone (no MPNet relative-position bias), as `predict` runs
//! them. `--lst-init` only decides how they started.

use crate::extract::onnx::builder::Tensors;
use crate::fit::nn::lst::{side_config, GATE_TEMPERATURE};
use crate::Result;

use super::super::body::Body;

/// The side network's graph on `body` with side width `d`; returns `Y`
/// (`[batch, seq, D]`) and its width `D`.
pub fn build(body: &mut dyn Body, trained: &Tensors, d: usize) -> Result<(String, usize)> {
    let (n, dm) = (body.layers(), body.width());
    let mut side = side_config(&body.sizes()?, d);
    // the side layers' weights carry BERT's names (and no relative bias)
    side.model_type = Some("bert".into());
    let g = body.g();
    let gate = g.weight(trained, "lst.gate", &[n], false)?;
    let t = g.const_f32("lst/temperature", &[GATE_TEMPERATURE as f32], &[]);
    let z = g.node("Div", &[&gate, &t], vec![]);
    let mu = g.node("Sigmoid", &[&z], vec![]); // [N]
    let one = g.const_f32("lst/one", &[1.0], &[]);

    let x0 = body.hidden(0)?;
    let mut h = body.g().linear(trained, "lst.down.0", dm, d, &x0)?;
    for i in 0..n {
        let xi = body.hidden(i + 1)?;
        let g = body.g();
        let x = g.linear(trained, &format!("lst.down.{}", i + 1), dm, d, &xi)?;
        let idx = g.const_i64(&format!("lst/gate_index.{i}"), &[i as i64], &[]);
        let m = g.node("Gather", &[&mu, &idx], vec![]); // scalar mu_i
        let rest = g.node("Sub", &[&one, &m], vec![]);
        let kept = g.node("Mul", &[&h, &m], vec![]);
        let new = g.node("Mul", &[&x, &rest], vec![]);
        let mixed = g.node("Add", &[&kept, &new], vec![]);
        h = body.side_layer(
            trained,
            &side,
            &format!("lst.layer.{i}/"),
            &format!("lst.layer.{i}"),
            &mixed,
            &format!("lst/h.{}", i + 1),
        )?;
    }
    let y = body.g().linear(trained, "lst.up", d, dm, &h)?;
    Ok((y, dm))
}
