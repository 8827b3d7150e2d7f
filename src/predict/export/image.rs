//! `sherl-fit export` of a run trained on an image cache: the backbone's
//! own ONNX graph with the method's graph and the head appended
//! ([`ImageBody`]), the preprocessing recipe the cache recorded as
//! `preprocess.json`, `labels.json` and a `README.md`.

use std::path::Path;

use super::image_body::{ImageBody, PatchPool, INPUT};
use super::{graph, head_weights, methods, readme, refuse_unused, write_json};
use super::{Body, Built, ExportPlan, ExportSummary, MODEL_FILE};
use crate::backbone::{BackboneDir, Checkpoint, F32Tensors, ImageBackboneDesc};
use crate::cache::manifest::ImageInfo;
use crate::data::image::Preprocess;
use crate::extract::onnx::builder::{meta, Tensors};
use crate::fit::error::FitError;
use crate::fit::nn::vit_layer::VitLayerConfig;
use crate::fit::run_dir::{self, RunConfig};
use crate::predict::checks::same;
use crate::{Error, Result};

/// The recipe file written next to the model.
pub const PREPROCESS_FILE: &str = "preprocess.json";

/// The first backbone layer the run trained (`encoder.layer.{i}.*` among
/// its weights that replace the checkpoint's), or `layers` when none; a
/// replaced tensor outside the layers is refused.
fn first_trained(path: &Path, overrides: &F32Tensors, layers: usize) -> Result<usize> {
    let mut first = layers;
    for name in overrides.keys() {
        let i = name
            .strip_prefix("encoder.layer.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|&i| i < layers)
            .ok_or_else(|| Error::Checkpoint {
                path: path.to_path_buf(),
                message: format!(
                    "tensor '{name}' replaces a backbone weight outside its {layers} layers, \
                     which an image run does not train"
                ),
            })?;
        first = first.min(i);
    }
    Ok(first)
}

/// Export the image run `rc` (image record `image`, trained weights
/// `weights` read from `weights_path`) as `plan` says.
pub(super) fn export_image(
    plan: &ExportPlan,
    rc: &RunConfig,
    image: &ImageInfo,
    weights_path: &Path,
    weights: F32Tensors,
) -> Result<ExportSummary> {
    let out_path = plan.out.join(MODEL_FILE);
    let (built, recipe) = image_model(
        &plan.run,
        rc,
        image,
        &plan.backbone,
        weights_path,
        weights,
        graph::Output::Classes,
        &out_path,
    )?;
    std::fs::create_dir_all(&plan.out).map_err(|e| Error::io(&plan.out, e))?;
    crate::fsutil::write_atomic(&out_path, &built.bytes)?;
    write_json(&plan.out.join(PREPROCESS_FILE), &recipe)?;
    write_json(&plan.out.join("labels.json"), &rc.labels)?;
    let text = readme::image_readme(
        rc,
        &built.method,
        INPUT,
        recipe.channels,
        recipe.size,
        image.patch_pool,
    );
    crate::fsutil::write_atomic(&plan.out.join("README.md"), text.as_bytes())?;
    Ok(built.summary(rc, out_path))
}

/// The ONNX model of the image run `rc` (`run` its directory, `image` its
/// cache's image record, `weights` its trained tensors read from
/// `weights_path`) on the backbone in `backbone`, with the head `out`, and
/// the preprocessing recipe its cache recorded; `out_path` names it in
/// errors. The backbone description, the ONNX model and the ViT
/// checkpoint must be the ones the cache was extracted with.
#[allow(clippy::too_many_arguments)]
pub(super) fn image_model(
    run: &Path,
    rc: &RunConfig,
    image: &ImageInfo,
    backbone: &Path,
    weights_path: &Path,
    weights: F32Tensors,
    out: graph::Output,
    out_path: &Path,
) -> Result<(Built, Preprocess)> {
    let config_path = run.join(run_dir::CONFIG_FILE);
    let bad_run = |message: String| -> Error {
        FitError::BadRun {
            path: config_path.clone(),
            message,
        }
        .into()
    };
    let dir = BackboneDir::open(backbone)?;
    let desc_path = dir.description_path();
    same("backbone.json", &desc_path, &image.description.sha256)?;
    let model_path = dir.onnx_path();
    same("ONNX model", &model_path, &rc.cache.backbone.onnx.sha256)?;
    let ckpt_path = dir.safetensors_path();
    let st = rc
        .cache
        .backbone
        .safetensors
        .as_ref()
        .ok_or_else(|| bad_run("the run's image cache records no ViT checkpoint".into()))?;
    same("ViT checkpoint", &ckpt_path, &st.sha256)?;
    let desc = ImageBackboneDesc::read(&desc_path)?;
    let recipe: Preprocess = serde_json::from_value(image.preprocess.clone())
        .map_err(|e| bad_run(format!("cache.image.preprocess is not a recipe: {e}")))?;
    recipe.validate()?;
    if image.backbone_tokens != desc.tokens || image.cls_token != desc.cls_token {
        return Err(bad_run(format!(
            "the cache recorded {} tokens per image (CLS token: {}), backbone.json says {} ({})",
            image.backbone_tokens, image.cls_token, desc.tokens, desc.cls_token
        )));
    }
    let cfg: VitLayerConfig = rc
        .cache
        .backbone
        .config
        .clone()
        .and_then(|c| serde_json::from_value(c).ok())
        .ok_or_else(|| bad_run("cache.backbone.config does not hold the ViT block sizes".into()))?;
    let layers = rc.cache.backbone.num_layers;
    let spec = crate::predict::checks::run_spec(rc)?;
    let method = spec.method.kind().name().to_string();

    let base = Checkpoint::open_vit(&ckpt_path)?;
    let (overrides, trained): (F32Tensors, F32Tensors) = weights
        .into_iter()
        .partition(|(name, _)| base.contains(name));
    super::check_overrides(weights_path, &spec.method, layers, &overrides)?;
    let first = first_trained(weights_path, &overrides, layers)?;
    let ckpt = base.with_overrides(weights_path, &overrides)?;
    let trained = Tensors::new(weights_path, trained);
    let pool = (image.patch_pool > 1).then(|| PatchPool {
        grid: desc.grid(),
        p: image.patch_pool as usize,
        cls: desc.cls_token,
    });
    let mut body = ImageBody::new(&cfg, layers, &ckpt, &rc.cache.layers, first, pool)?;
    let (seq, width) = methods::build(&mut body, &spec.method, &trained, run)?;
    let head = head_weights(&trained, spec.pool, width, spec.classes)?;
    let outputs = graph::append_image_head(body.g(), &seq, &head, out)?;
    refuse_unused(&trained, weights_path, &method)?;
    let doc = format!(
        "sherl run {} ({method}) exported by sherl-fit export",
        rc.run_id
    );
    let metadata = vec![
        meta("sherl.run_id", rc.run_id.clone()),
        meta("sherl.method", method.clone()),
        meta("sherl.preprocess_sha256", recipe.digest()),
    ];
    let bytes = body.finish(&model_path, &desc, outputs, doc, metadata)?;
    let bytes = crate::extract::onnx::edit::prune_to_outputs(out_path, &bytes, &out.names())?
        .unwrap_or(bytes);
    let built = Built {
        bytes,
        method,
        reads: seq,
        width: spec.classes,
        family: None,
    };
    Ok((built, recipe))
}
