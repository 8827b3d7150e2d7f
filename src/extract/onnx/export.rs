//! Export a Hugging Face BERT-family checkpoint (BERT or MPNet) to an ONNX
//! graph that exposes every layer's hidden state.
//!
//! Inputs: `input_ids`, `attention_mask` and, for BERT, `token_type_ids`
//! (int64, `[batch, seq]`, both dynamic). Outputs: `hidden_states.0`
//! (embedding output, after its LayerNorm) to `hidden_states.N` (after layer
//! N), float32 `[batch, seq, hidden]`, what `transformers`' `BertModel` /
//! `MPNetModel` return as `hidden_states` in eval mode, at every real token.
//!
//! The graph follows `modeling_bert.py` (huggingface/transformers v4.8.2,
//! `BertEmbeddings`, `BertSelfAttention`, `BertSelfOutput`,
//! `BertIntermediate`, `BertOutput`). Two details matter for ONNX Runtime:
//! position ids are taken by slicing the position table with the input's
//! `Shape` (a `Range` node broke ORT 1.32's extended optimiser), and padding
//! is masked with a large negative additive bias (the most negative f32, as
//! `transformers` does), so padded-batch outputs equal unpadded ones at real
//! tokens.
//!
//! MPNet (`modeling_mpnet.py`) has the same layer under other names, no
//! token types, positions counted from `pad_token_id + 1`, and a
//! relative-position bias added to the attention scores of every layer. The
//! graph gathers that bias from the shared `[buckets, heads]` table with a
//! bucket-index table (`[L, L]` for the longest sequence L, computed by
//! [`crate::backbone::relative`]) sliced to the batch's length, once per
//! batch. One stated difference: `transformers` gives padding tokens the
//! padding position and real tokens the positions after it; sherl pads on
//! the right and slices the position table from the first real position for
//! every token, so real tokens get the same positions and only the (masked,
//! never read) padding rows differ.

use std::path::Path;

use prost::Message;

use super::builder::{attr_int, attr_ints, meta, Graph, TensorSource};
use super::proto::{data_type, GraphProto, ModelProto, OperatorSetIdProto, ValueInfoProto};
use crate::backbone::{relative, Activation, BertConfig, Checkpoint, Family, LayerNames};
use crate::{Error, Result};

/// ONNX IR version written (ONNX 1.13+; read by ONNX Runtime >= 1.14).
pub const IR_VERSION: i64 = 8;
/// Default-domain opset (LayerNormalization needs 17).
pub const OPSET: i64 = 17;

pub use crate::backbone::hidden_state_name;

/// Summary of an export.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// Number of transformer layers.
    pub layers: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Checkpoint name prefix found (`""` or `"bert."`...).
    pub prefix: String,
    /// Bytes written.
    pub bytes: u64,
}

/// Build the ONNX model for `cfg` with the weights of `ckpt`.
pub fn build_model(cfg: &BertConfig, ckpt: &Checkpoint) -> Result<ModelProto> {
    let (mut b, mut x) = BertGraph::new(cfg, ckpt)?;
    for i in 0..cfg.num_hidden_layers {
        x = b.layer(ckpt, i, &x, &mut NoHooks)?;
    }
    let outputs = (0..=cfg.num_hidden_layers)
        .map(|i| b.hidden_output(&hidden_state_name(i)))
        .collect();
    Ok(b.finish(ckpt, outputs))
}

/// Where a method puts extra nodes inside an encoder layer (adapters).
pub trait LayerHooks {
    /// `z`, the attention block's output projection of layer `i` (before
    /// the residual and the LayerNorm): return what replaces it.
    fn after_attention(&mut self, _g: &mut Graph, _i: usize, z: &str) -> Result<String> {
        Ok(z.to_string())
    }
    /// `z`, the FFN's output projection of layer `i` (before the residual
    /// and the LayerNorm): return what replaces it.
    fn after_ffn(&mut self, _g: &mut Graph, _i: usize, z: &str) -> Result<String> {
        Ok(z.to_string())
    }
}

/// No extra nodes: the backbone's own layer.
pub struct NoHooks;
impl LayerHooks for NoHooks {}

/// A BERT-family encoder graph under construction: the inputs, the
/// embeddings and the attention bias are in place; layers are added one
/// by one with [`BertGraph::layer`], on any input.
pub struct BertGraph {
    /// The graph, for nodes a caller adds between layers.
    pub g: Graph,
    cfg: BertConfig,
    shared: LayerShared,
    /// The padding mask's additive bias alone (`[B, 1, 1, S]`), without
    /// MPNet's relative-position bias.
    keys: String,
}

impl BertGraph {
    /// Declare the inputs, build the embeddings and the attention bias;
    /// returns the builder and `hidden_states.0`.
    pub fn new(cfg: &BertConfig, ckpt: &Checkpoint) -> Result<(Self, String)> {
        cfg.validate().map_err(Error::UnsupportedBackbone)?;
        let mut g = Graph::default();
        let act = cfg.activation().map_err(Error::UnsupportedBackbone)?;
        declare_inputs(&mut g, cfg.family());
        let (x, seq) = embeddings(&mut g, cfg, ckpt)?;
        let (keys, bias) = attention_bias(&mut g, cfg, ckpt, &seq)?;
        let shared = LayerShared::new(&mut g, cfg, act, bias, "");
        let cfg = cfg.clone();
        Ok((
            BertGraph {
                g,
                cfg,
                shared,
                keys,
            },
            x,
        ))
    }

    /// Backbone layer `i` (checkpoint `encoder.layer.{i}` of `src`) on `x`;
    /// returns its output, named `hidden_states.{i + 1}`.
    pub fn layer(
        &mut self,
        src: &dyn TensorSource,
        i: usize,
        x: &str,
        hooks: &mut dyn LayerHooks,
    ) -> Result<String> {
        let spec = LayerSpec {
            cfg: &self.cfg,
            shared: &self.shared,
            index: i,
            prefix: format!("encoder.layer.{i}"),
            out: hidden_state_name(i + 1),
        };
        encoder_layer(&mut self.g, src, &spec, x, hooks)
    }

    /// A layer of the same family at another width (`cfg`: hidden size,
    /// heads, FFN size, activation, epsilon), its weights read from `src`
    /// under `prefix` (e.g. a backbone layer run a second time), with its
    /// own constants named after `tag`; returns its output `out`. The
    /// attention bias is the backbone's (the padding mask, and MPNet's
    /// relative bias).
    pub fn side_layer(
        &mut self,
        src: &dyn TensorSource,
        cfg: &BertConfig,
        tag: &str,
        prefix: &str,
        x: &str,
        out: String,
    ) -> Result<String> {
        let bias = &self.shared.bias4;
        side_layer_with_bias(&mut self.g, src, cfg, tag, prefix, x, out, bias)
    }

    /// [`BertGraph::side_layer`] attending under the padding mask alone,
    /// without MPNet's relative-position bias (a side network's layers,
    /// whose heads need not be the backbone's: LST's).
    pub fn masked_side_layer(
        &mut self,
        src: &dyn TensorSource,
        cfg: &BertConfig,
        tag: &str,
        prefix: &str,
        x: &str,
        out: String,
    ) -> Result<String> {
        side_layer_with_bias(&mut self.g, src, cfg, tag, prefix, x, out, &self.keys)
    }

    /// The backbone's configuration.
    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// A float `[batch, seq, hidden]` output declaration named `name`.
    pub fn hidden_output(&self, name: &str) -> ValueInfoProto {
        let out_dims: [Result<i64, &str>; 3] =
            [Err("batch"), Err("seq"), Ok(self.cfg.hidden_size as i64)];
        ValueInfoProto::tensor(name, data_type::FLOAT, &out_dims)
    }

    /// Wrap the graph in a model with `outputs`, opset and metadata.
    pub fn finish(self, ckpt: &Checkpoint, outputs: Vec<ValueInfoProto>) -> ModelProto {
        model_proto(&self.cfg, ckpt, self.g, outputs)
    }
}

/// A layer of `cfg`'s family and sizes built into `g` outside a
/// [`BertGraph`] (the side network of an image backbone, whose graph has no
/// embeddings and no padding): what [`BertGraph::side_layer`] builds, with
/// `bias4` (broadcast onto the attention scores `[batch, heads, seq, seq]`)
/// in place of the backbone's padding bias; a zero constant where no token
/// is padding. Weights from `src` under `prefix`, constants named after
/// `tag`; `g` must hold the constant `one` the GELU forms read. Returns its
/// output `out`.
#[allow(clippy::too_many_arguments)]
pub fn side_layer_with_bias(
    g: &mut Graph,
    src: &dyn TensorSource,
    cfg: &BertConfig,
    tag: &str,
    prefix: &str,
    x: &str,
    out: String,
    bias4: &str,
) -> Result<String> {
    let act = cfg.activation().map_err(Error::UnsupportedBackbone)?;
    let shared = LayerShared::new(g, cfg, act, bias4.to_string(), tag);
    let spec = LayerSpec {
        cfg,
        shared: &shared,
        index: 0,
        prefix: prefix.to_string(),
        out,
    };
    encoder_layer(g, src, &spec, x, &mut NoHooks)
}

/// Declare the graph's int64 `[batch, seq]` inputs for `family`.
fn declare_inputs(g: &mut Graph, family: Family) {
    let dims: [Result<i64, &str>; 2] = [Err("batch"), Err("seq")];
    let inputs: &[&str] = match family {
        Family::Bert => &["input_ids", "attention_mask", "token_type_ids"],
        Family::Mpnet => &["input_ids", "attention_mask"],
    };
    for name in inputs {
        g.inputs
            .push(ValueInfoProto::tensor(name, data_type::INT64, &dims));
    }
}

/// The embedding block: returns its output (`hidden_states.0`) and the
/// 1-element sequence-length tensor the attention bias slices with.
fn embeddings(g: &mut Graph, cfg: &BertConfig, ckpt: &Checkpoint) -> Result<(String, String)> {
    let d = cfg.hidden_size;
    let word = g.weight(
        ckpt,
        "embeddings.word_embeddings.weight",
        &[cfg.vocab_size, d],
        false,
    )?;
    let pos = g.weight(
        ckpt,
        "embeddings.position_embeddings.weight",
        &[cfg.max_position_embeddings, d],
        false,
    )?;
    // BERT's graph is written exactly as before MPNet existed (same
    // initializers, nodes and order, so the same bytes and sha256)
    let typ = match cfg.family() {
        Family::Bert => Some(g.weight(
            ckpt,
            "embeddings.token_type_embeddings.weight",
            &[cfg.type_vocab_size, d],
            false,
        )?),
        Family::Mpnet => None,
    };
    let we = g.node("Gather", &[&word, "input_ids"], vec![]);
    let te = typ.map(|t| g.node("Gather", &[&t, "token_type_ids"], vec![]));
    // seq length as a 1-element tensor: Shape(input_ids)[1:2]
    let seq = g.node(
        "Shape",
        &["input_ids"],
        vec![attr_int("start", 1), attr_int("end", 2)],
    );
    let s2 = match te {
        Some(te) => {
            let zero = g.const_i64("zero1", &[0], &[1]);
            let axis0 = g.const_i64("axis0", &[0], &[1]);
            let pe = g.node("Slice", &[&pos, &zero, &seq, &axis0], vec![]); // [seq, D]
            let s1 = g.node("Add", &[&we, &te], vec![]);
            g.node("Add", &[&s1, &pe], vec![])
        }
        None => {
            // MPNet: rows offset .. offset + seq of the position table
            let off = cfg.position_offset() as i64;
            let start = g.const_i64("pos_start", &[off], &[1]);
            let axis0 = g.const_i64("axis0", &[0], &[1]);
            let end = g.node("Add", &[&seq, &start], vec![]);
            let pe = g.node("Slice", &[&pos, &start, &end, &axis0], vec![]); // [seq, D]
            g.node("Add", &[&we, &pe], vec![])
        }
    };
    let x = g.layer_norm(
        ckpt,
        "embeddings.LayerNorm",
        d,
        cfg.layer_norm_eps as f32,
        &s2,
        Some(hidden_state_name(0)),
    )?;
    Ok((x, seq))
}

/// The additive attention bias from the mask, `(1 - mask) * f32::MIN` as
/// `[B, 1, 1, S]`, plus MPNet's relative-position bias (`[B, H, S, S]`);
/// returns the mask's bias alone and the sum.
fn attention_bias(
    g: &mut Graph,
    cfg: &BertConfig,
    ckpt: &Checkpoint,
    seq: &str,
) -> Result<(String, String)> {
    let mask_f = g.node(
        "Cast",
        &["attention_mask"],
        vec![attr_int("to", data_type::FLOAT as i64)],
    );
    let one = g.const_f32("one", &[1.0], &[]);
    let inv = g.node("Sub", &[&one, &mask_f], vec![]);
    let minv = g.const_f32("mask_min", &[f32::MIN], &[]);
    let bias = g.node("Mul", &[&inv, &minv], vec![]);
    let ax12 = g.const_i64("axes12", &[1, 2], &[2]);
    let keys = g.node("Unsqueeze", &[&bias, &ax12], vec![]);
    let mut bias4 = keys.clone();
    if let Some(buckets) = cfg.relative_buckets() {
        // MPNet: + table[bucket(j - i)][h], [1, H, S, S], shared by all layers
        let len = cfg.max_tokens();
        let idx: Vec<i64> = relative::bucket_table(len, buckets)
            .into_iter()
            .map(|b| b as i64)
            .collect();
        let idx = g.const_i64("relative_buckets", &idx, &[len as i64, len as i64]);
        let table = g.weight(
            ckpt,
            "encoder.relative_attention_bias.weight",
            &[buckets, cfg.num_attention_heads],
            false,
        )?;
        let zeros = g.const_i64("zero2", &[0, 0], &[2]);
        let ends = g.node("Concat", &[seq, seq], vec![attr_int("axis", 0)]);
        let axes01 = g.const_i64("axes01", &[0, 1], &[2]);
        let idx = g.node("Slice", &[&idx, &zeros, &ends, &axes01], vec![]); // [S, S]
        let rel = g.node("Gather", &[&table, &idx], vec![]); // [S, S, H]
        let rel = g.node("Transpose", &[&rel], vec![attr_ints("perm", &[2, 0, 1])]);
        let ax0 = g.const_i64("axes0", &[0], &[1]);
        let rel = g.node("Unsqueeze", &[&rel, &ax0], vec![]); // [1, H, S, S]
        bias4 = g.node("Add", &[&bias4, &rel], vec![]); // [B, H, S, S]
    }
    Ok((keys, bias4))
}

/// What every encoder layer shares: module names, activation, the
/// attention bias and the names of the constant initializers it reads.
struct LayerShared {
    names: LayerNames,
    act: Activation,
    bias4: String,
    split_shape: String,
    merge_shape: String,
    scale: String,
    sqrt2: String,
    half: String,
}

impl LayerShared {
    /// Add the shared constants to `g` (in the order the exporter always
    /// wrote them) next to `act` and the attention bias `bias4`.
    /// `tag` prefixes the constants' names (empty for the backbone's own
    /// layers, whose graph bytes stay as they always were).
    fn new(g: &mut Graph, cfg: &BertConfig, act: Activation, bias4: String, tag: &str) -> Self {
        let (heads, hd, d) = (cfg.num_attention_heads, cfg.head_dim(), cfg.hidden_size);
        let split = [0, 0, heads as i64, hd as i64];
        LayerShared {
            names: LayerNames::of(cfg.family()),
            act,
            bias4,
            split_shape: g.const_i64(&format!("{tag}split_heads"), &split, &[4]),
            merge_shape: g.const_i64(&format!("{tag}merge_heads"), &[0, 0, d as i64], &[3]),
            scale: g.const_f32(
                &format!("{tag}attn_scale"),
                &[1.0 / (hd as f32).sqrt()],
                &[],
            ),
            sqrt2: g.const_f32(&format!("{tag}sqrt2"), &[std::f32::consts::SQRT_2], &[]),
            half: g.const_f32(&format!("{tag}half"), &[0.5], &[]),
        }
    }
}

/// One encoder layer to build: its sizes, shared constants, index (for
/// hooks), checkpoint prefix and output name.
struct LayerSpec<'a> {
    cfg: &'a BertConfig,
    shared: &'a LayerShared,
    index: usize,
    prefix: String,
    out: String,
}

/// A transformer layer on `x` (attention, then the MLP, each with its
/// residual LayerNorm); returns its output, named `spec.out`.
fn encoder_layer(
    g: &mut Graph,
    src: &dyn TensorSource,
    spec: &LayerSpec<'_>,
    x: &str,
    hooks: &mut dyn LayerHooks,
) -> Result<String> {
    let (cfg, c, p) = (spec.cfg, spec.shared, &spec.prefix);
    let names = &c.names;
    let d = cfg.hidden_size;
    let eps = cfg.layer_norm_eps as f32;
    let q = g.linear(src, &format!("{p}.{}", names.query), d, d, x)?;
    let k = g.linear(src, &format!("{p}.{}", names.key), d, d, x)?;
    let v = g.linear(src, &format!("{p}.{}", names.value), d, d, x)?;
    let q = g.node("Reshape", &[&q, &c.split_shape], vec![]);
    let q = g.node("Transpose", &[&q], vec![attr_ints("perm", &[0, 2, 1, 3])]); // [B,H,S,hd]
    let k = g.node("Reshape", &[&k, &c.split_shape], vec![]);
    let k = g.node("Transpose", &[&k], vec![attr_ints("perm", &[0, 2, 3, 1])]); // [B,H,hd,S]
    let v = g.node("Reshape", &[&v, &c.split_shape], vec![]);
    let v = g.node("Transpose", &[&v], vec![attr_ints("perm", &[0, 2, 1, 3])]); // [B,H,S,hd]
    let scores = g.node("MatMul", &[&q, &k], vec![]);
    let scores = g.node("Mul", &[&scores, &c.scale], vec![]);
    let scores = g.node("Add", &[&scores, &c.bias4], vec![]);
    let probs = g.node("Softmax", &[&scores], vec![attr_int("axis", -1)]);
    let ctx = g.node("MatMul", &[&probs, &v], vec![]);
    let ctx = g.node("Transpose", &[&ctx], vec![attr_ints("perm", &[0, 2, 1, 3])]);
    let ctx = g.node("Reshape", &[&ctx, &c.merge_shape], vec![]);
    let ao = g.linear(src, &format!("{p}.{}", names.attn_out), d, d, &ctx)?;
    let ao = hooks.after_attention(g, spec.index, &ao)?;
    let r1 = g.node("Add", &[&ao, x], vec![]);
    let h1 = g.layer_norm(src, &format!("{p}.{}", names.attn_norm), d, eps, &r1, None)?;
    let inter = g.linear(
        src,
        &format!("{p}.intermediate.dense"),
        d,
        cfg.intermediate_size,
        &h1,
    )?;
    let a = g.activation(c.act, &inter, &c.sqrt2, &c.half);
    let o = g.linear(
        src,
        &format!("{p}.output.dense"),
        cfg.intermediate_size,
        d,
        &a,
    )?;
    let o = hooks.after_ffn(g, spec.index, &o)?;
    let r2 = g.node("Add", &[&o, &h1], vec![]);
    g.layer_norm(
        src,
        &format!("{p}.output.LayerNorm"),
        d,
        eps,
        &r2,
        Some(spec.out.clone()),
    )
}

/// Wrap the finished graph `g` in a model: outputs, opset and metadata.
fn model_proto(
    cfg: &BertConfig,
    ckpt: &Checkpoint,
    g: Graph,
    outputs: Vec<ValueInfoProto>,
) -> ModelProto {
    let d = cfg.hidden_size;
    let family = cfg.family();

    let graph = GraphProto {
        node: g.nodes,
        name: match family {
            Family::Bert => "sherl_bert",
            Family::Mpnet => "sherl_mpnet",
        }
        .into(),
        initializer: g.inits,
        doc_string: String::new(),
        input: g.inputs,
        output: outputs,
        value_info: vec![],
    };
    ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "sherl".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        domain: String::new(),
        model_version: 1,
        doc_string:
            "BERT-family encoder exported by sherl-extract export-onnx; outputs hidden_states.0..N"
                .into(),
        graph: Some(graph),
        metadata_props: vec![
            meta("sherl.layers", cfg.num_hidden_layers.to_string()),
            meta("sherl.hidden", d.to_string()),
            meta("sherl.checkpoint_prefix", ckpt.prefix().to_string()),
            meta("sherl.safetensors_sha256", ckpt.sha256()),
        ]
        .into_iter()
        // only an MPNet says its family (a BERT export keeps its bytes)
        .chain((family == Family::Mpnet).then(|| meta("sherl.family", "mpnet".into())))
        .collect(),
    }
}

/// Export the checkpoint in `backbone` (config.json + model.safetensors) to
/// `out`, written atomically (temporary file, then rename).
pub fn export_backbone(cfg: &BertConfig, ckpt: &Checkpoint, out: &Path) -> Result<ExportSummary> {
    let model = build_model(cfg, ckpt)?;
    let bytes = model.encode_to_vec();
    crate::fsutil::write_atomic(out, &bytes)?;
    Ok(ExportSummary {
        layers: cfg.num_hidden_layers,
        hidden: cfg.hidden_size,
        prefix: ckpt.prefix().to_string(),
        bytes: bytes.len() as u64,
    })
}
