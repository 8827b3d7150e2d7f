//! What is checked before a run starts: the backbone is the one the cache
//! was made with, and the settings give a model this cache can feed.

use std::path::Path;

use super::config::FitConfig;
use super::model::ModelSpec;
use crate::backbone::{BackboneDir, BertConfig, Checkpoint};
use crate::cache::Cache;
use crate::fit::error::FitError;
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
pub fn model_spec(cfg: &FitConfig, cache: &Cache, bert: &BertConfig) -> Result<ModelSpec> {
    let m = cache.manifest();
    let n = bert.num_hidden_layers;
    let k = cfg.late_layers;
    if k == 0 || k > n {
        return Err(FitError::settings(format!(
            "--late-layers {k} must be between 1 and {n}"
        )));
    }
    let side_dim = cfg.side_dim.unwrap_or(bert.hidden_size / cfg.reduction);
    if side_dim == 0 {
        return Err(FitError::settings(format!(
            "side width {} / {} is 0",
            bert.hidden_size, cfg.reduction
        )));
    }
    let early = match &cfg.early_layers {
        Some(v) => v.clone(),
        None => m
            .settings
            .layers
            .iter()
            .copied()
            .filter(|&i| i <= n - k)
            .collect(),
    };
    Ok(ModelSpec {
        method: cfg.method,
        late_layers: k,
        late_trainable: cfg.late_trainable,
        side_dim,
        early_layers: early,
        probe_layer: cfg.probe_layer.unwrap_or(n),
        pool: cfg.pool,
        dropout: cfg.dropout,
        classes: m.labels.len(),
    })
}

/// Check that `backbone` is the one the cache was made with.
pub fn check_backbone(cache: &Cache, dir: &BackboneDir) -> Result<(BertConfig, Checkpoint)> {
    let m = cache.manifest();
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
    Ok((cfg, ckpt))
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
