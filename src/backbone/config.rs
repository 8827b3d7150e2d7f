//! `config.json` of a BERT-family checkpoint, read with serde, and the checks
//! that decide whether sherl's exporter and late layers can reproduce it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The hidden activation of the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU, `x * Phi(x)` with the error function (HF `gelu`).
    Gelu,
    /// Tanh approximation of GELU (HF `gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// `max(x, 0)`.
    Relu,
}

/// The fields of a Hugging Face BERT `config.json` that define the network.
///
/// Unknown fields are accepted (Hugging Face configs carry many unrelated
/// keys); the fields that would change the computation are checked by
/// [`BertConfig::validate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// `model_type`, e.g. "bert".
    #[serde(default)]
    pub model_type: Option<String>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width D.
    pub hidden_size: usize,
    /// Number of transformer layers N.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Activation name as written in the file.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Size of the position table.
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Must be "absolute".
    #[serde(default = "default_pos")]
    pub position_embedding_type: String,
    /// Must be false: decoders are not encoders.
    #[serde(default)]
    pub is_decoder: bool,
    /// Must be false.
    #[serde(default)]
    pub add_cross_attention: bool,
    /// Dropout on hidden states in training (late layers).
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities in training (late layers).
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// ALBERT/ELECTRA-style factorised embeddings are not supported.
    #[serde(default)]
    pub embedding_size: Option<usize>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_pos() -> String {
    "absolute".into()
}

impl BertConfig {
    /// Read `config.json` and [`validate`](Self::validate) it.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let cfg: BertConfig = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        cfg.validate().map_err(|msg| Error::Backbone {
            path: path.to_path_buf(),
            message: format!("unsupported backbone: {msg}"),
        })?;
        Ok(cfg)
    }

    /// Check that this is a plain BERT-shaped encoder sherl computes exactly.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if let Some(t) = &self.model_type {
            let t = t.to_ascii_lowercase();
            if matches!(
                t.as_str(),
                "roberta" | "xlm-roberta" | "camembert" | "longformer"
            ) {
                return Err(format!(
                    "model_type '{t}' offsets position ids by the padding index; only BERT-style absolute positions from 0 are supported"
                ));
            }
            if matches!(
                t.as_str(),
                "distilbert" | "albert" | "deberta" | "deberta-v2" | "t5" | "gpt2"
            ) {
                return Err(format!(
                    "model_type '{t}' is not BERT-shaped (different weight layout or attention)"
                ));
            }
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type '{}' is not supported (only 'absolute'; relative positions change attention)",
                self.position_embedding_type
            ));
        }
        if self.is_decoder || self.add_cross_attention {
            return Err("decoder / cross-attention configs are not encoders".into());
        }
        if let Some(e) = self.embedding_size {
            if e != self.hidden_size {
                return Err(format!(
                    "embedding_size {e} differs from hidden_size {} (factorised embeddings are not supported)",
                    self.hidden_size
                ));
            }
        }
        self.activation()?;
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_hidden_layers == 0 || self.vocab_size == 0 || self.max_position_embeddings == 0
        {
            return Err(
                "num_hidden_layers, vocab_size and max_position_embeddings must be positive".into(),
            );
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err("layer_norm_eps must be positive".into());
        }
        Ok(())
    }

    /// The parsed activation, or why it is unsupported.
    pub fn activation(&self) -> std::result::Result<Activation, String> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(format!(
                "hidden_act '{other}' is not supported (supported: gelu, gelu_new, gelu_pytorch_tanh, relu)"
            )),
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minilm() -> BertConfig {
        serde_json::from_str(
            r#"{"hidden_act":"gelu","hidden_size":384,"intermediate_size":1536,"layer_norm_eps":1e-12,
            "max_position_embeddings":512,"model_type":"bert","num_attention_heads":12,"num_hidden_layers":6,
            "position_embedding_type":"absolute","type_vocab_size":2,"vocab_size":30522,"use_cache":true}"#,
        )
        .unwrap()
    }

    #[test]
    fn minilm_config_is_supported() {
        let c = minilm();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.head_dim(), 32);
        assert_eq!(c.activation(), Ok(Activation::Gelu));
    }

    #[test]
    fn unsupported_configs_are_refused_with_reason() {
        let mut c = minilm();
        c.hidden_act = "swish".into();
        assert!(c.validate().unwrap_err().contains("swish"));
        let mut c = minilm();
        c.position_embedding_type = "relative_key".into();
        assert!(c.validate().unwrap_err().contains("relative_key"));
        let mut c = minilm();
        c.model_type = Some("roberta".into());
        assert!(c.validate().unwrap_err().contains("roberta"));
        let mut c = minilm();
        c.num_attention_heads = 7;
        assert!(c.validate().unwrap_err().contains("multiple"));
    }
}
