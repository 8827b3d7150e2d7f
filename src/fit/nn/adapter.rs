//! Bottleneck adapters (Houlsby et al., "Parameter-Efficient Transfer
//! Learning for NLP", ICML 2019; Pfeiffer et al., "AdapterFusion", EACL
//! 2021) inside the frozen BERT layers of `--method adapter`.
//!
//! An adapter maps a sub-layer's output `z` (`[.., D]`, after the
//! projection and its dropout, before the residual and the LayerNorm) to
//!
//! ```text
//! adapter(z) = z + W_up act(W_down z + b_down) + b_up      W_down: m x D, W_up: D x m
//! ```
//!
//! with `m = D / r` (`--reduction`, or `--side-dim`). `W_down` is
//! Kaiming-uniform as PyTorch's `nn.Linear`; `W_up` and `b_up` are zero, so
//! before the first step every adapter is exactly the identity and the
//! model is the frozen backbone. Houlsby placement puts one adapter after
//! the attention sub-layer and one after the FFN; Pfeiffer placement only
//! the one after the FFN.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::layer_extras::{LayerExtras, Projection};
use super::ops::Mode;
use super::{Builder, Detach, Linear};
use crate::Result;

/// Where the adapters go (`--adapter-placement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// After the attention sub-layer and after the FFN.
    Houlsby,
    /// After the FFN only.
    Pfeiffer,
}

/// The adapter's non-linearity (`--adapter-activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AdapterActivation {
    /// Exact (erf) GELU.
    Gelu,
    /// ReLU.
    Relu,
}

/// The settings of the adapters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdapterSpec {
    /// Placement.
    pub placement: Placement,
    /// Non-linearity.
    pub activation: AdapterActivation,
}

impl AdapterSpec {
    /// Adapters per layer.
    pub fn per_layer(&self) -> usize {
        match self.placement {
            Placement::Houlsby => 2,
            Placement::Pfeiffer => 1,
        }
    }
}

/// The settings and sizes of the adapters of a layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdapterConfig {
    /// Placement and non-linearity.
    pub spec: AdapterSpec,
    /// The layer's width `D`.
    pub d: usize,
    /// The bottleneck width `m`.
    pub m: usize,
}

/// One bottleneck adapter.
#[derive(Debug, Clone)]
pub struct Adapter {
    down: Linear,
    up: Linear,
    act: AdapterActivation,
}

impl Detach for Adapter {
    fn detached(&self) -> Self {
        Adapter {
            down: self.down.detached(),
            up: self.up.detached(),
            act: self.act,
        }
    }
}

impl Adapter {
    /// Fresh `down` (drawn) and `up` (zero) under `vb`'s prefix.
    pub fn load(mut vb: Builder, cfg: &AdapterConfig) -> Result<Self> {
        let (d, m) = (cfg.d, cfg.m);
        let down = vb.fresh_linear("down", d, m)?;
        let dev = vb.device().clone();
        let up = Linear::from_parts(
            vb.fresh("up.weight", Tensor::zeros((d, m), DType::F32, &dev)?)?,
            vb.fresh("up.bias", Tensor::zeros(d, DType::F32, &dev)?)?,
        );
        Ok(Adapter {
            down,
            up,
            act: cfg.spec.activation,
        })
    }

    /// # Shapes
    /// `[.., D]` -> `[.., D]`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let h = self.down.forward(z)?;
        let h = match self.act {
            AdapterActivation::Gelu => h.gelu_erf()?,
            AdapterActivation::Relu => h.relu()?,
        };
        Ok((z + self.up.forward(&h)?)?)
    }
}

/// The adapters of one layer.
#[derive(Debug, Clone)]
pub struct AdapterLayer {
    attention: Option<Adapter>,
    ffn: Adapter,
}

impl Detach for AdapterLayer {
    fn detached(&self) -> Self {
        AdapterLayer {
            attention: self.attention.as_ref().map(Detach::detached),
            ffn: self.ffn.detached(),
        }
    }
}

impl AdapterLayer {
    /// Fresh adapters of width `cfg.m` for a layer of width `cfg.d` under
    /// `vb`'s prefix (`encoder.layer.{i}`): `attention.output.adapter`
    /// (Houlsby only), then `output.adapter`.
    pub fn load(mut vb: Builder, cfg: &AdapterConfig) -> Result<Self> {
        let attention = match cfg.spec.placement {
            Placement::Houlsby => Some(Adapter::load(vb.pp("attention.output.adapter"), cfg)?),
            Placement::Pfeiffer => None,
        };
        let ffn = Adapter::load(vb.pp("output.adapter"), cfg)?;
        Ok(AdapterLayer { attention, ffn })
    }
}

impl LayerExtras for AdapterLayer {
    fn delta(&self, _p: Projection, _x: &Tensor, _mode: &mut Mode<'_>) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn after_attention(&self, a: Tensor, _mode: &mut Mode<'_>) -> Result<Tensor> {
        match &self.attention {
            Some(ad) => ad.forward(&a),
            None => Ok(a),
        }
    }

    fn after_ffn(&self, o: Tensor, _mode: &mut Mode<'_>) -> Result<Tensor> {
        self.ffn.forward(&o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::nn::test_util::flat;
    use candle_core::Device;

    /// adapter(z) = z + W_up act(W_down z + b_down) + b_up, by hand.
    #[test]
    fn adapter_is_residual_bottleneck() {
        let dev = Device::Cpu;
        let t = |v: &[f32], shape: &[usize]| Tensor::from_vec(v.to_vec(), shape, &dev).unwrap();
        let down = Linear::from_parts(t(&[1.0, -1.0], &[1, 2]), t(&[0.5], &[1]));
        let up = Linear::from_parts(t(&[2.0, 3.0], &[2, 1]), t(&[0.0, 1.0], &[2]));
        let z = t(&[3.0, 1.0, 0.0, 2.0], &[2, 2]);
        for (act, want) in [
            // rows: W_down z + b = 2.5 and -1.5
            (AdapterActivation::Relu, vec![8.0, 9.5, 0.0, 3.0]),
            (
                AdapterActivation::Gelu,
                vec![
                    3.0 + 2.0 * gelu(2.5),
                    1.0 + 3.0 * gelu(2.5) + 1.0,
                    2.0 * gelu(-1.5),
                    2.0 + 3.0 * gelu(-1.5) + 1.0,
                ],
            ),
        ] {
            let a = Adapter {
                down: down.clone(),
                up: up.clone(),
                act,
            };
            let got = flat(&a.forward(&z).unwrap());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{act:?}: {got:?} vs {want:?}");
            }
        }
    }

    fn gelu(x: f32) -> f32 {
        // 0.5 x (1 + erf(x / sqrt 2)), erf by its series (enough terms here)
        let y = f64::from(x) / std::f64::consts::SQRT_2;
        let mut term = y;
        let mut sum = y;
        for n in 1..60 {
            term *= -y * y / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        let erf = 2.0 / std::f64::consts::PI.sqrt() * sum;
        (0.5 * f64::from(x) * (1.0 + erf)) as f32
    }
}
