//! The head appended to a backbone graph: pooling of one hidden state, the
//! trained linear layer, then the softmax of a classifier (`Output::Classes`)
//! or the L2 normalisation of a retrieval tower (`Output::Embeddings`).

use crate::extract::onnx::builder::{attr_int, Graph};
use crate::extract::onnx::proto::{data_type, ValueInfoProto};
use crate::fit::model::Pool;
use crate::{Error, Result};

/// Names of the exported model's outputs.
pub const LOGITS: &str = "logits";
/// See [`LOGITS`].
pub const PROBABILITIES: &str = "probabilities";
/// The output of a retrieval tower's model: `[batch, joint]`, L2-normalised.
pub const EMBEDDINGS: &str = "embeddings";

/// What the head outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Output {
    /// A classifier's [`LOGITS`] and their softmax, [`PROBABILITIES`].
    Classes,
    /// A retrieval tower's [`EMBEDDINGS`]: the linear layer's output
    /// divided by its L2 norm (`+1e-12` under the root), as
    /// `fit::retrieval::loss::l2_normalize` divides it.
    Embeddings,
}

impl Output {
    /// The names of the exported model's outputs.
    pub(super) fn names(self) -> Vec<String> {
        match self {
            Output::Classes => vec![LOGITS.into(), PROBABILITIES.into()],
            Output::Embeddings => vec![EMBEDDINGS.into()],
        }
    }
}

/// The trained head: pooling and `Linear(d -> classes)` (`weight` row-major
/// `[classes, d]`).
pub(super) struct HeadWeights {
    pub(super) pool: Pool,
    pub(super) weight: Vec<f32>,
    pub(super) bias: Vec<f32>,
    pub(super) d: usize,
    pub(super) classes: usize,
}

/// An f32 initializer named `head/{name}`.
fn f32s(g: &mut Graph, name: &str, values: &[f32], dims: &[i64]) -> String {
    g.const_f32(&format!("head/{name}"), values, dims)
}

/// An i64 initializer named `head/{name}`.
fn i64s(g: &mut Graph, name: &str, values: &[i64], dims: &[i64]) -> String {
    g.const_i64(&format!("head/{name}"), values, dims)
}

/// The mean of `x` (`[batch, seq, d]`) over each example's real tokens
/// (`attention_mask` 1; at least one counted): `[batch, d]`.
pub(super) fn masked_mean(g: &mut Graph, x: &str) -> String {
    let hidden = x;
    // sum over real tokens / their count (at least 1)
    let m = g.node(
        "Cast",
        &["attention_mask"],
        vec![attr_int("to", data_type::FLOAT as i64)],
    );
    let ax2 = g.axes(&[2]);
    let m3 = g.node("Unsqueeze", &[&m, &ax2], vec![]); // [B, S, 1]
    let x = g.node("Mul", &[hidden, &m3], vec![]);
    let sum = g.reduce_sum(&x, 1, false);
    let n = g.reduce_sum(&m3, 1, false);
    let name = g.fresh("head/one");
    let one = g.const_f32(&name, &[1.0], &[]);
    let n = g.node("Max", &[&n, &one], vec![]);
    g.node("Div", &[&sum, &n], vec![])
}

/// Append the head reading `hidden` (`[batch, seq, d]`) to `g`; returns the
/// declarations of its outputs (`out`: `logits` and `probabilities`
/// `[batch, classes]`, or `embeddings` `[batch, joint]`), the exported
/// model's only outputs. Text: the mean pools the real tokens
/// (`attention_mask` 1); patch-mean (image runs) is refused.
pub(super) fn append_head(
    g: &mut Graph,
    hidden: &str,
    head: &HeadWeights,
    out: Output,
) -> Result<Vec<ValueInfoProto>> {
    check_sizes(head)?;
    let pooled = match head.pool {
        Pool::Cls => cls(g, hidden),
        Pool::PatchMean => {
            return Err(Error::Onnx {
                path: "head".into(),
                message: "patch-mean pooling is for image runs only".into(),
            })
        }
        Pool::Mean => masked_mean(g, hidden),
    };
    Ok(linear_out(g, &pooled, head, out))
}

/// [`append_head`] for an image run, whose tokens are all real (no
/// padding mask): the mean pools every token, patch-mean every token but
/// the first (the CLS token), as `Head::pool` does with an all-ones mask.
pub(super) fn append_image_head(
    g: &mut Graph,
    hidden: &str,
    head: &HeadWeights,
    out: Output,
) -> Result<Vec<ValueInfoProto>> {
    check_sizes(head)?;
    let pooled = match head.pool {
        Pool::Cls => cls(g, hidden),
        Pool::Mean => token_mean(g, hidden),
        Pool::PatchMean => {
            let start = i64s(g, "patch_start", &[1], &[1]);
            let end = i64s(g, "patch_end", &[i64::MAX], &[1]);
            let axis = i64s(g, "patch_axis", &[1], &[1]);
            let patches = g.node("Slice", &[hidden, &start, &end, &axis], vec![]);
            token_mean(g, &patches)
        }
    };
    Ok(linear_out(g, &pooled, head, out))
}

/// The mean of `x` (`[batch, seq, d]`) over its tokens, all real:
/// their sum over their count (`[batch, d]`).
fn token_mean(g: &mut Graph, x: &str) -> String {
    let sum = g.reduce_sum(x, 1, false);
    let n = g.node(
        "Shape",
        &[x],
        vec![attr_int("start", 1), attr_int("end", 2)],
    );
    let n = g.node("Cast", &[&n], vec![attr_int("to", data_type::FLOAT as i64)]);
    g.node("Div", &[&sum, &n], vec![])
}

/// The first token of `hidden` (`[batch, d]`).
fn cls(g: &mut Graph, hidden: &str) -> String {
    let zero = i64s(g, "cls_index", &[0], &[]);
    g.node("Gather", &[hidden, &zero], vec![attr_int("axis", 1)])
}

/// Refuse head weights that do not make a `classes x d` linear layer.
fn check_sizes(head: &HeadWeights) -> Result<()> {
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
    Ok(())
}

/// The trained linear layer on `pooled`, then what `out` asks for;
/// returns the declarations of the outputs.
fn linear_out(g: &mut Graph, pooled: &str, head: &HeadWeights, out: Output) -> Vec<ValueInfoProto> {
    let (d, c) = (head.d as i64, head.classes as i64);
    let w = f32s(g, "weight", &head.weight, &[c, d]);
    let b = f32s(g, "bias", &head.bias, &[c]);
    let gemm = vec![attr_int("transB", 1)];
    if out == Output::Embeddings {
        let z = g.node("Gemm", &[pooled, &w, &b], gemm);
        // z / sqrt(sum(z^2) + 1e-12), over the last axis
        let sq = g.node("Mul", &[&z, &z], vec![]);
        let axis = i64s(g, "norm_axis", &[-1], &[1]);
        let sum = g.node("ReduceSum", &[&sq, &axis], vec![attr_int("keepdims", 1)]);
        let eps = f32s(g, "norm_eps", &[1e-12], &[]);
        let sum = g.node("Add", &[&sum, &eps], vec![]);
        let norm = g.node("Sqrt", &[&sum], vec![]);
        g.node_named("Div", &[&z, &norm], vec![], EMBEDDINGS.into());
        let dims: [std::result::Result<i64, &str>; 2] = [Err("batch"), Ok(c)];
        return vec![ValueInfoProto::tensor(EMBEDDINGS, data_type::FLOAT, &dims)];
    }
    let logits = g.node_named("Gemm", &[pooled, &w, &b], gemm, LOGITS.into());
    let softmax = vec![attr_int("axis", -1)];
    g.node_named("Softmax", &[&logits], softmax, PROBABILITIES.into());
    let dims: [std::result::Result<i64, &str>; 2] = [Err("batch"), Ok(c)];
    vec![
        ValueInfoProto::tensor(LOGITS, data_type::FLOAT, &dims),
        ValueInfoProto::tensor(PROBABILITIES, data_type::FLOAT, &dims),
    ]
}
