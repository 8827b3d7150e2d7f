//! What a method's graph is built on: the frozen backbone as a graph that
//! gives any hidden state and runs any backbone layer on any input
//! ([`Body`]). Method graphs ([`super::methods`]) are written once against
//! this trait and serve every backbone family that implements it.

use crate::backbone::{BertConfig, Checkpoint};
use crate::extract::onnx::builder::{Graph, TensorSource};
use crate::extract::onnx::export::{BertGraph, LayerHooks, NoHooks};
use crate::{Error, Result};

/// The frozen backbone inside an exported graph.
pub trait Body {
    /// The graph nodes are added to.
    fn g(&mut self) -> &mut Graph;
    /// Backbone width `D`.
    fn width(&self) -> usize;
    /// Backbone layer count `N`.
    fn layers(&self) -> usize;
    /// `hidden_states.i` of the frozen backbone (`[batch, seq, D]`),
    /// computing the layers up to `i` on first use.
    fn hidden(&mut self, i: usize) -> Result<String>;
    /// Backbone layer `i` (0-based, checkpoint `encoder.layer.{i}`, trained
    /// overrides in place) on `x`, its output named `out`.
    fn layer(&mut self, i: usize, x: &str, out: &str) -> Result<String>;
    /// The float padding mask `[batch, seq, 1]` (1 at real tokens), or
    /// `None` when the inputs have no padding (images).
    fn mask(&mut self) -> Option<String>;
    /// A post-norm BERT layer of sizes `cfg` (a side network's, e.g. LST's)
    /// with weights from `src` under `prefix` (named as `cfg`'s family
    /// names them), attending under the backbone's padding mask alone (no
    /// relative-position bias: a side layer's heads need not be the
    /// backbone's); `tag` prefixes its constants.
    fn side_layer(
        &mut self,
        src: &dyn TensorSource,
        cfg: &BertConfig,
        tag: &str,
        prefix: &str,
        x: &str,
        out: &str,
    ) -> Result<String>;
    /// The backbone's sizes as a BERT configuration (what a side network
    /// sized after the backbone reads: heads, FFN width, activation,
    /// epsilon). Bodies that cannot describe themselves so refuse.
    fn sizes(&self) -> Result<BertConfig> {
        Err(Error::UnsupportedBackbone(
            "this backbone's sizes are not a BERT configuration".into(),
        ))
    }
    /// Backbone layer `i` on `x` with extra nodes from `hooks` inside it
    /// (adapters), its output named `hidden_states.{i + 1}`. Bodies whose
    /// layers take no hooks refuse.
    fn hooked_layer(&mut self, i: usize, x: &str, hooks: &mut dyn LayerHooks) -> Result<String> {
        let _ = (i, x, hooks);
        Err(Error::UnsupportedBackbone(
            "modules inside this backbone's layers (adapters) are exported for text \
             backbones only"
                .into(),
        ))
    }
}

/// A BERT-family text backbone ([`BertGraph`]) as a [`Body`].
pub struct TextBody<'a> {
    /// The encoder graph.
    pub b: BertGraph,
    /// The backbone's weights (with the run's trained layers in place).
    pub ckpt: &'a Checkpoint,
    /// `hidden_states.i` computed so far: `states[i]`.
    states: Vec<String>,
    mask: Option<String>,
}

impl<'a> TextBody<'a> {
    /// Start from the embeddings of `cfg` with the weights of `ckpt`.
    pub fn new(cfg: &BertConfig, ckpt: &'a Checkpoint) -> Result<Self> {
        let (b, x0) = BertGraph::new(cfg, ckpt)?;
        Ok(TextBody {
            b,
            ckpt,
            states: vec![x0],
            mask: None,
        })
    }
}

impl Body for TextBody<'_> {
    fn g(&mut self) -> &mut Graph {
        &mut self.b.g
    }

    fn width(&self) -> usize {
        self.b.config().hidden_size
    }

    fn layers(&self) -> usize {
        self.b.config().num_hidden_layers
    }

    fn hidden(&mut self, i: usize) -> Result<String> {
        while self.states.len() <= i {
            let j = self.states.len() - 1;
            let x = self.states[j].clone();
            let y = self.b.layer(self.ckpt, j, &x, &mut NoHooks)?;
            self.states.push(y);
        }
        Ok(self.states[i].clone())
    }

    fn layer(&mut self, i: usize, x: &str, out: &str) -> Result<String> {
        let cfg = self.b.config().clone();
        let prefix = format!("encoder.layer.{i}");
        let tag = format!("late{i}/");
        // its own constants and output name: the frozen backbone's
        // `hidden_states.{i + 1}` may be in the graph as well
        self.b
            .side_layer(self.ckpt, &cfg, &tag, &prefix, x, out.to_string())
    }

    fn mask(&mut self) -> Option<String> {
        if self.mask.is_none() {
            use crate::extract::onnx::builder::attr_int;
            use crate::extract::onnx::proto::data_type;
            let g = &mut self.b.g;
            let m = g.node(
                "Cast",
                &["attention_mask"],
                vec![attr_int("to", data_type::FLOAT as i64)],
            );
            let ax = g.axes(&[2]);
            self.mask = Some(g.node("Unsqueeze", &[&m, &ax], vec![]));
        }
        self.mask.clone()
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
        self.b
            .masked_side_layer(src, cfg, tag, prefix, x, out.to_string())
    }

    fn sizes(&self) -> Result<BertConfig> {
        Ok(self.b.config().clone())
    }

    fn hooked_layer(&mut self, i: usize, x: &str, hooks: &mut dyn LayerHooks) -> Result<String> {
        self.b.layer(self.ckpt, i, x, hooks)
    }
}
