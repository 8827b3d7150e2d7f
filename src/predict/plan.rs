//! What `predict` is asked to do and what it reports.

use std::path::PathBuf;

use crate::data::args::PredictDataArgs;
use crate::extract::runtime::SessionConfig;

/// What `predict` needs.
#[derive(Debug, Clone)]
pub struct PredictPlan {
    /// Run directory (config.json, weights.safetensors).
    pub run: PathBuf,
    /// Backbone directory.
    pub backbone: PathBuf,
    /// ONNX model (default BACKBONE/model.onnx).
    pub model: PathBuf,
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
