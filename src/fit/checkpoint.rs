//! Mid-run checkpoints: the whole training state at the end of each epoch,
//! so that a run killed mid-way continues from its last finished epoch and
//! ends exactly as if it had never stopped.
//!
//! Two files in the run directory, each replaced atomically at every epoch
//! end (only the latest checkpoint is kept):
//!
//! - `checkpoint.safetensors`: the trained weights (`w/<name>`) and each
//!   trained parameter's two AdamW moments (`m/<group>/<i>`,
//!   `v/<group>/<i>`, f32), about three times the trained parameters' size;
//! - `checkpoint.json` ([`State`]), written second and so the commit point:
//!   the epochs finished, the optimiser steps and schedule position, the
//!   dropout stream's state, the best epoch so far (its score and the
//!   sha256 of `weights.safetensors`), the task's running totals, the
//!   sha256 of `config.json` the run trained under and of the tensors file.
//!
//! The batch order needs no state: epoch `e` draws its order from the seed
//! and `e` alone. A checkpoint is used only when every recorded sha256
//! matches; otherwise the run trains from epoch 1 and says why. Both files
//! are removed once `summary.json` is written.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::optim::ParamMoments;
use super::params::Params;
use crate::{Error, Result};

/// The checkpoint's tensors.
pub const TENSORS_FILE: &str = "checkpoint.safetensors";
/// The checkpoint's state (the commit point).
pub const STATE_FILE: &str = "checkpoint.json";
/// The layout of [`State`] and of the tensor names.
const FORMAT: u32 = 1;

/// The best epoch so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BestRecord {
    /// Its validation score (the selection score).
    pub score: f64,
    /// Its epoch (1-based).
    pub epoch: usize,
    /// sha256 of `weights.safetensors`, which holds its weights.
    pub sha256: String,
}

/// Everything but the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// The layout version (1).
    pub format: u32,
    /// Epochs finished.
    pub epoch: usize,
    /// Optimiser steps taken (the schedule's position).
    pub step: usize,
    /// The dropout stream's state.
    pub dropout: u64,
    /// Training seconds of the finished epochs.
    pub train_seconds: f64,
    /// The largest step memory so far.
    pub step_peak: Option<u64>,
    /// The best epoch so far.
    pub best: Option<BestRecord>,
    /// Each optimiser group's step count.
    pub adam_steps: Vec<i32>,
    /// The task's running totals.
    pub task: serde_json::Value,
    /// sha256 of `config.json` the run trained under.
    pub config_sha256: String,
    /// sha256 of `checkpoint.safetensors`.
    pub tensors_sha256: String,
}

/// A checkpoint read back: the state, the weights by name, and each
/// group's moments in parameter order.
pub struct Loaded {
    /// The state.
    pub state: State,
    /// The trained weights.
    pub weights: BTreeMap<String, Tensor>,
    /// Per group, per parameter: first and second moments.
    pub moments: Vec<ParamMoments>,
}

/// Write a checkpoint: `weights`, the `moments` of each group, then
/// `state` (its `tensors_sha256` filled in here).
pub fn save(
    dir: &Path,
    mut state: State,
    weights: BTreeMap<String, Tensor>,
    moments: &[ParamMoments],
) -> Result<()> {
    let mut tensors: BTreeMap<String, Tensor> = weights
        .into_iter()
        .map(|(k, v)| (format!("w/{k}"), v))
        .collect();
    let cpu = candle_core::Device::Cpu;
    for (g, group) in moments.iter().enumerate() {
        for (i, (m, v)) in group.iter().enumerate() {
            tensors.insert(format!("m/{g}/{i}"), Tensor::from_slice(m, m.len(), &cpu)?);
            tensors.insert(format!("v/{g}/{i}"), Tensor::from_slice(v, v.len(), &cpu)?);
        }
    }
    state.format = FORMAT;
    state.tensors_sha256 = Params::save(&tensors, &dir.join(TENSORS_FILE))?;
    let json = serde_json::to_vec_pretty(&state).map_err(|e| Error::Json {
        path: dir.join(STATE_FILE),
        source: e,
    })?;
    crate::fsutil::write_atomic(&dir.join(STATE_FILE), &json)
}

/// Read the checkpoint in `dir`, if there is one: `Ok(None)` without
/// `checkpoint.json`; `Err(why)` when it cannot be used (unreadable, another
/// format, trained under another `config.json`, a tensors file that is not
/// the one recorded, more epochs than the run has, or the moments of
/// another number of groups than `groups`).
pub fn load(
    dir: &Path,
    config_sha256: &str,
    epochs: usize,
    groups: usize,
) -> std::result::Result<Option<Loaded>, String> {
    let path = dir.join(STATE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let state: State = crate::fsutil::read_json(&path).map_err(|e| e.to_string())?;
    if state.format != FORMAT {
        return Err(format!(
            "format {}, this sherl writes {FORMAT}",
            state.format
        ));
    }
    if state.config_sha256 != config_sha256 {
        return Err("it was written under another config.json".into());
    }
    if state.epoch > epochs || state.adam_steps.len() != groups {
        return Err(format!(
            "it records {} epochs and {} optimiser groups, the run has {epochs} and {groups}",
            state.epoch,
            state.adam_steps.len()
        ));
    }
    let tpath = dir.join(TENSORS_FILE);
    let sha = crate::fsutil::sha256_file(&tpath).map_err(|e| e.to_string())?;
    if sha != state.tensors_sha256 {
        return Err(format!("{TENSORS_FILE} is not the file it records"));
    }
    let mut tensors =
        Params::load_file(&tpath, &candle_core::Device::Cpu).map_err(|e| e.to_string())?;
    let mut weights = BTreeMap::new();
    let names: Vec<String> = tensors.keys().cloned().collect();
    for name in names {
        if let Some(w) = name.strip_prefix("w/") {
            let t = tensors.remove(&name).expect("listed");
            weights.insert(w.to_string(), t);
        }
    }
    let mut moments = Vec::with_capacity(groups);
    for g in 0..groups {
        let mut group = Vec::new();
        for i in 0.. {
            let (Some(m), Some(v)) = (
                tensors.remove(&format!("m/{g}/{i}")),
                tensors.remove(&format!("v/{g}/{i}")),
            ) else {
                break;
            };
            let vec = |t: Tensor| t.to_vec1::<f32>().map_err(|e| e.to_string());
            group.push((vec(m)?, vec(v)?));
        }
        moments.push(group);
    }
    if let Some(extra) = tensors.keys().next() {
        return Err(format!(
            "{TENSORS_FILE} holds an unexpected tensor '{extra}'"
        ));
    }
    Ok(Some(Loaded {
        state,
        weights,
        moments,
    }))
}

/// Remove the checkpoint's files from `dir` (those present).
pub fn remove(dir: &Path) -> Result<()> {
    for name in [STATE_FILE, TENSORS_FILE] {
        let p = dir.join(name);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// A test hook standing in for `kill -9` at an exact point: with
/// `SHERL_TEST_ABORT_AFTER_EPOCH=k`, the process aborts right after the
/// checkpoint of epoch `k` is written (no destructors, no summary), as a
/// killed run would leave it.
pub(super) fn abort_for_test(epoch: usize) {
    if std::env::var("SHERL_TEST_ABORT_AFTER_EPOCH").is_ok_and(|v| v == epoch.to_string()) {
        std::process::abort();
    }
}
