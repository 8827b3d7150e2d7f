//! What is checked before a run starts: the backbone is the one the cache
//! was made with, and the settings give a model this cache can feed.

use std::path::Path;

use super::config::FitConfig;
use super::method::ResolveOn;
use super::model::{Arch, ModelSpec, Pool};
use crate::backbone::{BackboneDir, BertConfig, Checkpoint};
use crate::cache::Cache;
use crate::fit::error::FitError;
use crate::fit::nn::vit_layer::VitLayerConfig;
use crate::Result;

pub(super) fn split_id(cache: &Cache, names: &[&str]) -> Option<u32> {
    let m = cache.manifest();
    m.split_names
        .iter()
        .position(|n| names.contains(&n.as_str()))
        .filter(|&i| m.splits.get(&m.split_names[i]).copied().unwrap_or(0) > 0)
        .map(|i| i as u32)
}

/// Resolve the model spec for `cfg` on this cache.
pub fn model_spec(cfg: &FitConfig, cache: &Cache, arch: &Arch) -> Result<ModelSpec> {
    let m = cache.manifest();
    if cfg.pool == Pool::PatchMean {
        match &m.image {
            None => {
                return Err(FitError::settings(format!(
                    "--pool patch-mean averages the patch tokens of an image cache, but {} \
                     holds text; use --pool mean or cls",
                    cache.dir().display()
                )))
            }
            Some(image) if !image.cls_token => {
                return Err(FitError::settings(format!(
                    "--pool patch-mean leaves out the CLS token, but the images of {} have \
                     none; --pool mean already averages the patch tokens alone",
                    cache.dir().display()
                )))
            }
            Some(_) => {}
        }
    }
    let on = ResolveOn {
        layers: arch.num_layers(),
        hidden: arch.hidden(),
        cached: &m.settings.layers,
    };
    Ok(ModelSpec {
        method: cfg.method.resolve(&on)?,
        pool: cfg.pool,
        classes: m.labels.len(),
    })
}

/// Check that `backbone` is the one the cache was made with.
pub fn check_backbone(cache: &Cache, dir: &BackboneDir) -> Result<(Arch, Checkpoint)> {
    let m = cache.manifest();
    if m.image.is_some() || dir.is_image() {
        return check_image_backbone(cache, dir);
    }
    let cfg = dir.config()?;
    let ckpt = Checkpoint::open(&dir.safetensors_path())?;
    if let Some(want) = &m.backbone.safetensors {
        let got = ckpt.sha256();
        if got != want.sha256 {
            return Err(FitError::backbone(format!(
                "{}: sha256 {} differs from the one the cache {} was extracted with ({}); use the same backbone",
                dir.safetensors_path().display(),
                &got[..12],
                cache.dir().display(),
                &want.sha256[..12]
            )));
        }
    }
    check_config(
        &cfg,
        m.backbone.config.as_ref(),
        &dir.config_path(),
        cache.dir(),
    )?;
    if cfg.num_hidden_layers != m.backbone.num_layers || cfg.hidden_size != m.backbone.hidden {
        return Err(FitError::backbone(format!(
            "{}: {} layers x {} hidden, but the cache was made by a backbone with {} x {}",
            dir.config_path().display(),
            cfg.num_hidden_layers,
            cfg.hidden_size,
            m.backbone.num_layers,
            m.backbone.hidden
        )));
    }
    Ok((Arch::Bert(cfg), ckpt))
}

/// [`check_backbone`] for an image cache: the backbone directory is an
/// image backbone whose `backbone.json` and `model.safetensors` (the ViT
/// weights `sherl-extract` took from the ONNX initializers) are the files
/// the cache was extracted with; the block sizes are the manifest's
/// `backbone.config`. Training never parses ONNX.
fn check_image_backbone(cache: &Cache, dir: &BackboneDir) -> Result<(Arch, Checkpoint)> {
    let m = cache.manifest();
    let Some(image) = &m.image else {
        return Err(FitError::backbone(format!(
            "{} is an image backbone, but the cache {} holds text",
            dir.root().display(),
            cache.dir().display()
        )));
    };
    if !dir.is_image() {
        return Err(FitError::backbone(format!(
            "the cache {} holds images, but {} has no backbone.json (not an image backbone)",
            cache.dir().display(),
            dir.root().display()
        )));
    }
    let same = |path: &Path, want: &str, what: &str| -> Result<()> {
        let got = crate::fsutil::sha256_path(path)?;
        if got != want {
            return Err(FitError::backbone(format!(
                "{}: sha256 {} differs from the {what} the cache {} was extracted with ({}); use the same backbone",
                path.display(),
                crate::hash::abbrev(&got),
                cache.dir().display(),
                crate::hash::abbrev(want)
            )));
        }
        Ok(())
    };
    let desc_path = dir.description_path();
    same(&desc_path, &image.description.sha256, "backbone.json")?;
    let Some(want) = &m.backbone.safetensors else {
        return Err(FitError::backbone(format!(
            "the cache {} records no ViT checkpoint; re-extract it with this sherl",
            cache.dir().display()
        )));
    };
    let ckpt_path = dir.safetensors_path();
    same(&ckpt_path, &want.sha256, "ViT checkpoint")?;
    let ckpt = Checkpoint::open_vit(&ckpt_path)?;
    let cfg: VitLayerConfig = m
        .backbone
        .config
        .clone()
        .and_then(|c| serde_json::from_value(c).ok())
        .ok_or_else(|| {
            FitError::cache_lacks(format!(
                "{}: the manifest's backbone.config does not hold the ViT block sizes",
                cache.dir().display()
            ))
        })?;
    if cfg.hidden_size != m.backbone.hidden {
        return Err(FitError::cache_lacks(format!(
            "{}: backbone.config says width {}, backbone.hidden {}",
            cache.dir().display(),
            cfg.hidden_size,
            m.backbone.hidden
        )));
    }
    let layers = m.backbone.num_layers;
    Ok((Arch::Vit { cfg, layers }, ckpt))
}

/// Refuse a backbone `config.json` that differs from the one recorded when
/// the cache was extracted (`recorded`, the manifest's `backbone.config`),
/// naming the fields that differ: the late layers and the full model are
/// built from it, so 6 heads instead of 12, or another activation, would
/// silently compute something else on the same cache. A cache extracted
/// without a config (a user's ONNX model) has nothing to compare.
pub fn check_config(
    cfg: &BertConfig,
    recorded: Option<&serde_json::Value>,
    config_path: &Path,
    cache_dir: &Path,
) -> Result<()> {
    let Some(recorded) = recorded else {
        return Ok(());
    };
    let now = serde_json::to_value(cfg).expect("config serializes");
    let (Some(now), Some(then)) = (now.as_object(), recorded.as_object()) else {
        return Ok(());
    };
    let null = serde_json::Value::Null;
    let mut keys: Vec<&String> = now.keys().chain(then.keys()).collect();
    keys.sort();
    keys.dedup();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter_map(|k| {
            let (a, b) = (now.get(k).unwrap_or(&null), then.get(k).unwrap_or(&null));
            (a != b).then(|| format!("{k} is {a} here, {b} in the cache"))
        })
        .collect();
    if diffs.is_empty() {
        return Ok(());
    }
    Err(FitError::backbone(format!(
        "{}: differs from the config.json the cache {} was extracted with ({}); use the same backbone",
        config_path.display(),
        cache_dir.display(),
        diffs.join("; ")
    )))
}
