//! `sherl-fit export`: a trained classification run as one standalone ONNX
//! model, written by sherl's own ONNX writer ([`crate::extract::onnx`]).
//!
//! The graph is the backbone's ([`crate::extract::onnx::export::build_model`])
//! built from the backbone checkpoint with the layers the run trained put
//! in place of their pre-trained weights, reduced to what the method reads
//! ([`crate::extract::onnx::edit::prune_to_outputs`]), with the trained head
//! appended ([`graph`]): inputs `input_ids`, `attention_mask` (and
//! `token_type_ids` for BERT), outputs `logits` and `probabilities`
//! `[batch, classes]`. Next to `model.onnx` go the tokenizer (truncating at
//! the run's `max_len`, no padding), `labels.json` and a `README.md`.
//!
//! An image run ([`image_body`]) is the backbone's own ONNX graph with the
//! hidden states the run read exposed (and pooled as its cache was), the
//! ViT blocks it computes, its method's graph and the head appended: input
//! `pixel_values` (the preprocessed images), the same outputs, and next to
//! it `preprocess.json` (the recipe the cache recorded), `labels.json` and
//! a `README.md`.
//!
//! Every method is exported ([`methods`]): `sherl` (its early route,
//! restore and gate in front of the backbone's last layers),
//! `linear-probe`, `late-layer`, `unipt` (its side network on every hidden
//! state), `full-ft`, `lora` (its updates merged into the weights,
//! `merge`), `adapter` (inside the backbone's layers) and `lst` (its side
//! layers on every hidden state).
//! A retrieval run ([`retrieval`]) is exported as two encoders, `text.onnx`
//! and `image.onnx`: the same text and image flows with the joint-space
//! head (`graph::Output::Embeddings`) in place of the classifier's.
//!
//! A run whose weights or `config.json` fail their recorded checksums, or
//! whose backbone files differ from the ones its cache was extracted with,
//! is refused, by the same checks `predict` makes.

pub mod body;
pub mod graph;
mod image;
pub mod image_body;
mod merge;
pub mod methods;
mod readme;
pub mod retrieval;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use prost::Message;
use serde::Serialize;

use crate::backbone::{BackboneDir, Checkpoint, F32Tensors};
use crate::extract::onnx::builder::{TensorSource, Tensors};
use crate::extract::tokenize::Tokenizer;
use crate::fit::method::MethodSpec;
use crate::fit::params::Params;
use crate::fit::run_dir::RunConfig;
use crate::{Error, Result};
use body::{Body, TextBody};

/// The exported model's file name in the output directory.
pub const MODEL_FILE: &str = "model.onnx";

/// What to export and where.
#[derive(Debug, Clone)]
pub struct ExportPlan {
    /// The run directory (`RUNS/<run id>`).
    pub run: PathBuf,
    /// The backbone directory the run's cache was made from.
    pub backbone: PathBuf,
    /// The output directory (created when missing).
    pub out: PathBuf,
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportSummary {
    /// The run's id.
    pub run_id: String,
    /// The run's method.
    pub method: String,
    /// Number of classes.
    pub classes: usize,
    /// The sequence the head pools (`hidden_states.i`, or a method node).
    pub reads: String,
    /// The exported model.
    pub model: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
}

/// Export the run in `plan.run` to `plan.out`.
pub fn export(plan: &ExportPlan) -> Result<ExportSummary> {
    let rc = RunConfig::read(&plan.run)?;
    let weights_path = super::checks::checked_weights(&plan.run)?;
    let weights = read_weights(&weights_path)?;
    if let Some(image) = &rc.cache.image {
        return image::export_image(plan, &rc, image, &weights_path, weights);
    }
    let dir = BackboneDir::open(&plan.backbone)?;
    let out_path = plan.out.join(MODEL_FILE);
    let built = text_model(
        &plan.run,
        &rc,
        &dir,
        &weights_path,
        weights,
        graph::Output::Classes,
        &out_path,
    )?;
    std::fs::create_dir_all(&plan.out).map_err(|e| Error::io(&plan.out, e))?;
    crate::fsutil::write_atomic(&out_path, &built.bytes)?;
    write_tokenizer(&dir, rc.cache.max_len, &plan.out)?;
    write_json(&plan.out.join("labels.json"), &rc.labels)?;
    let family = built.family.unwrap_or(crate::backbone::Family::Bert);
    let text = readme::readme(&rc, &built.method, family, rc.cache.max_len);
    crate::fsutil::write_atomic(&plan.out.join("README.md"), text.as_bytes())?;
    Ok(built.summary(&rc, out_path))
}

/// A model built by [`text_model`] or [`image::image_model`]: its bytes,
/// the run's method, the sequence its head pools, the head's output width
/// (classes, or the joint width) and the text backbone's family (`None`
/// for an image model).
struct Built {
    bytes: Vec<u8>,
    method: String,
    reads: String,
    width: usize,
    family: Option<crate::backbone::Family>,
}

impl Built {
    /// What the export of run `rc` wrote, the model at `model`.
    fn summary(self, rc: &RunConfig, model: PathBuf) -> ExportSummary {
        ExportSummary {
            run_id: rc.run_id.clone(),
            method: self.method,
            classes: self.width,
            reads: self.reads,
            model,
            bytes: self.bytes.len() as u64,
        }
    }
}

/// The ONNX model of the text run `rc` (`run` its directory, `weights` its
/// trained tensors read from `weights_path`) on the backbone in `dir`,
/// checked against the one its cache was extracted with, with the head
/// `out`; `model_path` names it in errors.
fn text_model(
    run: &Path,
    rc: &RunConfig,
    dir: &BackboneDir,
    weights_path: &Path,
    weights: F32Tensors,
    out: graph::Output,
    model_path: &Path,
) -> Result<Built> {
    let bert = super::text::checked_text_backbone(run, rc, dir)?;
    let spec = super::checks::run_spec(rc)?;
    let method = spec.method.kind().name().to_string();
    let base = Checkpoint::open(&dir.safetensors_path())?;
    let (overrides, trained) = split_weights(weights_path, weights, &spec.method, &bert, &base)?;
    let ckpt = base.with_overrides(weights_path, &overrides)?;
    let trained = Tensors::new(weights_path, trained);
    let mut body = TextBody::new(&bert, &ckpt)?;
    let (seq, width) = methods::build(&mut body, &spec.method, &trained, run)?;
    let head = head_weights(&trained, spec.pool, width, spec.classes)?;
    let outputs = graph::append_head(body.g(), &seq, &head, out)?;
    refuse_unused(&trained, weights_path, &method)?;
    let mut model = body.b.finish(&ckpt, outputs);
    model.doc_string = format!(
        "sherl run {} ({method}) exported by sherl-fit export",
        rc.run_id
    );
    let bytes = model.encode_to_vec();
    let bytes = crate::extract::onnx::edit::prune_to_outputs(model_path, &bytes, &out.names())?
        .unwrap_or(bytes);
    Ok(Built {
        bytes,
        method,
        reads: seq,
        width: spec.classes,
        family: Some(bert.family()),
    })
}

/// Refuse a run whose weights hold tensors its exported model does not
/// read (a run of another method or shape).
fn refuse_unused(trained: &Tensors, weights_path: &Path, method: &str) -> Result<()> {
    let unused = trained.unused();
    if !unused.is_empty() {
        return Err(Error::Checkpoint {
            path: weights_path.to_path_buf(),
            message: format!(
                "a {method} run's weights hold tensors its model does not use: {:?}",
                unused.iter().take(3).collect::<Vec<_>>()
            ),
        });
    }
    Ok(())
}

/// The backbone's tokenizer (`dir`), truncating at `max_len` and not
/// padding, as `out/tokenizer.json`.
fn write_tokenizer(dir: &BackboneDir, max_len: usize, out: &Path) -> Result<()> {
    let tok = Tokenizer::from_file(&dir.tokenizer_path(), max_len)?;
    crate::fsutil::write_atomic(&out.join("tokenizer.json"), tok.to_json()?.as_bytes())
}

/// `value` as pretty JSON at `path`, written atomically.
fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    crate::fsutil::write_atomic(path, &bytes)
}

/// Every tensor of the run's weights as f32 shape and values.
fn read_weights(path: &Path) -> Result<F32Tensors> {
    let mut out = F32Tensors::new();
    for (name, t) in Params::load_file(path, &Device::Cpu)? {
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        out.insert(name, (t.dims().to_vec(), values));
    }
    Ok(out)
}

/// The run's trained tensors (read from `path`) split in two: those that replace backbone
/// weights (checkpoint names: a late-layer, full-ft or `--late-trainable`
/// run's layers, LoRA's merged projections) and the rest (head and side
/// modules), read by the method's graph.
fn split_weights(
    path: &Path,
    mut trained: F32Tensors,
    method: &MethodSpec,
    bert: &crate::backbone::BertConfig,
    base: &Checkpoint,
) -> Result<(F32Tensors, F32Tensors)> {
    let overrides = match method {
        MethodSpec::Lora {
            rank,
            alpha,
            targets,
            ..
        } => {
            let scale = (*alpha / *rank as f64) as f32;
            merge::merge_lora(path, &mut trained, bert, base, targets, scale)?
        }
        _ => {
            let (backbone, rest) = std::mem::take(&mut trained)
                .into_iter()
                .partition(|(name, _)| base.contains(name));
            trained = rest;
            backbone
        }
    };
    check_overrides(path, method, bert.num_hidden_layers, &overrides)?;
    Ok((overrides, trained))
}

/// Refuse backbone tensors the run's method does not train: only
/// `full-ft` trains every one, `late-layer` and `sherl --late-trainable`
/// their last `K` layers, LoRA its merged projections; any other backbone
/// name in a run's weights would silently replace a frozen weight.
pub(super) fn check_overrides(
    path: &Path,
    method: &MethodSpec,
    layers: usize,
    overrides: &F32Tensors,
) -> Result<()> {
    let late = |k: usize| {
        move |name: &str| {
            (layers.saturating_sub(k)..layers)
                .any(|i| name.starts_with(&format!("encoder.layer.{i}.")))
        }
    };
    let allowed: Box<dyn Fn(&str) -> bool> = match method {
        MethodSpec::FullFt | MethodSpec::Lora { .. } => Box::new(|_| true),
        MethodSpec::LateLayer { late_layers } => Box::new(late(*late_layers)),
        MethodSpec::Sherl {
            late_layers,
            late_trainable: true,
            ..
        } => Box::new(late(*late_layers)),
        _ => Box::new(|_| false),
    };
    match overrides.keys().find(|n| !allowed(n)) {
        None => Ok(()),
        Some(name) => Err(Error::Checkpoint {
            path: path.to_path_buf(),
            message: format!(
                "tensor '{name}' is a backbone weight a {} run does not train",
                method.kind().name()
            ),
        }),
    }
}

/// The head's `head.weight` (`[classes, width]`) and `head.bias`.
fn head_weights(
    trained: &Tensors,
    pool: crate::fit::model::Pool,
    d: usize,
    classes: usize,
) -> Result<graph::HeadWeights> {
    Ok(graph::HeadWeights {
        pool,
        weight: trained.tensor_f32_shaped("head.weight", &[classes, d])?,
        bias: trained.tensor_f32_shaped("head.bias", &[classes])?,
        d,
        classes,
    })
}
