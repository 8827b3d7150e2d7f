//! The affine building blocks: [`Linear`], [`LayerNorm`], and the
//! [`Projector`] (`LayerNorm(Linear(x))`) that SHERL's early route and UniPT
//! put on every cached layer.

use candle_core::Tensor;

use super::ops::layer_norm;
use super::Builder;
use crate::fit::kernels::fused::{cpu_f32, LinearOp};
use crate::Result;

/// `x W^T + b`, `W` `[out, in]`, `b` `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Tensor,
}

impl super::Detach for Linear {
    fn detached(&self) -> Self {
        Linear {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
        }
    }
}

impl Linear {
    /// From explicit tensors.
    pub fn from_parts(weight: Tensor, bias: Tensor) -> Self {
        Linear { weight, bias }
    }

    /// A fresh `Linear(d_in -> d_out)` under `vb`'s prefix (`weight`,
    /// `bias`), Kaiming-uniform as PyTorch's `nn.Linear`: weight, then
    /// bias, uniform in ±1/sqrt(d_in).
    pub fn fresh(mut vb: Builder, d_in: usize, d_out: usize) -> Result<Self> {
        let bound = 1.0 / (d_in as f32).sqrt();
        let w = vb.uniform(d_in * d_out, bound);
        let b = vb.uniform(d_out, bound);
        let weight = Tensor::from_vec(w, (d_out, d_in), vb.device())?;
        let bias = Tensor::from_vec(b, d_out, vb.device())?;
        Ok(Linear {
            weight: vb.fresh("weight", weight)?,
            bias: vb.fresh("bias", bias)?,
        })
    }

    /// # Shapes
    /// `x` of any rank `[.., in]` -> `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = *dims.last().expect("linear input has a last dimension");
        let rows = x.elem_count() / d_in.max(1);
        let x2 = x.reshape((rows, d_in))?;
        // On the CPU one op (LinearOp): OpenBLAS, bias folded
        // in, and only the gradients some variable needs.
        let y = if cpu_f32(&x2) && cpu_f32(&self.weight) && cpu_f32(&self.bias) {
            let x2 = x2.contiguous()?;
            let op = LinearOp::for_operands(&x2, &self.weight, &self.bias);
            x2.apply_op3(&self.weight.contiguous()?, &self.bias.contiguous()?, op)?
        } else {
            x2.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?
        };
        let mut out = dims;
        *out.last_mut().expect("non-empty") = self.weight.dim(0)?;
        Ok(y.reshape(out)?)
    }
}

/// LayerNorm over the last dimension (biased variance, as PyTorch).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// Scale, `[d]`.
    pub weight: Tensor,
    /// Shift, `[d]`.
    pub bias: Tensor,
    /// Added to the variance.
    pub eps: f64,
}

impl super::Detach for LayerNorm {
    fn detached(&self) -> Self {
        LayerNorm {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            eps: self.eps,
        }
    }
}

impl LayerNorm {
    /// From explicit tensors.
    pub fn from_parts(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        LayerNorm { weight, bias, eps }
    }

    /// # Shapes
    /// `[.., d]` -> `[.., d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// `LayerNorm_d(Linear(D -> d))`, one per cached layer, named `proj.{j}` and
/// `proj_ln.{j}` under the side network's prefix.
#[derive(Debug, Clone)]
pub struct Projector {
    /// `D -> d`.
    pub linear: Linear,
    /// LayerNorm over `d`.
    pub norm: LayerNorm,
}

/// LayerNorm epsilon of the projectors (PyTorch's `nn.LayerNorm` default).
pub const PROJ_LN_EPS: f64 = 1e-5;

/// The sizes of a side network over cached layers (SHERL's early route,
/// UniPT): one [`Projector`] per cached layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SideConfig {
    /// Cached layers it reads (`M`), one projector each.
    pub layers: usize,
    /// The backbone's width `D`.
    pub d_model: usize,
    /// The side width `d`.
    pub d: usize,
}

impl super::Detach for Projector {
    fn detached(&self) -> Self {
        Projector {
            linear: self.linear.detached(),
            norm: self.norm.detached(),
        }
    }
}

impl Projector {
    /// Fresh projectors under `vb`'s prefix for `cfg.layers` entries of
    /// width `cfg.d_model`, side width `cfg.d`, in entry order (linear then
    /// LayerNorm per entry).
    pub fn load_all(mut vb: Builder, cfg: &SideConfig) -> Result<Vec<Self>> {
        (0..cfg.layers)
            .map(|j| {
                Ok(Projector {
                    linear: vb.fresh_linear(&format!("proj.{j}"), cfg.d_model, cfg.d)?,
                    norm: vb.fresh_layer_norm(&format!("proj_ln.{j}"), cfg.d, PROJ_LN_EPS)?,
                })
            })
            .collect()
    }

    /// # Shapes
    /// `[.., D]` -> `[.., d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(&self.linear.forward(x)?)
    }

    /// Apply each projector to its entry.
    pub fn forward_all(projectors: &[Projector], layers: &[Tensor]) -> Result<Vec<Tensor>> {
        layers
            .iter()
            .zip(projectors)
            .map(|(x, p)| p.forward(x))
            .collect()
    }
}
