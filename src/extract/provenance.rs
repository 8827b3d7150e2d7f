//! Stage three of `sherl-extract run`: what the cache records about where
//! it came from (FORMAT.md §5): the backbone's and dataset's files with
//! their sha256, the reading options, and the settings hash that decides
//! whether two extractions wrote the same bytes.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use super::order::CacheOrder;
use crate::backbone::{BackboneDir, BertConfig};
use crate::cache::format::{IMAGE_SHARD_FORMAT_VERSION, SHARD_FORMAT_VERSION};
use crate::cache::manifest::{
    BackboneInfo, DatasetInfo, ExtractSettings, FileInfo, ImageInfo, Manifest, WorkerInfo,
};
use crate::cache::FORMAT_VERSION;
use crate::data::{DatasetPlan, LoadReport, SplitSource};
use crate::Result;

/// A file and its sha256.
pub fn file_info(path: &Path) -> Result<FileInfo> {
    Ok(FileInfo {
        path: path.display().to_string(),
        sha256: crate::fsutil::sha256_path(path)?,
    })
}

/// The backbone's files: the ONNX model run, its checkpoint (when the
/// directory has one) and tokenizer, its config and size.
pub fn backbone_info(
    dir: &BackboneDir,
    model: &Path,
    config: Option<&BertConfig>,
    num_layers: usize,
    hidden: usize,
) -> Result<BackboneInfo> {
    let ckpt_path = dir.safetensors_path();
    let (safetensors, prefix) = if ckpt_path.exists() {
        let ck = crate::backbone::Checkpoint::open(&ckpt_path)?;
        (
            Some(FileInfo {
                path: ckpt_path.display().to_string(),
                sha256: ck.sha256(),
            }),
            Some(ck.prefix().to_string()),
        )
    } else {
        (None, None)
    };
    Ok(BackboneInfo {
        onnx: file_info(model)?,
        safetensors,
        tokenizer: Some(file_info(&dir.tokenizer_path())?),
        checkpoint_prefix: prefix,
        config: config.map(|c| serde_json::to_value(c).expect("config serializes")),
        num_layers,
        hidden,
    })
}

/// A dataset input and its fingerprint ([`crate::data::fingerprint`]:
/// for a folder dataset, exactly the files its reader reads).
fn dataset_file_info(path: &Path) -> Result<FileInfo> {
    Ok(FileInfo {
        path: path.display().to_string(),
        sha256: crate::data::fingerprint(path)?,
    })
}

/// The dataset's files and the options that decide which rows are read.
pub fn dataset_info(plan: &DatasetPlan, report: &LoadReport) -> Result<DatasetInfo> {
    let mut files = Vec::new();
    match &plan.source {
        SplitSource::Files(fs) => {
            for (_, p) in fs {
                files.push(dataset_file_info(p)?);
            }
        }
        SplitSource::Single { path, .. } => files.push(dataset_file_info(path)?),
    }
    Ok(DatasetInfo {
        files,
        options: dataset_options(plan),
        rows_read: report.rows_read,
        skipped_bad_rows: report.skipped_bad_rows,
        dropped_labels: report.dropped_labels.clone(),
    })
}

/// The dataset keys of [`DatasetInfo::options`] that hold a column.
const COLUMN_KEYS: [&str; 5] = [
    "text_column",
    "text_pair_column",
    "label_column",
    "id_column",
    "group_column",
];

/// `dataset.options` as the manifest records them: columns as JSON strings
/// (names) or numbers (0-based indices), `null` when not set.
fn dataset_options(plan: &DatasetPlan) -> serde_json::Value {
    let r = &plan.read;
    let col = |c: &Option<crate::data::Column>| json!(c);
    let split = match &plan.source {
        SplitSource::Files(files) => {
            json!({ "files": files.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>() })
        }
        SplitSource::Single { split: None, .. } => json!("all rows are 'train'"),
        SplitSource::Single { split: Some(s), .. } => {
            json!({ "fractions": s.fractions, "seed": s.seed })
        }
    };
    let mut options = json!({
        "format": r.format.to_string(),
        "has_header": r.has_header,
        "encoding": r.encoding.to_string(),
        "text_column": json!(r.text_column),
        "text_pair_column": col(&r.text_pair_column),
        "label_column": col(&r.label_column),
        "id_column": col(&r.id_column),
        "group_column": col(&r.group_column),
        "skip_bad_rows": r.skip_bad_rows,
        "labels": plan.labels,
        "split": split,
    });
    // Reading choices that change which rows are read; recorded only when
    // not the default, so caches written before they existed keep their hash.
    if r.tsv_quotes {
        options["tsv_quotes"] = json!(true);
    }
    if r.limits != crate::data::ReadLimits::default() {
        options["limits"] = json!({
            "max_line_bytes": r.limits.max_line_bytes,
            "max_quoted_lines": r.limits.max_quoted_lines,
            "max_quoted_bytes": r.limits.max_quoted_bytes,
        });
    }
    options
}

/// `options` with each column in the spelling the first manifests used
/// (`` `name` ``, `#index`), which the settings hash is computed over so
/// that caches written before columns were stored plainly keep their hash
/// (and `--resume`, `merge` and run ids keep working across the change).
fn hash_spelling(options: &serde_json::Value) -> serde_json::Value {
    let mut options = options.clone();
    for key in COLUMN_KEYS {
        let spelt = match &options[key] {
            serde_json::Value::String(name) => json!(format!("`{name}`")),
            serde_json::Value::Number(i) => json!(format!("#{i}")),
            _ => continue,
        };
        options[key] = spelt;
    }
    options
}

/// sha256 hex of the canonical JSON of what determines the cache's bytes.
pub fn settings_hash(
    backbone: &BackboneInfo,
    dataset: &DatasetInfo,
    settings: &ExtractSettings,
    image: Option<&ImageInfo>,
) -> String {
    if let Some(image) = image {
        // An image cache (FORMAT.md §5.1, version 3): the image shard
        // layout's version, no tokenizer, and the whole image record (the
        // recipe, the pooling) folded in.
        let canon = json!({
            "format_version": IMAGE_SHARD_FORMAT_VERSION,
            "backbone": {
                "onnx": backbone.onnx.sha256,
                "safetensors": backbone.safetensors.as_ref().map(|f| f.sha256.clone()),
                "tokenizer": null,
                "config": backbone.config,
            },
            "dataset": {
                "files": dataset.files.iter().map(|f| f.sha256.clone()).collect::<Vec<_>>(),
                "options": hash_spelling(&dataset.options),
            },
            "settings": settings,
            "image": {
                "description": image.description.sha256,
                "input": image.input,
                "preprocess": image.preprocess,
                "preprocess_sha256": image.preprocess_sha256,
                "backbone_tokens": image.backbone_tokens,
                "cls_token": image.cls_token,
                "patch_pool": image.patch_pool,
                "tokens": image.tokens,
            },
        });
        return crate::hash::sha256_hex(canon.to_string().as_bytes());
    }
    let canon = json!({
        // The shard layout's version, so the hash (and the shard headers that
        // carry it) stay those of format version 1 (FORMAT.md §5.1).
        "format_version": SHARD_FORMAT_VERSION,
        "backbone": {
            "onnx": backbone.onnx.sha256,
            "safetensors": backbone.safetensors.as_ref().map(|f| f.sha256.clone()),
            "tokenizer": backbone.tokenizer.as_ref().map(|f| f.sha256.clone()),
            "config": backbone.config,
        },
        "dataset": {
            "files": dataset.files.iter().map(|f| f.sha256.clone()).collect::<Vec<_>>(),
            "options": hash_spelling(&dataset.options),
        },
        "settings": settings,
    });
    crate::hash::sha256_hex(canon.to_string().as_bytes())
}

/// The manifest of the cache to write, before any shard: `shards` empty,
/// `examples`/`tokens` those of the whole cache (a worker's
/// [`crate::cache::writer::CacheWriter::finish`] narrows them to its part).
pub fn manifest(
    backbone: BackboneInfo,
    dataset: DatasetInfo,
    settings: ExtractSettings,
    labels: Vec<String>,
    order: &CacheOrder,
    worker: Option<WorkerInfo>,
    image: Option<ImageInfo>,
) -> Manifest {
    let hash = settings_hash(&backbone, &dataset, &settings, image.as_ref());
    let mut splits = BTreeMap::new();
    for e in &order.examples {
        *splits
            .entry(order.split_names[e.split as usize].clone())
            .or_insert(0u64) += 1;
    }
    Manifest {
        format_version: FORMAT_VERSION,
        sherl_version: env!("CARGO_PKG_VERSION").into(),
        created_at: String::new(),
        settings_hash: hash,
        manifest_sha256: None, // set when written (Manifest::write)
        settings,
        backbone,
        dataset,
        labels,
        split_names: order.split_names.clone(),
        splits,
        examples: order.examples.len() as u64,
        tokens: order.tokens(),
        worker,
        shards: Vec::new(),
        image,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Column, ReadOptions, SplitSource};

    /// The manifest stores columns plainly; the settings hash still sees
    /// the first manifests' spelling, so existing caches keep their hash.
    #[test]
    fn columns_are_plain_in_the_manifest_and_hashed_as_before() {
        let plan = DatasetPlan {
            source: SplitSource::Single {
                path: "d.csv".into(),
                split: None,
            },
            read: ReadOptions {
                label_column: Some(Column::Name("category".into())),
                group_column: Some(Column::Index(2)),
                ..ReadOptions::default()
            },
            labels: None,
        };
        let options = dataset_options(&plan);
        assert_eq!(options["text_column"], json!("text"));
        assert_eq!(options["label_column"], json!("category"));
        assert_eq!(options["group_column"], json!(2));
        assert_eq!(options["id_column"], serde_json::Value::Null);
        let hashed = hash_spelling(&options);
        assert_eq!(hashed["text_column"], json!("`text`"));
        assert_eq!(hashed["label_column"], json!("`category`"));
        assert_eq!(hashed["group_column"], json!("#2"));
        assert_eq!(hashed["id_column"], serde_json::Value::Null);
        assert_eq!(hashed["format"], options["format"]);
    }
}
