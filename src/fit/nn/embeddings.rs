//! BERT embeddings (word + position + token type, LayerNorm, dropout),
//! pre-trained and trainable, for full fine-tuning; MPNet's have no token
//! types and count positions from `pad_token_id + 1`.

use candle_core::Tensor;

use super::ops::{dropout, Mode};
use super::{Builder, LayerNorm};
use crate::backbone::{BertConfig, Family};
use crate::Result;

/// The embedding tables and their LayerNorm.
#[derive(Debug, Clone)]
pub struct Embeddings {
    word: Tensor,
    position: Tensor,
    /// `None` for MPNet.
    token_type: Option<Tensor>,
    /// Row of the first token's position.
    position_offset: usize,
    norm: LayerNorm,
    dropout: f32,
}

impl super::Detach for Embeddings {
    fn detached(&self) -> Self {
        Embeddings {
            word: self.word.detach(),
            position: self.position.detach(),
            token_type: self.token_type.as_ref().map(Tensor::detach),
            position_offset: self.position_offset,
            norm: self.norm.detached(),
            dropout: self.dropout,
        }
    }
}

impl Embeddings {
    /// Load `word_embeddings`, `position_embeddings`,
    /// `token_type_embeddings` (BERT only) and `LayerNorm` under `vb`'s
    /// prefix (`embeddings`).
    pub fn load(mut vb: Builder, cfg: &BertConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let word = vb.pretrained("word_embeddings.weight", &[cfg.vocab_size, d])?;
        let position = vb.pretrained(
            "position_embeddings.weight",
            &[cfg.max_position_embeddings, d],
        )?;
        let token_type = match cfg.family() {
            Family::Bert => {
                Some(vb.pretrained("token_type_embeddings.weight", &[cfg.type_vocab_size, d])?)
            }
            Family::Mpnet => None,
        };
        Ok(Embeddings {
            word,
            position,
            token_type,
            position_offset: cfg.position_offset(),
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
        let w = match &self.token_type {
            Some(tt) => {
                (w + tt
                    .index_select(&types.flatten_all()?, 0)?
                    .reshape((b, s, d))?)?
            }
            None => w,
        };
        let p = self.position.narrow(0, self.position_offset, s)?;
        let x = w.broadcast_add(&p)?;
        dropout(&self.norm.forward(&x)?, self.dropout, mode)
    }
}
