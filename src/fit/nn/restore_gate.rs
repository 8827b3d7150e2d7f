//! SHERL's join of the two routes: restore the consolidated side state to
//! the backbone's width and gate it with the last cached early layer
//! (docs/method.md §4, steps 6-7).

use candle_core::{DType, Tensor};

use super::ops::{dropout, Mode};
use super::{Builder, LayerNorm, Linear};
use crate::Result;

/// LayerNorm epsilon of the restore block (docs/method.md §4, step 6).
pub const RESTORE_LN_EPS: f64 = 1e-12;
/// Temperature of the gate: `tanh(gamma / 0.1)`.
pub const GATE_TEMPERATURE: f64 = 0.1;

/// The sizes and dropout of a [`RestoreGate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestoreGateConfig {
    /// The side width `d` (of the consolidated state).
    pub d: usize,
    /// The backbone's width `D`.
    pub d_model: usize,
    /// Dropout after the restore block's LayerNorm.
    pub dropout: f32,
}

/// Restore (`Dropout(LayerNorm_D(W_up relu(g) + b_up))`) and gate
/// (`H = Z + tanh(gamma / 0.1) * X`).
#[derive(Debug, Clone)]
pub struct RestoreGate {
    up: Linear,
    norm: LayerNorm,
    gamma: Tensor,
    dropout: f32,
}

impl super::Detach for RestoreGate {
    fn detached(&self) -> Self {
        RestoreGate {
            up: self.up.detached(),
            norm: self.norm.detached(),
            gamma: self.gamma.detach(),
            dropout: self.dropout,
        }
    }
}

impl RestoreGate {
    /// Fresh parameters under `vb`'s prefix (`late`): `up`, `up_ln`, and
    /// `gate` (gamma), which starts at 0, so layer N first sees only Z.
    pub fn load(mut vb: Builder, cfg: &RestoreGateConfig) -> Result<Self> {
        let up = vb.fresh_linear("up", cfg.d, cfg.d_model)?;
        let norm = vb.fresh_layer_norm("up_ln", cfg.d_model, RESTORE_LN_EPS)?;
        let zero = Tensor::zeros(1, DType::F32, vb.device())?;
        let gamma = vb.fresh("gate", zero)?;
        Ok(RestoreGate {
            up,
            norm,
            gamma,
            dropout: cfg.dropout,
        })
    }

    /// # Shapes
    /// `g` `[B, S, d]`, `x` (the last cached early layer) `[B, S, D]` -> `[B, S, D]`.
    pub fn forward(&self, g: &Tensor, x: &Tensor, mode: &mut Mode<'_>) -> Result<Tensor> {
        let z = self.norm.forward(&self.up.forward(&g.relu()?)?)?;
        let z = dropout(&z, self.dropout, mode)?;
        let gate = (&self.gamma / GATE_TEMPERATURE)?.tanh()?;
        Ok((z + x.broadcast_mul(&gate)?)?)
    }

    /// Current gate value `tanh(gamma / 0.1)`.
    pub fn gate(&self) -> Result<f32> {
        Ok((&self.gamma / GATE_TEMPERATURE)?.tanh()?.to_vec1::<f32>()?[0])
    }
}
