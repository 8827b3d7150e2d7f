//! A small ONNX graph builder: nodes with generated unique output names,
//! initializers from a [`TensorSource`] (a backbone checkpoint or a run's
//! trained tensors), and the few composite blocks (linear layer,
//! LayerNorm, activations) every exported graph is made of.

use super::proto::{
    attr_type, data_type, AttributeProto, NodeProto, StringStringEntryProto, TensorProto,
    ValueInfoProto,
};
use crate::backbone::{Activation, Checkpoint, F32Tensors};
use crate::{Error, Result};

/// Where a graph's named f32 weights come from.
pub trait TensorSource {
    /// The values of tensor `name` (no checkpoint prefix), checked to have
    /// `shape`.
    fn tensor_f32_shaped(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
}

impl TensorSource for Checkpoint {
    fn tensor_f32_shaped(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Checkpoint::tensor_f32_shaped(self, name, shape)
    }
}

/// Named tensors held in memory (a run's trained weights), with the file
/// they came from for messages. Every tensor read is marked, so a caller
/// can refuse tensors a graph never used ([`Tensors::unused`]).
pub struct Tensors {
    path: std::path::PathBuf,
    tensors: F32Tensors,
    used: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl Tensors {
    /// Wrap `tensors`, read from `path`.
    pub fn new(path: &std::path::Path, tensors: F32Tensors) -> Self {
        Tensors {
            path: path.to_path_buf(),
            tensors,
            used: Default::default(),
        }
    }

    /// The names no graph has read yet.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        self.tensors
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect()
    }

    /// Shape and values of `name`, if present (marked as used).
    pub fn get(&self, name: &str) -> Option<&(Vec<usize>, Vec<f32>)> {
        let t = self.tensors.get(name)?;
        self.used.borrow_mut().insert(name.to_string());
        Some(t)
    }
}

impl TensorSource for Tensors {
    fn tensor_f32_shaped(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        match self.get(name) {
            Some((s, v)) if s == shape => Ok(v.clone()),
            Some((s, _)) => Err(Error::Checkpoint {
                path: self.path.clone(),
                message: format!("tensor '{name}' has shape {s:?}, the graph needs {shape:?}"),
            }),
            None => Err(Error::Checkpoint {
                path: self.path.clone(),
                message: format!("tensor '{name}' is missing"),
            }),
        }
    }
}

/// A model metadata entry.
pub fn meta(key: &str, value: String) -> StringStringEntryProto {
    StringStringEntryProto {
        key: key.into(),
        value,
    }
}

/// An integer node attribute.
pub fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::INT,
        i,
        ..Default::default()
    }
}

/// A float node attribute.
pub fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::FLOAT,
        f,
        ..Default::default()
    }
}

/// An integer-list node attribute.
pub fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::INTS,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

/// Accumulates nodes and initializers with unique generated names.
#[derive(Default)]
pub struct Graph {
    /// The nodes, in topological order.
    pub nodes: Vec<NodeProto>,
    /// The initializers (weights and constants).
    pub inits: Vec<TensorProto>,
    /// The graph's declared inputs.
    pub inputs: Vec<ValueInfoProto>,
    counter: usize,
    /// Names of the checkpoint weights added (one initializer per name).
    weights: std::collections::HashSet<String>,
}

impl Graph {
    /// A new unique value name for an output of `op`.
    pub fn fresh(&mut self, op: &str) -> String {
        self.counter += 1;
        format!("{}_{}", op.to_ascii_lowercase(), self.counter)
    }

    /// Add a node with one output; returns the output name.
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh(op);
        self.node_named(op, inputs, attrs, out)
    }

    /// Add a node with one output named `out`; returns `out`.
    pub fn node_named(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        out: String,
    ) -> String {
        let name = format!("{op}_{}", self.nodes.len());
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name,
            op_type: op.into(),
            domain: String::new(),
            attribute: attrs,
            doc_string: String::new(),
        });
        out
    }

    /// An i64 axes constant `[values.len()]` of its own (a unique name).
    pub fn axes(&mut self, values: &[i64]) -> String {
        let name = self.fresh("sherl/axes");
        self.const_i64(&name, values, &[values.len() as i64])
    }

    /// `ReduceSum` of `x` over `axis`, keeping that axis when `keepdims`.
    pub fn reduce_sum(&mut self, x: &str, axis: i64, keepdims: bool) -> String {
        let ax = self.axes(&[axis]);
        let attrs = vec![attr_int("keepdims", i64::from(keepdims))];
        self.node("ReduceSum", &[x, &ax], attrs)
    }

    /// Add an f32 initializer `name` (the caller keeps names unique).
    pub fn const_f32(&mut self, name: &str, values: &[f32], dims: &[i64]) -> String {
        self.inits.push(TensorProto {
            dims: dims.to_vec(),
            data_type: data_type::FLOAT,
            name: name.into(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.into()
    }

    /// Add an i64 initializer `name` (the caller keeps names unique).
    pub fn const_i64(&mut self, name: &str, values: &[i64], dims: &[i64]) -> String {
        self.inits.push(TensorProto {
            dims: dims.to_vec(),
            data_type: data_type::INT64,
            name: name.into(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.into()
    }

    /// Add checkpoint tensor `name` as an initializer (named as in the
    /// checkpoint, without prefix), transposed if `transpose` (a 2-D
    /// `[out, in]` linear weight becomes `[in, out]` for `MatMul`).
    pub fn weight(
        &mut self,
        src: &dyn TensorSource,
        name: &str,
        shape: &[usize],
        transpose: bool,
    ) -> Result<String> {
        let init_name = if transpose {
            format!("{name}.T")
        } else {
            name.to_string()
        };
        if !self.weights.insert(init_name.clone()) {
            // a second read of the same weight (a layer run twice) shares it
            return Ok(init_name);
        }
        let values = src.tensor_f32_shaped(name, shape)?;
        let (dims, values) = if transpose {
            let (r, c) = (shape[0], shape[1]);
            let mut t = vec![0f32; values.len()];
            for i in 0..r {
                for j in 0..c {
                    t[j * r + i] = values[i * c + j];
                }
            }
            (vec![c as i64, r as i64], t)
        } else {
            (shape.iter().map(|&s| s as i64).collect(), values)
        };
        self.inits.push(TensorProto {
            dims,
            data_type: data_type::FLOAT,
            name: init_name.clone(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        Ok(init_name)
    }

    /// `x W^T + b` for the HF `Linear` at `prefix`.
    pub fn linear(
        &mut self,
        src: &dyn TensorSource,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        x: &str,
    ) -> Result<String> {
        let w = self.weight(src, &format!("{prefix}.weight"), &[d_out, d_in], true)?;
        let b = self.weight(src, &format!("{prefix}.bias"), &[d_out], false)?;
        let y = self.node("MatMul", &[x, &w], vec![]);
        Ok(self.node("Add", &[&y, &b], vec![]))
    }

    /// LayerNorm over the last axis with `prefix.weight` / `prefix.bias`
    /// of `src`; its output is named `out` when given.
    pub fn layer_norm(
        &mut self,
        src: &dyn TensorSource,
        prefix: &str,
        d: usize,
        eps: f32,
        x: &str,
        out: Option<String>,
    ) -> Result<String> {
        let w = self.weight(src, &format!("{prefix}.weight"), &[d], false)?;
        let b = self.weight(src, &format!("{prefix}.bias"), &[d], false)?;
        let attrs = vec![attr_int("axis", -1), attr_float("epsilon", eps)];
        let out = out.unwrap_or_else(|| self.fresh("layernorm"));
        Ok(self.node_named("LayerNormalization", &[x, &w, &b], attrs, out))
    }

    /// The activation `act` on `x` (`sqrt2` and `half` name the constants
    /// the GELU forms read; the graph must hold a constant `one`).
    pub fn activation(&mut self, act: Activation, x: &str, sqrt2: &str, half: &str) -> String {
        match act {
            Activation::Relu => self.node("Relu", &[x], vec![]),
            Activation::Gelu => {
                // 0.5 * x * (1 + erf(x / sqrt(2)))
                let t = self.node("Div", &[x, sqrt2], vec![]);
                let e = self.node("Erf", &[&t], vec![]);
                let one = "one";
                let e1 = self.node("Add", &[&e, one], vec![]);
                let m = self.node("Mul", &[x, &e1], vec![]);
                self.node("Mul", &[&m, half], vec![])
            }
            Activation::GeluTanh => {
                // 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
                let c = self.const_f32_once("gelu_c", (2.0f32 / std::f32::consts::PI).sqrt());
                let k = self.const_f32_once("gelu_k", 0.044715);
                let x2 = self.node("Mul", &[x, x], vec![]);
                let x3 = self.node("Mul", &[&x2, x], vec![]);
                let kx3 = self.node("Mul", &[&x3, &k], vec![]);
                let inner = self.node("Add", &[x, &kx3], vec![]);
                let inner = self.node("Mul", &[&inner, &c], vec![]);
                let t = self.node("Tanh", &[&inner], vec![]);
                let t1 = self.node("Add", &[&t, "one"], vec![]);
                let m = self.node("Mul", &[x, &t1], vec![]);
                self.node("Mul", &[&m, half], vec![])
            }
        }
    }

    /// A scalar f32 constant `name`, added on first use.
    pub fn const_f32_once(&mut self, name: &str, v: f32) -> String {
        if !self.inits.iter().any(|t| t.name == name) {
            self.const_f32(name, &[v], &[]);
        }
        name.into()
    }
}
