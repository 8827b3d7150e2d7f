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

use crate::backbone::{BertConfig, Checkpoint};
use crate::fit::batcher::Batch;
use crate::fit::nn::bert_layer::BertLayer;
use crate::fit::nn::head::{Head, HeadConfig};
use crate::fit::nn::relative::RelativeBias;
use crate::fit::nn::vit_layer::{VitLayer, VitLayerConfig};
use crate::fit::nn::{Builder, Detach, Mode};
use crate::fit::params::{Group, Params};
use crate::rng::{SplitMix64, Stream};
use crate::Result;
use net::Net;

mod net;

pub use super::nn::head::Pool;
pub use crate::fit::method::{Method, MethodSpec};

/// What the model is built from: the method with its settings resolved
/// on the cache, the pooling and the classes. Stored in the run's
/// `config.json` (`spec`) and read back by predict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The method and its settings.
    #[serde(flatten)]
    pub method: MethodSpec,
    /// Pooling.
    pub pool: Pool,
    /// Classes.
    pub classes: usize,
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
        let mut params = Params::new();
        let mut rng = SplitMix64::for_stream(seed, Stream::Init);
        let mut vb = Builder::new(&mut params, &mut rng, ckpt, dev);
        let built = net::build(&spec.method, &mut vb, arch, cached)?;
        let head_cfg = HeadConfig {
            pool: spec.pool,
            d: built.head_dim,
            classes: spec.classes,
        };
        let head = Head::load(vb.pp("head"), &head_cfg)?;
        let rel = match arch {
            Arch::Bert(cfg) => RelativeBias::load(vb, cfg)?,
            Arch::Vit { .. } => None,
        };
        Ok(Model {
            spec,
            inputs: built.inputs,
            net: built.net,
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
        self.net.gate()
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
        let (y, _) = net::sequence(&self.net, self.rel.as_ref(), batch, &mut Mode::Eval)?;
        self.head.pool(&y, &batch.mask)
    }
}

fn forward(
    net: &Net,
    head: &Head,
    rel: Option<&RelativeBias>,
    batch: &Batch,
    mode: &mut Mode<'_>,
) -> Result<Output> {
    let (y, alpha) = net::sequence(net, rel, batch, mode)?;
    let logits = head.forward(&y, &batch.mask)?;
    Ok(Output { logits, alpha })
}
