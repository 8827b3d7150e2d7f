//! `adapter`: bottleneck adapters inside the frozen backbone's layers
//! ([`crate::fit::nn::adapter`]). Every backbone layer runs with its
//! adapters on the sub-layers' output projections, before the residual
//! and the LayerNorm:
//!
//! ```text
//! adapter(z) = z + W_up act(W_down z + b_down) + b_up
//! ```
//!
//! Houlsby placement puts one after the attention output projection
//! (`encoder.layer.{i}.attention.output.adapter`) and one after the FFN's
//! (`encoder.layer.{i}.output.adapter`); Pfeiffer placement only the
//! latter. The head pools the last layer's output.

use crate::backbone::Activation;
use crate::extract::onnx::builder::{Graph, Tensors};
use crate::extract::onnx::export::LayerHooks;
use crate::fit::nn::adapter::{AdapterActivation, Placement};
use crate::Result;

use super::super::body::Body;

/// The adapters' graph on `body`: every backbone layer with its adapters
/// (width `m`); returns the last layer's output and its width.
pub fn build(
    body: &mut dyn Body,
    trained: &Tensors,
    m: usize,
    placement: Placement,
    activation: AdapterActivation,
) -> Result<(String, usize)> {
    let d = body.width();
    let mut hooks = AdapterHooks {
        src: trained,
        d,
        m,
        placement,
        activation,
    };
    let mut x = body.hidden(0)?;
    for i in 0..body.layers() {
        x = body.hooked_layer(i, &x, &mut hooks)?;
    }
    Ok((x, d))
}

/// The adapters of every layer as [`LayerHooks`].
struct AdapterHooks<'a> {
    src: &'a Tensors,
    d: usize,
    m: usize,
    placement: Placement,
    activation: AdapterActivation,
}

impl AdapterHooks<'_> {
    /// `z + up(act(down(z)))` with the adapter under `prefix`.
    fn adapter(&self, g: &mut Graph, prefix: &str, z: &str) -> Result<String> {
        let (d, m) = (self.d, self.m);
        let h = g.linear(self.src, &format!("{prefix}.down"), d, m, z)?;
        let h = match self.activation {
            AdapterActivation::Relu => g.activation(Activation::Relu, &h, "", ""),
            AdapterActivation::Gelu => {
                // the GELU form reads a constant `one`
                g.const_f32_once("one", 1.0);
                let sqrt2 = g.const_f32_once("adapter/sqrt2", std::f32::consts::SQRT_2);
                let half = g.const_f32_once("adapter/half", 0.5);
                g.activation(Activation::Gelu, &h, &sqrt2, &half)
            }
        };
        let u = g.linear(self.src, &format!("{prefix}.up"), m, d, &h)?;
        Ok(g.node("Add", &[z, &u], vec![]))
    }
}

impl LayerHooks for AdapterHooks<'_> {
    fn after_attention(&mut self, g: &mut Graph, i: usize, z: &str) -> Result<String> {
        match self.placement {
            Placement::Houlsby => {
                self.adapter(g, &format!("encoder.layer.{i}.attention.output.adapter"), z)
            }
            Placement::Pfeiffer => Ok(z.to_string()),
        }
    }

    fn after_ffn(&mut self, g: &mut Graph, i: usize, z: &str) -> Result<String> {
        self.adapter(g, &format!("encoder.layer.{i}.output.adapter"), z)
    }
}
