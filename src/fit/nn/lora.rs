//! LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
//! ICLR 2022) inside the frozen BERT layers of `--method lora`.
//!
//! A targeted projection `y = W x + b` (frozen `W` `[out, in]`) becomes
//!
//! ```text
//! y = W x + b + (alpha / r) * B A dropout(x)      A: [r, in], B: [out, r]
//! ```
//!
//! with only `A` and `B` trained. `A` is Kaiming-uniform as PyTorch's
//! `nn.Linear` (uniform in ±1/sqrt(in)), `B` is zero, so before the first
//! step the update is exactly 0 and the layer is the frozen layer. The
//! dropout (`--lora-dropout`) acts on the update's input only.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::layer_extras::{LayerExtras, Projection};
use super::ops::{dropout, Mode};
use super::{Builder, Detach};
use crate::Result;

/// A projection LoRA can target (`--lora-targets`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum LoraTarget {
    /// Attention query.
    Q,
    /// Attention key.
    K,
    /// Attention value.
    V,
    /// Attention output dense.
    O,
    /// FFN intermediate dense (`D -> F`).
    FfnIn,
    /// FFN output dense (`F -> D`).
    FfnOut,
}

impl LoraTarget {
    /// The projection it adapts.
    pub fn projection(self) -> Projection {
        match self {
            LoraTarget::Q => Projection::Query,
            LoraTarget::K => Projection::Key,
            LoraTarget::V => Projection::Value,
            LoraTarget::O => Projection::Output,
            LoraTarget::FfnIn => Projection::FfnIn,
            LoraTarget::FfnOut => Projection::FfnOut,
        }
    }

    /// The projection's checkpoint name inside `encoder.layer.{i}`.
    pub fn path(self) -> &'static str {
        match self {
            LoraTarget::Q => "attention.self.query",
            LoraTarget::K => "attention.self.key",
            LoraTarget::V => "attention.self.value",
            LoraTarget::O => "attention.output.dense",
            LoraTarget::FfnIn => "intermediate.dense",
            LoraTarget::FfnOut => "output.dense",
        }
    }

    /// `(in, out)` widths in a layer of width `d` and FFN width `f`.
    pub fn dims(self, d: usize, f: usize) -> (usize, usize) {
        match self {
            LoraTarget::FfnIn => (d, f),
            LoraTarget::FfnOut => (f, d),
            _ => (d, d),
        }
    }

    /// Name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q",
            LoraTarget::K => "k",
            LoraTarget::V => "v",
            LoraTarget::O => "o",
            LoraTarget::FfnIn => "ffn-in",
            LoraTarget::FfnOut => "ffn-out",
        }
    }

    /// Parse one name (`q`, `k`, `v`, `o`, `ffn-in`, `ffn-out`).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        <LoraTarget as clap::ValueEnum>::from_str(s.trim(), true)
            .map_err(|_| format!("LoRA target \"{s}\" is not one of q, k, v, o, ffn-in, ffn-out"))
    }
}

/// The default targets: the attention query and value projections.
pub const DEFAULT_TARGETS: [LoraTarget; 2] = [LoraTarget::Q, LoraTarget::V];

/// The settings of the LoRA updates.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// Rank r.
    pub rank: usize,
    /// alpha (the update is scaled by alpha / r).
    pub alpha: f64,
    /// Dropout on the update's input.
    pub dropout: f32,
    /// Targeted projections, sorted, without repeats.
    pub targets: Vec<LoraTarget>,
}

/// The settings of the LoRA updates of a layer of width `d` and FFN width
/// `f`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank, alpha, dropout and targets.
    pub spec: LoraSpec,
    /// The layer's width `D`.
    pub d: usize,
    /// The layer's FFN width `F`.
    pub f: usize,
}

/// The settings and sizes of one update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraUpdateConfig {
    /// Rank r.
    pub rank: usize,
    /// alpha (the update is scaled by alpha / r).
    pub alpha: f64,
    /// Dropout on the update's input.
    pub dropout: f32,
    /// Width of the projection's input.
    pub d_in: usize,
    /// Width of the projection's output.
    pub d_out: usize,
}

/// One low-rank update `(alpha / r) * B A dropout(x)`.
#[derive(Debug, Clone)]
pub struct LoraUpdate {
    /// `[r, in]`.
    a: Tensor,
    /// `[out, r]`.
    b: Tensor,
    scale: f64,
    dropout: f32,
}

impl Detach for LoraUpdate {
    fn detached(&self) -> Self {
        LoraUpdate {
            a: self.a.detach(),
            b: self.b.detach(),
            scale: self.scale,
            dropout: self.dropout,
        }
    }
}

impl LoraUpdate {
    /// From explicit tensors: `a` `[r, in]`, `b` `[out, r]`, the scale
    /// alpha / r and the dropout on the input.
    pub fn from_parts(a: Tensor, b: Tensor, scale: f64, dropout: f32) -> Self {
        LoraUpdate {
            a,
            b,
            scale,
            dropout,
        }
    }

    /// The update as a weight delta `(alpha / r) B A` `[out, in]`.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.matmul(&self.a)? * self.scale)?)
    }

    /// Fresh `lora_a` (Kaiming-uniform, drawn) and `lora_b` (zero) under
    /// `vb`'s prefix.
    pub fn load(mut vb: Builder, cfg: &LoraUpdateConfig) -> Result<Self> {
        let (r, d_in, d_out) = (cfg.rank, cfg.d_in, cfg.d_out);
        let bound = 1.0 / (d_in as f32).sqrt();
        let a = vb.uniform(r * d_in, bound);
        let dev = vb.device().clone();
        let a = vb.fresh("lora_a", Tensor::from_vec(a, (r, d_in), &dev)?)?;
        let b = vb.fresh(
            "lora_b",
            Tensor::zeros((d_out, r), candle_core::DType::F32, &dev)?,
        )?;
        Ok(LoraUpdate {
            a,
            b,
            scale: cfg.alpha / r as f64,
            dropout: cfg.dropout,
        })
    }

    /// # Shapes
    /// `x` `[.., in]` (rows first, as dropout draws them) -> `[.., out]`.
    pub fn forward(&self, x: &Tensor, mode: &mut Mode<'_>) -> Result<Tensor> {
        let x = dropout(x, self.dropout, mode)?;
        let dims = x.dims().to_vec();
        let d_in = *dims
            .last()
            .expect("a projection input has a last dimension");
        let rows = x.elem_count() / d_in.max(1);
        let low = x.reshape((rows, d_in))?.matmul(&self.a.t()?)?;
        let y = (low.matmul(&self.b.t()?)? * self.scale)?;
        let mut out = dims;
        *out.last_mut().expect("non-empty") = self.b.dim(0)?;
        Ok(y.reshape(out)?)
    }
}

/// The LoRA updates of one layer.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    updates: Vec<(Projection, LoraUpdate)>,
}

impl Detach for LoraLayer {
    fn detached(&self) -> Self {
        LoraLayer {
            updates: self
                .updates
                .iter()
                .map(|(p, u)| (*p, u.detached()))
                .collect(),
        }
    }
}

impl LoraLayer {
    /// From explicit updates.
    pub fn from_updates(updates: Vec<(Projection, LoraUpdate)>) -> Self {
        LoraLayer { updates }
    }

    /// Without dropout on the updates, each as a weight delta to merge
    /// into its projection ([`super::bert_layer::BertLayer::merged`]): the
    /// same function as the updates beside the projections. `None` when an
    /// update has dropout (which acts on the update's input alone, so it
    /// cannot be merged).
    pub fn merged_deltas(&self) -> Result<Option<Vec<(Projection, Tensor)>>> {
        if self.updates.iter().any(|(_, u)| u.dropout > 0.0) {
            return Ok(None);
        }
        self.updates
            .iter()
            .map(|(p, u)| Ok((*p, u.delta_weight()?)))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Fresh updates for `cfg.spec.targets` under `vb`'s prefix
    /// (`encoder.layer.{i}`), named `{projection}.lora_a` / `.lora_b`,
    /// drawn in target order.
    pub fn load(mut vb: Builder, cfg: &LoraConfig) -> Result<Self> {
        let spec = &cfg.spec;
        let updates = spec
            .targets
            .iter()
            .map(|&t| {
                let (d_in, d_out) = t.dims(cfg.d, cfg.f);
                let update = LoraUpdateConfig {
                    rank: spec.rank,
                    alpha: spec.alpha,
                    dropout: spec.dropout,
                    d_in,
                    d_out,
                };
                Ok((t.projection(), LoraUpdate::load(vb.pp(t.path()), &update)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LoraLayer { updates })
    }
}

impl LayerExtras for LoraLayer {
    fn delta(&self, p: Projection, x: &Tensor, mode: &mut Mode<'_>) -> Result<Option<Tensor>> {
        match self.updates.iter().find(|(q, _)| *q == p) {
            Some((_, u)) => u.forward(x, mode).map(Some),
            None => Ok(None),
        }
    }

    fn after_attention(&self, a: Tensor, _mode: &mut Mode<'_>) -> Result<Tensor> {
        Ok(a)
    }

    fn after_ffn(&self, o: Tensor, _mode: &mut Mode<'_>) -> Result<Tensor> {
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::nn::test_util::flat;
    use candle_core::{Device, Var};

    #[test]
    fn targets_parse_and_name() {
        for t in [
            LoraTarget::Q,
            LoraTarget::K,
            LoraTarget::V,
            LoraTarget::O,
            LoraTarget::FfnIn,
            LoraTarget::FfnOut,
        ] {
            assert_eq!(LoraTarget::parse(t.name()).unwrap(), t);
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.name()));
        }
        let e = LoraTarget::parse("ffn").unwrap_err();
        assert!(e.contains("ffn-in"), "{e}");
    }

    /// The update is (alpha / r) B A x, checked by hand on a 2 x 3 input,
    /// and exactly zero while B is zero.
    #[test]
    fn update_is_scaled_low_rank_product() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 0.0, 2.0]], &dev).unwrap(); // r = 1, in = 3
        let b = Tensor::new(&[[1f32], [-1.0]], &dev).unwrap(); // out = 2
        let u = LoraUpdate {
            a,
            b,
            scale: 16.0,
            dropout: 0.0,
        };
        let x = Tensor::new(&[[[1f32, 5.0, 1.0], [0.0, 1.0, -1.0]]], &dev).unwrap();
        let y = u.forward(&x, &mut Mode::Eval).unwrap();
        assert_eq!(y.dims(), &[1, 2, 2]);
        // A x = 3 and -2; B (A x) = (3, -3), (-2, 2); times 16
        assert_eq!(flat(&y), vec![48.0, -48.0, -32.0, 32.0]);
        let zero = LoraUpdate {
            b: Tensor::zeros((2, 1), candle_core::DType::F32, &dev).unwrap(),
            ..u.clone()
        };
        assert_eq!(
            flat(&zero.forward(&x, &mut Mode::Eval).unwrap()),
            vec![0.0; 4]
        );
        // with B = 0, B's gradient is still non-zero (the update can learn)
        let bv = Var::zeros((2, 1), candle_core::DType::F32, &dev).unwrap();
        let learn = LoraUpdate {
            b: bv.as_tensor().clone(),
            ..u
        };
        let g = learn
            .forward(&x, &mut Mode::Eval)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // d/dB[o, 0] of sum = scale * sum_rows (A x) = 16 * (3 - 2)
        assert_eq!(flat(g.get(&bv).unwrap()), vec![16.0, 16.0]);
    }
}
