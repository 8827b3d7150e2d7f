//! BERT-family backbones (BERT and MPNet): the on-disk *backbone directory*, its
//! `config.json`, and its `model.safetensors` checkpoint.
//!
//! A backbone directory holds `config.json`, `model.safetensors` and
//! `tokenizer.json` (as Hugging Face ships them), and, once exported or
//! supplied by the user, `model.onnx`. Layer indices follow Hugging Face's
//! `hidden_states` convention: 0 is the embedding output, `i` the output of
//! transformer layer `i` (1-based), so a model with N layers has N + 1
//! hidden states.

mod checkpoint;
mod config;
mod image;
pub mod relative;

pub use checkpoint::{Checkpoint, F32Tensors, VIT_ANCHOR};
pub use config::{Activation, BertConfig, Family, LayerNames};
pub use image::ImageBackboneDesc;

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Size bound of a model file read whole (a `model.safetensors`
/// checkpoint, an ONNX model): 256 GiB, above any checkpoint sherl can run
/// (and an ONNX protobuf stops at 2 GiB). What protects the reader is that
/// the file must be a regular file ([`crate::fsutil::open_regular`]), so a
/// FIFO or `/dev/zero` is refused; the bound only makes the limit explicit.
pub const MODEL_FILE_LIMIT: u64 = 256 << 30;

/// Size bound of `tokenizer.json` (256 MiB; the largest Hugging Face
/// tokenizers are a few tens of MiB).
pub const TOKENIZER_FILE_LIMIT: u64 = 256 << 20;

/// Paths inside a backbone directory.
#[derive(Debug, Clone)]
pub struct BackboneDir {
    root: PathBuf,
}

impl BackboneDir {
    /// Use `root` as a backbone directory; fails if it is not a directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        match std::fs::metadata(&root) {
            Ok(m) if m.is_dir() => Ok(BackboneDir { root }),
            Ok(_) => Err(Error::Backbone {
                path: root.clone(),
                message: "backbone must be a directory holding config.json, model.safetensors and tokenizer.json".into(),
            }),
            Err(e) => Err(Error::io(&root, e)),
        }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `config.json`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.json")
    }

    /// `model.safetensors`.
    pub fn safetensors_path(&self) -> PathBuf {
        self.root.join("model.safetensors")
    }

    /// `tokenizer.json`.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.root.join("tokenizer.json")
    }

    /// `backbone.json`: present for an image backbone
    /// ([`ImageBackboneDesc`]).
    pub fn description_path(&self) -> PathBuf {
        self.root.join("backbone.json")
    }

    /// Whether this is an image backbone (it holds `backbone.json`).
    pub fn is_image(&self) -> bool {
        self.description_path().is_file()
    }

    /// `model.onnx` (the default export target and the model extraction runs).
    pub fn onnx_path(&self) -> PathBuf {
        self.root.join("model.onnx")
    }

    /// Read and validate `config.json`.
    pub fn config(&self) -> Result<BertConfig> {
        BertConfig::from_file(&self.config_path())
    }
}

/// Name of the `i`-th hidden state (`hidden_states.i`, Hugging Face's
/// numbering: 0 is the embedding output): the ONNX output names, and how
/// every message and listing names a layer.
pub fn hidden_state_name(i: usize) -> String {
    format!("{HIDDEN_STATE_PREFIX}{i}")
}

/// What every hidden state's name starts with.
const HIDDEN_STATE_PREFIX: &str = "hidden_states.";

/// Parse a name made by [`hidden_state_name`] back into its index (`None`
/// for any other name, including leading zeros).
pub fn hidden_state_index(name: &str) -> Option<usize> {
    let rest = name.strip_prefix(HIDDEN_STATE_PREFIX)?;
    if rest.is_empty()
        || !rest.bytes().all(|b| b.is_ascii_digit())
        || (rest.len() > 1 && rest.starts_with('0'))
    {
        return None;
    }
    rest.parse().ok()
}
