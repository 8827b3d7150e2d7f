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
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
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

/// Describe a model's interface and suggest per-layer tensors.
///
/// Candidates are the outputs of LayerNormalization nodes (fused, or the
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
