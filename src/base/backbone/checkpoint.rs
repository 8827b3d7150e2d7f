//! A `model.safetensors` checkpoint read by Hugging Face names, with or
//! without a model prefix such as `bert.`.

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

/// The tensor whose name gives a ViT checkpoint's prefix (every Hugging
/// Face ViT/Dinov2 checkpoint has it).
pub const VIT_ANCHOR: &str = "encoder.layer.0.norm1.weight";

/// Name of the tensor used to find the checkpoint's prefix.
const ANCHOR: &str = "embeddings.word_embeddings.weight";

/// Named f32 tensors: shape and row-major values.
pub type F32Tensors = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// A safetensors checkpoint held in memory.
pub struct Checkpoint {
    path: PathBuf,
    bytes: Vec<u8>,
    prefix: String,
    names: Vec<String>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("prefix", &self.prefix)
            .field("tensors", &self.names.len())
            .finish()
    }
}

impl Checkpoint {
    /// Read a checkpoint and find its name prefix (`""`, `"bert."`, ...).
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = crate::fsutil::read_bounded(path, super::MODEL_FILE_LIMIT)?;
        Self::from_bytes(path, bytes)
    }

    /// Parse checkpoint bytes; `path` is used in messages only.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::from_bytes_anchored(path, bytes, ANCHOR, "a BERT-family checkpoint")
    }

    /// Open a ViT checkpoint (`model.safetensors` that `sherl-extract`
    /// writes next to an image backbone's `model.onnx`, Hugging Face Dinov2
    /// names), its prefix found through [`VIT_ANCHOR`].
    pub fn open_vit(path: &Path) -> Result<Self> {
        let bytes = crate::fsutil::read_bounded(path, super::MODEL_FILE_LIMIT)?;
        Self::from_bytes_anchored(path, bytes, VIT_ANCHOR, "a ViT checkpoint")
    }

    /// Parse checkpoint bytes of another family: the prefix is what comes
    /// before `anchor`, a tensor every checkpoint of that `family` has (for
    /// a ViT, `encoder.layer.0.norm1.weight`).
    pub fn from_bytes_anchored(
        path: &Path,
        bytes: Vec<u8>,
        anchor: &str,
        family: &str,
    ) -> Result<Self> {
        let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            message: format!("not a valid safetensors file: {e}"),
        })?;
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        let prefix = names
            .iter()
            .filter_map(|n| n.strip_suffix(anchor))
            .min_by_key(|p| p.len())
            .map(str::to_string)
            .ok_or_else(|| Error::Checkpoint {
                path: path.to_path_buf(),
                message: format!(
                    "no '{anchor}' tensor (with or without a prefix such as 'bert.'): not {family}"
                ),
            })?;
        Ok(Checkpoint {
            path: path.to_path_buf(),
            bytes,
            prefix,
            names,
        })
    }

    /// The prefix in front of every BERT name, e.g. `"bert."` or `""`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// sha256 of the file's bytes, lowercase hex.
    pub fn sha256(&self) -> String {
        crate::hash::sha256_hex(&self.bytes)
    }

    /// Whether a tensor exists under `name` (without prefix).
    pub fn contains(&self, name: &str) -> bool {
        let full = format!("{}{name}", self.prefix);
        self.names.binary_search(&full).is_ok()
    }

    /// Read tensor `name` (without prefix) as f32, converting F16/BF16/F64.
    /// Returns its shape and row-major values.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let full = format!("{}{name}", self.prefix);
        let err = |message: String| Error::Checkpoint {
            path: self.path.clone(),
            message,
        };
        let st = SafeTensors::deserialize(&self.bytes)
            .map_err(|e| err(format!("not a valid safetensors file: {e}")))?;
        let view = st
            .tensor(&full)
            .map_err(|_| err(format!("tensor '{full}' is missing from the checkpoint")))?;
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => crate::le::f32s(data),
            Dtype::F16 => crate::le::f16s(data),
            Dtype::BF16 => crate::le::bf16s(data),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|b| {
                    f64::from_le_bytes(b.try_into().expect("chunks_exact(8) yields 8 bytes")) as f32
                })
                .collect(),
            other => {
                return Err(err(format!(
                    "tensor '{full}' has dtype {other:?}; expected a float type"
                )))
            }
        };
        Ok((view.shape().to_vec(), values))
    }

    /// Read tensor `name` and check its shape.
    pub fn tensor_f32_shaped(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (got, values) = self.tensor_f32(name)?;
        if got != shape {
            return Err(Error::Checkpoint {
                path: self.path.clone(),
                message: format!(
                    "tensor '{}{name}' has shape {got:?}, config.json implies {shape:?}",
                    self.prefix
                ),
            });
        }
        Ok(values)
    }

    /// This checkpoint with the f32 tensors of `overrides` (names without
    /// prefix, each one the checkpoint holds, with its shape) in place of
    /// its own: a trained run's updated layers over the backbone they
    /// started from. `path` names the result in messages.
    pub fn with_overrides(&self, path: &Path, overrides: &F32Tensors) -> Result<Checkpoint> {
        let st = SafeTensors::deserialize(&self.bytes).map_err(|e| Error::Checkpoint {
            path: self.path.clone(),
            message: format!("not a valid safetensors file: {e}"),
        })?;
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, (shape, values)) in overrides {
            let full = format!("{}{name}", self.prefix);
            let view = st.tensor(&full).map_err(|_| Error::Checkpoint {
                path: path.to_path_buf(),
                message: format!("tensor '{name}' is not in the backbone checkpoint"),
            })?;
            if view.shape() != shape.as_slice() {
                return Err(Error::Checkpoint {
                    path: path.to_path_buf(),
                    message: format!(
                        "tensor '{name}' has shape {shape:?}, the backbone's has {:?}",
                        view.shape()
                    ),
                });
            }
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            owned.push((full, Dtype::F32, shape.clone(), bytes));
        }
        let mut views = Vec::with_capacity(self.names.len());
        for name in &self.names {
            let view = match owned.iter().find(|o| &o.0 == name) {
                Some((_, dtype, shape, bytes)) => {
                    safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                }
                None => {
                    let v = st.tensor(name).map_err(|e| Error::Checkpoint {
                        path: self.path.clone(),
                        message: format!("tensor '{name}': {e}"),
                    })?;
                    safetensors::tensor::TensorView::new(v.dtype(), v.shape().to_vec(), v.data())
                }
            }
            .map_err(|e| Error::Checkpoint {
                path: path.to_path_buf(),
                message: format!("tensor '{name}': {e}"),
            })?;
            views.push((name.clone(), view));
        }
        let bytes = safetensors::tensor::serialize(views, None).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            message: format!("cannot serialise the merged weights: {e}"),
        })?;
        // the same tensor names under the same prefix, whatever the family
        Ok(Checkpoint {
            path: path.to_path_buf(),
            bytes,
            prefix: self.prefix.clone(),
            names: self.names.clone(),
        })
    }
}
