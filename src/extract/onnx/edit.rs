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

use std::ops::Range;
use std::path::Path;

use prost::Message;

use super::proto::{
    GraphOutline, GraphProto, ModelOutline, NodeProto, TypeProto, TypeProtoTensor, ValueInfoProto,
};
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
    let g = decode_outline(path, bytes)?;
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
    if extra.node.is_empty() {
        return Ok(bytes.to_vec());
    }
    // ModelProto field 7 (graph), wire type 2 (length-delimited).
    let body = extra.encode_to_vec();
    let mut out = Vec::with_capacity(bytes.len() + body.len() + 16);
    out.extend_from_slice(bytes);
    prost::encoding::encode_key(7, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(body.len() as u64, &mut out);
    out.extend_from_slice(&body);
    Ok(out)
}

/// The graph of the ONNX model `bytes` (graphs appended by
/// [`expose_layers`] merged in), initializers by name only: no weight is
/// copied. `path` names the model in messages.
fn decode_outline(path: &Path, bytes: &[u8]) -> Result<GraphOutline> {
    let model = ModelOutline::decode(bytes).map_err(|e| Error::Onnx {
        path: path.to_path_buf(),
        message: format!("not an ONNX model (protobuf decode failed: {e})"),
    })?;
    model.graph.ok_or_else(|| Error::Onnx {
        path: path.to_path_buf(),
        message: "not an ONNX model (no graph)".into(),
    })
}

/// One protobuf field of a serialized message: its tag, the whole field's
/// byte range (key included) and its payload's range (for length-delimited
/// fields, without the length prefix).
struct WireField {
    tag: u32,
    whole: Range<usize>,
    payload: Range<usize>,
}

/// The top-level fields of the serialized message `buf`, in order.
fn wire_fields(buf: &[u8]) -> std::result::Result<Vec<WireField>, String> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    let mut fields = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let mut rest = &buf[pos..];
        let start = pos;
        let (tag, wire) = decode_key(&mut rest).map_err(|e| format!("at byte {pos}: {e}"))?;
        let after_key = buf.len() - rest.len();
        let (payload, end) = match wire {
            WireType::Varint => {
                decode_varint(&mut rest).map_err(|e| format!("at byte {pos}: {e}"))?;
                let end = buf.len() - rest.len();
                (after_key..end, end)
            }
            WireType::SixtyFourBit => (after_key..after_key + 8, after_key + 8),
            WireType::ThirtyTwoBit => (after_key..after_key + 4, after_key + 4),
            WireType::LengthDelimited => {
                let len = decode_varint(&mut rest).map_err(|e| format!("at byte {pos}: {e}"))?;
                let body = buf.len() - rest.len();
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|l| body.checked_add(l))
                    .ok_or_else(|| format!("at byte {pos}: length {len} out of range"))?;
                (body..end, end)
            }
            WireType::StartGroup | WireType::EndGroup => {
                return Err(format!("at byte {pos}: protobuf groups are not supported"))
            }
        };
        if end > buf.len() {
            return Err(format!("at byte {pos}: field {tag} runs past the end"));
        }
        fields.push(WireField {
            tag,
            whole: start..end,
            payload,
        });
        pos = end;
    }
    Ok(fields)
}

/// ONNX `AttributeProto.type` values of graph-valued attributes (`If`,
/// `Loop`, `Scan` bodies), whose outer-scope inputs are not listed on
/// the node.
const ATTRIBUTE_GRAPH: i32 = 5;
const ATTRIBUTE_GRAPHS: i32 = 10;

/// `bytes` (a model, possibly with graphs appended by [`expose_layers`])
/// reduced to what computes the graph outputs named in `keep`: the other
/// outputs are dropped with every node, initializer and value-info entry
/// only they needed (an image backbone's task head, say, which ONNX Runtime
/// would otherwise compute on every run although nobody reads it). Inputs
/// are kept as they are. Like [`expose_layers`], it never re-encodes what it
/// keeps: the kept fields are copied byte for byte.
///
/// Returns `Ok(None)` when it cannot tell what a kept node reads (a node
/// with a subgraph attribute): the model is then best run whole.
pub fn prune_to_outputs(path: &Path, bytes: &[u8], keep: &[String]) -> Result<Option<Vec<u8>>> {
    let err = |message: String| Error::Onnx {
        path: path.to_path_buf(),
        message,
    };
    let g = decode_outline(path, bytes)?;
    for k in keep {
        if !g.output.iter().any(|o| &o.name == k) {
            return Err(err(format!("the model has no output '{k}' to keep")));
        }
    }
    // Walk back from the kept outputs: a node is needed when it produces a
    // needed tensor; its inputs are then needed too.
    let mut producer: std::collections::HashMap<&str, usize> = Default::default();
    for (i, n) in g.node.iter().enumerate() {
        for o in &n.output {
            producer.insert(o.as_str(), i);
        }
    }
    let mut needed_node = vec![false; g.node.len()];
    let mut needed: std::collections::HashSet<&str> = keep.iter().map(String::as_str).collect();
    let mut stack: Vec<&str> = needed.iter().copied().collect();
    while let Some(t) = stack.pop() {
        let Some(&i) = producer.get(t) else { continue };
        if needed_node[i] {
            continue;
        }
        needed_node[i] = true;
        let n = &g.node[i];
        if n.attribute
            .iter()
            .any(|a| a.r#type == ATTRIBUTE_GRAPH || a.r#type == ATTRIBUTE_GRAPHS)
        {
            return Ok(None);
        }
        for input in n.input.iter().filter(|s| !s.is_empty()) {
            if needed.insert(input.as_str()) {
                stack.push(input.as_str());
            }
        }
    }
    let produced: std::collections::HashSet<&str> = g
        .node
        .iter()
        .zip(&needed_node)
        .filter(|(_, &k)| k)
        .flat_map(|(n, _)| n.output.iter().map(String::as_str))
        .chain(g.input.iter().map(|v| v.name.as_str()))
        .collect();
    let keep_output: Vec<bool> = g.output.iter().map(|o| keep.contains(&o.name)).collect();
    // An initializer also listed as a graph input (IR < 4 lists them all)
    // stays: without it the input would become one the caller must feed.
    let inputs: std::collections::HashSet<&str> = g.input.iter().map(|v| v.name.as_str()).collect();
    let keep_init: Vec<bool> = g
        .initializer
        .iter()
        .map(|t| needed.contains(t.name.as_str()) || inputs.contains(t.name.as_str()))
        .collect();
    let keep_info: Vec<bool> = g
        .value_info
        .iter()
        .map(|v| produced.contains(v.name.as_str()))
        .collect();

    // Rewrite: every occurrence of ModelProto.graph (field 7) keeps its
    // fields but the dropped nodes (1), initializers (5), outputs (12) and
    // value infos (13); the merged message numbers each repeated field's
    // entries across occurrences in order, as `decode_outline` saw them.
    let (mut n_node, mut n_init, mut n_out, mut n_info) = (0, 0, 0, 0);
    let mut out = Vec::with_capacity(bytes.len());
    for f in wire_fields(bytes).map_err(|e| err(format!("model: {e}")))? {
        if f.tag != 7 {
            out.extend_from_slice(&bytes[f.whole]);
            continue;
        }
        let graph = &bytes[f.payload.clone()];
        let mut body = Vec::with_capacity(graph.len());
        for gf in wire_fields(graph).map_err(|e| err(format!("graph: {e}")))? {
            let counter = match gf.tag {
                1 => Some((&mut n_node, &needed_node)),
                5 => Some((&mut n_init, &keep_init)),
                12 => Some((&mut n_out, &keep_output)),
                13 => Some((&mut n_info, &keep_info)),
                _ => None,
            };
            let kept = match counter {
                Some((n, flags)) => {
                    let k = flags.get(*n).copied().unwrap_or(true);
                    *n += 1;
                    k
                }
                None => true,
            };
            if kept {
                body.extend_from_slice(&graph[gf.whole]);
            }
        }
        prost::encoding::encode_key(7, prost::encoding::WireType::LengthDelimited, &mut out);
        prost::encoding::encode_varint(body.len() as u64, &mut out);
        out.extend_from_slice(&body);
    }
    if (n_node, n_init, n_out, n_info)
        != (
            g.node.len(),
            g.initializer.len(),
            g.output.len(),
            g.value_info.len(),
        )
    {
        // The wire walk and the decoded model disagree (which a valid
        // model does not do): run it whole rather than guess.
        return Ok(None);
    }
    Ok(Some(out))
}

/// Lowest default-domain opset [`append_graph`] raises: from opset 13 on,
/// the operators a ViT export uses keep their meaning up to opset 17
/// (axes as inputs of `ReduceSum`, `Unsqueeze`, `Squeeze`, `Split`).
pub const APPEND_MIN_OPSET: i64 = 13;

/// `bytes` (a model, possibly with graphs appended by [`expose_layers`])
/// with the nodes, initializers and outputs of `extra` appended to its
/// graph, by the protobuf merge rule [`expose_layers`] relies on (the
/// model's own graph bytes untouched), its default-domain opset raised to
/// at least `opset` and its IR version to at least `ir_version`.
///
/// `extra`'s nodes may read the model's tensors by name. With
/// `rename_input` `(from, to)`, the graph input `from` is declared as `to`
/// instead (same type) and an `Identity` node placed before every other
/// node gives `to` the old name the model's nodes read.
///
/// Refused: a name `extra` defines (a node output or an initializer) or
/// `to` that the model's graph defines or takes as input already, an input
/// `from` the graph does not have, and a model whose default-domain opset
/// is missing or below [`APPEND_MIN_OPSET`] (raising it could change what
/// its operators compute).
pub fn append_graph(
    path: &Path,
    bytes: &[u8],
    extra: &GraphProto,
    rename_input: Option<(&str, &str)>,
    opset: i64,
    ir_version: i64,
) -> Result<Vec<u8>> {
    use prost::encoding::{encode_key, encode_varint, WireType};
    let err = |message: String| Error::Onnx {
        path: path.to_path_buf(),
        message,
    };
    let g = decode_outline(path, bytes)?;
    let defined: std::collections::HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(String::as_str))
        .chain(g.initializer.iter().map(|t| t.name.as_str()))
        .chain(g.input.iter().map(|v| v.name.as_str()))
        .collect();
    let clash = extra
        .node
        .iter()
        .flat_map(|n| n.output.iter())
        .chain(extra.initializer.iter().map(|t| &t.name))
        .map(String::as_str)
        .chain(rename_input.map(|(_, to)| to))
        .find(|n| defined.contains(n));
    if let Some(name) = clash {
        return Err(err(format!(
            "the model already has a tensor named '{name}', which the appended graph defines"
        )));
    }
    // the graph occurrence put first: the renamed input and its Identity
    let first = match rename_input {
        Some((from, to)) => {
            let old = g.input.iter().find(|v| v.name == from).ok_or_else(|| {
                err(format!(
                    "the model has no input '{from}' (it has {:?})",
                    g.input.iter().map(|v| &v.name).collect::<Vec<_>>()
                ))
            })?;
            Some(GraphProto {
                node: vec![NodeProto {
                    input: vec![to.to_string()],
                    output: vec![from.to_string()],
                    name: format!("sherl_input_{to}"),
                    op_type: "Identity".into(),
                    ..Default::default()
                }],
                input: vec![ValueInfoProto {
                    name: to.to_string(),
                    ..old.clone()
                }],
                ..Default::default()
            })
        }
        None => None,
    };
    let mut out = Vec::with_capacity(bytes.len() + extra.encoded_len() + 32);
    let (mut old_opset, mut old_ir) = (None, 0i64);
    let put_graph = |out: &mut Vec<u8>, body: &[u8]| {
        encode_key(7, WireType::LengthDelimited, out);
        encode_varint(body.len() as u64, out);
        out.extend_from_slice(body);
    };
    let mut first = first.map(|g| g.encode_to_vec());
    for f in wire_fields(bytes).map_err(|e| err(format!("model: {e}")))? {
        match f.tag {
            7 => {
                if let Some(body) = first.take() {
                    put_graph(&mut out, &body);
                }
                let Some((from, _)) = rename_input else {
                    out.extend_from_slice(&bytes[f.whole]);
                    continue;
                };
                // the graph without its declaration of input `from`
                let graph = &bytes[f.payload.clone()];
                let mut body = Vec::with_capacity(graph.len());
                for gf in wire_fields(graph).map_err(|e| err(format!("graph: {e}")))? {
                    if gf.tag == 11 {
                        let v = ValueInfoProto::decode(&graph[gf.payload.clone()])
                            .map_err(|e| err(format!("graph input: {e}")))?;
                        if v.name == from {
                            continue;
                        }
                    }
                    body.extend_from_slice(&graph[gf.whole]);
                }
                put_graph(&mut out, &body);
            }
            1 => {
                let mut v = &bytes[f.payload.clone()];
                old_ir = prost::encoding::decode_varint(&mut v)
                    .map_err(|e| err(format!("model: ir_version: {e}")))?
                    as i64;
            }
            8 => {
                let set = super::proto::OperatorSetIdProto::decode(&bytes[f.payload.clone()])
                    .map_err(|e| err(format!("model: opset_import: {e}")))?;
                if set.domain.is_empty() || set.domain == "ai.onnx" {
                    old_opset = Some(set.version);
                } else {
                    out.extend_from_slice(&bytes[f.whole]);
                }
            }
            _ => out.extend_from_slice(&bytes[f.whole]),
        }
    }
    let old_opset = old_opset
        .ok_or_else(|| err("the model imports no default-domain (ai.onnx) opset".into()))?;
    if old_opset < APPEND_MIN_OPSET {
        return Err(err(format!(
            "the model uses opset {old_opset}; sherl appends to models of opset \
             {APPEND_MIN_OPSET} or later (re-export it with a newer opset)"
        )));
    }
    encode_key(1, WireType::Varint, &mut out);
    encode_varint(old_ir.max(ir_version) as u64, &mut out);
    let set = super::proto::OperatorSetIdProto {
        domain: String::new(),
        version: old_opset.max(opset),
    };
    encode_key(8, WireType::LengthDelimited, &mut out);
    encode_varint(set.encoded_len() as u64, &mut out);
    set.encode(&mut out)
        .expect("a Vec grows to hold what is encoded");
    put_graph(&mut out, &extra.encode_to_vec());
    Ok(out)
}
