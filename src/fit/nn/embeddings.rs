//! BERT embeddings (word + position + token type, LayerNorm, dropout),
//! pre-trained and trainable, for full fine-tuning.

use candle_core::Tensor;

use super::ops::{dropout, Mode};
use super::{Builder, LayerNorm};
use crate::backbone::BertConfig;
use crate::Result;

/// The embedding tables and their LayerNorm.
#[derive(Debug, Clone)]
pub struct Embeddings {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    norm: LayerNorm,
    dropout: f32,
}

impl super::Detach for Embeddings {
    fn detached(&self) -> Self {
        Embeddings {
            word: self.word.detach(),
            position: self.position.detach(),
            token_type: self.token_type.detach(),
            norm: self.norm.detached(),
            dropout: self.dropout,
        }
    }
}

impl Embeddings {
    /// Load `word_embeddings`, `position_embeddings`,
    /// `token_type_embeddings` and `LayerNorm` under `vb`'s prefix
    /// (`embeddings`).
    pub fn load(mut vb: Builder, cfg: &BertConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Embeddings {
            word: vb.pretrained("word_embeddings.weight", &[cfg.vocab_size, d])?,
            position: vb.pretrained(
                "position_embeddings.weight",
                &[cfg.max_position_embeddings, d],
            )?,
            token_type: vb.pretrained("token_type_embeddings.weight", &[cfg.type_vocab_size, d])?,
            norm: vb.pretrained_layer_norm("LayerNorm", d, cfg.layer_norm_eps)?,
            dropout: cfg.hidden_dropout_prob as f32,
        })
    }

    /// # Shapes
    /// `ids`, `types` `[B, S]` u32 -> `[B, S, D]`.
    pub fn forward(&self, ids: &Tensor, types: &Tensor, mode: &mut Mode<'_>) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let d = self.word.dim(1)?;
        let w = self
            .word
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, s, d))?;
        let t = self
            .token_type
            .index_select(&types.flatten_all()?, 0)?
            .reshape((b, s, d))?;
        let p = self.position.narrow(0, 0, s)?;
        let x = (w + t)?.broadcast_add(&p)?;
        dropout(&self.norm.forward(&x)?, self.dropout, mode)
    }
}
