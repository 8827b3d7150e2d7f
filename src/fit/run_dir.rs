//! The run directory `RUNS/<run id>/` and its files, one type each, written
//! and read by this module:
//!
//! - [`RunConfig`]: `config.json`, written before training (the settings,
//!   the model's shape, the labels, the cache it trains on; a retrieval
//!   run writes its own, see [`super::retrieval::train`]);
//! - [`EpochMetrics`]: one line of `metrics.jsonl` per finished epoch;
//! - [`Summary`]: `summary.json`, written when the run finished (also the
//!   last stdout line of `sherl-fit run`);
//! - [`RunError`]: `error.json`, written instead when the run stopped;
//! - `weights.safetensors` (see [`super::params::Params::save`]) and the
//!   lock file [`RUN_LOCK`].
//!
//! Both tasks, classification and retrieval, write the same
//! [`EpochMetrics`] and [`Summary`]: the fields they share, and the task's
//! own ([`EpochTask`], [`SummaryTask`]) flattened into the same JSON
//! object, so the keys are those each task wrote when it had types of its
//! own.
//!
//! Readers: [`RunConfig::read`], [`read_checked_config`] and
//! [`recorded_checksums`] (predict, search),
//! [`Summary::read`] (a finished run is not re-run), [`SummaryView`] (the
//! report reads it with serde, tolerant of older and hand-written runs).
//!
//! Bytes: `config.json` and `error.json` are written through a
//! `serde_json::Value`, whose objects sort their keys, so their keys are
//! sorted at every level and single-precision settings are widened to f64
//! (`dropout` 0.1 is stored as 0.10000000149011612), exactly as the files
//! written by earlier versions; `summary.json` and `metrics.jsonl` keep the
//! fields in declaration order, the task's section where it is flattened.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::data::args::TrainedColumns;
use serde::{Deserialize, Serialize};

use super::config::FitConfig;
use super::retrieval::recall::Recall;
use crate::cache::manifest::BackboneInfo;
use crate::{Error, Result};

/// `config.json`.
pub const CONFIG_FILE: &str = "config.json";
/// `metrics.jsonl`.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// `summary.json`.
pub const SUMMARY_FILE: &str = "summary.json";
/// `error.json`.
pub const ERROR_FILE: &str = "error.json";
/// `weights.safetensors`: the best epoch's trainable weights.
pub const WEIGHTS_FILE: &str = "weights.safetensors";
/// Lock file of a run directory (see [`crate::fsutil::DirLock`]).
pub const RUN_LOCK: &str = ".lock";

mod checked;
pub use checked::{
    for_each_metrics_line, read_checked_config, recorded_checksums, Checked, Recorded,
    METRICS_LINE_LIMIT,
};

/// `config.json`: what a run was trained with. Fields are in the order the
/// file has them (sorted).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    /// The cache the run trained on.
    pub cache: RunCache,
    /// The training settings (also as written by earlier versions, which
    /// recorded every method's settings).
    #[serde(deserialize_with = "FitConfig::deserialize_stored")]
    pub config: FitConfig,
    /// Class labels, by class index.
    pub labels: Vec<String>,
    /// The model's shape.
    pub model: RunModel,
    /// Run id.
    pub run_id: String,
    /// Version of sherl that trained it.
    #[serde(default)]
    pub sherl_version: String,
    /// What the model was built from (absent in runs of earlier versions:
    /// [`crate::predict`] then resolves `config` on the recorded `model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<super::model::ModelSpec>,
}

/// The model part of [`RunConfig`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunModel {
    /// Classes.
    pub classes: usize,
    /// Early-route hidden-state indices (sherl).
    pub early_layers: Vec<usize>,
    /// Frozen parameters loaded.
    #[serde(default)]
    pub frozen_params: usize,
    /// Hidden-state indices the model reads from the cache, in order.
    #[serde(default)]
    pub inputs: Vec<usize>,
    /// Linear-probe layer.
    pub probe_layer: usize,
    /// Side width d.
    pub side_dim: usize,
    /// Trainable parameters.
    #[serde(default)]
    pub trainable_params: usize,
}

/// The cache part of [`RunConfig`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunCache {
    /// The backbone that made the cache (from its manifest).
    pub backbone: BackboneInfo,
    /// Cached hidden-state indices.
    pub layers: Vec<usize>,
    /// Maximum tokens per example.
    pub max_len: usize,
    /// The cache directory as given to `sherl-fit run`.
    #[serde(default)]
    pub path: PathBuf,
    /// The cache's settings hash.
    #[serde(default)]
    pub settings_hash: String,
    /// The dataset columns the cache was extracted from (predict's
    /// defaults); absent in runs written before sherl recorded them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<TrainedColumns>,
    /// An image cache's image record (the preprocessing recipe and its
    /// digest, the token layout, the patch pooling), which `predict` must
    /// apply again; absent for text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<crate::cache::manifest::ImageInfo>,
}

impl RunConfig {
    /// Write `run_dir/config.json`.
    pub fn write(&self, run_dir: &Path) -> Result<()> {
        write_sorted(&run_dir.join(CONFIG_FILE), self)
    }

    /// Read `run_dir/config.json` for use (predict): its bytes checked
    /// against the sha256 the run recorded ([`read_checked_config`]), its
    /// labels checked ([`RunConfig::check_labels`]). A run written before
    /// the checksum was recorded has its labels compared with the cache's
    /// manifest instead, when the cache is still where the run recorded it.
    pub fn read(run_dir: &Path) -> Result<Self> {
        let (path, bytes, checked) = read_checked_config(run_dir)?;
        let rc: RunConfig = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
            path: path.clone(),
            source: e,
        })?;
        rc.check_labels(&path)?;
        if let Checked::Unrecorded(from) = checked {
            rc.check_labels_against_cache(&path, &from)?;
        }
        Ok(rc)
    }
}

/// One line of `metrics.jsonl`: the fields both tasks write, and the
/// task's own in [`EpochTask`] (flattened into the same JSON object, so a
/// line reads as the lines written before the two tasks shared one type).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss (per example for classification, per batch for
    /// retrieval).
    pub train_loss: f64,
    /// The task's scores and rates.
    #[serde(flatten)]
    pub task: EpochTask,
    /// Training seconds of this epoch (excluding evaluation).
    pub seconds: f64,
    /// Evaluation seconds.
    pub eval_seconds: f64,
    /// Learning rate (new modules) at the end of the epoch.
    pub lr: f64,
}

/// The task's part of an [`EpochMetrics`] line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EpochTask {
    /// `sherl-fit run` (classification).
    Classification {
        /// Training accuracy (with dropout on).
        train_accuracy: f64,
        /// Valid loss.
        valid_loss: f64,
        /// Valid accuracy.
        valid_accuracy: f64,
        /// Valid macro-F1.
        valid_macro_f1: f64,
        /// Real training tokens per second.
        tokens_per_second: f64,
        /// SHERL gate tanh(gamma / 0.1) at the end of the epoch.
        gate: Option<f32>,
    },
    /// `sherl-fit run --task retrieval`.
    Retrieval {
        /// Valid rsum.
        valid_rsum: f64,
        /// Valid Recall@K both ways.
        valid: Recall,
        /// Training pairs per second.
        pairs_per_second: f64,
        /// InfoNCE's scale (1 / temperature) at the end of the epoch.
        scale: Option<f64>,
    },
}

impl EpochTask {
    /// The valid score the best epoch is chosen by: accuracy, or rsum.
    pub fn selection(&self) -> f64 {
        match self {
            EpochTask::Classification { valid_accuracy, .. } => *valid_accuracy,
            EpochTask::Retrieval { valid_rsum, .. } => *valid_rsum,
        }
    }
}

impl EpochMetrics {
    /// The line of `metrics.jsonl` (without the newline).
    pub fn line(&self) -> String {
        serde_json::to_string(self).expect("metrics serialise")
    }
}

/// `summary.json` and the last stdout line: the fields both tasks write,
/// and the task's own in [`SummaryTask`] (flattened into the same object).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Run id.
    pub run_id: String,
    /// Method (`<image method>+<text method>` for retrieval).
    pub method: String,
    /// Seed.
    pub seed: u64,
    /// The task's scores of the best checkpoint and its records.
    #[serde(flatten)]
    pub task: SummaryTask,
    /// Epoch of the best checkpoint (1-based).
    pub best_epoch: usize,
    /// Epochs run.
    pub epochs: usize,
    /// Trainable parameters (retrieval: both towers and the temperature).
    pub trainable_params: usize,
    /// Frozen parameters loaded (pre-trained late layers; both towers').
    pub frozen_params: usize,
    /// Peak resident memory of the process, bytes.
    pub peak_rss_bytes: u64,
    /// Seconds spent training (all epochs, excluding evaluation).
    pub train_seconds: f64,
    /// Mean training seconds per epoch.
    pub seconds_per_epoch: f64,
    /// Run directory.
    pub run_dir: PathBuf,
    /// sha256 of `weights.safetensors` (the best epoch's weights), checked
    /// by `predict` and `search` before they use them. Absent in
    /// classification runs written by sherl before it was recorded.
    #[serde(default)]
    pub weights_sha256: Option<String>,
    /// sha256 of `config.json` as the run wrote it (its labels, the model's
    /// shape, the cache): checked by `predict` and `search` before they
    /// use it, so an edited file (reordered labels would swap classes) is
    /// refused. Absent in runs written by sherl before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    /// Where it trained: `cpu` or `cuda:N` (absent in older runs).
    #[serde(default)]
    pub device: Option<String>,
    /// The matrix kernel of the fused CPU ops (`gemm` or the OpenBLAS
    /// build, see `--blas`): seeded results are reproducible for a given
    /// kernel. Absent on other devices and in older runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matmul: Option<String>,
    /// The training memory the method itself needs
    /// ([`super::alloc_track`]); absent when not measured (a process
    /// without the tracking allocator, older runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_memory: Option<TrainMemory>,
}

/// The task's part of a [`Summary`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
// One value per run, written and read once: boxing the larger retrieval
// section would save nothing worth the indirection.
#[allow(clippy::large_enum_variant)]
pub enum SummaryTask {
    /// `sherl-fit run` (classification).
    Classification {
        /// Valid accuracy of the best checkpoint.
        valid_accuracy: f64,
        /// Test accuracy of the best checkpoint (null without a test split).
        test_accuracy: Option<f64>,
        /// Valid macro-F1 of the best checkpoint.
        valid_macro_f1: f64,
        /// Test macro-F1 of the best checkpoint.
        test_macro_f1: Option<f64>,
        /// Real training tokens per second.
        train_tokens_per_second: f64,
        /// SHERL layer weights: alpha averaged over the valid split's real
        /// tokens, one value per shallow early layer (`layer_weight_layers`).
        layer_weights: Option<Vec<f64>>,
        /// hidden_states indices of `layer_weights`.
        layer_weight_layers: Option<Vec<usize>>,
        /// Cache settings hash.
        cache: String,
    },
    /// `sherl-fit run --task retrieval`.
    Retrieval {
        /// Always [`TaskName::Retrieval`] (`"retrieval"`).
        task: TaskName,
        /// The image tower's method.
        image_method: String,
        /// The caption tower's method.
        text_method: String,
        /// Loss.
        loss: String,
        /// Joint width.
        joint_dim: usize,
        /// Valid rsum of the best checkpoint.
        valid_rsum: f64,
        /// Test rsum of the best checkpoint (null without a test split).
        test_rsum: Option<f64>,
        /// Valid Recall@K of the best checkpoint.
        valid: Recall,
        /// Test Recall@K of the best checkpoint.
        test: Option<Recall>,
        /// The image tower's trainable parameters.
        image_trainable_params: usize,
        /// The caption tower's trainable parameters.
        text_trainable_params: usize,
        /// Training pairs per second.
        pairs_per_second: f64,
        /// Train pairs (images) and captions, valid, test.
        pairs: BTreeMap<String, [usize; 2]>,
        /// Image cache settings hash.
        image_cache: String,
        /// Caption cache settings hash.
        text_cache: String,
    },
}

/// The `task` key of a retrieval summary (classification summaries have
/// none, as before there were two tasks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskName {
    /// `"retrieval"`.
    Retrieval,
}

/// The training memory of a run, counted by the allocator
/// ([`super::alloc_track`]), bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainMemory {
    /// Trainable parameters and AdamW's two moments: 12 bytes each.
    pub trainable_state_bytes: u64,
    /// The largest count, over the run's training steps, of bytes the step
    /// allocated and had not freed yet (activations kept for the backward
    /// pass, gradients, temporaries).
    pub step_peak_bytes: u64,
    /// The sum of the two: the method's training memory.
    pub total_bytes: u64,
}

impl TrainMemory {
    /// From the trainable parameter count and the largest step peak.
    pub fn new(trainable_params: usize, step_peak_bytes: u64) -> Self {
        let trainable_state_bytes = trainable_params as u64 * 12;
        TrainMemory {
            trainable_state_bytes,
            step_peak_bytes,
            total_bytes: trainable_state_bytes + step_peak_bytes,
        }
    }
}

impl Summary {
    /// Write `run_dir/summary.json`.
    pub fn write(&self, run_dir: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("summary serialises");
        crate::fsutil::write_atomic(&run_dir.join(SUMMARY_FILE), &bytes)
    }

    /// The summary of a finished run, `None` if `run_dir` has no
    /// `summary.json`.
    pub fn read(run_dir: &Path) -> Result<Option<Self>> {
        let path = run_dir.join(SUMMARY_FILE);
        if !path.exists() {
            return Ok(None);
        }
        read_json(&path).map(Some)
    }
}

/// `summary.json` read tolerantly, for the report: every field of
/// [`Summary`] the report uses, each optional, unknown fields ignored, so
/// runs from older versions (and hand-written ones) are still reported.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SummaryView {
    /// [`Summary::run_id`].
    pub run_id: Option<String>,
    /// [`Summary::method`].
    pub method: Option<String>,
    /// [`Summary::seed`].
    pub seed: Option<u64>,
    /// `valid_accuracy` of [`SummaryTask::Classification`].
    pub valid_accuracy: Option<f64>,
    /// `test_accuracy` of [`SummaryTask::Classification`].
    pub test_accuracy: Option<f64>,
    /// `valid_macro_f1` of [`SummaryTask::Classification`].
    pub valid_macro_f1: Option<f64>,
    /// `test_macro_f1` of [`SummaryTask::Classification`].
    pub test_macro_f1: Option<f64>,
    /// [`Summary::trainable_params`].
    pub trainable_params: Option<u64>,
    /// [`Summary::peak_rss_bytes`].
    pub peak_rss_bytes: Option<u64>,
    /// [`Summary::seconds_per_epoch`].
    pub seconds_per_epoch: Option<f64>,
    /// `layer_weights` of [`SummaryTask::Classification`].
    pub layer_weights: Option<Vec<f64>>,
    /// `layer_weight_layers` of [`SummaryTask::Classification`].
    pub layer_weight_layers: Option<Vec<usize>>,
    /// `cache` of [`SummaryTask::Classification`].
    pub cache: Option<String>,
}

/// `error.json`: why a run stopped. Fields in file order (sorted).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunError {
    /// The error message.
    pub error: String,
    /// Run id.
    #[serde(default)]
    pub run_id: String,
    /// sha256 of the best weights written before it stopped, if any.
    #[serde(default)]
    pub weights_sha256: Option<String>,
    /// sha256 of `config.json` (see [`Summary::config_sha256`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
}

impl RunError {
    /// Write `run_dir/error.json`.
    pub fn write(&self, run_dir: &Path) -> Result<()> {
        write_sorted(&run_dir.join(ERROR_FILE), self)
    }

    /// Record that run `run_id` stopped with `err`: `error.json` with the
    /// message and the checksum of the best weights written before it
    /// stopped and `config_sha256`, the checksum of `config.json` the run
    /// trained with (so predict can use both safely). Recording must not
    /// hide the failure: if it fails too (the disk that stopped training
    /// is full), that is logged and the caller returns the original error.
    pub fn record(
        run_dir: &Path,
        run_id: &str,
        config_sha256: Option<String>,
        err: &dyn std::fmt::Display,
    ) {
        let weights = run_dir.join(WEIGHTS_FILE);
        let record = (|| {
            let weights_sha256 = if weights.exists() {
                Some(crate::fsutil::sha256_file(&weights)?)
            } else {
                None
            };
            RunError {
                error: err.to_string(),
                run_id: run_id.to_string(),
                weights_sha256,
                config_sha256,
            }
            .write(run_dir)
        })();
        if let Err(also) = record {
            tracing::warn!("could not record the failure in error.json: {also}");
        }
    }
}

/// Pretty JSON through a `serde_json::Value` (keys sorted, f32 widened),
/// written atomically.
fn write_sorted(path: &Path, v: &impl Serialize) -> Result<()> {
    let value = serde_json::to_value(v).expect("run file serialises");
    let bytes = serde_json::to_vec_pretty(&value).expect("serialises");
    crate::fsutil::write_atomic(path, &bytes)
}

/// A small run file (`summary.json`, `error.json`): a regular file of at
/// most [`crate::fsutil::SMALL_FILE_LIMIT`] bytes, parsed; errors name it.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    crate::fsutil::read_json(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines and summaries as sherl wrote them when classification and
    /// retrieval had run-file types of their own (copied from runs of the
    /// tests' fixtures): each reads into the shared type as its task and
    /// writes back the same keys and values.
    #[test]
    fn run_files_of_both_tasks_read_back_unchanged() {
        let cls_line = r#"{"epoch":1,"train_loss":1.1227791839175754,"train_accuracy":0.3333333333333333,"valid_loss":1.0929845571517944,"valid_accuracy":0.3888888888888889,"valid_macro_f1":0.28654970760233917,"seconds":0.014007578,"eval_seconds":0.016322821,"tokens_per_second":29341.260851804644,"lr":0.001,"gate":-0.019093042}"#;
        let ret_line = r#"{"epoch":1,"train_loss":2.0723958611488342,"valid_rsum":425.0,"valid":{"i2t":[25.0,75.0,100.0],"t2i":[25.0,100.0,100.0],"rsum":425.0,"images":4,"captions":8},"seconds":0.002360906,"eval_seconds":0.000248109,"pairs_per_second":6777.059315364526,"lr":0.01,"scale":14.04160213470459}"#;
        let cls_summary = r#"{"run_id": "sherl-e912c99d128c", "method": "sherl", "seed": 0, "valid_accuracy": 0.3888888888888889, "test_accuracy": 0.3333333333333333, "valid_macro_f1": 0.28654970760233917, "test_macro_f1": 0.28484848484848485, "best_epoch": 1, "epochs": 2, "trainable_params": 1301, "frozen_params": 8544, "peak_rss_bytes": 19812352, "train_seconds": 0.016988172, "seconds_per_epoch": 0.008494086, "train_tokens_per_second": 48386.60686976798, "layer_weights": [0.3993519936838458, 0.3619382550639491], "layer_weight_layers": [0, 1], "run_dir": "runs/sherl-e912c99d128c", "cache": "51fb7456", "weights_sha256": "e956f75f", "device": "cpu", "matmul": "gemm", "train_memory": {"trainable_state_bytes": 15612, "step_peak_bytes": 896746, "total_bytes": 912358}}"#;
        let ret_summary = r#"{"task": "retrieval", "run_id": "retrieval-sherl-sherl-af397007c636", "method": "sherl+sherl", "image_method": "sherl", "text_method": "sherl", "loss": "infonce", "joint_dim": 16, "seed": 1, "valid_rsum": 425.0, "test_rsum": 425.0, "valid": {"i2t": [25.0, 75.0, 100.0], "t2i": [25.0, 100.0, 100.0], "rsum": 425.0, "images": 4, "captions": 8}, "test": {"i2t": [25.0, 75.0, 100.0], "t2i": [25.0, 100.0, 100.0], "rsum": 425.0, "images": 4, "captions": 8}, "best_epoch": 1, "epochs": 4, "trainable_params": 1963, "image_trainable_params": 232, "text_trainable_params": 1730, "frozen_params": 9160, "peak_rss_bytes": 18919424, "train_seconds": 0.014124002, "seconds_per_epoch": 0.0035310005, "pairs_per_second": 4531.293609275898, "pairs": {"test": [4, 8], "train": [16, 32], "valid": [4, 8]}, "run_dir": "runs/retrieval-sherl-sherl-af397007c636", "image_cache": "fa6a95ac", "text_cache": "edd90ae2", "weights_sha256": "d623eb36", "device": "cpu", "matmul": "gemm", "train_memory": {"trainable_state_bytes": 23556, "step_peak_bytes": 2357235, "total_bytes": 2380791}}"#;
        let value = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap();
        for (text, retrieval) in [(cls_line, false), (ret_line, true)] {
            let m: EpochMetrics = serde_json::from_str(text).unwrap();
            assert_eq!(matches!(m.task, EpochTask::Retrieval { .. }), retrieval);
            assert_eq!(value(&m.line()), value(text));
        }
        assert_eq!(
            serde_json::from_str::<EpochMetrics>(ret_line)
                .unwrap()
                .task
                .selection(),
            425.0
        );
        for (text, retrieval) in [(cls_summary, false), (ret_summary, true)] {
            let s: Summary = serde_json::from_str(text).unwrap();
            assert_eq!(matches!(s.task, SummaryTask::Retrieval { .. }), retrieval);
            assert_eq!(serde_json::to_value(&s).unwrap(), value(text));
        }
        // A classification summary from before the checksum, device and
        // memory were recorded still reads.
        let mut old = value(cls_summary);
        for k in ["weights_sha256", "device", "matmul", "train_memory"] {
            old.as_object_mut().unwrap().remove(k);
        }
        let s: Summary = serde_json::from_value(old).unwrap();
        assert!(s.weights_sha256.is_none() && s.train_memory.is_none());
    }

    #[test]
    fn run_error_keys_are_sorted_as_before() {
        let dir = tempfile::tempdir().unwrap();
        RunError {
            error: "boom".into(),
            run_id: "sherl-x".into(),
            weights_sha256: None,
            config_sha256: None,
        }
        .write(dir.path())
        .unwrap();
        let text = std::fs::read_to_string(dir.path().join(ERROR_FILE)).unwrap();
        let old = serde_json::to_string_pretty(
            &serde_json::json!({ "run_id": "sherl-x", "error": "boom", "weights_sha256": null }),
        )
        .unwrap();
        assert_eq!(text, old);
        assert_eq!(
            recorded_checksums(dir.path()).unwrap(),
            Some(Recorded {
                from: dir.path().join(ERROR_FILE),
                weights_sha256: None,
                config_sha256: None,
            })
        );
    }
}
