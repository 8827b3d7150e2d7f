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

/// A parameter: trainable (`Var`), frozen (plain tensor), or a slice of a
/// packed variable.
#[derive(Debug, Clone)]
pub enum Param {
    /// Trained, in a group.
    Train(Var, Group),
    /// Frozen.
    Frozen(Tensor),
    /// Trained as part of pack `pack` (see [`Params::add_packed`]): its
    /// values are `len` elements at `offset` of the pack's flat variable,
    /// seen through `view` (shaped, tracking the variable).
    Packed {
        /// Index of the pack.
        pack: usize,
        /// First element in the flat variable.
        offset: usize,
        /// The parameter's shaped view of the variable.
        view: Tensor,
    },
}

impl Param {
    /// The tensor to compute with.
    pub fn t(&self) -> &Tensor {
        match self {
            Param::Train(v, _) => v.as_tensor(),
            Param::Frozen(t) => t,
            Param::Packed { view, .. } => view,
        }
    }
}

/// All parameters of a model, by name.
#[derive(Debug, Default)]
pub struct Params {
    map: BTreeMap<String, Param>,
    /// Flat variables holding several named parameters each.
    packs: Vec<(Var, Group)>,
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

    /// Register `members` (name, tensor) as one trained flat variable of
    /// `group`, in the order given: the flat variable (what an op that
    /// takes all of them at once uses, with no concatenation per step) and
    /// each member's shaped view of it (what the composed ops use; their
    /// gradients reach the variable). Files keep one tensor per name.
    pub fn add_packed(
        &mut self,
        members: Vec<(String, Tensor)>,
        group: Group,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let flat = members
            .iter()
            .map(|(_, t)| t.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let var = Var::from_tensor(&Tensor::cat(&flat, 0)?)?;
        let pack = self.packs.len();
        let mut views = Vec::with_capacity(members.len());
        let mut offset = 0;
        for (name, t) in members {
            let n = t.elem_count();
            let view = var.as_tensor().narrow(0, offset, n)?.reshape(t.shape())?;
            let p = Param::Packed {
                pack,
                offset,
                view: view.clone(),
            };
            if self.map.insert(name.clone(), p).is_some() {
                return Err(FitError::model(format!(
                    "parameter {name} registered twice"
                )));
            }
            views.push(view);
            offset += n;
        }
        let flat = var.as_tensor().clone();
        self.packs.push((var, group));
        Ok((flat, views))
    }

    /// Trainable variables of `group` (packs count once).
    pub fn vars(&self, group: Group) -> Vec<Var> {
        self.map
            .values()
            .filter_map(|p| match p {
                Param::Train(v, g) if *g == group => Some(v.clone()),
                _ => None,
            })
            .chain(
                self.packs
                    .iter()
                    .filter(|(_, g)| *g == group)
                    .map(|(v, _)| v.clone()),
            )
            .collect()
    }

    /// Every trained parameter by name with its current values (a pack's
    /// members as their views).
    fn trainable(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.map.iter().filter_map(|(n, p)| match p {
            Param::Train(v, _) => Some((n, v.as_tensor())),
            Param::Packed { view, .. } => Some((n, view)),
            Param::Frozen(_) => None,
        })
    }

    /// Number of trainable scalars.
    pub fn trainable_count(&self) -> usize {
        self.trainable().map(|(_, t)| t.elem_count()).sum()
    }

    /// Number of frozen scalars.
    pub fn frozen_count(&self) -> usize {
        self.map
            .values()
            .filter_map(|p| match p {
                Param::Frozen(t) => Some(t.elem_count()),
                Param::Train(..) | Param::Packed { .. } => None,
            })
            .sum()
    }

    /// Copy of every trainable tensor (for keeping the best checkpoint).
    pub fn snapshot(&self) -> Result<BTreeMap<String, Tensor>> {
        self.trainable()
            .map(|(n, t)| {
                // a new storage holding only this parameter (a pack
                // member's view shares the whole pack's)
                let v = t.flatten_all()?.to_vec1::<f32>()?;
                Ok((n.clone(), Tensor::from_vec(v, t.shape(), t.device())?))
            })
            .collect()
    }

    /// Restore trainable tensors from a snapshot or a loaded file; every
    /// trainable parameter must be present with the same shape.
    pub fn restore(&self, values: &BTreeMap<String, Tensor>, source: &Path) -> Result<()> {
        let mut packed: Vec<Vec<(usize, Tensor)>> = vec![Vec::new(); self.packs.len()];
        for (name, p) in &self.map {
            let cur = match p {
                Param::Frozen(_) => continue,
                p => p.t(),
            };
            let t = values.get(name).ok_or_else(|| Error::Checkpoint {
                path: source.to_path_buf(),
                message: format!("parameter '{name}' is missing"),
            })?;
            if t.dims() != cur.dims() {
                return Err(Error::Checkpoint {
                    path: source.to_path_buf(),
                    message: format!(
                        "parameter '{name}' has shape {:?}, the model needs {:?}",
                        t.dims(),
                        cur.dims()
                    ),
                });
            }
            let t = t.to_dtype(DType::F32)?;
            match p {
                Param::Train(var, _) => var.set(&t)?,
                Param::Packed { pack, offset, .. } => packed[*pack].push((*offset, t)),
                Param::Frozen(_) => {}
            }
        }
        for ((var, _), mut members) in self.packs.iter().zip(packed) {
            members.sort_by_key(|(o, _)| *o);
            let flat = members
                .iter()
                .map(|(_, t)| t.flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            var.set(&Tensor::cat(&flat, 0)?)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A pack is one variable for the optimizer, separate names for files:
    /// gradients through the views reach it, a snapshot holds each member
    /// alone, and restoring the snapshot puts the values back.
    #[test]
    fn packed_parameters_train_as_one_variable_and_save_by_name() {
        let dev = Device::Cpu;
        let mut p = Params::new();
        let a = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        let b = Tensor::new(&[5f32, 6., 7.], &dev).unwrap();
        p.add("c", Tensor::new(&[9f32], &dev).unwrap(), Some(Group::New))
            .unwrap();
        let (flat, views) = p
            .add_packed(
                vec![("a".into(), a.clone()), ("b".into(), b.clone())],
                Group::Pretrained,
            )
            .unwrap();
        assert_eq!(flat.to_vec1::<f32>().unwrap(), [1., 2., 3., 4., 5., 6., 7.]);
        assert_eq!(
            views[0].to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        assert_eq!(p.vars(Group::Pretrained).len(), 1);
        assert_eq!(p.vars(Group::New).len(), 1);
        assert_eq!(p.trainable_count(), 8);
        // the gradient of sum(a * 2) + sum(b) reaches the flat variable
        let loss =
            ((&views[0] * 2.0).unwrap().sum_all().unwrap() + views[1].sum_all().unwrap()).unwrap();
        let g = loss.backward().unwrap();
        let var = &p.vars(Group::Pretrained)[0];
        assert_eq!(
            g.get(var.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            [2., 2., 2., 2., 1., 1., 1.]
        );
        let snap = p.snapshot().unwrap();
        assert_eq!(snap["b"].to_vec1::<f32>().unwrap(), [5., 6., 7.]);
        assert_eq!(snap["a"].dims(), &[2, 2]);
        var.set(&Tensor::zeros(7, DType::F32, &dev).unwrap())
            .unwrap();
        assert_eq!(snap["b"].to_vec1::<f32>().unwrap(), [5., 6., 7.]); // a copy
        p.restore(&snap, Path::new("snapshot")).unwrap();
        assert_eq!(flat.to_vec1::<f32>().unwrap(), [1., 2., 3., 4., 5., 6., 7.]);
        // a missing member is refused by name
        let mut partial = snap.clone();
        partial.remove("a");
        let e = p.restore(&partial, Path::new("w.safetensors")).unwrap_err();
        assert!(e.to_string().contains("'a' is missing"), "{e}");
    }
}
