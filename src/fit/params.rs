//! Named trainable parameters in two groups (new modules, pre-trained
//! weights), saved as safetensors (the modules create them through
//! [`super::nn::Builder`]).
//!
//! Two groups give two AdamW optimizers with their own learning rates, and
//! keep pre-trained and fresh weights apart (candle's `VarMap::load` fails
//! when the file lacks a variable, so mixing them is a trap).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::fit::error::FitError;
use crate::{Error, Result};

/// Which optimizer group a parameter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    /// Fresh modules (consolidation, restore, gate, head).
    New,
    /// Pre-trained backbone weights being fine-tuned.
    Pretrained,
}

/// A parameter: trainable (`Var`) or frozen (plain tensor).
#[derive(Debug, Clone)]
pub enum Param {
    /// Trained, in a group.
    Train(Var, Group),
    /// Frozen.
    Frozen(Tensor),
}

impl Param {
    /// The tensor to compute with.
    pub fn t(&self) -> &Tensor {
        match self {
            Param::Train(v, _) => v.as_tensor(),
            Param::Frozen(t) => t,
        }
    }
}

/// All parameters of a model, by name.
#[derive(Debug, Default)]
pub struct Params {
    map: BTreeMap<String, Param>,
}

impl Params {
    /// Empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a tensor under `name`, trained in `group` or frozen (`None`).
    pub fn add(&mut self, name: &str, t: Tensor, group: Option<Group>) -> Result<Tensor> {
        let p = match group {
            Some(g) => Param::Train(Var::from_tensor(&t)?, g),
            None => Param::Frozen(t),
        };
        let out = p.t().clone();
        if self.map.insert(name.to_string(), p).is_some() {
            return Err(FitError::model(format!(
                "parameter {name} registered twice"
            )));
        }
        Ok(out)
    }

    /// Trainable variables of `group`.
    pub fn vars(&self, group: Group) -> Vec<Var> {
        self.map
            .values()
            .filter_map(|p| match p {
                Param::Train(v, g) if *g == group => Some(v.clone()),
                _ => None,
            })
            .collect()
    }

    /// All trainable variables with their names.
    pub fn trainable(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.map.iter().filter_map(|(n, p)| match p {
            Param::Train(v, _) => Some((n, v)),
            Param::Frozen(_) => None,
        })
    }

    /// Number of trainable scalars.
    pub fn trainable_count(&self) -> usize {
        self.trainable().map(|(_, v)| v.elem_count()).sum()
    }

    /// Number of frozen scalars.
    pub fn frozen_count(&self) -> usize {
        self.map
            .values()
            .filter_map(|p| match p {
                Param::Frozen(t) => Some(t.elem_count()),
                Param::Train(..) => None,
            })
            .sum()
    }

    /// Copy of every trainable tensor (for keeping the best checkpoint).
    pub fn snapshot(&self) -> Result<BTreeMap<String, Tensor>> {
        self.trainable()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect()
    }

    /// Restore trainable tensors from a snapshot or a loaded file; every
    /// trainable parameter must be present with the same shape.
    pub fn restore(&self, values: &BTreeMap<String, Tensor>, source: &Path) -> Result<()> {
        for (name, var) in self.trainable() {
            let t = values.get(name).ok_or_else(|| Error::Checkpoint {
                path: source.to_path_buf(),
                message: format!("parameter '{name}' is missing"),
            })?;
            if t.dims() != var.dims() {
                return Err(Error::Checkpoint {
                    path: source.to_path_buf(),
                    message: format!(
                        "parameter '{name}' has shape {:?}, the model needs {:?}",
                        t.dims(),
                        var.dims()
                    ),
                });
            }
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }

    /// Write trainable tensors as safetensors, atomically (temporary file,
    /// fsync, rename; an I/O error names the file). Returns the sha256 of the
    /// bytes written, which `summary.json` records so `predict` can tell the
    /// weights it loads are the ones the run ended with.
    pub fn save(values: &BTreeMap<String, Tensor>, path: &Path) -> Result<String> {
        let bytes =
            safetensors::tensor::serialize(values.iter().map(|(k, v)| (k.as_str(), v)), None)
                .map_err(|e| Error::Checkpoint {
                    path: path.to_path_buf(),
                    message: format!("cannot serialise the weights: {e}"),
                })?;
        crate::fsutil::write_atomic(path, &bytes)?;
        Ok(crate::fsutil::sha256_bytes(&bytes))
    }

    /// Read a safetensors file written by [`Params::save`].
    pub fn load_file(path: &Path, dev: &Device) -> Result<BTreeMap<String, Tensor>> {
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "weights file not found"),
            ));
        }
        let m = candle_core::safetensors::load(path, dev).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(m.into_iter().collect())
    }
}
