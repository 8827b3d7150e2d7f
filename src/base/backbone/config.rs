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

/// Which encoder family a `config.json` describes.
///
/// Both run the same post-LayerNorm layer (attention, residual, LayerNorm,
/// FFN, residual, LayerNorm); they differ in names and position handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// BERT: learned absolute positions from 0, token types, attention
    /// weights under `attention.self.{query,key,value}`.
    Bert,
    /// MPNet (`model_type` "mpnet", e.g. all-mpnet-base-v2): learned
    /// absolute positions from `pad_token_id + 1`, no token types, and a
    /// relative-position bias added to every layer's attention scores from
    /// one table `encoder.relative_attention_bias.weight` `[buckets, heads]`
    /// shared by all layers (see [`super::relative`]); attention weights
    /// under `attention.attn.{q,k,v,o}`, its LayerNorm `attention.LayerNorm`.
    Mpnet,
}

/// Where a family keeps a layer's attention weights (under
/// `encoder.layer.{i}.`); the FFN (`intermediate.dense`, `output.dense`,
/// `output.LayerNorm`) is named alike in both.
pub struct LayerNames {
    /// Query projection.
    pub query: &'static str,
    /// Key projection.
    pub key: &'static str,
    /// Value projection.
    pub value: &'static str,
    /// Attention output projection.
    pub attn_out: &'static str,
    /// LayerNorm after attention.
    pub attn_norm: &'static str,
}

impl LayerNames {
    /// The names of `family`.
    pub fn of(family: Family) -> Self {
        match family {
            Family::Bert => LayerNames {
                query: "attention.self.query",
                key: "attention.self.key",
                value: "attention.self.value",
                attn_out: "attention.output.dense",
                attn_norm: "attention.output.LayerNorm",
            },
            Family::Mpnet => LayerNames {
                query: "attention.attn.q",
                key: "attention.attn.k",
                value: "attention.attn.v",
                attn_out: "attention.attn.o",
                attn_norm: "attention.LayerNorm",
            },
        }
    }

    /// The checkpoint name (under the layer's prefix) of the BERT-named
    /// tensor `bert` (e.g. `attention.self.query.weight`) in this family.
    pub fn map(&self, bert: &str) -> String {
        let b = LayerNames::of(Family::Bert);
        for (from, to) in [
            (b.query, self.query),
            (b.key, self.key),
            (b.value, self.value),
            (b.attn_out, self.attn_out),
            (b.attn_norm, self.attn_norm),
        ] {
            if let Some(rest) = bert.strip_prefix(from) {
                return format!("{to}{rest}");
            }
        }
        bert.to_string()
    }
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
    /// MPNet: number of relative-position buckets (32 in every released
    /// MPNet); `None` for BERT (cleared when read, so that a BERT
    /// config's recorded form is what it was before MPNet was supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relative_attention_num_buckets: Option<usize>,
    /// MPNet: the padding id, whose successor is the first position;
    /// `None` for BERT (cleared when read, as above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<usize>,
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
        let bytes = crate::fsutil::read_bounded(path, crate::fsutil::SMALL_FILE_LIMIT)?;
        let mut cfg: BertConfig = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        match cfg.family() {
            // MPNet has no token-type table (the key is absent from its
            // config; serde's BERT default would claim two)
            Family::Mpnet => cfg.type_vocab_size = 0,
            // what BERT does not use is not part of its identity
            Family::Bert => {
                cfg.relative_attention_num_buckets = None;
                cfg.pad_token_id = None;
            }
        }
        cfg.validate().map_err(|msg| Error::Backbone {
            path: path.to_path_buf(),
            message: format!("unsupported backbone: {msg}"),
        })?;
        Ok(cfg)
    }

    /// The encoder family (from `model_type`; BERT when absent).
    pub fn family(&self) -> Family {
        match self.model_type.as_deref() {
            Some(t) if t.eq_ignore_ascii_case("mpnet") => Family::Mpnet,
            _ => Family::Bert,
        }
    }

    /// The position-table row of a sequence's first token: 0 for BERT,
    /// `pad_token_id + 1` for MPNet (whose position ids count from there).
    pub fn position_offset(&self) -> usize {
        match self.family() {
            Family::Bert => 0,
            Family::Mpnet => self.pad_token_id.unwrap_or(1) + 1,
        }
    }

    /// The longest sequence the position table covers.
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.position_offset())
    }

    /// MPNet's relative-position bucket count (`None` for BERT).
    pub fn relative_buckets(&self) -> Option<usize> {
        match self.family() {
            Family::Bert => None,
            Family::Mpnet => Some(self.relative_attention_num_buckets.unwrap_or(32)),
        }
    }

    /// Check that this is an encoder sherl computes exactly (BERT-shaped,
    /// or MPNet).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if let Some(b) = self.relative_buckets() {
            // transformers' MPNet computes the buckets with its default 32
            // whatever the config says (only the table's size follows it),
            // and its embeddings take padding index 1 whatever
            // pad_token_id says: anything else would differ from it
            if b != 32 {
                return Err(format!(
                    "relative_attention_num_buckets {b} is not supported (transformers' MPNet always buckets relative positions into 32, so only a 32-row table is computed the same)"
                ));
            }
            if let Some(p) = self.pad_token_id.filter(|&p| p != 1) {
                return Err(format!(
                    "pad_token_id {p} is not supported for MPNet (transformers' MPNet counts positions from padding index 1 whatever pad_token_id says)"
                ));
            }
            if self.max_tokens() == 0 {
                return Err(format!(
                    "max_position_embeddings {} leaves no position after the padding offset {}",
                    self.max_position_embeddings,
                    self.position_offset()
                ));
            }
        }
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

    fn mpnet() -> BertConfig {
        serde_json::from_str(
            r#"{"architectures":["MPNetForMaskedLM"],"hidden_act":"gelu","hidden_size":768,
            "intermediate_size":3072,"layer_norm_eps":1e-05,"max_position_embeddings":514,
            "model_type":"mpnet","num_attention_heads":12,"num_hidden_layers":12,"pad_token_id":1,
            "relative_attention_num_buckets":32,"vocab_size":30527}"#,
        )
        .unwrap()
    }

    #[test]
    fn mpnet_config_is_supported_with_its_positions() {
        let c = mpnet();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.family(), Family::Mpnet);
        assert_eq!(c.position_offset(), 2);
        assert_eq!(c.max_tokens(), 512);
        assert_eq!(c.relative_buckets(), Some(32));
        assert_eq!(minilm().family(), Family::Bert);
        assert_eq!(minilm().max_tokens(), 512);
        assert_eq!(minilm().relative_buckets(), None);
        let mut c = mpnet();
        c.relative_attention_num_buckets = Some(7);
        assert!(c
            .validate()
            .unwrap_err()
            .contains("relative_attention_num_buckets 7"));
        let mut c = mpnet();
        c.max_position_embeddings = 2;
        assert!(c.validate().unwrap_err().contains("no position"));
    }

    /// A BERT config reads and records as before MPNet's fields existed
    /// (caches compare the recorded form), and an MPNet's has no token
    /// types.
    #[test]
    fn read_configs_record_only_what_their_family_uses() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let mut v = serde_json::to_value(minilm()).unwrap();
        v["pad_token_id"] = serde_json::json!(0);
        std::fs::write(&p, v.to_string()).unwrap();
        let read = serde_json::to_value(BertConfig::from_file(&p).unwrap()).unwrap();
        assert!(read.get("pad_token_id").is_none(), "{read}");
        assert!(read.get("relative_attention_num_buckets").is_none());
        std::fs::write(&p, serde_json::to_string(&mpnet()).unwrap()).unwrap();
        let m = BertConfig::from_file(&p).unwrap();
        assert_eq!(m.type_vocab_size, 0);
        assert_eq!(m.pad_token_id, Some(1));
    }
}
