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
//! - `unipt`: the UniPT side network (docs/method.md §6): every
//!   hidden_states.0..=N projected to width d, the last as anchor, each
//!   shallower one aggregated by relu'd, key-masked, L1-normalised similarity
//!   to the anchor plus identity, weighted by a softmax over per-layer
//!   confidences, added to the anchor through Linear + LayerNorm; no
//!   backbone layer in the backward pass. Needs hidden_states.N cached.
//! - `full-ft`: the whole backbone in candle, every weight trained, from the
//!   token ids stored in the cache (the memory and accuracy reference).

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::batcher::Batch;
use super::bert_layer::{attention_bias, BertLayer};
use super::consolidation::{Consolidation, RestoreGate};
use super::layers::{dropout, layer_norm, linear, masked_mean, softmax, Mode};
use super::params::Params;
use crate::backbone::{BertConfig, Checkpoint};
use crate::rng::{SplitMix64, Stream};
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
    /// UniPT side network over all cached layers.
    Unipt,
    /// Full fine-tuning of the whole backbone from token ids.
    FullFt,
}

impl Method {
    /// Name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Method::Sherl => "sherl",
            Method::LinearProbe => "linear-probe",
            Method::LateLayer => "late-layer",
            Method::Unipt => "unipt",
            Method::FullFt => "full-ft",
        }
    }
}

/// Pooling of the final sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The first (`[CLS]`) token.
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
    unipt: Option<Unipt>,
    embeddings: Option<Embeddings>,
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
        let mut rng = SplitMix64::for_stream(seed, Stream::Init);
        let drop = (
            cfg.attention_probs_dropout_prob as f32,
            cfg.hidden_dropout_prob as f32,
        );
        let load_layers = |range: std::ops::Range<usize>, trainable: bool, params: &mut Params| {
            range
                .map(|li| BertLayer::load(ckpt, cfg, li, params, trainable, drop, dev))
                .collect::<Result<Vec<_>>>()
        };
        let mut consolidation = None;
        let mut restore = None;
        let mut late = Vec::new();
        let mut frozen = Vec::new();
        let mut unipt = None;
        let mut embeddings = None;
        let mut head_dim = d_model;
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
                late = load_layers(last..n, spec.late_trainable, &mut params)?;
                inputs = spec.early_layers.clone();
            }
            Method::LateLayer => {
                let last = n - k;
                need(last)?;
                late = load_layers(last..n, true, &mut params)?;
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
                frozen = load_layers(from..p, false, &mut params)?;
                inputs = vec![from];
            }
            Method::Unipt => {
                for i in 0..=n {
                    need(i)?;
                }
                unipt = Some(Unipt::new(
                    &mut params,
                    n + 1,
                    d_model,
                    spec.side_dim,
                    &mut rng,
                    dev,
                )?);
                head_dim = spec.side_dim;
                inputs = (0..=n).collect();
            }
            Method::FullFt => {
                embeddings = Some(Embeddings::load(ckpt, cfg, &mut params, dev)?);
                late = load_layers(0..n, true, &mut params)?;
                inputs = Vec::new();
            }
        }
        let head = params.linear("head", head_dim, spec.classes, &mut rng, dev)?;
        Ok(Model {
            spec,
            inputs,
            consolidation,
            restore,
            late,
            frozen,
            unipt,
            embeddings,
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
    pub fn forward(&self, batch: &Batch, mode: &mut Mode<'_>) -> Result<Output> {
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
                    .forward(&c.g, last, mode)?;
                for l in &self.late {
                    h = l.forward(&h, &bias, mode)?;
                }
                h
            }
            Method::LateLayer => {
                let mut h = batch.layers[0].clone();
                for l in &self.late {
                    h = l.forward(&h, &bias, mode)?;
                }
                h
            }
            Method::LinearProbe => {
                let mut h = batch.layers[0].clone();
                for l in &self.frozen {
                    h = l.forward(&h, &bias, &mut Mode::Eval)?;
                }
                h.detach()
            }
            Method::Unipt => self
                .unipt
                .as_ref()
                .expect("unipt has its side network")
                .forward(&batch.layers, &batch.mask)?,
            Method::FullFt => {
                let emb = self.embeddings.as_ref().expect("full-ft has embeddings");
                let mut h = emb.forward(&batch.token_ids, &batch.type_ids, mode)?;
                for l in &self.late {
                    h = l.forward(&h, &bias, mode)?;
                }
                h
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

type Lin = (Tensor, Tensor);

/// UniPT side network (Diao et al., CVPR 2024), as docs/method.md §6 restates it.
#[derive(Debug, Clone)]
struct Unipt {
    proj: Vec<(Lin, Lin)>,
    conf: Lin,
    out: Lin,
    out_ln: Lin,
}

impl Unipt {
    fn new(
        params: &mut Params,
        m: usize,
        d_model: usize,
        d: usize,
        rng: &mut SplitMix64,
        dev: &Device,
    ) -> Result<Self> {
        let proj = super::consolidation::projectors(params, "unipt", m, d_model, d, rng, dev)?;
        let conf = params.linear("unipt.confidence", d, 1, rng, dev)?;
        let out = params.linear("unipt.out", d, d, rng, dev)?;
        let out_ln = params.layer_norm("unipt.out_ln", d, dev)?;
        Ok(Unipt {
            proj,
            conf,
            out,
            out_ln,
        })
    }

    /// # Shapes
    /// `layers`: hidden_states.0..=N, each `[B, S, D]`; `mask` `[B, S]` -> `[B, S, d]`.
    fn forward(&self, layers: &[Tensor], mask: &Tensor) -> Result<Tensor> {
        let _span = tracing::trace_span!("unipt").entered();
        let a = super::consolidation::project(layers, &self.proj)?;
        let n = a.len() - 1;
        let anchor = &a[n];
        let key_mask = mask.unsqueeze(1)?; // [B, 1, S]
        let anchor_mean = masked_mean(anchor, mask)?; // [B, d]
        let mut ms = Vec::with_capacity(n);
        let mut cs = Vec::with_capacity(n);
        for aj in &a[..n] {
            let sim = anchor
                .matmul(&aj.transpose(1, 2)?.contiguous()?)?
                .relu()?
                .broadcast_mul(&key_mask)?; // [B, S, S]
            let norm = sim.broadcast_div(&(sim.sum_keepdim(2)? + 1e-8)?)?;
            ms.push((norm.matmul(aj)? + aj)?); // W A_j with W = normalised + identity
            cs.push(linear(
                &(&anchor_mean * masked_mean(aj, mask)?)?,
                &self.conf.0,
                &self.conf.1,
            )?); // [B, 1]
        }
        let w = softmax(&Tensor::cat(&cs, 1)?)?; // [B, n]
        let mut agg = ms[0].broadcast_mul(&w.narrow(1, 0, 1)?.unsqueeze(2)?)?;
        for (j, m) in ms.iter().enumerate().skip(1) {
            agg = (agg + m.broadcast_mul(&w.narrow(1, j, 1)?.unsqueeze(2)?)?)?;
        }
        let o = layer_norm(
            &linear(&agg, &self.out.0, &self.out.1)?,
            &self.out_ln.0,
            &self.out_ln.1,
            1e-5,
        )?;
        Ok((anchor + o)?)
    }
}

/// BERT embeddings (word + position + token type, LayerNorm, dropout),
/// trainable, for full fine-tuning.
#[derive(Debug, Clone)]
struct Embeddings {
    word: Tensor,
    pos: Tensor,
    typ: Tensor,
    ln: Lin,
    eps: f64,
    dropout: f32,
}

impl Embeddings {
    fn load(
        ckpt: &Checkpoint,
        cfg: &BertConfig,
        params: &mut Params,
        dev: &Device,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        let mut get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let v = ckpt.tensor_f32_shaped(name, shape)?;
            params.add(
                name,
                Tensor::from_vec(v, shape, dev)?,
                Some(super::params::Group::Pretrained),
            )
        };
        Ok(Embeddings {
            word: get("embeddings.word_embeddings.weight", &[cfg.vocab_size, d])?,
            pos: get(
                "embeddings.position_embeddings.weight",
                &[cfg.max_position_embeddings, d],
            )?,
            typ: get(
                "embeddings.token_type_embeddings.weight",
                &[cfg.type_vocab_size, d],
            )?,
            ln: (
                get("embeddings.LayerNorm.weight", &[d])?,
                get("embeddings.LayerNorm.bias", &[d])?,
            ),
            eps: cfg.layer_norm_eps,
            dropout: cfg.hidden_dropout_prob as f32,
        })
    }

    /// # Shapes
    /// `ids`, `types` `[B, S]` u32 -> `[B, S, D]`.
    fn forward(&self, ids: &Tensor, types: &Tensor, mode: &mut Mode<'_>) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let d = self.word.dim(1)?;
        let w = self
            .word
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, s, d))?;
        let t = self
            .typ
            .index_select(&types.flatten_all()?, 0)?
            .reshape((b, s, d))?;
        let p = self.pos.narrow(0, 0, s)?;
        let x = (w + t)?.broadcast_add(&p)?;
        dropout(
            &layer_norm(&x, &self.ln.0, &self.ln.1, self.eps)?,
            self.dropout,
            mode,
        )
    }
}
