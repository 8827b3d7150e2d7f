//! Rewrite a user's ONNX graph so chosen intermediate tensors become outputs
//! named `hidden_states.i`.
//!
//! The rewrite never decodes and re-encodes the user's model (our protobuf
//! subset would drop fields it does not declare). It relies on protobuf's
//! merge rule instead: a serialized message followed by another occurrence
//! of the same embedded-message field is parsed as the merge of both, and
//! repeated fields concatenate. So appending one more `ModelProto.graph`
//! (field 7) that holds only new `Identity` nodes (field 1) and new outputs
//! (field 12) adds exactly those, leaving every original byte untouched.

use std::path::Path;

use prost::Message;

use super::inspect::decode_model;
use super::proto::{GraphProto, NodeProto, TypeProto, TypeProtoTensor, ValueInfoProto};
use crate::backbone::{hidden_state_index, hidden_state_name};
use crate::{Error, Result};

/// Expose `tensors[i]` as output `hidden_states.i` (first index `first`).
/// Returns the new model bytes.
pub fn expose_layers(
    path: &Path,
    bytes: &[u8],
    tensors: &[String],
    first: usize,
) -> Result<Vec<u8>> {
    let model = decode_model(path, bytes)?;
    let g = model
        .graph
        .as_ref()
        .expect("decode_model guarantees a graph");
    let err = |message: String| Error::Onnx {
        path: path.to_path_buf(),
        message,
    };
    if tensors.is_empty() {
        return Err(err("no tensors given to expose".into()));
    }
    let produced: std::collections::HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(String::as_str))
        .chain(g.input.iter().map(|v| v.name.as_str()))
        .collect();
    let missing: Vec<&str> = tensors
        .iter()
        .map(String::as_str)
        .filter(|t| !produced.contains(t))
        .collect();
    if !missing.is_empty() {
        return Err(err(format!(
            "no node produces tensor(s) {}; run `sherl-extract inspect-onnx` to list candidates",
            missing.join(", ")
        )));
    }
    let mut extra = GraphProto::default();
    for (k, t) in tensors.iter().enumerate() {
        let i = first + k;
        let name = hidden_state_name(i);
        if t == &name && g.output.iter().any(|o| o.name == name) {
            continue; // already exposed under the right name
        }
        if let Some(o) = g
            .output
            .iter()
            .find(|o| hidden_state_index(&o.name) == Some(i))
        {
            return Err(err(format!(
                "the model already has an output '{}'; refusing to create a second one",
                o.name
            )));
        }
        if produced.contains(name.as_str()) {
            return Err(err(format!(
                "a tensor named '{name}' already exists inside the graph"
            )));
        }
        // Keep the element type when the graph declares it; otherwise leave
        // the type for ONNX Runtime to infer.
        let elem = g
            .value_info
            .iter()
            .chain(g.output.iter())
            .chain(g.input.iter())
            .find(|v| &v.name == t)
            .and_then(|v| v.r#type.as_ref())
            .and_then(|ty| ty.tensor_type.as_ref())
            .map(|tt| tt.elem_type);
        extra.node.push(NodeProto {
            input: vec![t.clone()],
            output: vec![name.clone()],
            name: format!("sherl_expose_{i}"),
            op_type: "Identity".into(),
            ..Default::default()
        });
        extra.output.push(ValueInfoProto {
            name,
            r#type: elem.map(|e| TypeProto {
                tensor_type: Some(TypeProtoTensor {
                    elem_type: e,
                    shape: None,
                }),
                denotation: String::new(),
            }),
            doc_string: String::new(),
        });
    }
    let mut out = bytes.to_vec();
    if extra.node.is_empty() {
        return Ok(out);
    }
    // ModelProto field 7 (graph), wire type 2 (length-delimited).
    let body = extra.encode_to_vec();
    prost::encoding::encode_key(7, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(body.len() as u64, &mut out);
    out.extend_from_slice(&body);
    Ok(out)
}
