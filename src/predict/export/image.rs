//! `sherl-fit export` of a run trained on an image cache: the backbone's
//! own ONNX graph with the method's graph and the head appended
//! ([`ImageBody`]), the preprocessing recipe the cache recorded as
//! `preprocess.json`, `labels.json` and a `README.md`.

use std::path::Path;

use super::image_body::{ImageBody, PatchPool, INPUT};
use super::{graph, head_weights, methods, read_weights, readme, ExportPlan, ExportSummary};
use super::{Body, MODEL_FILE};
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

/// Export the image run `rc` (image record `image`, trained weights at
/// `weights_path`) as `plan` says. The backbone description, the ONNX model
/// and the ViT checkpoint must be the ones the cache was extracted with.
pub(super) fn export_image(
    plan: &ExportPlan,
    rc: &RunConfig,
    image: &ImageInfo,
    weights_path: &Path,
) -> Result<ExportSummary> {
    let config_path = plan.run.join(run_dir::CONFIG_FILE);
    let bad_run = |message: String| -> Error {
        FitError::BadRun {
            path: config_path.clone(),
            message,
        }
        .into()
    };
    let dir = BackboneDir::open(&plan.backbone)?;
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
    let (overrides, trained): (F32Tensors, F32Tensors) = read_weights(weights_path)?
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
    let (seq, width) = methods::build(&mut body, &spec.method, &trained, &plan.run)?;
    let head = head_weights(&trained, spec.pool, width, spec.classes)?;
    let outputs = graph::append_image_head(body.g(), &seq, &head)?;
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
    let out_path = plan.out.join(MODEL_FILE);
    let keep = [graph::LOGITS.to_string(), graph::PROBABILITIES.to_string()];
    let bytes =
        crate::extract::onnx::edit::prune_to_outputs(&out_path, &bytes, &keep)?.unwrap_or(bytes);

    std::fs::create_dir_all(&plan.out).map_err(|e| Error::io(&plan.out, e))?;
    crate::fsutil::write_atomic(&out_path, &bytes)?;
    write_json(&plan.out.join(PREPROCESS_FILE), &recipe)?;
    write_json(&plan.out.join("labels.json"), &rc.labels)?;
    let text = readme::image_readme(
        rc,
        &method,
        INPUT,
        recipe.channels,
        recipe.size,
        image.patch_pool,
    );
    crate::fsutil::write_atomic(&plan.out.join("README.md"), text.as_bytes())?;
    Ok(ExportSummary {
        run_id: rc.run_id.clone(),
        method,
        classes: spec.classes,
        reads: seq,
        model: out_path,
        bytes: bytes.len() as u64,
    })
}

/// `value` as pretty JSON at `path`, written atomically.
fn write_json<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    crate::fsutil::write_atomic(path, &bytes)
}
