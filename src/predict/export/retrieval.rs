//! `sherl-fit export` of a retrieval run: its two towers as two encoders,
//! `text.onnx` and `image.onnx`, each the same body and method graph a
//! classification run of its method exports (`text_model`,
//! `image::image_model`) with the joint-space head
//! (`graph::Output::Embeddings`: pooling, the projection, the L2
//! normalisation `sherl-fit search` applies). Next to them go
//! `tokenizer.json` (the caption cache's `max_len`), `preprocess.json`
//! (the image cache's recipe), `retrieval.json` and a `README.md`.
//!
//! The run is checked as `sherl-fit search` checks it
//! ([`crate::predict::search`]): `config.json` and `weights.safetensors`
//! against their recorded checksums, both caches where the run recorded
//! them with the settings hashes it recorded (each tower's model is
//! resolved on its cache, as training built it), and each backbone
//! against its cache (as `run` checks it, then the files the export
//! reads: tokenizer, checkpoint, ONNX model, image description).

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::json;

use super::image::{image_model, PREPROCESS_FILE};
use super::image_body::INPUT;
use super::{graph, read_weights, readme, text_model, write_json, write_tokenizer, Built};
use crate::backbone::{BackboneDir, F32Tensors};
use crate::cache::Cache;
use crate::fit::checks::{check_backbone, model_spec};
use crate::fit::error::FitError;
use crate::fit::method::Method;
use crate::fit::run_dir::{self, RunCache, RunConfig, RunModel};
use crate::predict::search::{open_cache, read_run, RunRecord};
use crate::{Error, Result};

/// The text encoder's file name.
pub const TEXT_MODEL_FILE: &str = "text.onnx";
/// The image encoder's file name.
pub const IMAGE_MODEL_FILE: &str = "image.onnx";
/// The metadata file.
pub const RETRIEVAL_FILE: &str = "retrieval.json";

/// What to export and where.
#[derive(Debug, Clone)]
pub struct RetrievalExportPlan {
    /// The retrieval run's directory.
    pub run: PathBuf,
    /// The image backbone (`None`: the one the image cache recorded, when
    /// its ONNX model is still there unchanged).
    pub image_backbone: Option<PathBuf>,
    /// The text backbone (`None`: the one the caption cache recorded).
    pub text_backbone: Option<PathBuf>,
    /// The output directory (created when missing).
    pub out: PathBuf,
}

/// One exported encoder.
#[derive(Debug, Clone, Serialize)]
pub struct TowerExport {
    /// The tower's method.
    pub method: String,
    /// The sequence its head pools.
    pub reads: String,
    /// The model file.
    pub model: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
}

/// What a retrieval export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct RetrievalExportSummary {
    /// The run's id.
    pub run_id: String,
    /// `<image method>+<text method>`.
    pub method: String,
    /// Width of the joint space (both encoders' output).
    pub joint_dim: usize,
    /// The text encoder.
    pub text: TowerExport,
    /// The image encoder.
    pub image: TowerExport,
}

/// Whether `run`'s `config.json` is a retrieval run's (`task`); read
/// without checks, to choose the export (the chosen export checks it).
pub fn is_retrieval_run(run: &Path) -> Result<bool> {
    let path = run.join(run_dir::CONFIG_FILE);
    let v: serde_json::Value =
        crate::fsutil::read_json_limited(&path, crate::fsutil::METADATA_LIMIT)?;
    Ok(v["task"].as_str() == Some("retrieval"))
}

/// One tower of the run as a classification run's record on its cache:
/// the cache's backbone and layers, the run's settings with the tower's
/// method, and the model spec training built (resolved on the cache and
/// the backbone, checked against the cache as `run` checks it; output
/// width the joint width); it has no labels. The backbone is `given`, else
/// the one the cache recorded ([`crate::predict::checks::backbone_dir`]);
/// returned with the record.
fn tower_record(
    rec: &RunRecord,
    cache: &Cache,
    given: Option<&Path>,
    method: Method,
) -> Result<(RunConfig, PathBuf)> {
    let m = cache.manifest();
    let backbone = match given {
        Some(b) => b.to_owned(),
        None => crate::predict::checks::recorded_backbone_dir(None, None, &m.backbone)?.0,
    };
    let dir = BackboneDir::open(&backbone)?;
    let (arch, _) = check_backbone(cache, &dir)?;
    let config = rec.fit.for_method(method);
    let mut spec = model_spec(&config, cache, &arch)?;
    spec.classes = rec.retrieval.joint_dim;
    let rc = RunConfig {
        cache: RunCache {
            backbone: m.backbone.clone(),
            layers: m.settings.layers.clone(),
            max_len: m.settings.max_len,
            path: cache.dir().to_path_buf(),
            settings_hash: m.settings_hash.clone(),
            columns: None,
            image: m.image.clone(),
        },
        config,
        labels: Vec::new(),
        model: RunModel {
            classes: 0,
            early_layers: Vec::new(),
            frozen_params: 0,
            inputs: Vec::new(),
            probe_layer: 0,
            side_dim: 0,
            trainable_params: 0,
        },
        run_id: rec.run_id.clone(),
        sherl_version: env!("CARGO_PKG_VERSION").into(),
        spec: Some(spec),
    };
    Ok((rc, backbone))
}

/// `weights`' tensors under `prefix` (`text/`, `image/`), the prefix cut.
fn tower_weights(weights: &F32Tensors, prefix: &str) -> F32Tensors {
    weights
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_owned(), v.clone())))
        .collect()
}

/// Export the retrieval run in `plan.run` to `plan.out`.
pub fn export_retrieval(plan: &RetrievalExportPlan) -> Result<RetrievalExportSummary> {
    let rec = read_run(&plan.run)?;
    let weights_path = crate::predict::checks::checked_weights(&plan.run)?;
    let weights = read_weights(&weights_path)?;
    let bad_weights = |message: String| -> Error {
        FitError::BadRun {
            path: weights_path.clone(),
            message,
        }
        .into()
    };
    if !weights.contains_key("log_scale") {
        return Err(bad_weights(
            "not a retrieval run's weights (no log_scale)".into(),
        ));
    }
    if let Some(other) = weights
        .keys()
        .find(|k| *k != "log_scale" && !k.starts_with("image/") && !k.starts_with("text/"))
    {
        return Err(bad_weights(format!(
            "tensor '{other}' belongs to neither tower (image/, text/)"
        )));
    }
    let run_id = rec.run_id.clone();
    let retrieval = &rec.retrieval;
    let text_cache = open_cache("caption", &rec.text_cache, &plan.run)?;
    let (text_rc, text_backbone) = tower_record(
        &rec,
        &text_cache,
        plan.text_backbone.as_deref(),
        retrieval.text_method,
    )?;
    let image_cache = open_cache("image", &rec.image_cache, &plan.run)?;
    let (image_rc, image_backbone) = tower_record(
        &rec,
        &image_cache,
        plan.image_backbone.as_deref(),
        retrieval.image_method,
    )?;
    let (None, Some(image_info)) = (&text_rc.cache.image, image_rc.cache.image.clone()) else {
        return Err(Error::from(FitError::BadRun {
            path: plan.run.join(run_dir::CONFIG_FILE),
            message: format!(
                "the run's caption cache {} must hold texts and its image cache {} images",
                text_cache.dir().display(),
                image_cache.dir().display()
            ),
        }));
    };

    let text_dir = BackboneDir::open(&text_backbone)?;
    let text_path = plan.out.join(TEXT_MODEL_FILE);
    let text = text_model(
        &plan.run,
        &text_rc,
        &text_dir,
        &weights_path,
        tower_weights(&weights, "text/"),
        graph::Output::Embeddings,
        &text_path,
    )?;
    let image_path = plan.out.join(IMAGE_MODEL_FILE);
    let (image, recipe) = image_model(
        &plan.run,
        &image_rc,
        &image_info,
        &image_backbone,
        &weights_path,
        tower_weights(&weights, "image/"),
        graph::Output::Embeddings,
        &image_path,
    )?;

    std::fs::create_dir_all(&plan.out).map_err(|e| Error::io(&plan.out, e))?;
    crate::fsutil::write_atomic(&text_path, &text.bytes)?;
    crate::fsutil::write_atomic(&image_path, &image.bytes)?;
    write_tokenizer(&text_dir, text_rc.cache.max_len, &plan.out)?;
    write_json(&plan.out.join(PREPROCESS_FILE), &recipe)?;
    let bert = text.family == Some(crate::backbone::Family::Bert);
    let mut text_inputs = vec!["input_ids", "attention_mask"];
    if bert {
        text_inputs.push("token_type_ids");
    }
    let meta = json!({
        "run_id": run_id,
        "sherl_version": env!("CARGO_PKG_VERSION"),
        "joint_dim": retrieval.joint_dim,
        "similarity": "dot product of the embeddings (both L2-normalised: cosine)",
        "text": {
            "model": TEXT_MODEL_FILE,
            "method": text.method,
            "pool": text_rc.config.pool,
            "inputs": text_inputs,
            "output": graph::EMBEDDINGS,
            "tokenizer": "tokenizer.json",
            "max_len": text_rc.cache.max_len,
        },
        "image": {
            "model": IMAGE_MODEL_FILE,
            "method": image.method,
            "pool": image_rc.config.pool,
            "inputs": [INPUT],
            "output": graph::EMBEDDINGS,
            "preprocess": PREPROCESS_FILE,
            "patch_pool": image_info.patch_pool,
        },
    });
    write_json(&plan.out.join(RETRIEVAL_FILE), &meta)?;
    let readme = readme::retrieval_readme(
        &run_id,
        &image.method,
        &text.method,
        retrieval.joint_dim,
        bert,
        text_rc.cache.max_len,
        INPUT,
        (recipe.channels, recipe.size),
    );
    crate::fsutil::write_atomic(&plan.out.join("README.md"), readme.as_bytes())?;
    let tower = |b: Built, model: PathBuf| TowerExport {
        method: b.method,
        reads: b.reads,
        model,
        bytes: b.bytes.len() as u64,
    };
    Ok(RetrievalExportSummary {
        run_id,
        method: format!("{}+{}", image.method, text.method),
        joint_dim: retrieval.joint_dim,
        text: tower(text, text_path),
        image: tower(image, image_path),
    })
}
