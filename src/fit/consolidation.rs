//! SHERL's early route: the anti-redundancy consolidation of the cached
//! intermediate layers, and the late-route restore and gate.
//!
//! Computes docs/method.md §4, steps 1-7 (the repository's restatement of
//! the paper, with the epsilons this code adds): per-layer projectors
//! `LayerNorm_d(W_j S_j + b_j)`; per token, the shallow set `E` (all but the
//! last entry) and the guide `e` (the last entry); redundancy `r` = row sums
//! of `relu(E' E'^T)` with `E'` the rows of `E` scaled to unit L2 norm
//! (divided by norm plus 1e-8); guided weights `u = relu(w_a . (E * e) +
//! b_a) / r`,
//! L1-normalised over layers (`alpha = u / (sum |u| + 1e-8)`, no softmax);
//! `g = sum alpha_j E_j + e`.

use candle_core::{Device, Tensor, D};

use super::layers::{dropout, layer_norm, linear, Mode};
use super::params::{Group, Params};
use crate::rng::SplitMix64;
use crate::{Error, Result};

type Lin = (Tensor, Tensor);

/// LayerNorm epsilon of the projectors (PyTorch's `nn.LayerNorm` default).
pub const PROJ_LN_EPS: f64 = 1e-5;
/// LayerNorm epsilon of the restore block (docs/method.md §4, step 6).
pub const RESTORE_LN_EPS: f64 = 1e-12;
/// Epsilon in the row normalisation and in the L1 normalisation.
pub const EPS: f64 = 1e-8;
/// Temperature of the gate: `tanh(gamma / 0.1)`.
pub const GATE_TEMPERATURE: f64 = 0.1;

/// Projectors, guided-weight scorer.
#[derive(Debug, Clone)]
pub struct Consolidation {
    proj: Vec<(Lin, Lin)>,
    w_a: Lin,
}

/// What the early route returns.
#[derive(Debug, Clone)]
pub struct Consolidated {
    /// `g`, `[B, S, d]`.
    pub g: Tensor,
    /// `alpha`, `[B, S, M-1]` (layer weights per token).
    pub alpha: Tensor,
}

/// One `LayerNorm_d(Linear(D -> d))` projector per entry, named
/// `{prefix}.proj.{j}` and `{prefix}.proj_ln.{j}` (shared by SHERL's early
/// route and UniPT).
pub fn projectors(
    params: &mut Params,
    prefix: &str,
    m: usize,
    d_model: usize,
    d: usize,
    rng: &mut SplitMix64,
    dev: &Device,
) -> Result<Vec<(Lin, Lin)>> {
    (0..m)
        .map(|j| {
            let l = params.linear(&format!("{prefix}.proj.{j}"), d_model, d, rng, dev)?;
            let n = params.layer_norm(&format!("{prefix}.proj_ln.{j}"), d, dev)?;
            Ok((l, n))
        })
        .collect()
}

/// Apply each projector to its entry: `LayerNorm(x_j W_j^T + b_j)`.
pub fn project(layers: &[Tensor], proj: &[(Lin, Lin)]) -> Result<Vec<Tensor>> {
    layers
        .iter()
        .zip(proj)
        .map(|(x, ((w, b), (lw, lb)))| layer_norm(&linear(x, w, b)?, lw, lb, PROJ_LN_EPS))
        .collect()
}

impl Consolidation {
    /// Fresh parameters for `m` entries of width `d_model`, side width `d`.
    pub fn new(
        params: &mut Params,
        m: usize,
        d_model: usize,
        d: usize,
        rng: &mut SplitMix64,
        dev: &Device,
    ) -> Result<Self> {
        if m < 2 {
            return Err(Error::Config(format!(
                "SHERL's early route needs at least 2 cached layers (got {m}): re-extract with more layers"
            )));
        }
        let proj = projectors(params, "early", m, d_model, d, rng, dev)?;
        let w_a = params.linear("early.score", d, 1, rng, dev)?;
        Ok(Consolidation { proj, w_a })
    }

    /// From explicit tensors (for tests): `proj[j] = ((W, b), (ln_w, ln_b))`.
    pub fn from_parts(proj: Vec<(Lin, Lin)>, w_a: Lin) -> Self {
        Consolidation { proj, w_a }
    }

    /// # Shapes
    /// `layers`: M tensors `[B, S, D]` (shallow first, guide last), `mask`
    /// `[B, S]` -> `g` `[B, S, d]` (0 at padding), `alpha` `[B, S, M-1]`.
    pub fn forward(&self, layers: &[Tensor], mask: &Tensor) -> Result<Consolidated> {
        let _span = tracing::trace_span!("consolidation").entered();
        if layers.len() != self.proj.len() {
            return Err(Error::Config(format!(
                "consolidation built for {} layers, given {}",
                self.proj.len(),
                layers.len()
            )));
        }
        let (b, s, _) = layers[0].dims3()?;
        let m = layers.len();
        let f = project(layers, &self.proj)?;
        let d = f[0].dim(D::Minus1)?;
        let n = b * s;
        // shallow set E [N, M-1, d], guide e [N, 1, d]
        let e_set = Tensor::stack(&f[..m - 1], 2)?.reshape((n, m - 1, d))?;
        let guide = f[m - 1].reshape((n, 1, d))?;
        // redundancy
        let norm = (e_set.sqr()?.sum_keepdim(D::Minus1)? + 1e-16)?.sqrt()?;
        let unit = e_set.broadcast_div(&(norm + EPS)?)?;
        let c = unit.matmul(&unit.transpose(1, 2)?.contiguous()?)?.relu()?; // [N, M-1, M-1]
        let r = c.sum_keepdim(D::Minus1)?.clamp(EPS, f64::MAX)?; // [N, M-1, 1]
                                                                 // guided weights
        let a = linear(&e_set.broadcast_mul(&guide)?, &self.w_a.0, &self.w_a.1)?; // [N, M-1, 1]
        let u = a.relu()?.div(&r)?;
        let alpha = u.broadcast_div(&(u.abs()?.sum_keepdim(1)? + EPS)?)?; // [N, M-1, 1]
        let g = (alpha.broadcast_mul(&e_set)?.sum(1)? + guide.squeeze(1)?)?; // [N, d]
        let g = g.reshape((b, s, d))?.broadcast_mul(&mask.unsqueeze(2)?)?;
        Ok(Consolidated {
            g,
            alpha: alpha.reshape((b, s, m - 1))?,
        })
    }
}

/// Restore (`Dropout(LayerNorm_D(W_up relu(g) + b_up))`) and gate
/// (`H = Z + tanh(gamma / 0.1) * X`).
#[derive(Debug, Clone)]
pub struct RestoreGate {
    up: Lin,
    ln: Lin,
    gamma: Tensor,
    dropout: f32,
}

impl RestoreGate {
    /// Fresh parameters; gamma starts at 0, so layer N first sees only Z.
    pub fn new(
        params: &mut Params,
        d: usize,
        d_model: usize,
        dropout: f32,
        rng: &mut SplitMix64,
        dev: &Device,
    ) -> Result<Self> {
        let up = params.linear("late.up", d, d_model, rng, dev)?;
        let ln = params.layer_norm("late.up_ln", d_model, dev)?;
        let gamma = params.add(
            "late.gate",
            Tensor::zeros(1, candle_core::DType::F32, dev)?,
            Some(Group::New),
        )?;
        Ok(RestoreGate {
            up,
            ln,
            gamma,
            dropout,
        })
    }

    /// # Shapes
    /// `g` `[B, S, d]`, `x` (the last cached early layer) `[B, S, D]` -> `[B, S, D]`.
    pub fn forward(&self, g: &Tensor, x: &Tensor, mode: &mut Mode<'_>) -> Result<Tensor> {
        let z = layer_norm(
            &linear(&g.relu()?, &self.up.0, &self.up.1)?,
            &self.ln.0,
            &self.ln.1,
            RESTORE_LN_EPS,
        )?;
        let z = dropout(&z, self.dropout, mode)?;
        let gate = (&self.gamma / GATE_TEMPERATURE)?.tanh()?;
        Ok((z + x.broadcast_mul(&gate)?)?)
    }

    /// Current gate value `tanh(gamma / 0.1)`.
    pub fn gate(&self) -> Result<f32> {
        Ok((&self.gamma / GATE_TEMPERATURE)?.tanh()?.to_vec1::<f32>()?[0])
    }
}
