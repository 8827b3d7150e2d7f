//! MPNet's relative-position bias for the candle layers: the shared table
//! `encoder.relative_attention_bias.weight` `[buckets, heads]` turned, per
//! batch, into the bias `[1, H, S, S]` that every layer adds to its
//! attention scores (the buckets of [`crate::backbone::relative`]).
//!
//! The table is read once and kept frozen by every method, `full-ft`
//! included (a stated choice: 384 numbers of MPNet's 110 M; keeping it a
//! constant lets the fused layer op, which has no gradient for an additive
//! score bias, run MPNet layers exactly as it runs BERT's).

use candle_core::Tensor;

use super::Builder;
use crate::backbone::{relative, BertConfig};
use crate::Result;

/// The shared table of an MPNet backbone.
#[derive(Debug, Clone)]
pub struct RelativeBias {
    table: Vec<f32>,
    buckets: usize,
    heads: usize,
}

impl RelativeBias {
    /// The table of `cfg`'s backbone, read from `vb`'s checkpoint (by its
    /// full name, registered as no parameter), or `None` for a backbone
    /// without relative positions (BERT).
    pub fn load(vb: Builder, cfg: &BertConfig) -> Result<Option<Self>> {
        let Some(buckets) = cfg.relative_buckets() else {
            return Ok(None);
        };
        let heads = cfg.num_attention_heads;
        let table =
            vb.read_checkpoint("encoder.relative_attention_bias.weight", &[buckets, heads])?;
        Ok(Some(RelativeBias {
            table,
            buckets,
            heads,
        }))
    }

    /// # Shapes
    /// `key_bias` `[B, 1, 1, S]` ([`super::bert_layer::attention_bias`]) ->
    /// `[B, H, S, S]`: the key bias plus each head's position bias.
    pub fn add_to(&self, key_bias: &Tensor) -> Result<Tensor> {
        let (_, _, _, s) = key_bias.dims4()?;
        let pos = relative::position_bias(&self.table, self.buckets, self.heads, s);
        let pos = Tensor::from_vec(pos, (1, self.heads, s, s), key_bias.device())?;
        Ok(key_bias.broadcast_add(&pos)?.contiguous()?)
    }
}
