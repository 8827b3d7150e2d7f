//! `predict` for a run trained on a text cache.

use std::path::Path;

use candle_core::Device;
use serde_json::{json, Map};

use super::checks::{same, trained_columns, trained_model};
use super::output::Labeller;
use super::plan::{PredictPlan, PredictSummary};
use crate::backbone::{BackboneDir, BertConfig, Checkpoint};
use crate::batching::{real_rows, PaddedBatch};
use crate::data::{Dataset, Format};
use crate::extract::runtime::{BackboneSession, Runtime};
use crate::extract::tokenize::{Encoded, Tokenizer};
use crate::fit::batcher::Batch;
use crate::fit::error::FitError;
use crate::fit::model::Arch;
use crate::fit::run_dir::{self, RunConfig};
use crate::{Error, Result};

/// The first `chars` characters of `text`, with `…` when it was cut.
fn prefix(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// The text backbone in `dir`, checked against what the run's cache
/// recorded: tokenizer, checkpoint, `config.json` and its shape.
fn checked_backbone(plan: &PredictPlan, rc: &RunConfig, dir: &BackboneDir) -> Result<BertConfig> {
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
    checked_text_backbone(&plan.run, rc, dir)
}

/// The text backbone in `dir`, checked against what the run in `run`
/// recorded: tokenizer, checkpoint, `config.json` and its shape, and the
/// run's labels against its head.
pub(crate) fn checked_text_backbone(
    run: &Path,
    rc: &RunConfig,
    dir: &BackboneDir,
) -> Result<BertConfig> {
    let cfg_path = run.join(run_dir::CONFIG_FILE);
    let Some(tokenizer) = &rc.cache.backbone.tokenizer else {
        return Err(FitError::BadRun {
            path: run.to_path_buf(),
            message: "the run's cache records no tokenizer and no image record".into(),
        }
        .into());
    };
    same("tokenizer", &dir.tokenizer_path(), &tokenizer.sha256)?;
    if let Some(st) = &rc.cache.backbone.safetensors {
        same("checkpoint", &dir.safetensors_path(), &st.sha256)?;
    }
    let bert = dir.config()?;
    crate::fit::checks::check_config(
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
    Ok(bert)
}

/// The texts to label, read with the columns the run was trained on unless
/// the flags say otherwise. True labels (if the file has them) are read as
/// they are and mapped to the run's classes by name.
fn read_texts(plan: &PredictPlan, rc: &RunConfig) -> Result<Dataset> {
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
    crate::data::load(&dplan)
}

/// `predict` for a text run: every row is labelled; a true label the run
/// does not know is kept in the output and left out of the accuracy.
pub(crate) fn predict_texts(
    rt: &Runtime,
    plan: &PredictPlan,
    rc: &RunConfig,
    dir: &BackboneDir,
    weights_path: &Path,
    out_file: Option<crate::fsutil::AtomicFile>,
) -> Result<PredictSummary> {
    let bert = checked_backbone(plan, rc, dir)?;
    let ckpt = Checkpoint::open(&dir.safetensors_path())?;
    let data = read_texts(plan, rc)?;
    let cfg_path = plan.run.join(run_dir::CONFIG_FILE);
    let tok = Tokenizer::from_file(&dir.tokenizer_path(), rc.cache.max_len)
        .map_err(|e| super::recorded_in(e, &cfg_path, &[("--max-len", "cache.max_len")]))?;
    let (mut session, choice) = BackboneSession::open(rt, &plan.model_path(), &plan.session)?;
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
    let model = trained_model(rc, &arch, &ckpt, weights_path, &dev)
        .map_err(|e| super::recorded_in(e, &cfg_path, &[("--probe-layer", "probe layer")]))?;
    let inputs = model.inputs().to_vec();
    let model_eval = model.inference();
    session.check_layers(&inputs)?;

    let mut out = Labeller::open(out_file, &rc.labels, &data.label_names)?;
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
        let logits = model_eval.forward(&batch)?.logits;
        let probs: Vec<Vec<f32>> = candle_nn::ops::softmax(&logits, 1)?.to_vec2()?;
        for (e, p) in chunk.iter().zip(probs) {
            let mut fields = Map::new();
            fields.insert("id".into(), json!(e.id));
            if plan.text_chars > 0 {
                fields.insert("text".into(), json!(prefix(&e.text, plan.text_chars)));
                if let Some(pair) = &e.text_pair {
                    fields.insert("text_pair".into(), json!(prefix(pair, plan.text_chars)));
                }
            }
            out.write(fields, &p, e.label)?;
        }
    }
    out.finish(rc.run_id.clone(), data.examples.len(), plan.out.clone())
}
