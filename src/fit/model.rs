//! The trainable models, one per `--method`, all fed from the cache.
//!
//! - `sherl`: early-route consolidation of hidden_states.0..=N-K, restore,
//!   gate with hidden_states.N-K, the backbone's last K layers (frozen by
//!   default, `--late-trainable` to train them), pool, head.
//! - `linear-probe`: pool hidden_states.P (default N) and a linear head;
//!   when P is not cached it is computed from the deepest cached layer below
//!   it by the frozen backbone layers, without gradients.
//! - `late-layer`: hidden_states.N-K straight into the last K layers,
//!   fine-tuned, then pool and head (no early route).

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::batcher::Batch;
use super::bert_layer::{attention_bias, BertLayer};
use super::consolidation::{Consolidation, RestoreGate};
use super::layers::{linear, masked_mean};
use super::params::Params;
use super::rng::Rng;
use crate::backbone::{BertConfig, Checkpoint};
use crate::{Error, Result};

/// Which model to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// SHERL (early-route consolidation + late layer(s)).
    Sherl,
    /// Pooled last layer -> linear head.
    LinearProbe,
    /// Late layer(s) fine-tuned on hidden_states.N-K, no early route.
    LateLayer,
}

impl Method {
    /// Name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Method::Sherl => "sherl",
            Method::LinearProbe => "linear-probe",
            Method::LateLayer => "late-layer",
        }
    }
}

/// Pooling of the final sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The first ([CLS]) token.
    Cls,
    /// Mean over real tokens.
    Mean,
}

/// Hyper-parameters that shape the model.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Method.
    pub method: Method,
    /// K.
    pub late_layers: usize,
    /// Train the late layers' pre-trained weights (sherl).
    pub late_trainable: bool,
    /// Side width d.
    pub side_dim: usize,
    /// Early-route hidden-state indices (sherl), last = N-K.
    pub early_layers: Vec<usize>,
    /// Linear-probe layer P.
    pub probe_layer: usize,
    /// Pooling.
    pub pool: Pool,
    /// Dropout of the restore block.
    pub dropout: f32,
    /// Classes.
    pub classes: usize,
}

/// A model ready to train or predict.
#[derive(Debug)]
pub struct Model {
    spec: ModelSpec,
    /// Hidden-state indices the model reads from the cache, in order.
    inputs: Vec<usize>,
    consolidation: Option<Consolidation>,
    restore: Option<RestoreGate>,
    /// Layers with gradients (late route).
    late: Vec<BertLayer>,
    /// Frozen layers run without gradients before the head (probe).
    frozen: Vec<BertLayer>,
    head: (Tensor, Tensor),
    /// All parameters.
    pub params: Params,
}

/// Forward result.
#[derive(Debug)]
pub struct Output {
    /// `[B, classes]`.
    pub logits: Tensor,
    /// SHERL layer weights `[B, S, M-1]`, if any.
    pub alpha: Option<Tensor>,
}

impl Model {
    /// Build the model for `spec` on a cache holding hidden states `cached`,
    /// with pre-trained layers from `ckpt`.
    pub fn build(
        spec: ModelSpec,
        cached: &[usize],
        cfg: &BertConfig,
        ckpt: &Checkpoint,
        seed: u64,
        dev: &Device,
    ) -> Result<Self> {
        let n = cfg.num_hidden_layers;
        let d_model = cfg.hidden_size;
        let k = spec.late_layers;
        if k == 0 || k > n {
            return Err(Error::Config(format!(
                "--late-layers {k} must be between 1 and {n}"
            )));
        }
        let need = |i: usize| -> Result<()> {
            if cached.contains(&i) {
                Ok(())
            } else {
                Err(Error::Config(format!(
                    "method {} needs hidden_states.{i}, which the cache does not hold (it has {:?}); re-extract with --layers including {i} or --late-layers {}",
                    spec.method.name(),
                    cached,
                    n - i.min(n)
                )))
            }
        };
        let mut params = Params::new();
        let mut rng = Rng::new(seed, 0x1417);
        let drop = (
            cfg.attention_probs_dropout_prob as f32,
            cfg.hidden_dropout_prob as f32,
        );
        let mut consolidation = None;
        let mut restore = None;
        let mut late = Vec::new();
        let mut frozen = Vec::new();
        let inputs;
        match spec.method {
            Method::Sherl => {
                let last = n - k;
                if spec.early_layers.last() != Some(&last) {
                    return Err(Error::Config(format!(
                        "the early route must end with hidden_states.{last} (N - K); got {:?}",
                        spec.early_layers
                    )));
                }
                for &i in &spec.early_layers {
                    need(i)?;
                }
                consolidation = Some(Consolidation::new(
                    &mut params,
                    spec.early_layers.len(),
                    d_model,
                    spec.side_dim,
                    &mut rng,
                    dev,
                )?);
                restore = Some(RestoreGate::new(
                    &mut params,
                    spec.side_dim,
                    d_model,
                    spec.dropout,
                    &mut rng,
                    dev,
                )?);
                for li in last..n {
                    late.push(BertLayer::load(
                        ckpt,
                        cfg,
                        li,
                        &mut params,
                        spec.late_trainable,
                        drop,
                        dev,
                    )?);
                }
                inputs = spec.early_layers.clone();
            }
            Method::LateLayer => {
                let last = n - k;
                need(last)?;
                for li in last..n {
                    late.push(BertLayer::load(
                        ckpt,
                        cfg,
                        li,
                        &mut params,
                        true,
                        drop,
                        dev,
                    )?);
                }
                inputs = vec![last];
            }
            Method::LinearProbe => {
                let p = spec.probe_layer;
                if p > n {
                    return Err(Error::Config(format!(
                        "--probe-layer {p} does not exist (0..={n})"
                    )));
                }
                let from = cached
                    .iter()
                    .copied()
                    .filter(|&i| i <= p)
                    .max()
                    .ok_or_else(|| {
                        Error::Config(format!(
                            "the cache holds no layer at or below {p} for the linear probe"
                        ))
                    })?;
                for li in from..p {
                    frozen.push(BertLayer::load(
                        ckpt,
                        cfg,
                        li,
                        &mut params,
                        false,
                        drop,
                        dev,
                    )?);
                }
                inputs = vec![from];
            }
        }
        let head = params.linear("head", d_model, spec.classes, &mut rng, dev)?;
        Ok(Model {
            spec,
            inputs,
            consolidation,
            restore,
            late,
            frozen,
            head,
            params,
        })
    }

    /// Hidden-state indices to load from the cache, in order.
    pub fn inputs(&self) -> &[usize] {
        &self.inputs
    }

    /// The spec.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Current gate value (sherl).
    pub fn gate(&self) -> Result<Option<f32>> {
        self.restore.as_ref().map(|r| r.gate()).transpose()
    }

    /// # Shapes
    /// `batch.layers` as [`Model::inputs`], each `[B, S, D]` -> logits `[B, classes]`.
    pub fn forward(&self, batch: &Batch, train: bool, rng: &mut Rng) -> Result<Output> {
        let bias = attention_bias(&batch.mask)?;
        let mut alpha = None;
        let y = match self.spec.method {
            Method::Sherl => {
                let c = self
                    .consolidation
                    .as_ref()
                    .expect("sherl has a consolidation")
                    .forward(&batch.layers, &batch.mask)?;
                alpha = Some(c.alpha);
                let last = batch.layers.last().expect("sherl reads at least 2 layers");
                let mut h = self
                    .restore
                    .as_ref()
                    .expect("sherl has a restore")
                    .forward(&c.g, last, train, rng)?;
                for l in &self.late {
                    h = l.forward(&h, &bias, train, rng)?;
                }
                h
            }
            Method::LateLayer => {
                let mut h = batch.layers[0].clone();
                for l in &self.late {
                    h = l.forward(&h, &bias, train, rng)?;
                }
                h
            }
            Method::LinearProbe => {
                let mut h = batch.layers[0].clone();
                for l in &self.frozen {
                    h = l.forward(&h, &bias, false, rng)?;
                }
                h.detach()
            }
        };
        let pooled = match self.spec.pool {
            Pool::Cls => y.narrow(1, 0, 1)?.squeeze(1)?,
            Pool::Mean => masked_mean(&y, &batch.mask)?,
        };
        let logits = linear(&pooled, &self.head.0, &self.head.1)?;
        Ok(Output { logits, alpha })
    }
}
