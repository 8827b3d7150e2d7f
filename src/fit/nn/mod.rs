//! The trainable modules, written the way candle's models are: one struct
//! per module, built by `load(vb, &Config)` from a [`Builder`] (which names,
//! initialises or loads and registers every parameter) and applied by
//! `forward`. Every `load` takes its builder by value, at the module's own
//! prefix (`Module::load(vb.pp("name"), &cfg)`, as candle's `VarBuilder`),
//! and its sizes and settings as one config struct ([`BertConfig`](crate::backbone::BertConfig)
//! for the backbone's modules, a small struct of the module's own
//! otherwise); [`Builder::reborrow`] lends a builder that is still needed
//! afterwards.
//!
//! - [`ops`]: differentiable functions (LayerNorm, softmax, dropout with its
//!   [`Mode`], masked mean, attention bias);
//! - [`linear`]: [`Linear`], [`LayerNorm`] and the [`Projector`] of both
//!   side networks;
//! - [`bert_layer`], [`embeddings`]: pre-trained BERT modules (on the CPU a
//!   BERT layer is one fused op, [`crate::fit::kernels::fused_layer`]);
//! - [`consolidation`], [`restore_gate`]: SHERL's early route and its join
//!   with the late route;
//! - [`unipt`]: the UniPT side network;
//! - [`lora`], [`adapter`]: LoRA updates and bottleneck adapters inside
//!   the frozen backbone's layers, through the hooks of [`layer_extras`]; [`lst`]: the Ladder Side Tuning side
//!   network over the cached hidden states;
//! - [`head`]: pooling and the classification layer.

pub mod adapter;
pub mod bert_layer;
pub mod consolidation;
pub mod embeddings;
pub mod head;
pub mod layer_extras;
pub mod linear;
pub mod lora;
pub mod lst;
pub mod ops;
pub mod relative;
pub mod restore_gate;
#[cfg(test)]
pub(crate) mod test_util;
pub mod unipt;
pub mod vit_layer;

use candle_core::{DType, Device, Tensor};

pub use linear::{LayerNorm, Linear, Projector, SideConfig};
pub use ops::Mode;

use super::params::{Group, Params};
use crate::backbone::Checkpoint;
use crate::rng::SplitMix64;
use crate::Result;

/// A copy of a module whose tensors are cut from the autograd graph
/// (`Tensor::detach`: same storage, no variable, no op), for evaluation
/// and prediction: candle then records no graph and keeps no activations
/// for a backward pass, and the CPU custom ops that only exist to skip
/// gradients ([`crate::fit::kernels::fused`]) give way to plain products.
pub trait Detach {
    /// The detached copy.
    fn detached(&self) -> Self;
}

impl Detach for Tensor {
    fn detached(&self) -> Self {
        self.detach()
    }
}

impl<T: Detach> Detach for Vec<T> {
    fn detached(&self) -> Self {
        self.iter().map(Detach::detached).collect()
    }
}

/// Where modules get their parameters (the counterpart of candle's
/// `VarBuilder`): fresh parameters are initialised from the model's seeded
/// init generator and trained in [`Group::New`]; pre-trained ones are read
/// from the checkpoint by name and trained in the builder's group, or frozen.
/// Every parameter is registered in [`Params`] under the builder's prefix
/// plus its own name. The order in which modules draw fresh parameters is
/// part of the seeded results.
pub struct Builder<'a> {
    params: &'a mut Params,
    rng: &'a mut SplitMix64,
    ckpt: &'a Checkpoint,
    dev: &'a Device,
    prefix: String,
    group: Option<Group>,
}

impl<'a> Builder<'a> {
    /// A builder at the root, loading pre-trained weights frozen.
    pub fn new(
        params: &'a mut Params,
        rng: &'a mut SplitMix64,
        ckpt: &'a Checkpoint,
        dev: &'a Device,
    ) -> Self {
        Builder {
            params,
            rng,
            ckpt,
            dev,
            prefix: String::new(),
            group: None,
        }
    }

    /// A builder for the sub-module `name` (names get `name.` in front).
    pub fn pp(&mut self, name: &str) -> Builder<'_> {
        let prefix = self.path(name);
        Builder {
            params: self.params,
            rng: self.rng,
            ckpt: self.ckpt,
            dev: self.dev,
            prefix,
            group: self.group,
        }
    }

    /// A builder at the same prefix (for a module that takes its builder
    /// by value, when this one is still needed afterwards).
    pub fn reborrow(&mut self) -> Builder<'_> {
        Builder {
            params: self.params,
            rng: self.rng,
            ckpt: self.ckpt,
            dev: self.dev,
            prefix: self.prefix.clone(),
            group: self.group,
        }
    }

    /// Pre-trained weights loaded from here on are trained in `group`, or
    /// frozen for `None`.
    pub fn pretrained_group(mut self, group: Option<Group>) -> Self {
        self.group = group;
        self
    }

    /// The device.
    pub fn device(&self) -> &Device {
        self.dev
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// A fresh tensor `name` of `shape`, trained in [`Group::New`].
    pub fn fresh(&mut self, name: &str, t: Tensor) -> Result<Tensor> {
        let path = self.path(name);
        self.params.add(&path, t, Some(Group::New))
    }

    /// `n` values drawn uniform in ±`bound` from the init generator.
    pub fn uniform(&mut self, n: usize, bound: f32) -> Vec<f32> {
        (0..n).map(|_| self.rng.symmetric_f32(bound)).collect()
    }

    /// Fresh tensors `members` (names under the prefix) trained in
    /// [`Group::New`] as one packed variable (see [`Params::add_packed`]):
    /// the flat variable and each member's view of it.
    pub fn fresh_packed(
        &mut self,
        members: Vec<(String, Tensor)>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let members = members
            .into_iter()
            .map(|(n, t)| (self.path(&n), t))
            .collect();
        self.params.add_packed(members, Group::New)
    }

    /// A fresh `Linear(d_in -> d_out)` named `name` ([`Linear::fresh`]).
    pub fn fresh_linear(&mut self, name: &str, d_in: usize, d_out: usize) -> Result<Linear> {
        Linear::fresh(self.pp(name), d_in, d_out)
    }

    /// A fresh LayerNorm of width `d`: weight 1, bias 0.
    pub fn fresh_layer_norm(&mut self, name: &str, d: usize, eps: f64) -> Result<LayerNorm> {
        let weight = Tensor::ones(d, DType::F32, self.dev)?;
        let bias = Tensor::zeros(d, DType::F32, self.dev)?;
        Ok(LayerNorm {
            weight: self.fresh(&format!("{name}.weight"), weight)?,
            bias: self.fresh(&format!("{name}.bias"), bias)?,
            eps,
        })
    }

    /// The checkpoint tensor `name` (under the prefix), checked to have
    /// `shape`.
    pub fn pretrained(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let path = self.path(name);
        let v = self.ckpt.tensor_f32_shaped(&path, shape)?;
        self.params
            .add(&path, Tensor::from_vec(v, shape, self.dev)?, self.group)
    }

    /// The checkpoint tensors `names` (under the prefix) with their shapes.
    /// Trained: one flat variable for all of them (returned first; see
    /// [`Params::add_packed`]) and each one's view of it. Frozen: no flat
    /// variable, each tensor as [`Builder::pretrained`] gives it.
    pub fn pretrained_packed(
        &mut self,
        names: &[(String, Vec<usize>)],
    ) -> Result<(Option<Tensor>, Vec<Tensor>)> {
        let Some(group) = self.group else {
            let ts = names
                .iter()
                .map(|(n, shape)| self.pretrained(n, shape))
                .collect::<Result<Vec<_>>>()?;
            return Ok((None, ts));
        };
        let members = names
            .iter()
            .map(|(n, shape)| {
                let path = self.path(n);
                let v = self.ckpt.tensor_f32_shaped(&path, shape)?;
                Ok((path, Tensor::from_vec(v, shape.as_slice(), self.dev)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let (flat, views) = self.params.add_packed(members, group)?;
        Ok((Some(flat), views))
    }

    /// The checkpoint tensor `name` (the full name, not under the prefix)
    /// checked to have `shape`, read without registering a parameter (to
    /// derive fresh weights from it).
    pub fn read_checkpoint(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.ckpt.tensor_f32_shaped(name, shape)
    }

    /// A pre-trained `Linear(d_in -> d_out)`.
    pub fn pretrained_linear(&mut self, name: &str, d_in: usize, d_out: usize) -> Result<Linear> {
        Ok(Linear {
            weight: self.pretrained(&format!("{name}.weight"), &[d_out, d_in])?,
            bias: self.pretrained(&format!("{name}.bias"), &[d_out])?,
        })
    }

    /// A pre-trained LayerNorm of width `d`.
    pub fn pretrained_layer_norm(&mut self, name: &str, d: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.pretrained(&format!("{name}.weight"), &[d])?,
            bias: self.pretrained(&format!("{name}.bias"), &[d])?,
            eps,
        })
    }
}
