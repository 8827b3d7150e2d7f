//! An image backbone (a DINOv2 ViT behind its own ONNX graph) as a
//! [`Body`].
//!
//! The hidden states the run read from its cache come from the user's own
//! graph, as extraction and `predict` compute them: its tensors named in
//! `backbone.json` exposed as `hidden_states.i`
//! ([`crate::extract::image::exposed_model`]; the patch embedding and every
//! frozen layer are the model's own nodes), then pooled `p x p` as the
//! cache was (`--patch-pool`). Everything after them is written here: the
//! ViT blocks a run computes in candle ([`crate::fit::nn::vit_layer`]:
//! pre-norm, LayerScale, erf GELU, no attention mask) from the ViT
//! checkpoint with the run's trained weights in place, side layers, the
//! method's modules and the head. A hidden state the cache holds is read
//! from the graph when no trained layer comes before it; any other is
//! computed from the deepest such state below it, as candle does (a
//! linear probe of an uncached layer, the trained late layers, full-ft's
//! every block from hidden_states.0).
//!
//! The nodes written here are appended to the user's graph
//! ([`crate::extract::onnx::edit::append_graph`]: its bytes untouched),
//! each name they define prefixed with `sherl/` but the outputs `logits`
//! and `probabilities`, and the opset raised to 17 (LayerNormalization).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use super::body::Body;
use crate::backbone::{BertConfig, Checkpoint, ImageBackboneDesc};
use crate::extract::onnx::builder::{attr_int, attr_ints, Graph, TensorSource};
use crate::extract::onnx::proto::{GraphProto, ValueInfoProto};
use crate::fit::nn::vit_layer::VitLayerConfig;
use crate::{Error, Result};

/// The exported model's input: the preprocessed images, `[batch, channels,
/// size, size]` floats (the backbone's own input, renamed).
pub const INPUT: &str = "pixel_values";

/// Prefix of every name the appended graph defines.
pub const PREFIX: &str = "sherl/";

/// The `p x p` averaging of the patch grid the cache was extracted with.
#[derive(Debug, Clone, Copy)]
pub struct PatchPool {
    /// Side of the backbone's patch grid.
    pub grid: usize,
    /// Side of the averaged squares (`--patch-pool`, > 1).
    pub p: usize,
    /// Whether token 0 is a CLS token (kept as it is).
    pub cls: bool,
}

/// The constants every ViT block reads.
struct VitConsts {
    split: String,
    merge: String,
    scale: String,
    sqrt2: String,
    half: String,
}

/// A DINOv2 ViT behind the user's ONNX graph, as a [`Body`].
pub struct ImageBody<'a> {
    g: Graph,
    ckpt: &'a Checkpoint,
    cfg: VitLayerConfig,
    layers: usize,
    /// Hidden states read from the backbone's graph (cached, and no
    /// trained layer before them).
    from_graph: BTreeSet<usize>,
    /// Cached hidden states (for messages).
    cached: Vec<usize>,
    pool: Option<PatchPool>,
    consts: VitConsts,
    /// `hidden_states.i` built so far.
    states: BTreeMap<usize, String>,
    /// Backbone hidden states the graph reads.
    exposed: BTreeSet<usize>,
    zero_bias: Option<String>,
}

impl<'a> ImageBody<'a> {
    /// The ViT of block sizes `cfg` and `layers` layers, weights `ckpt`
    /// (the run's trained tensors in place); `cached` lists the hidden
    /// states the cache holds, `first_trained` the first layer with
    /// trained weights (`layers` when none), `pool` the patch pooling.
    pub fn new(
        cfg: &VitLayerConfig,
        layers: usize,
        ckpt: &'a Checkpoint,
        cached: &[usize],
        first_trained: usize,
        pool: Option<PatchPool>,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        if cfg.heads == 0 || !d.is_multiple_of(cfg.heads) {
            return Err(Error::UnsupportedBackbone(format!(
                "{} attention heads do not divide the width {d}",
                cfg.heads
            )));
        }
        let hd = d / cfg.heads;
        let mut g = Graph::default();
        // read by the GELU forms (`Graph::activation`)
        g.const_f32("one", &[1.0], &[]);
        let consts = VitConsts {
            split: g.const_i64(
                "vit/split_heads",
                &[0, 0, cfg.heads as i64, hd as i64],
                &[4],
            ),
            merge: g.const_i64("vit/merge_heads", &[0, 0, d as i64], &[3]),
            scale: g.const_f32("vit/attn_scale", &[1.0 / (hd as f32).sqrt()], &[]),
            sqrt2: g.const_f32("vit/sqrt2", &[std::f32::consts::SQRT_2], &[]),
            half: g.const_f32("vit/half", &[0.5], &[]),
        };
        let from_graph = cached
            .iter()
            .copied()
            .filter(|&i| i <= first_trained && i <= layers)
            .collect();
        Ok(ImageBody {
            g,
            ckpt,
            cfg: *cfg,
            layers,
            from_graph,
            cached: cached.to_vec(),
            pool,
            consts,
            states: BTreeMap::new(),
            exposed: BTreeSet::new(),
            zero_bias: None,
        })
    }

    /// `x` (`[batch, tokens, D]`) with its patch tokens averaged over
    /// `p x p` squares, the CLS token kept
    /// ([`crate::extract::image::pool_patches`]).
    fn pooled(&mut self, x: &str, pool: PatchPool) -> String {
        let d = self.cfg.hidden_size as i64;
        let (grid, p) = (pool.grid as i64, pool.p as i64);
        let side = grid / p;
        let c = i64::from(pool.cls);
        let g = &mut self.g;
        let axis1 = g.fresh("vit/axis1");
        let axis1 = g.const_i64(&axis1, &[1], &[1]);
        let start = g.fresh("vit/patch_start");
        let start = g.const_i64(&start, &[c], &[1]);
        let end = g.fresh("vit/patch_end");
        let end = g.const_i64(&end, &[c + grid * grid], &[1]);
        let patches = g.node("Slice", &[x, &start, &end, &axis1], vec![]);
        // token c + (r p + i) grid + q p + j -> [batch, r, i, q, j, D]
        let shape = g.fresh("vit/pool_grid");
        let shape = g.const_i64(&shape, &[0, side, p, side, p, d], &[6]);
        let squares = g.node("Reshape", &[&patches, &shape], vec![]);
        let axes = g.fresh("vit/pool_axes");
        let axes = g.const_i64(&axes, &[2, 4], &[2]);
        let sum = g.node(
            "ReduceSum",
            &[&squares, &axes],
            vec![attr_int("keepdims", 0)],
        );
        let scale = g.fresh("vit/pool_scale");
        let scale = g.const_f32(&scale, &[1.0 / (p * p) as f32], &[]);
        let mean = g.node("Mul", &[&sum, &scale], vec![]);
        let shape = g.fresh("vit/pool_tokens");
        let shape = g.const_i64(&shape, &[0, side * side, d], &[3]);
        let mean = g.node("Reshape", &[&mean, &shape], vec![]);
        if !pool.cls {
            return mean;
        }
        let zero = g.fresh("vit/cls_start");
        let zero = g.const_i64(&zero, &[0], &[1]);
        let one = g.fresh("vit/cls_end");
        let one = g.const_i64(&one, &[1], &[1]);
        let cls = g.node("Slice", &[x, &zero, &one, &axis1], vec![]);
        g.node("Concat", &[&cls, &mean], vec![attr_int("axis", 1)])
    }

    /// The graph appended to the backbone's: every name it defines
    /// prefixed with [`PREFIX`] but those in `keep` (the model's outputs),
    /// with `outputs` as its outputs.
    fn prefixed(self, outputs: Vec<ValueInfoProto>, keep: &[&str]) -> GraphProto {
        let g = self.g;
        let defined: HashSet<String> = g
            .nodes
            .iter()
            .flat_map(|n| n.output.iter().cloned())
            .chain(g.inits.iter().map(|t| t.name.clone()))
            .filter(|n| !keep.contains(&n.as_str()))
            .collect();
        let rename = |n: &mut String| {
            if defined.contains(n.as_str()) {
                *n = format!("{PREFIX}{n}");
            }
        };
        let mut nodes = g.nodes;
        for node in &mut nodes {
            node.input.iter_mut().for_each(rename);
            node.output.iter_mut().for_each(rename);
            node.name = format!("{PREFIX}{}", node.name);
        }
        let mut inits = g.inits;
        for t in &mut inits {
            rename(&mut t.name);
        }
        GraphProto {
            node: nodes,
            initializer: inits,
            output: outputs,
            ..Default::default()
        }
    }

    /// The exported model's bytes: the backbone model at `model` (described
    /// by `desc`) with the hidden states read exposed, its input renamed
    /// [`INPUT`], the nodes built here appended, `outputs` its outputs;
    /// `doc` its description and `meta` its metadata.
    pub fn finish(
        self,
        model: &Path,
        desc: &ImageBackboneDesc,
        outputs: Vec<ValueInfoProto>,
        doc: String,
        meta: Vec<crate::extract::onnx::proto::StringStringEntryProto>,
    ) -> Result<Vec<u8>> {
        use crate::extract::onnx::export::{IR_VERSION, OPSET};
        use prost::Message;
        let exposed: Vec<usize> = self.exposed.iter().copied().collect();
        if exposed.is_empty() {
            return Err(Error::Onnx {
                path: model.to_path_buf(),
                message: "the exported graph reads no hidden state of the backbone".into(),
            });
        }
        let bytes = crate::extract::image::exposed_model(model, desc, &exposed)?;
        let keep: Vec<String> = outputs.iter().map(|o| o.name.clone()).collect();
        let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
        let graph = self.prefixed(outputs, &keep);
        let rename = (desc.input != INPUT).then_some((desc.input.as_str(), INPUT));
        let mut bytes = crate::extract::onnx::edit::append_graph(
            model, &bytes, &graph, rename, OPSET, IR_VERSION,
        )?;
        // scalar fields appended replace the model's; metadata entries add
        let tail = crate::extract::onnx::proto::ModelProto {
            producer_name: "sherl".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            doc_string: doc,
            metadata_props: meta,
            ..Default::default()
        };
        tail.encode(&mut bytes)
            .expect("a Vec grows to hold what is encoded");
        Ok(bytes)
    }

    /// A checkpoint linear layer `prefix` (`[d_out, d_in]`) on `x`.
    fn linear(&mut self, prefix: &str, d_in: usize, d_out: usize, x: &str) -> Result<String> {
        self.g.linear(self.ckpt, prefix, d_in, d_out, x)
    }
}

impl Body for ImageBody<'_> {
    fn g(&mut self) -> &mut Graph {
        &mut self.g
    }

    fn width(&self) -> usize {
        self.cfg.hidden_size
    }

    fn layers(&self) -> usize {
        self.layers
    }

    fn hidden(&mut self, i: usize) -> Result<String> {
        if let Some(s) = self.states.get(&i) {
            return Ok(s.clone());
        }
        if i > self.layers {
            return Err(Error::UnsupportedBackbone(format!(
                "hidden_states.{i} does not exist: the ViT has {} layers",
                self.layers
            )));
        }
        let s = if self.from_graph.contains(&i) {
            self.exposed.insert(i);
            let name = crate::backbone::hidden_state_name(i);
            match self.pool {
                Some(pool) => self.pooled(&name, pool),
                None => name,
            }
        } else if i == 0 {
            return Err(Error::Onnx {
                path: PathBuf::from("hidden_states.0"),
                message: format!(
                    "the run computes from a hidden state its cache does not hold (cached: {:?})",
                    self.cached
                ),
            });
        } else {
            let x = self.hidden(i - 1)?;
            self.layer(i - 1, &x, &format!("vit/hidden_states.{i}"))?
        };
        self.states.insert(i, s.clone());
        Ok(s)
    }

    fn layer(&mut self, i: usize, x: &str, out: &str) -> Result<String> {
        // Hugging Face's Dinov2Layer, as `VitLayer::forward`
        let d = self.cfg.hidden_size;
        let eps = self.cfg.layer_norm_eps as f32;
        let p = format!("encoder.layer.{i}");
        let (ckpt, g) = (self.ckpt, &mut self.g);
        let n1 = g.layer_norm(ckpt, &format!("{p}.norm1"), d, eps, x, None)?;
        let q = self.linear(&format!("{p}.attention.attention.query"), d, d, &n1)?;
        let k = self.linear(&format!("{p}.attention.attention.key"), d, d, &n1)?;
        let v = self.linear(&format!("{p}.attention.attention.value"), d, d, &n1)?;
        let c = &self.consts;
        let g = &mut self.g;
        let q = g.node("Reshape", &[&q, &c.split], vec![]);
        let q = g.node("Transpose", &[&q], vec![attr_ints("perm", &[0, 2, 1, 3])]);
        let k = g.node("Reshape", &[&k, &c.split], vec![]);
        let k = g.node("Transpose", &[&k], vec![attr_ints("perm", &[0, 2, 3, 1])]);
        let v = g.node("Reshape", &[&v, &c.split], vec![]);
        let v = g.node("Transpose", &[&v], vec![attr_ints("perm", &[0, 2, 1, 3])]);
        let scores = g.node("MatMul", &[&q, &k], vec![]);
        let scores = g.node("Mul", &[&scores, &c.scale], vec![]);
        let probs = g.node("Softmax", &[&scores], vec![attr_int("axis", -1)]);
        let ctx = g.node("MatMul", &[&probs, &v], vec![]);
        let ctx = g.node("Transpose", &[&ctx], vec![attr_ints("perm", &[0, 2, 1, 3])]);
        let ctx = g.node("Reshape", &[&ctx, &c.merge], vec![]);
        let a = self.linear(&format!("{p}.attention.output.dense"), d, d, &ctx)?;
        let (ckpt, g) = (self.ckpt, &mut self.g);
        let s1 = g.weight(ckpt, &format!("{p}.layer_scale1.lambda1"), &[d], false)?;
        let a = g.node("Mul", &[&a, &s1], vec![]);
        let h1 = g.node("Add", &[x, &a], vec![]);
        let n2 = g.layer_norm(ckpt, &format!("{p}.norm2"), d, eps, &h1, None)?;
        let mlp = self.cfg.mlp_size;
        let m = self.linear(&format!("{p}.mlp.fc1"), d, mlp, &n2)?;
        let (sqrt2, half) = (self.consts.sqrt2.clone(), self.consts.half.clone());
        let m = self
            .g
            .activation(crate::backbone::Activation::Gelu, &m, &sqrt2, &half);
        let m = self.linear(&format!("{p}.mlp.fc2"), mlp, d, &m)?;
        let (ckpt, g) = (self.ckpt, &mut self.g);
        let s2 = g.weight(ckpt, &format!("{p}.layer_scale2.lambda1"), &[d], false)?;
        let m = g.node("Mul", &[&m, &s2], vec![]);
        Ok(g.node_named("Add", &[&h1, &m], vec![], out.to_string()))
    }

    fn mask(&mut self) -> Option<String> {
        None
    }

    fn sizes(&self) -> Result<BertConfig> {
        // what the trainer sizes LST's side layers after on an image cache
        let arch = crate::fit::model::Arch::Vit {
            cfg: self.cfg,
            layers: self.layers,
        };
        Ok(arch.sizes())
    }

    fn side_layer(
        &mut self,
        src: &dyn TensorSource,
        cfg: &BertConfig,
        tag: &str,
        prefix: &str,
        x: &str,
        out: &str,
    ) -> Result<String> {
        // no token is padding: the attention bias is zero
        let bias = match &self.zero_bias {
            Some(b) => b.clone(),
            None => {
                let b = self.g.const_f32("vit/no_padding", &[0.0], &[]);
                self.zero_bias = Some(b.clone());
                b
            }
        };
        crate::extract::onnx::export::side_layer_with_bias(
            &mut self.g,
            src,
            cfg,
            tag,
            prefix,
            x,
            out.to_string(),
            &bias,
        )
    }
}
