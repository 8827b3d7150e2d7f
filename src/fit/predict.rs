//! `sherl-fit predict`: label new texts with a trained run. The backbone's
//! early layers run through ONNX Runtime (new texts have no cache), then the
//! trained modules run in candle exactly as in training (dropout off).
//!
//! The backbone must be the one the run's cache was extracted with: the
//! ONNX model, checkpoint and tokenizer hashes are compared with the cache
//! manifest recorded in the run's `config.json`, and any difference is
//! refused (the trained modules would read different features).

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::json;

use super::batcher::Batch;
use super::error::FitError;
use super::model::{Arch, Model, ModelSpec};
use super::params::Params;
use super::retrieval::search::{Hit, Query, SearchPlan, Searcher};
use super::run_dir::{self, RunCache, RunConfig};
use crate::backbone::{BackboneDir, Checkpoint};
use crate::batching::{real_rows, PaddedBatch};
use crate::cache::Cache;
use crate::data::args::{PredictDataArgs, TrainedColumns};
use crate::data::Format;
use crate::runtime::{BackboneSession, Runtime, SessionConfig};
use crate::tokenize::{Encoded, Tokenizer};
use crate::{Error, Result};

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

fn same(what: &str, path: &Path, want: &str) -> Result<()> {
    let got = crate::fsutil::sha256_file(path)?;
    if got != want {
        return Err(Error::Backbone {
            path: path.to_path_buf(),
            message: format!(
                "sha256 {} differs from the {what} the run's cache was extracted with ({}); predict with the same backbone",
                crate::hash::abbrev(&got),
                crate::hash::abbrev(want)
            ),
        });
    }
    Ok(())
}

/// Check `weights.safetensors` against the sha256 the run recorded when it
/// wrote them (`summary.json`, or `error.json` for a run that stopped):
/// flipped bits in a weight file must not turn into confident wrong
/// answers. A run still in progress (or killed) has no record: its weights
/// are used with a warning.
pub(crate) fn check_weights(run: &Path, weights: &Path) -> Result<()> {
    let recorded = run_dir::recorded_weights_sha256(run)?;
    match recorded {
        Some((from, Some(want))) => {
            let got = crate::fsutil::sha256_file(weights)?;
            if got != want {
                return Err(Error::Checkpoint {
                    path: weights.to_path_buf(),
                    message: format!(
                        "sha256 {} differs from the {} recorded in {} when the run wrote it: the file was changed or is corrupt",
                        &got[..12],
                        &want[..12.min(want.len())],
                        from.display()
                    ),
                });
            }
        }
        Some((from, None)) => tracing::warn!(
            "{}: written by an older sherl without a weights checksum; {} is used unchecked",
            from.display(),
            weights.display()
        ),
        None => tracing::warn!(
            "{}: the run has not finished (no summary.json); using its best weights so far, unchecked",
            run.display()
        ),
    }
    Ok(())
}

/// The columns the run was trained on: recorded in its `config.json`, or,
/// for runs written before that, read from the cache's manifest (when it
/// is still where the run recorded it and is the cache the run was trained
/// on), else the reader's defaults (`text`, `label`).
fn trained_columns(cache: &RunCache) -> TrainedColumns {
    if let Some(columns) = &cache.columns {
        return columns.clone();
    }
    let path = cache.path.join("manifest.json");
    let manifest: Option<serde_json::Value> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    match manifest {
        Some(m)
            if !cache.settings_hash.is_empty()
                && m["settings_hash"].as_str() == Some(cache.settings_hash.as_str()) =>
        {
            TrainedColumns::from_options(&m["dataset"]["options"])
        }
        _ => {
            tracing::warn!(
                "{}: not readable, or not the cache this run was trained on; reading \
                 the texts from column `text` (labels: `label`) unless --text-column says otherwise",
                path.display()
            );
            TrainedColumns::default()
        }
    }
}

/// The first `chars` characters of `text`, with `…` when it was cut.
fn prefix(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// Label `plan.data` with the run in `plan.run`.
pub fn predict(rt: &Runtime, plan: &PredictPlan) -> Result<PredictSummary> {
    let cfg_path = plan.run.join(run_dir::CONFIG_FILE);
    let rc = RunConfig::read(&plan.run)?;
    let weights_path = plan.run.join(run_dir::WEIGHTS_FILE);
    if !weights_path.exists() {
        return Err(FitError::BadRun {
            path: plan.run.clone(),
            message: "no weights.safetensors (the run has not finished an epoch)".into(),
        }
        .into());
    }
    check_weights(&plan.run, &weights_path)?;
    let dir = BackboneDir::open(&plan.backbone)?;
    same("ONNX model", &plan.model, &rc.cache.backbone.onnx.sha256)?;
    if let Some(image) = &rc.cache.image {
        return predict_images(rt, plan, &rc, image, &dir, &weights_path);
    }
    if let Some(col) = &plan.data.image_column {
        return Err(crate::Error::setting(
            "--image-column",
            format!(
                "{col} names an image column, but the run {} was trained on text; use \
                 --text-column",
                plan.run.display()
            ),
        ));
    }
    let Some(tokenizer) = &rc.cache.backbone.tokenizer else {
        return Err(FitError::BadRun {
            path: plan.run.clone(),
            message: "the run's cache records no tokenizer and no image record".into(),
        }
        .into());
    };
    same("tokenizer", &dir.tokenizer_path(), &tokenizer.sha256)?;
    if let Some(st) = &rc.cache.backbone.safetensors {
        same("checkpoint", &dir.safetensors_path(), &st.sha256)?;
    }
    let bert = dir.config()?;
    super::checks::check_config(
        &bert,
        rc.cache.backbone.config.as_ref(),
        &dir.config_path(),
        &cfg_path,
    )?;
    if bert.num_hidden_layers != rc.cache.backbone.num_layers
        || bert.hidden_size != rc.cache.backbone.hidden
    {
        return Err(Error::Backbone {
            path: dir.config_path(),
            message: format!(
                "{} layers x {} hidden, but the run's cache was made by a backbone with {} x {}",
                bert.num_hidden_layers,
                bert.hidden_size,
                rc.cache.backbone.num_layers,
                rc.cache.backbone.hidden
            ),
        });
    }
    let ckpt = Checkpoint::open(&dir.safetensors_path())?;
    if rc.model.classes != rc.labels.len() {
        return Err(FitError::BadRun {
            path: cfg_path,
            message: format!(
                "{} labels but a head of {} classes",
                rc.labels.len(),
                rc.model.classes
            ),
        }
        .into());
    }
    let spec = run_spec(&rc);

    // Texts: every row is labelled. True labels (if the file has them) are
    // read as they are and mapped to the run's classes by name; a label the
    // run does not know is kept in the output and left out of the accuracy.
    let trained = trained_columns(&rc.cache);
    let dplan = plan.data.to_plan(&trained);
    if let Some(pair) = &dplan.read.text_pair_column {
        let path = &plan.data.data;
        if dplan.read.format.resolve(path)? == Format::Text {
            return Err(Error::Dataset {
                path: path.clone(),
                message: format!(
                    "the run was trained on sentence pairs (columns {} and {pair}), but \
                     this input is read as plain text, one text per line: give a CSV, TSV \
                     or JSON Lines file with both columns",
                    dplan.read.text_column
                ),
            });
        }
    }
    tracing::debug!(
        "predict reads text column {} (pair: {:?}, labels: {:?})",
        dplan.read.text_column,
        dplan.read.text_pair_column,
        dplan.read.label_column
    );
    let data = crate::data::load(&dplan)?;
    let class_of: Vec<Option<usize>> = data
        .label_names
        .iter()
        .map(|n| rc.labels.iter().position(|l| l == n))
        .collect();
    let tok = Tokenizer::from_file(&dir.tokenizer_path(), rc.cache.max_len)?;
    let (mut session, choice) = BackboneSession::open(rt, &plan.model, &plan.session)?;
    if let Some(r) = &choice.fallback_reason {
        tracing::info!("device auto: running on CPU ({r})");
    }
    // The trained layers run where the backbone does: on the same GPU when
    // ONNX Runtime runs on one and this build has CUDA, else on the CPU.
    let dev = match choice.device.as_str() {
        "cpu" => Device::Cpu,
        gpu => match crate::fit::device(gpu) {
            Ok((d, _)) => d,
            Err(e) => {
                tracing::info!("the backbone runs on {gpu}, the trained layers on the CPU ({e})");
                Device::Cpu
            }
        },
    };
    let arch = Arch::Bert(bert.clone());
    let model = Model::build(spec, &rc.cache.layers, &arch, &ckpt, rc.config.seed, &dev)?;
    model
        .params
        .restore(&Params::load_file(&weights_path, &dev)?, &weights_path)?;
    let inputs = model.inputs().to_vec();
    let model_eval = model.inference();
    session.check_layers(&inputs)?;

    let mut sink: Box<dyn Write> = match &plan.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| Error::io(p, e))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let out_name = plan
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("<stdout>"));
    let (mut correct, mut labelled, mut unknown) = (0usize, 0usize, 0usize);
    let hidden = bert.hidden_size;
    for chunk in data.examples.chunks(plan.batch_size.max(1)) {
        let encs: Vec<Encoded> = chunk
            .iter()
            .map(|e| tok.encode(&e.text, e.text_pair.as_deref()))
            .collect::<Result<_>>()?;
        let refs: Vec<&Encoded> = encs.iter().collect();
        let pb = PaddedBatch::new(&refs, None);
        let (ids, mask, types) = pb.views();
        let outs = session.run(ids, mask, types, &inputs)?;
        let (b, s) = (encs.len(), pb.ids.ncols());
        let mut layers = Vec::with_capacity(inputs.len());
        for h in &outs {
            let mut v = vec![0f32; b * s * hidden];
            for (r, e) in encs.iter().enumerate() {
                v[r * s * hidden..(r * s + e.len()) * hidden].copy_from_slice(&real_rows(
                    h.view(),
                    r,
                    e.len(),
                ));
            }
            layers.push(v);
        }
        let ids = chunk.iter().map(|e| e.id.clone()).collect();
        let batch = Batch::from_padded(&pb, layers, hidden, ids, &dev)?;
        let out = model_eval.forward(&batch)?;
        let probs: Vec<Vec<f32>> = candle_nn::ops::softmax(&out.logits, 1)?.to_vec2()?;
        for (e, p) in chunk.iter().zip(probs) {
            let best = p
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            let mut line = json!({
                "id": e.id,
                "label": rc.labels[best],
                "probabilities": rc.labels.iter().cloned().zip(p.iter().map(|&x| json!(f64::from(x)))).collect::<serde_json::Map<String, serde_json::Value>>(),
            });
            if plan.text_chars > 0 {
                line["text"] = json!(prefix(&e.text, plan.text_chars));
                if let Some(pair) = &e.text_pair {
                    line["text_pair"] = json!(prefix(pair, plan.text_chars));
                }
            }
            if let Some(t) = e.label {
                let t = t as usize;
                line["true_label"] = json!(data.label_names[t]);
                match class_of[t] {
                    Some(c) => {
                        labelled += 1;
                        correct += usize::from(c == best);
                    }
                    None => unknown += 1,
                }
            }
            writeln!(sink, "{line}").map_err(|e| Error::io(&out_name, e))?;
        }
    }
    sink.flush().map_err(|e| Error::io(&out_name, e))?;
    if unknown > 0 {
        let names: Vec<&str> = class_of
            .iter()
            .zip(&data.label_names)
            .filter(|(c, _)| c.is_none())
            .map(|(_, n)| n.as_str())
            .collect();
        tracing::warn!(
            "{unknown} row(s) have a true label the run was not trained on ({}); they are labelled but left out of the accuracy",
            names.join(", ")
        );
    }
    Ok(PredictSummary {
        run_id: rc.run_id,
        examples: data.examples.len(),
        accuracy: (labelled > 0).then(|| correct as f64 / labelled as f64),
        labelled,
        unknown_labels: unknown,
        out: plan.out.clone(),
    })
}

/// The model spec a run was trained with.
fn run_spec(rc: &RunConfig) -> ModelSpec {
    ModelSpec {
        method: rc.config.method,
        late_layers: rc.config.late_layers,
        late_trainable: rc.config.late_trainable,
        side_dim: rc.model.side_dim,
        early_layers: rc.model.early_layers.clone(),
        probe_layer: rc.model.probe_layer,
        pool: rc.config.pool,
        dropout: rc.config.dropout,
        classes: rc.model.classes,
        lora: rc.config.lora_spec(),
        adapter: rc.config.adapter_spec(),
        lst_init: rc.config.lst_init.unwrap_or_default(),
    }
}

/// `predict` for a run trained on an image cache: the new images (a folder
/// of class folders, a table whose image column names image files:
/// `--image-column`, else the one the cache was extracted from; IDX)
/// are decoded and preprocessed with the recipe the cache recorded (not
/// whatever `backbone.json` says now), run through the ViT with the
/// run's input layers exposed, pooled as the cache was, and labelled by
/// the trained modules. The backbone description, the ONNX model and the
/// ViT checkpoint must be the ones the cache was extracted with.
fn predict_images(
    rt: &Runtime,
    plan: &PredictPlan,
    rc: &RunConfig,
    image: &crate::cache::manifest::ImageInfo,
    dir: &BackboneDir,
    weights_path: &Path,
) -> Result<PredictSummary> {
    use crate::data::image::{load_images, ImageOptions, Preprocess};
    use crate::extract::image::{exposed_model, ImageBackbone, ImageRunner};

    let desc_path = dir.description_path();
    same("backbone.json", &desc_path, &image.description.sha256)?;
    let ckpt_path = dir.safetensors_path();
    let Some(st) = &rc.cache.backbone.safetensors else {
        return Err(FitError::BadRun {
            path: plan.run.clone(),
            message: "the run's image cache records no ViT checkpoint".into(),
        }
        .into());
    };
    same("ViT checkpoint", &ckpt_path, &st.sha256)?;
    let recipe: Preprocess =
        serde_json::from_value(image.preprocess.clone()).map_err(|e| FitError::BadRun {
            path: plan.run.join(run_dir::CONFIG_FILE),
            message: format!("cache.image.preprocess is not a recipe: {e}"),
        })?;
    let desc = crate::backbone::ImageBackboneDesc::read(&desc_path)?;
    let backbone = ImageBackbone {
        desc,
        desc_path,
        recipe,
        patch_pool: image.patch_pool,
        tokens: image.tokens,
    };
    let cfg: crate::fit::nn::vit_layer::VitLayerConfig = rc
        .cache
        .backbone
        .config
        .clone()
        .and_then(|c| serde_json::from_value(c).ok())
        .ok_or_else(|| FitError::BadRun {
            path: plan.run.join(run_dir::CONFIG_FILE),
            message: "cache.backbone.config does not hold the ViT block sizes".into(),
        })?;
    let arch = Arch::Vit {
        cfg,
        layers: rc.cache.backbone.num_layers,
    };
    let ckpt = Checkpoint::open_vit(&ckpt_path)?;
    let dev = Device::Cpu;
    let model = Model::build(
        run_spec(rc),
        &rc.cache.layers,
        &arch,
        &ckpt,
        rc.config.seed,
        &dev,
    )?;
    model
        .params
        .restore(&Params::load_file(weights_path, &dev)?, weights_path)?;
    let inputs = model.inputs().to_vec();
    let model_eval = model.inference();

    let trained = trained_columns(&rc.cache);
    let dplan = plan.data.to_plan(&trained);
    let options = ImageOptions {
        image_column: plan
            .data
            .image_column
            .clone()
            .or_else(|| trained.image.clone())
            .unwrap_or_else(|| ImageOptions::default().image_column),
        // IDX class numbers get the names the cache was extracted with.
        idx_label_names: trained.idx_class_names.clone(),
        ..ImageOptions::default()
    };
    let data = load_images(&dplan, &options)?;
    let class_of: Vec<Option<usize>> = data
        .label_names
        .iter()
        .map(|n| rc.labels.iter().position(|l| l == n))
        .collect();
    let bytes = exposed_model(&plan.model, &backbone.desc, &inputs)?;
    let mut session =
        crate::runtime::F32Session::from_bytes(rt, &plan.model, &bytes, &plan.session)?;
    drop(bytes);
    let order: Vec<usize> = (0..data.examples.len()).collect();
    let mut runner = ImageRunner {
        session: &mut session,
        backbone: &backbone,
        options: &options,
        layers: &inputs,
        examples: &data.examples,
        order: &order,
    };
    let mut sink: Box<dyn Write> = match &plan.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| Error::io(p, e))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let out_name = plan
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("<stdout>"));
    let hidden = arch.hidden();
    let tokens = backbone.tokens;
    let (mut correct, mut labelled, mut unknown) = (0usize, 0usize, 0usize);
    let positions: Vec<usize> = (0..data.examples.len()).collect();
    for chunk in positions.chunks(plan.batch_size.max(1)) {
        let metas: Vec<crate::cache::ExampleMeta> = chunk
            .iter()
            .map(|&p| crate::cache::ExampleMeta {
                position: p as u64,
                id: data.examples[p].id.clone(),
                split: 0,
                label: None,
                ids: Vec::new(),
                type_ids: Vec::new(),
                image: Some(crate::cache::ImageMeta {
                    tokens: tokens as u32,
                    digest: [0; 32],
                }),
            })
            .collect();
        let out = runner.run(&metas)?;
        let layers: Vec<Vec<f32>> = out
            .outs
            .into_iter()
            .map(|a| a.into_array().into_raw_vec_and_offset().0)
            .collect();
        // Every image has `tokens` real tokens: an all-ones mask.
        let encs: Vec<Encoded> = chunk
            .iter()
            .map(|_| Encoded {
                ids: vec![0; tokens],
                type_ids: vec![0; tokens],
            })
            .collect();
        let refs: Vec<&Encoded> = encs.iter().collect();
        let pb = PaddedBatch::new(&refs, None);
        let ids = metas.iter().map(|m| m.id.clone()).collect();
        let batch = Batch::from_padded(&pb, layers, hidden, ids, &dev)?;
        let logits = model_eval.forward(&batch)?.logits;
        let probs: Vec<Vec<f32>> = candle_nn::ops::softmax(&logits, 1)?.to_vec2()?;
        for (&p, pr) in chunk.iter().zip(probs) {
            let e = &data.examples[p];
            let best = pr
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            let mut line = json!({
                "id": e.id,
                "image": e.source.path().display().to_string(),
                "label": rc.labels[best],
                "probabilities": rc.labels.iter().cloned().zip(pr.iter().map(|&x| json!(f64::from(x)))).collect::<serde_json::Map<String, serde_json::Value>>(),
            });
            if let Some(t) = e.label {
                let t = t as usize;
                line["true_label"] = json!(data.label_names[t]);
                match class_of[t] {
                    Some(c) => {
                        labelled += 1;
                        correct += usize::from(c == best);
                    }
                    None => unknown += 1,
                }
            }
            writeln!(sink, "{line}").map_err(|e| Error::io(&out_name, e))?;
        }
    }
    sink.flush().map_err(|e| Error::io(&out_name, e))?;
    Ok(PredictSummary {
        run_id: rc.run_id.clone(),
        examples: data.examples.len(),
        accuracy: (labelled > 0).then(|| correct as f64 / labelled as f64),
        labelled,
        unknown_labels: unknown,
        out: plan.out.clone(),
    })
}

/// `sherl-fit search`: the query of `plan` through the backbone its
/// tower's cache was made with (ONNX Runtime, as [`predict`] runs new
/// inputs) and that trained tower, then ranked against the run's split
/// ([`Searcher`]).
pub fn search(rt: &Runtime, plan: &SearchPlan, session: &SessionConfig) -> Result<Vec<Hit>> {
    let searcher = Searcher::open(plan)?;
    let tower = searcher.query_tower(&plan.query);
    let dev = Device::Cpu;
    let z = match &plan.query {
        Query::Text(t) => text_query(rt, session, &plan.text_backbone, tower, t, &dev)?,
        Query::Image(f) => image_query(rt, session, &plan.image_backbone, tower, f, &dev)?,
    };
    searcher.rank(plan, &z)
}

/// `sherl-fit search`'s text query through the tokenizer and the ONNX
/// model of the backbone the caption cache was made with (its `max_len`),
/// then the trained text tower: `[1, J]`, not normalised.
fn text_query(
    rt: &Runtime,
    session_cfg: &SessionConfig,
    backbone: &Path,
    (cache, model, hidden): (&Cache, &Model, usize),
    text: &str,
    dev: &Device,
) -> Result<Tensor> {
    let dir = BackboneDir::open(backbone)?;
    let m = cache.manifest();
    let Some(tok) = &m.backbone.tokenizer else {
        return Err(FitError::BadRun {
            path: cache.dir().to_path_buf(),
            message: "the caption cache records no tokenizer".into(),
        }
        .into());
    };
    same("tokenizer", &dir.tokenizer_path(), &tok.sha256)?;
    let onnx = dir.onnx_path();
    same("ONNX model", &onnx, &m.backbone.onnx.sha256)?;
    let tokenizer = Tokenizer::from_file(&dir.tokenizer_path(), m.settings.max_len)?;
    let enc = tokenizer.encode(text, None)?;
    let (mut session, _) = BackboneSession::open(rt, &onnx, session_cfg)?;
    let inputs = model.inputs().to_vec();
    session.check_layers(&inputs)?;
    let refs = [&enc];
    let pb = PaddedBatch::new(&refs, None);
    let (ids, mask, types) = pb.views();
    let outs = session.run(ids, mask, types, &inputs)?;
    let layers = outs
        .iter()
        .map(|h| real_rows(h.view(), 0, enc.len()))
        .collect();
    let batch = Batch::from_padded(&pb, layers, hidden, vec!["query".into()], dev)?;
    Ok(model.inference().forward(&batch)?.logits)
}

/// `sherl-fit search`'s image query decoded and preprocessed with the
/// recipe the image cache recorded, through the ViT's ONNX model with the
/// tower's input layers exposed (pooled as the cache was), then the
/// trained image tower: `[1, J]`, not normalised.
fn image_query(
    rt: &Runtime,
    session_cfg: &SessionConfig,
    backbone: &Path,
    (cache, model, hidden): (&Cache, &Model, usize),
    file: &Path,
    dev: &Device,
) -> Result<Tensor> {
    use crate::cache::{ExampleMeta, ImageMeta};
    use crate::data::image::{ImageExample, ImageOptions, ImageSource, Preprocess};
    use crate::extract::image::{exposed_model, ImageBackbone, ImageRunner};

    if !file.is_file() {
        return Err(Error::io(
            file,
            std::io::Error::new(std::io::ErrorKind::NotFound, "query image not found"),
        ));
    }
    let dir = BackboneDir::open(backbone)?;
    let m = cache.manifest();
    let Some(info) = &m.image else {
        return Err(FitError::BadRun {
            path: cache.dir().to_path_buf(),
            message: "the image cache records no image recipe".into(),
        }
        .into());
    };
    let desc_path = dir.description_path();
    same("backbone.json", &desc_path, &info.description.sha256)?;
    let onnx = dir.onnx_path();
    same("ONNX model", &onnx, &m.backbone.onnx.sha256)?;
    let recipe: Preprocess =
        serde_json::from_value(info.preprocess.clone()).map_err(|e| FitError::BadRun {
            path: cache.dir().to_path_buf(),
            message: format!("image.preprocess is not a recipe: {e}"),
        })?;
    let backbone = ImageBackbone {
        desc: crate::backbone::ImageBackboneDesc::read(&desc_path)?,
        desc_path,
        recipe,
        patch_pool: info.patch_pool,
        tokens: info.tokens,
    };
    let inputs = model.inputs().to_vec();
    let bytes = exposed_model(&onnx, &backbone.desc, &inputs)?;
    let mut session = crate::runtime::F32Session::from_bytes(rt, &onnx, &bytes, session_cfg)?;
    drop(bytes);
    let mut options = ImageOptions::default();
    if let Ok(b) = serde_json::from_value(m.dataset.options["image"]["background"].clone()) {
        options.background = b;
    }
    let examples = [ImageExample {
        id: "query".into(),
        split: String::new(),
        source: ImageSource::File(file.to_path_buf()),
        label: None,
        group: None,
        source_line: 0,
        width: 0,
        height: 0,
    }];
    let tokens = backbone.tokens;
    let mut runner = ImageRunner {
        session: &mut session,
        backbone: &backbone,
        options: &options,
        layers: &inputs,
        examples: &examples,
        order: &[0],
    };
    let out = runner.run(&[ExampleMeta {
        position: 0,
        id: "query".into(),
        split: 0,
        label: None,
        ids: Vec::new(),
        type_ids: Vec::new(),
        image: Some(ImageMeta {
            tokens: tokens as u32,
            digest: [0; 32],
        }),
    }])?;
    let layers = out
        .outs
        .into_iter()
        .map(|a| a.into_array().into_raw_vec_and_offset().0)
        .collect();
    // Every image token is real: an all-ones mask.
    let enc = Encoded {
        ids: vec![0; tokens],
        type_ids: vec![0; tokens],
    };
    let pb = PaddedBatch::new(&[&enc], None);
    let batch = Batch::from_padded(&pb, layers, hidden, vec!["query".into()], dev)?;
    Ok(model.inference().forward(&batch)?.logits)
}
