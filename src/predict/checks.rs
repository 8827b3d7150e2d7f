//! What a run must match before predict or search uses it.

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::backbone::Checkpoint;
use crate::data::args::TrainedColumns;
use crate::fit::config::FitConfig;
use crate::fit::error::FitError;
use crate::fit::method::ResolveOn;
use crate::fit::model::{Arch, Model, ModelSpec};
use crate::fit::params::Params;
use crate::fit::run_dir::{self, RunCache, RunConfig};
use crate::{Error, Result};

/// Refuse `path` unless its sha256 is `want` (a backbone file the run's
/// cache was extracted with).
pub(crate) fn same(what: &str, path: &Path, want: &str) -> Result<()> {
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

/// The backbone directory and ONNX model predict uses: `--backbone`
/// (and `--model`) when given; else the directory of the ONNX model the
/// run's cache recorded (`cache.backbone.onnx.path` in `config.json`, as
/// given to `sherl-extract`, relative to where it ran), when that file is
/// still there and its sha256 is the one recorded; else an error naming
/// the recorded path and asking for `--backbone`. The other backbone files
/// (tokenizer, checkpoint, description) are checked against their
/// recorded sha256 wherever the directory came from.
pub(crate) fn backbone_dir(
    backbone: Option<&Path>,
    model: Option<&Path>,
    rc: &RunConfig,
) -> Result<(PathBuf, PathBuf)> {
    recorded_backbone_dir(backbone, model, &rc.cache.backbone)
}

/// [`backbone_dir`] for a cache whose manifest recorded `info` (a
/// retrieval run's caches record one backbone each).
pub(crate) fn recorded_backbone_dir(
    backbone: Option<&Path>,
    model: Option<&Path>,
    info: &crate::cache::manifest::BackboneInfo,
) -> Result<(PathBuf, PathBuf)> {
    if let Some(dir) = backbone {
        let model = model.map_or_else(|| dir.join("model.onnx"), Path::to_owned);
        return Ok((dir.to_owned(), model));
    }
    let recorded = PathBuf::from(&info.onnx.path);
    let dir = match recorded.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let ask = |why: String| {
        Error::setting(
            "--backbone",
            format!(
                "not given, and the backbone the run recorded, {} (ONNX model {}), {why}; \
                 pass --backbone DIR with the backbone the run's cache was extracted with",
                dir.display(),
                recorded.display()
            ),
        )
    };
    if info.onnx.path.is_empty() {
        return Err(Error::setting(
            "--backbone",
            "not given, and the run records no backbone path; pass --backbone DIR".to_owned(),
        ));
    }
    if !recorded.is_file() {
        return Err(ask(
            "is not there (paths are as given to sherl-extract, relative to where it ran)".into(),
        ));
    }
    let got = crate::fsutil::sha256_file(&recorded)?;
    if got != info.onnx.sha256 {
        return Err(ask(format!(
            "has changed (sha256 {}, recorded {})",
            crate::hash::abbrev(&got),
            crate::hash::abbrev(&info.onnx.sha256)
        )));
    }
    tracing::info!(
        "--backbone: {}, the backbone the run recorded (its ONNX model's sha256 matches)",
        dir.display()
    );
    let model = model.map_or(recorded, Path::to_owned);
    Ok((dir, model))
}

/// The run's `weights.safetensors`: refused when the run has not written
/// it yet, and checked with [`check_weights`].
pub(crate) fn checked_weights(run: &Path) -> Result<PathBuf> {
    let weights = run.join(run_dir::WEIGHTS_FILE);
    if !weights.exists() {
        return Err(FitError::BadRun {
            path: run.to_path_buf(),
            message: "no weights.safetensors (the run has not finished an epoch)".into(),
        }
        .into());
    }
    check_weights(run, &weights)?;
    Ok(weights)
}

/// Check `weights.safetensors` against the sha256 the run recorded when it
/// wrote them (`summary.json`, or `error.json` for a run that stopped):
/// flipped bits in a weight file must not turn into confident wrong
/// answers. A run still in progress (or killed) has no record: its weights
/// (and its `config.json`, see [`run_dir::read_checked_config`]) are used
/// with a warning.
pub(crate) fn check_weights(run: &Path, weights: &Path) -> Result<()> {
    match run_dir::recorded_checksums(run)? {
        Some(run_dir::Recorded {
            from,
            weights_sha256: Some(want),
            ..
        }) => {
            let got = crate::fsutil::sha256_file(weights)?;
            if got != want {
                return Err(Error::Checkpoint {
                    path: weights.to_path_buf(),
                    message: format!(
                        "sha256 {} differs from the {} recorded in {} when the run wrote it: the file was changed or is corrupt",
                        crate::hash::abbrev(&got),
                        crate::hash::abbrev(&want),
                        from.display()
                    ),
                });
            }
        }
        Some(run_dir::Recorded { from, .. }) => tracing::warn!(
            "{}: written by an older sherl without a weights checksum; {} is used unchecked",
            from.display(),
            weights.display()
        ),
        None => tracing::warn!(
            "{}: the run has not finished (no summary.json); using its config.json and best \
             weights so far, unchecked",
            run.display()
        ),
    }
    Ok(())
}

/// The columns the run was trained on: recorded in its `config.json`, or,
/// for runs written before that, read from the cache's manifest (when it
/// is still where the run recorded it and is the cache the run was trained
/// on), else the reader's defaults (`text`, `label`).
pub(crate) fn trained_columns(cache: &RunCache) -> TrainedColumns {
    if let Some(columns) = &cache.columns {
        return columns.clone();
    }
    let path = cache.path.join("manifest.json");
    let manifest: Option<serde_json::Value> =
        crate::fsutil::read_json_limited(&path, crate::fsutil::METADATA_LIMIT).ok();
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

/// The model spec a run was trained with: the one its `config.json`
/// stores; a run of an earlier version, which stored none, has its settings
/// resolved on the cache it recorded, with the side width, early route and
/// probed layer it recorded (what it was built with).
pub(crate) fn run_spec(rc: &RunConfig) -> Result<ModelSpec> {
    if let Some(spec) = &rc.spec {
        return Ok(spec.clone());
    }
    let mut settings = rc.config.legacy_json();
    settings["side_dim"] = rc.model.side_dim.into();
    settings["early_layers"] = rc.model.early_layers.clone().into();
    settings["probe_layer"] = rc.model.probe_layer.into();
    let bad = |message: String| crate::fit::error::FitError::BadRun {
        path: rc.cache.path.clone(),
        message,
    };
    let config = FitConfig::from_stored(settings).map_err(bad)?;
    let on = ResolveOn {
        layers: rc.cache.backbone.num_layers,
        hidden: rc.cache.backbone.hidden,
        cached: &rc.cache.layers,
    };
    Ok(ModelSpec {
        method: config.method.resolve(&on)?,
        pool: config.pool,
        classes: rc.model.classes,
    })
}

/// The run's model on `dev`: built from the spec it recorded over `arch`
/// and `ckpt`, its trained weights restored from `weights`.
pub(crate) fn trained_model(
    rc: &RunConfig,
    arch: &Arch,
    ckpt: &Checkpoint,
    weights: &Path,
    dev: &Device,
) -> Result<Model> {
    let model = Model::build(
        run_spec(rc)?,
        &rc.cache.layers,
        arch,
        ckpt,
        rc.config.seed,
        dev,
    )?;
    model
        .params
        .restore(&Params::load_file(weights, dev)?, weights)?;
    Ok(model)
}
