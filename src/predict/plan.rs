//! What `predict` is asked to do and what it reports.

use std::path::{Path, PathBuf};

use crate::data::args::PredictDataArgs;
use crate::extract::runtime::SessionConfig;

/// What `predict` needs.
#[derive(Debug, Clone)]
pub struct PredictPlan {
    /// Run directory (config.json, weights.safetensors), or a directory of
    /// runs ([`super::runs`]: listed, or the best taken with `best`).
    pub run: PathBuf,
    /// With `run` a directory of runs: take the run with the best valid
    /// accuracy.
    pub best: bool,
    /// Backbone directory; `None`: the one the run recorded
    /// (`checks::backbone_dir`).
    pub backbone: Option<PathBuf>,
    /// ONNX model (default BACKBONE/model.onnx).
    pub model: Option<PathBuf>,
    /// Texts to label (labels optional; when present, accuracy is reported);
    /// columns not given default to those the run was trained on.
    pub data: PredictDataArgs,
    /// Each output line repeats the first this many characters of its text
    /// (`…` marks a cut); 0 leaves the text out.
    pub text_chars: usize,
    /// Where to write JSONL (stdout when `None`).
    pub out: Option<PathBuf>,
    /// ONNX Runtime session.
    pub session: SessionConfig,
    /// Examples per ONNX Runtime / candle batch.
    pub batch_size: usize,
}

impl PredictPlan {
    /// The ONNX model: `model`, else `BACKBONE/model.onnx` (set by
    /// [`super::predict()`] before it is used).
    pub fn model_path(&self) -> PathBuf {
        match (&self.model, &self.backbone) {
            (Some(m), _) => m.clone(),
            (None, Some(b)) => b.join("model.onnx"),
            (None, None) => Path::new("model.onnx").to_owned(),
        }
    }
}

/// Outcome of `predict`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PredictSummary {
    /// Run used.
    pub run_id: String,
    /// Examples labelled.
    pub examples: usize,
    /// Accuracy over the rows whose true label is one of the run's classes.
    pub accuracy: Option<f64>,
    /// Rows with a true label among the run's classes (the accuracy's base).
    pub labelled: usize,
    /// Rows with a true label the run does not know (labelled all the same,
    /// written with their `true_label`, not counted in the accuracy).
    pub unknown_labels: usize,
    /// Where predictions went.
    pub out: Option<PathBuf>,
}
