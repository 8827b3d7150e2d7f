//! The layer above both phases: a trained run applied to new inputs. The
//! backbone's layers the run reads are computed by ONNX Runtime (new inputs
//! have no cache), then the trained modules run in candle exactly as in
//! training (dropout off).
//!
//! - [`predict()`]: `sherl-fit predict`, a classification run labelling new
//!   texts ([`text`]) or images ([`image`]);
//! - [`search`]: `sherl-fit search`, a retrieval run's text or image query
//!   ranked against a split of its caches ([`query`] embeds the query);
//! - [`runs`]: `--run` naming a directory of runs (listed, or the best
//!   taken);
//! - [`export`]: `sherl-fit export`, a classification run as one standalone
//!   ONNX model (backbone layers, trained modules, head) with its tokenizer
//!   and labels, a retrieval run as two encoders into its joint space;
//! - [`checks`]: what a run must match before it is used (weights, backbone
//!   files, the columns it was trained on); [`output`]: the prediction
//!   lines and their accuracy.
//!
//! The backbone must be the one the run's cache was extracted with: the
//! ONNX model, checkpoint and tokenizer hashes are compared with the cache
//! manifest recorded in the run's `config.json`, and any difference is
//! refused (the trained modules would read different features).

pub mod checks;
pub mod export;
pub mod image;
pub mod output;
pub mod plan;
pub mod query;
pub mod runs;
pub mod search;
pub mod text;

pub use plan::{PredictPlan, PredictSummary};

use std::path::Path;

use crate::backbone::BackboneDir;
use crate::extract::runtime::Runtime;
use crate::fit::error::FitError;
use crate::fit::run_dir::RunConfig;
use crate::{Error, Result};

/// An error about a value `predict` or `search` took from a file (a run's
/// `config.json`, a cache's manifest), not from a flag: a settings message
/// that names a flag (`--probe-layer 99 does not exist`) is rewritten to
/// name `file` and the field the value came from (`fields`: flag, field);
/// any other error passes unchanged.
pub(crate) fn recorded_in(e: Error, file: &Path, fields: &[(&str, &str)]) -> Error {
    let message = match &e {
        Error::Setting { message, .. } | Error::Fit(FitError::Settings(message)) => message,
        _ => return e,
    };
    let Some((flag, field)) = fields.iter().find(|(flag, _)| message.contains(flag)) else {
        return e;
    };
    FitError::BadRun {
        path: file.to_path_buf(),
        message: format!(
            "{} (a value recorded as {field} in this file, not given by a flag: was the file edited?)",
            message.replace(flag, field)
        ),
    }
    .into()
}

/// Label `plan.data` with the run in `plan.run` (or, for a directory of
/// runs, the best one with `plan.best`, else an error listing them:
/// [`runs::resolve_run`]), with the backbone `plan.backbone` or the one the
/// run recorded (`checks::backbone_dir`): its weights checked
/// against the sha256 the run recorded, the ONNX model against the one its
/// cache was extracted with, then the texts or images labelled.
///
/// `--out` is checked and created first ([`output::create_output`]: not the
/// input, its directory writable), before any model runs; the lines are
/// written under a temporary name and renamed to `--out` when complete.
pub fn predict(rt: &Runtime, plan: &PredictPlan) -> Result<PredictSummary> {
    let out = match &plan.out {
        Some(o) => Some(output::create_output(o, &[("--data", &plan.data.data)])?),
        None => None,
    };
    let run = runs::resolve_run(&plan.run, plan.best)?;
    let rc = RunConfig::read(&run)?;
    let weights_path = checks::checked_weights(&run)?;
    let (backbone, model) =
        checks::backbone_dir(plan.backbone.as_deref(), plan.model.as_deref(), &rc)?;
    let dir = BackboneDir::open(&backbone)?;
    checks::same("ONNX model", &model, &rc.cache.backbone.onnx.sha256)?;
    let plan = &PredictPlan {
        run,
        backbone: Some(backbone),
        model: Some(model),
        ..plan.clone()
    };
    match &rc.cache.image {
        Some(info) => image::predict_images(rt, plan, &rc, info, &dir, &weights_path, out),
        None => text::predict_texts(rt, plan, &rc, &dir, &weights_path, out),
    }
}
