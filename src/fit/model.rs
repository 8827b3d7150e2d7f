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
//!   token ids stored in the cache (the memory and accuracy reference). On
//!   an image cache, every ViT block from the cached hidden_states.0 (the
//!   patch embedding's output: the patch projection, CLS and position
//!   embeddings are not trained, every transformer block is).
//!
//! - `lora`: the whole backbone from the token ids as `full-ft`, every
//!   pre-trained weight frozen, a trained low-rank update on the targeted
//!   projections of every layer ([`super::nn::lora`]).
//! - `adapter`: the same, with bottleneck adapters after the attention
//!   and FFN sub-layers (Houlsby) or after the FFN only (Pfeiffer)
//!   ([`super::nn::adapter`]); the backbone's LayerNorms stay frozen.
//! - `lst`: Ladder Side Tuning ([`super::nn::lst`]): a narrow side
//!   network fed, layer by layer, by gated down-projections of the cached
//!   hidden_states.0..=N; no backbone layer runs. Needs every layer
//!   cached.
//!
//! `lora` and `adapter` run BERT layers only: on an image cache they are
//! refused (`lst` runs on either).
//!
//! The backbone layers are BERT layers for a text cache and DINOv2 ViT
//! blocks ([`super::nn::vit_layer`], weights from the ONNX initializers)
//! for an image cache ([`Arch`]); everything else is the same.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::batcher::Batch;
use super::nn::adapter::{AdapterConfig, AdapterLayer, AdapterSpec};
use super::nn::bert_layer::{attention_bias, BertLayer};
use super::nn::consolidation::Consolidation;
use super::nn::embeddings::Embeddings;
use super::nn::head::{Head, HeadConfig};
use super::nn::layer_extras::LayerExtras;
use super::nn::lora::{LoraConfig, LoraLayer, LoraSpec};
use super::nn::lst::{Lst, LstConfig, LstInit};
use super::nn::relative::RelativeBias;
use super::nn::restore_gate::{RestoreGate, RestoreGateConfig};
use super::nn::unipt::Unipt;
use super::nn::vit_layer::{VitLayer, VitLayerConfig};
use super::nn::{Builder, Detach, Mode, SideConfig};
use super::params::{Group, Params};
use crate::backbone::{BertConfig, Checkpoint};
use crate::fit::error::FitError;
use crate::rng::{SplitMix64, Stream};
use crate::Result;

pub use super::nn::head::Pool;

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
    /// LoRA on the frozen backbone, from token ids.
    Lora,
    /// Bottleneck adapters in the frozen backbone, from token ids.
    Adapter,
    /// Ladder Side Tuning over all cached layers.
    Lst,
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
            Method::Lora => "lora",
            Method::Adapter => "adapter",
            Method::Lst => "lst",
        }
    }
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
    /// LoRA settings (`lora`).
    pub lora: LoraSpec,
    /// Adapter settings (`adapter`; their width is `side_dim`).
    pub adapter: AdapterSpec,
    /// How LST's side layers start (`lst`).
    pub lst_init: LstInit,
}

/// The backbone whose layers the model runs.
#[derive(Debug, Clone)]
pub enum Arch {
    /// A BERT-family text encoder (`config.json`).
    Bert(BertConfig),
    /// A DINOv2 ViT (an image cache): the block sizes and the layer count.
    Vit {
        /// Block sizes.
        cfg: VitLayerConfig,
        /// Transformer layers N.
        layers: usize,
    },
}

impl Arch {
    /// Transformer layers N.
    pub fn num_layers(&self) -> usize {
        match self {
            Arch::Bert(c) => c.num_hidden_layers,
            Arch::Vit { layers, .. } => *layers,
        }
    }

    /// Hidden width.
    pub fn hidden(&self) -> usize {
        match self {
            Arch::Bert(c) => c.hidden_size,
            Arch::Vit { cfg, .. } => cfg.hidden_size,
        }
    }

    /// The sizes as a BERT configuration, for what only needs the sizes
    /// (the memory estimate): a ViT block has a BERT layer's tensors (four
    /// projections, two LayerNorms, an MLP) plus two LayerScale vectors;
    /// no embeddings are used (`full-ft` on images starts from the cached
    /// hidden_states.0).
    pub fn sizes(&self) -> BertConfig {
        match self {
            Arch::Bert(c) => c.clone(),
            Arch::Vit { cfg, layers } => serde_json::from_value(serde_json::json!({
                "vocab_size": 0,
                "hidden_size": cfg.hidden_size,
                "num_hidden_layers": layers,
                "num_attention_heads": cfg.heads,
                "intermediate_size": cfg.mlp_size,
                "max_position_embeddings": 0,
                "type_vocab_size": 0,
                "layer_norm_eps": cfg.layer_norm_eps,
            }))
            .expect("a BERT config from ViT sizes"),
        }
    }
}

/// One backbone layer: BERT (masked attention) or ViT (every token real).
#[derive(Debug, Clone)]
enum Layer {
    Bert(BertLayer),
    Vit(VitLayer),
}

impl Layer {
    fn forward(&self, x: &Tensor, bias: &Tensor, mode: &mut Mode<'_>) -> Result<Tensor> {
        match self {
            Layer::Bert(l) => l.forward(x, bias, mode),
            // Images have no padding: every token attends to every token.
            Layer::Vit(l) => l.forward(x, mode),
        }
    }
}

impl Detach for Layer {
    fn detached(&self) -> Self {
        match self {
            Layer::Bert(l) => Layer::Bert(l.detached()),
            Layer::Vit(l) => Layer::Vit(l.detached()),
        }
    }
}

/// The modules of one method (each method has exactly its own).
#[derive(Debug, Clone)]
enum Net {
    /// Early route, restore and gate, then the late layers (with gradients).
    Sherl {
        consolidation: Consolidation,
        restore: RestoreGate,
        late: Vec<Layer>,
    },
    /// The late layers (with gradients) on hidden_states.N-K.
    LateLayer { late: Vec<Layer> },
    /// Frozen layers run without gradients up to the probed layer.
    LinearProbe { frozen: Vec<Layer> },
    /// The UniPT side network.
    Unipt(Unipt),
    /// Embeddings and every layer, all trained; without embeddings (an
    /// image cache) the layers start from the cached hidden_states.0.
    FullFt {
        embeddings: Option<Embeddings>,
        layers: Vec<Layer>,
    },
    /// Frozen embeddings and layers with trained modules inside every
    /// layer (LoRA updates or adapters).
    Tuned {
        embeddings: Embeddings,
        layers: Vec<BertLayer>,
        extras: Vec<Extras>,
    },
    /// The LST side network.
    Lst(Lst),
}

/// The trained modules inside one frozen layer.
#[derive(Debug, Clone)]
enum Extras {
    Lora(LoraLayer),
    Adapter(AdapterLayer),
}

impl Extras {
    fn get(&self) -> &dyn LayerExtras {
        match self {
            Extras::Lora(l) => l,
            Extras::Adapter(a) => a,
        }
    }
}

impl Detach for Extras {
    fn detached(&self) -> Self {
        match self {
            Extras::Lora(l) => Extras::Lora(l.detached()),
            Extras::Adapter(a) => Extras::Adapter(a.detached()),
        }
    }
}

/// A model ready to train or predict.
#[derive(Debug)]
pub struct Model {
    spec: ModelSpec,
    /// Hidden-state indices the model reads from the cache, in order.
    inputs: Vec<usize>,
    net: Net,
    head: Head,
    /// MPNet's relative-position bias (frozen), for the backbone layers.
    rel: Option<RelativeBias>,
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

/// Load `encoder.layer.{range}` trained in `group` or frozen (`None`).
fn load_layers(
    vb: &mut Builder,
    arch: &Arch,
    range: std::ops::Range<usize>,
    group: Option<Group>,
) -> Result<Vec<Layer>> {
    range
        .map(|li| {
            let b = vb
                .pp(&format!("encoder.layer.{li}"))
                .pretrained_group(group);
            Ok(match arch {
                Arch::Bert(cfg) => Layer::Bert(BertLayer::load(b, cfg)?),
                Arch::Vit { cfg, .. } => Layer::Vit(VitLayer::load(b, cfg)?),
            })
        })
        .collect()
}

/// Run `h` through `layers`.
fn run_layers(
    layers: &[Layer],
    mut h: Tensor,
    bias: &Tensor,
    mode: &mut Mode<'_>,
) -> Result<Tensor> {
    for l in layers {
        h = l.forward(&h, bias, mode)?;
    }
    Ok(h)
}

impl Model {
    /// Build the model for `spec` on a cache holding hidden states `cached`,
    /// with pre-trained layers from `ckpt`; fresh weights come from `seed`'s
    /// [`Stream::Init`], drawn in module order (early route, restore, side
    /// network, head).
    pub fn build(
        spec: ModelSpec,
        cached: &[usize],
        arch: &Arch,
        ckpt: &Checkpoint,
        seed: u64,
        dev: &Device,
    ) -> Result<Self> {
        let n = arch.num_layers();
        let d_model = arch.hidden();
        let k = spec.late_layers;
        if k == 0 || k > n {
            return Err(FitError::settings(format!(
                "--late-layers {k} must be between 1 and {n}"
            )));
        }
        let need = |i: usize| -> Result<()> {
            if cached.contains(&i) {
                Ok(())
            } else {
                Err(FitError::cache_lacks(format!(
                    "method {} needs hidden_states.{i}, which the cache does not hold (it has {:?}); re-extract with --layers including {i} or --late-layers {}",
                    spec.method.name(),
                    cached,
                    n - i.min(n)
                )))
            }
        };
        let mut params = Params::new();
        let mut rng = SplitMix64::for_stream(seed, Stream::Init);
        let mut vb = Builder::new(&mut params, &mut rng, ckpt, dev);
        let pretrained = Some(Group::Pretrained);
        let mut head_dim = d_model;
        let (net, inputs) = match spec.method {
            Method::Sherl => {
                let last = n - k;
                if spec.early_layers.last() != Some(&last) {
                    return Err(FitError::settings(format!(
                        "the early route must end with hidden_states.{last} (N - K); got {:?}",
                        spec.early_layers
                    )));
                }
                for &i in &spec.early_layers {
                    need(i)?;
                }
                let m = spec.early_layers.len();
                let side = SideConfig {
                    layers: m,
                    d_model,
                    d: spec.side_dim,
                };
                let consolidation = Consolidation::load(vb.pp("early"), &side)?;
                let gate = RestoreGateConfig {
                    d: spec.side_dim,
                    d_model,
                    dropout: spec.dropout,
                };
                let restore = RestoreGate::load(vb.pp("late"), &gate)?;
                let group = spec.late_trainable.then_some(Group::Pretrained);
                let late = load_layers(&mut vb, arch, last..n, group)?;
                let net = Net::Sherl {
                    consolidation,
                    restore,
                    late,
                };
                (net, spec.early_layers.clone())
            }
            Method::LateLayer => {
                let last = n - k;
                need(last)?;
                let late = load_layers(&mut vb, arch, last..n, pretrained)?;
                (Net::LateLayer { late }, vec![last])
            }
            Method::LinearProbe => {
                let p = spec.probe_layer;
                if p > n {
                    return Err(FitError::settings(format!(
                        "--probe-layer {p} does not exist (0..={n})"
                    )));
                }
                let from = cached
                    .iter()
                    .copied()
                    .filter(|&i| i <= p)
                    .max()
                    .ok_or_else(|| {
                        FitError::cache_lacks(format!(
                            "the cache holds no layer at or below {p} for the linear probe"
                        ))
                    })?;
                let frozen = load_layers(&mut vb, arch, from..p, None)?;
                (Net::LinearProbe { frozen }, vec![from])
            }
            Method::Unipt => {
                for i in 0..=n {
                    need(i)?;
                }
                let side = SideConfig {
                    layers: n + 1,
                    d_model,
                    d: spec.side_dim,
                };
                let unipt = Unipt::load(vb.pp("unipt"), &side)?;
                head_dim = spec.side_dim;
                (Net::Unipt(unipt), (0..=n).collect())
            }
            Method::FullFt => {
                let (embeddings, inputs) = match arch {
                    Arch::Bert(cfg) => {
                        let b = vb.pp("embeddings").pretrained_group(pretrained);
                        (Some(Embeddings::load(b, cfg)?), Vec::new())
                    }
                    // Images: the patch embedding's output is cached.
                    Arch::Vit { .. } => {
                        if !cached.contains(&0) {
                            return Err(FitError::cache_lacks(format!(
                                "method full-ft on images starts from hidden_states.0 (the \
                                 patch embedding's output), which the cache does not hold (it \
                                 has {cached:?}); re-extract with --layers all (or a list \
                                 including 0)"
                            )));
                        }
                        (None, vec![0])
                    }
                };
                let layers = load_layers(&mut vb, arch, 0..n, pretrained)?;
                (Net::FullFt { embeddings, layers }, inputs)
            }
            Method::Lora | Method::Adapter => {
                let Arch::Bert(cfg) = arch else {
                    return Err(FitError::settings(format!(
                        "method {} runs BERT layers from token ids and is not implemented for                          an image cache; use lst, full-ft or another method there",
                        spec.method.name()
                    )));
                };
                let embeddings = Embeddings::load(vb.pp("embeddings"), cfg)?;
                let mut layers = Vec::with_capacity(n);
                let mut extras = Vec::with_capacity(n);
                for li in 0..n {
                    let mut b = vb.pp(&format!("encoder.layer.{li}"));
                    layers.push(BertLayer::load(b.reborrow(), cfg)?.without_packed_copy());
                    extras.push(match spec.method {
                        Method::Lora => Extras::Lora(LoraLayer::load(
                            b,
                            &LoraConfig {
                                spec: spec.lora.clone(),
                                d: d_model,
                                f: cfg.intermediate_size,
                            },
                        )?),
                        _ => Extras::Adapter(AdapterLayer::load(
                            b,
                            &AdapterConfig {
                                spec: spec.adapter,
                                d: d_model,
                                m: spec.side_dim,
                            },
                        )?),
                    });
                }
                let net = Net::Tuned {
                    embeddings,
                    layers,
                    extras,
                };
                (net, Vec::new())
            }
            Method::Lst => {
                for i in 0..=n {
                    need(i)?;
                }
                if spec.lst_init == LstInit::Prune && matches!(arch, Arch::Vit { .. }) {
                    return Err(FitError::settings(
                        "--lst-init prune prunes BERT layers and is not implemented for an \
                         image cache; use --lst-init random",
                    ));
                }
                let lst_cfg = LstConfig {
                    backbone: arch.sizes(),
                    d: spec.side_dim,
                    init: spec.lst_init,
                };
                let lst = Lst::load(vb.pp("lst"), &lst_cfg)?;
                (Net::Lst(lst), (0..=n).collect())
            }
        };
        let head_cfg = HeadConfig {
            pool: spec.pool,
            d: head_dim,
            classes: spec.classes,
        };
        let head = Head::load(vb.pp("head"), &head_cfg)?;
        let rel = match arch {
            Arch::Bert(cfg) => RelativeBias::load(vb, cfg)?,
            Arch::Vit { .. } => None,
        };
        Ok(Model {
            spec,
            inputs,
            net,
            head,
            rel,
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
        match &self.net {
            Net::Sherl { restore, .. } => restore.gate().map(Some),
            _ => Ok(None),
        }
    }

    /// # Shapes
    /// `batch.layers` as [`Model::inputs`], each `[B, S, D]` -> logits `[B, classes]`.
    pub fn forward(&self, batch: &Batch, mode: &mut Mode<'_>) -> Result<Output> {
        forward(&self.net, &self.head, self.rel.as_ref(), batch, mode)
    }

    /// The modules with the same tensors (the same variables: gradients of
    /// its forward passes are the model's), owned, for a forward pass on
    /// another thread.
    pub fn shared(&self) -> Shared {
        Shared {
            net: self.net.clone(),
            head: self.head.clone(),
            rel: self.rel.clone(),
        }
    }

    /// The model for evaluation and prediction: the same weights (shared,
    /// not copied) cut from the autograd graph, so a forward pass records
    /// no graph and keeps no activations (see [`Detach`]).
    pub fn inference(&self) -> Inference {
        Inference {
            net: self.net.detached(),
            head: self.head.detached(),
            rel: self.rel.clone(),
        }
    }
}

/// [`Model::shared`]: the model's modules, owned.
#[derive(Debug, Clone)]
pub struct Shared {
    net: Net,
    head: Head,
    rel: Option<RelativeBias>,
}

impl Shared {
    /// As [`Model::forward`].
    pub fn forward(&self, batch: &Batch, mode: &mut Mode<'_>) -> Result<Output> {
        forward(&self.net, &self.head, self.rel.as_ref(), batch, mode)
    }
}

/// [`Model::inference`]: a forward pass without dropout or gradients.
#[derive(Debug, Clone)]
pub struct Inference {
    net: Net,
    head: Head,
    rel: Option<RelativeBias>,
}

impl Inference {
    /// As [`Model::forward`] in evaluation mode.
    pub fn forward(&self, batch: &Batch) -> Result<Output> {
        forward(
            &self.net,
            &self.head,
            self.rel.as_ref(),
            batch,
            &mut Mode::Eval,
        )
    }

    /// The pooled features `[B, d]` the head's linear layer sees, in
    /// evaluation mode (a check that a model reproduces its backbone).
    pub fn pooled(&self, batch: &Batch) -> Result<Tensor> {
        let (y, _) = sequence(&self.net, self.rel.as_ref(), batch, &mut Mode::Eval)?;
        self.head.pool(&y, &batch.mask)
    }
}

impl Detach for Net {
    fn detached(&self) -> Self {
        match self {
            Net::Sherl {
                consolidation,
                restore,
                late,
            } => Net::Sherl {
                consolidation: consolidation.detached(),
                restore: restore.detached(),
                late: late.detached(),
            },
            Net::LateLayer { late } => Net::LateLayer {
                late: late.detached(),
            },
            Net::LinearProbe { frozen } => Net::LinearProbe {
                frozen: frozen.detached(),
            },
            Net::Unipt(u) => Net::Unipt(u.detached()),
            Net::FullFt { embeddings, layers } => Net::FullFt {
                embeddings: embeddings.as_ref().map(Detach::detached),
                layers: layers.detached(),
            },
            Net::Tuned {
                embeddings,
                layers,
                extras,
            } => Net::Tuned {
                embeddings: embeddings.detached(),
                layers: layers.detached(),
                extras: extras.detached(),
            },
            Net::Lst(l) => Net::Lst(l.detached()),
        }
    }
}

fn forward(
    net: &Net,
    head: &Head,
    rel: Option<&RelativeBias>,
    batch: &Batch,
    mode: &mut Mode<'_>,
) -> Result<Output> {
    let (y, alpha) = sequence(net, rel, batch, mode)?;
    let logits = head.forward(&y, &batch.mask)?;
    Ok(Output { logits, alpha })
}

/// The final sequence `[B, S, d]` before the head, and SHERL's layer
/// weights when the method has them. The backbone's layers get MPNet's
/// relative-position bias when `rel` holds it; LST's side layers only the
/// key mask (their heads need not be the backbone's, and the cached states
/// they read already carry positions).
fn sequence(
    net: &Net,
    rel: Option<&RelativeBias>,
    batch: &Batch,
    mode: &mut Mode<'_>,
) -> Result<(Tensor, Option<Tensor>)> {
    {
        let keys = attention_bias(&batch.mask)?;
        let bias = match (rel, net) {
            (Some(r), Net::Sherl { .. })
            | (Some(r), Net::LateLayer { .. })
            | (Some(r), Net::LinearProbe { .. })
            | (Some(r), Net::FullFt { .. })
            | (Some(r), Net::Tuned { .. }) => r.add_to(&keys)?,
            _ => keys.clone(),
        };
        let mut alpha = None;
        let y = match net {
            Net::Sherl {
                consolidation,
                restore,
                late,
            } => {
                let c = consolidation.forward(&batch.layers, &batch.mask)?;
                alpha = Some(c.alpha);
                let last = batch.layers.last().expect("sherl reads at least 2 layers");
                let h = restore.forward(&c.g, last, mode)?;
                run_layers(late, h, &bias, mode)?
            }
            Net::LateLayer { late } => run_layers(late, batch.layers[0].clone(), &bias, mode)?,
            Net::LinearProbe { frozen } => {
                run_layers(frozen, batch.layers[0].clone(), &bias, &mut Mode::Eval)?.detach()
            }
            Net::Unipt(unipt) => unipt.forward(&batch.layers, &batch.mask)?,
            Net::FullFt { embeddings, layers } => {
                let h = match embeddings {
                    Some(e) => e.forward(&batch.token_ids, &batch.type_ids, mode)?,
                    None => batch.layers[0].clone(),
                };
                run_layers(layers, h, &bias, mode)?
            }
            Net::Tuned {
                embeddings,
                layers,
                extras,
            } => {
                let mut h = embeddings.forward(&batch.token_ids, &batch.type_ids, mode)?;
                for (l, e) in layers.iter().zip(extras) {
                    // LoRA without dropout merges into the weights and runs
                    // as a trained layer (the fused op on the CPU)
                    let merged = match e {
                        Extras::Lora(lora) => lora.merged_deltas()?,
                        Extras::Adapter(_) => None,
                    };
                    h = match merged {
                        Some(deltas) => l.merged(&deltas)?.forward(&h, &bias, mode)?,
                        None => l.forward_with(&h, &bias, mode, Some(e.get()))?,
                    };
                }
                h
            }
            Net::Lst(lst) => lst.forward(&batch.layers, &keys, mode)?,
        };
        Ok((y, alpha))
    }
}
