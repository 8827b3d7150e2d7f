//! Ladder Side Tuning (Sung, Cho and Bansal, "LST: Ladder Side-Tuning for
//! Parameter and Memory Efficient Transfer Learning", NeurIPS 2022) over
//! the cached hidden states; the formulas are in docs/lst.md.
//!
//! A side network of `N` BERT layers of width `d` runs beside the frozen
//! backbone. Its input is the down-projected `hidden_states.0`; before side
//! layer `i` (1-based) its stream is mixed with the down-projected
//! `hidden_states.i` through a learned gate:
//!
//! ```text
//! h_0 = down_0(X_0)
//! mu_i = sigmoid(a_i / T)                 a_i = 0 at init, T = 0.1
//! h_i = side_i(mu_i * h_{i-1} + (1 - mu_i) * down_i(X_i))      i = 1 ..= N
//! Y = up(h_N)                              d -> D
//! ```
//!
//! The backbone's states come from the cache, so no gradient ever reaches
//! the backbone and nothing of it runs while training.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::bert_layer::BertLayer;
use super::ops::Mode;
use super::{Builder, Detach, Linear};
use crate::backbone::BertConfig;
use crate::Result;

/// How the side layers start (`--lst-init`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LstInit {
    /// Fresh random weights (std 0.02).
    #[default]
    Random,
    /// The backbone's layers, structurally pruned by weight magnitude
    /// ([`BertLayer::pruned`]; text caches only).
    Prune,
}

/// The `d` residual dimensions the pruned side layers keep: the largest
/// `sum_i |gamma_i[k]|` over the output LayerNorm weights of the backbone's
/// layers, in index order.
fn residual_keep(vb: &Builder, cfg: &BertConfig, d: usize) -> Result<Vec<usize>> {
    let dm = cfg.hidden_size;
    let mut score = vec![0f32; dm];
    for i in 0..cfg.num_hidden_layers {
        let g = vb.read_checkpoint(&format!("encoder.layer.{i}.output.LayerNorm.weight"), &[dm])?;
        for (s, v) in score.iter_mut().zip(g) {
            *s += v.abs();
        }
    }
    let mut idx: Vec<usize> = (0..dm).collect();
    idx.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    idx.truncate(d);
    idx.sort_unstable();
    Ok(idx)
}

/// The gate temperature T (the paper's value).
pub const GATE_TEMPERATURE: f64 = 0.1;

/// The sizes of the side layers for a backbone of `cfg`'s sizes and side
/// width `d`: FFN width `F * d / D` (at least 1), and the backbone's head
/// count when it divides `d`, else the largest count below it that does.
pub fn side_config(cfg: &BertConfig, d: usize) -> BertConfig {
    let mut side = cfg.clone();
    side.hidden_size = d;
    side.intermediate_size = (cfg.intermediate_size * d / cfg.hidden_size.max(1)).max(1);
    side.num_attention_heads = (1..=cfg.num_attention_heads.max(1))
        .rev()
        .find(|&h| d.is_multiple_of(h))
        .unwrap_or(1);
    side
}

/// The sizes and start of a side network.
#[derive(Debug, Clone)]
pub struct LstConfig {
    /// The backbone's sizes (`N` layers of width `D`).
    pub backbone: BertConfig,
    /// The side width `d`.
    pub d: usize,
    /// How the side layers start.
    pub init: LstInit,
}

/// The side network.
#[derive(Debug, Clone)]
pub struct Lst {
    /// `down.{i}`: `D -> d`, one per `hidden_states.i`, `i = 0 ..= N`.
    downs: Vec<Linear>,
    /// `gate`: `[N]`, the `a_i`.
    gates: Tensor,
    /// `layer.{i}`: the side layers.
    side: Vec<BertLayer>,
    /// `up`: `d -> D`.
    up: Linear,
}

impl Detach for Lst {
    fn detached(&self) -> Self {
        Lst {
            downs: self.downs.detached(),
            gates: self.gates.detach(),
            side: self.side.detached(),
            up: self.up.detached(),
        }
    }
}

impl Lst {
    /// Fresh modules under `vb`'s prefix (`lst`) for a backbone of
    /// `cfg.backbone`'s sizes and `num_hidden_layers` layers, side width
    /// `cfg.d`, drawn in the order: down projections, side layers (none
    /// drawn when pruned from the backbone's layers), up projection (the
    /// gates are 0).
    pub fn load(mut vb: Builder, cfg: &LstConfig) -> Result<Self> {
        let (d, init) = (cfg.d, cfg.init);
        let cfg = &cfg.backbone;
        let n = cfg.num_hidden_layers;
        let dm = cfg.hidden_size;
        let downs = (0..=n)
            .map(|i| vb.fresh_linear(&format!("down.{i}"), dm, d))
            .collect::<Result<Vec<_>>>()?;
        let dev = vb.device().clone();
        let gates = vb.fresh("gate", Tensor::zeros(n, DType::F32, &dev)?)?;
        let side_cfg = side_config(cfg, d);
        let side = match init {
            LstInit::Random => (0..n)
                .map(|i| BertLayer::fresh(vb.pp(&format!("layer.{i}")), &side_cfg))
                .collect::<Result<Vec<_>>>()?,
            LstInit::Prune => {
                let hidden = residual_keep(&vb, cfg, d)?;
                (0..n)
                    .map(|i| {
                        BertLayer::pruned(
                            vb.pp(&format!("layer.{i}")),
                            cfg,
                            &side_cfg,
                            &format!("encoder.layer.{i}"),
                            &hidden,
                        )
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        };
        let up = vb.fresh_linear("up", d, dm)?;
        Ok(Lst {
            downs,
            gates,
            side,
            up,
        })
    }

    /// The gates `mu_i = sigmoid(a_i / T)`, `[N]`.
    pub fn mu(&self) -> Result<Tensor> {
        let z = (&self.gates / GATE_TEMPERATURE)?;
        Ok((z.neg()?.exp()? + 1.0)?.recip()?)
    }

    /// # Shapes
    /// `layers`: `hidden_states.0 ..= N`, each `[B, S, D]`; `bias`
    /// `[B, 1, 1, S]` -> `[B, S, D]`.
    pub fn forward(&self, layers: &[Tensor], bias: &Tensor, mode: &mut Mode<'_>) -> Result<Tensor> {
        let mu = self.mu()?;
        let mut h = self.downs[0].forward(&layers[0])?;
        for (i, side) in self.side.iter().enumerate() {
            let m = mu.narrow(0, i, 1)?;
            let x = self.downs[i + 1].forward(&layers[i + 1])?;
            let mixed = (h.broadcast_mul(&m)? + x.broadcast_mul(&m.affine(-1.0, 1.0)?)?)?;
            h = side.forward(&mixed, bias, mode)?;
        }
        self.up.forward(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::nn::test_util::flat;

    fn bert(d: usize, heads: usize, f: usize) -> BertConfig {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 10, "hidden_size": d, "num_hidden_layers": 2,
            "num_attention_heads": heads, "intermediate_size": f,
            "max_position_embeddings": 8
        }))
        .unwrap()
    }

    #[test]
    fn side_layers_keep_the_heads_that_divide_the_width() {
        let s = side_config(&bert(384, 12, 1536), 96);
        assert_eq!(
            (s.hidden_size, s.num_attention_heads, s.intermediate_size),
            (96, 12, 384)
        );
        // 12 does not divide 40: 10 heads of 4
        assert_eq!(
            side_config(&bert(384, 12, 1536), 40).num_attention_heads,
            10
        );
        assert_eq!(side_config(&bert(32, 4, 64), 7).num_attention_heads, 1);
        assert_eq!(side_config(&bert(32, 4, 64), 8).intermediate_size, 16);
    }

    /// Gates start at exactly 1/2 and follow sigmoid(a / 0.1).
    #[test]
    fn gates_start_at_one_half() {
        let dev = candle_core::Device::Cpu;
        let lin = |i: usize, o: usize| {
            Linear::from_parts(
                Tensor::zeros((o, i), DType::F32, &dev).unwrap(),
                Tensor::zeros(o, DType::F32, &dev).unwrap(),
            )
        };
        let mut l = Lst {
            downs: vec![lin(4, 2)],
            gates: Tensor::zeros(3, DType::F32, &dev).unwrap(),
            side: Vec::new(),
            up: lin(2, 4),
        };
        assert_eq!(flat(&l.mu().unwrap()), vec![0.5; 3]);
        l.gates = Tensor::new(&[0.1f32, -0.2, 0.0], &dev).unwrap();
        let want = [1.0 / (1.0 + (-1f32).exp()), 1.0 / (1.0 + 2f32.exp()), 0.5];
        for (g, w) in flat(&l.mu().unwrap()).iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
    }
}
