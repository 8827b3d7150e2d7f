//! The hooks by which trained modules sit inside a frozen BERT layer
//! ([`super::bert_layer::BertLayer::forward_with`]): the projections a
//! module can update ([`Projection`]) and the interface LoRA
//! ([`super::lora`]) and adapters ([`super::adapter`]) implement
//! ([`LayerExtras`]).

use candle_core::Tensor;

use super::ops::Mode;
use crate::Result;

/// A projection inside a BERT layer (what a LoRA update can target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    /// Attention query.
    Query,
    /// Attention key.
    Key,
    /// Attention value.
    Value,
    /// Attention output dense.
    Output,
    /// FFN intermediate dense (`D -> F`).
    FfnIn,
    /// FFN output dense (`F -> D`).
    FfnOut,
}

/// Trained modules inside a frozen layer
/// ([`BertLayer::forward_with`](super::bert_layer::BertLayer::forward_with)):
/// low-rank updates of its projections (LoRA) and modules on its
/// sub-layers' outputs (adapters).
pub trait LayerExtras {
    /// Added to projection `p`'s output, computed from its input `x`;
    /// `None` adds nothing.
    fn delta(&self, p: Projection, x: &Tensor, mode: &mut Mode<'_>) -> Result<Option<Tensor>>;
    /// Applied to the attention sub-layer's output (after its dropout),
    /// before the residual and the LayerNorm.
    fn after_attention(&self, a: Tensor, mode: &mut Mode<'_>) -> Result<Tensor>;
    /// Applied to the FFN's output (after its dropout), before the
    /// residual and the LayerNorm.
    fn after_ffn(&self, o: Tensor, mode: &mut Mode<'_>) -> Result<Tensor>;
}
