//! The classification head appended to a backbone graph: pooling of one
//! hidden state, the trained linear layer, the softmax.

use crate::extract::onnx::proto::{
    attr_type, data_type, AttributeProto, ModelProto, NodeProto, TensorProto, ValueInfoProto,
};
use crate::fit::model::Pool;
use crate::{Error, Result};

/// Names of the exported model's outputs.
pub const LOGITS: &str = "logits";
/// See [`LOGITS`].
pub const PROBABILITIES: &str = "probabilities";

/// The trained head: pooling and `Linear(d -> classes)` (`weight` row-major
/// `[classes, d]`).
pub(super) struct HeadWeights {
    pub(super) pool: Pool,
    pub(super) weight: Vec<f32>,
    pub(super) bias: Vec<f32>,
    pub(super) d: usize,
    pub(super) classes: usize,
}

/// Nodes and initializers added to a graph, names prefixed `head/`.
struct Adder<'a> {
    model: &'a mut ModelProto,
    count: usize,
}

impl Adder<'_> {
    fn graph(&mut self) -> &mut crate::extract::onnx::proto::GraphProto {
        self.model
            .graph
            .as_mut()
            .expect("the backbone graph is built")
    }

    fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        out: Option<&str>,
    ) -> String {
        self.count += 1;
        let out = out.map_or_else(
            || format!("head/{}_{}", op.to_ascii_lowercase(), self.count),
            str::to_owned,
        );
        let name = format!("head/{op}_{}", self.count);
        self.graph().node.push(NodeProto {
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

    fn init(&mut self, name: &str, data_type: i32, raw: Vec<u8>, dims: &[i64]) -> String {
        let name = format!("head/{name}");
        self.graph().initializer.push(TensorProto {
            dims: dims.to_vec(),
            data_type,
            name: name.clone(),
            raw_data: raw,
            ..Default::default()
        });
        name
    }

    fn f32s(&mut self, name: &str, values: &[f32], dims: &[i64]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.init(name, data_type::FLOAT, raw, dims)
    }

    fn i64s(&mut self, name: &str, values: &[i64], dims: &[i64]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.init(name, data_type::INT64, raw, dims)
    }
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::INT,
        i,
        ..Default::default()
    }
}

/// Append the head reading `hidden` (`[batch, seq, d]`) to `model` and make
/// `logits` and `probabilities` (`[batch, classes]`) its only outputs.
pub(super) fn append_head(model: &mut ModelProto, hidden: &str, head: &HeadWeights) -> Result<()> {
    if head.weight.len() != head.d * head.classes || head.bias.len() != head.classes {
        return Err(Error::Onnx {
            path: "head".into(),
            message: format!(
                "head weights of {} and {} values do not make a {} x {} linear layer",
                head.weight.len(),
                head.bias.len(),
                head.classes,
                head.d
            ),
        });
    }
    let mut g = Adder { model, count: 0 };
    let pooled = match head.pool {
        Pool::Cls => {
            let zero = g.i64s("cls_index", &[0], &[]);
            g.node("Gather", &[hidden, &zero], vec![attr_int("axis", 1)], None)
        }
        Pool::PatchMean => {
            return Err(Error::Onnx {
                path: "head".into(),
                message: "patch-mean pooling (image runs) is not exported yet".into(),
            })
        }
        Pool::Mean => {
            // sum over real tokens / their count (at least 1)
            let m = g.node(
                "Cast",
                &["attention_mask"],
                vec![attr_int("to", data_type::FLOAT as i64)],
                None,
            );
            let ax2 = g.i64s("axes2", &[2], &[1]);
            let m3 = g.node("Unsqueeze", &[&m, &ax2], vec![], None); // [B, S, 1]
            let x = g.node("Mul", &[hidden, &m3], vec![], None);
            let ax1 = g.i64s("axes1", &[1], &[1]);
            let sum = g.node(
                "ReduceSum",
                &[&x, &ax1],
                vec![attr_int("keepdims", 0)],
                None,
            );
            let n = g.node(
                "ReduceSum",
                &[&m3, &ax1],
                vec![attr_int("keepdims", 0)],
                None,
            );
            let one = g.f32s("one", &[1.0], &[]);
            let n = g.node("Max", &[&n, &one], vec![], None);
            g.node("Div", &[&sum, &n], vec![], None)
        }
    };
    let (d, c) = (head.d as i64, head.classes as i64);
    let w = g.f32s("weight", &head.weight, &[c, d]);
    let b = g.f32s("bias", &head.bias, &[c]);
    let logits = g.node(
        "Gemm",
        &[&pooled, &w, &b],
        vec![attr_int("transB", 1)],
        Some(LOGITS),
    );
    g.node(
        "Softmax",
        &[&logits],
        vec![attr_int("axis", -1)],
        Some(PROBABILITIES),
    );
    let dims: [std::result::Result<i64, &str>; 2] = [Err("batch"), Ok(c)];
    let graph = g.graph();
    graph.output = vec![
        ValueInfoProto::tensor(LOGITS, data_type::FLOAT, &dims),
        ValueInfoProto::tensor(PROBABILITIES, data_type::FLOAT, &dims),
    ];
    Ok(())
}
