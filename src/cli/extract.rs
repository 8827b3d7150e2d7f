//! `sherl-extract run` as a library function: the parsed flags
//! ([`super::extract_args::RunArgs`]) in, the JSON line the command prints
//! on stdout out, so that the binary and the Python package
//! (`sherl.extract`) run the same code with the same defaults and errors.
//! Logs and the progress bar go to stderr, as the binary's do.

use super::extract_args::RunArgs;
use super::OutputArgs;
use crate::cache::manifest::{ExtractSettings, WorkerInfo};
use crate::data::image::ImageOptions;
use crate::extract::runtime;
use crate::extract::{ExtractPlan, ImagePlan};

/// `sherl-extract run`: run the backbone over the dataset and write the
/// feature cache in `--out`. Returns the summary JSON line.
pub fn run(a: RunArgs, output: &OutputArgs) -> anyhow::Result<String> {
    let worker = a
        .shard_of
        .as_deref()
        .map(|s| WorkerInfo::parse("--shard-of", s))
        .transpose()?;
    let plan = ExtractPlan {
        model: a
            .model
            .clone()
            .unwrap_or_else(|| a.backbone.join("model.onnx")),
        backbone: a.backbone,
        out: a.out,
        dataset: a.data.to_plan()?,
        layers: a.layers,
        settings: ExtractSettings {
            layers: Vec::new(),
            late_layers: a.late_layers,
            dtype: a.dtype,
            shuffle: !a.no_shuffle,
            zstd_level: a.zstd_level,
            chunk_size: a
                .chunk_size
                .unwrap_or(ExtractSettings::default().chunk_size),
            examples_per_shard: a.examples_per_shard,
            max_len: a.max_len,
            max_tokens_per_batch: a.max_tokens_per_batch,
            max_batch: a.max_batch,
        },
        resume: a.resume,
        worker,
        compress_threads: a.compress_threads,
        session: a.runtime.session_config(),
        image: ImagePlan {
            options: ImageOptions {
                image_column: a.image_column.parse()?,
                idx_label_names: match &a.class_names {
                    Some(p) => crate::data::image::read_class_names(p)?,
                    None => Vec::new(),
                },
                ..ImageOptions::default()
            },
            preprocess: a.preprocess,
            patch_pool: a.patch_pool,
            chunk_size: a.chunk_size,
        },
    };
    let rt = runtime::init_for(a.runtime.ort_lib.as_deref(), a.runtime.device)?;
    let bar = super::progress::ExtractBar::new(output.progress());
    let summary = crate::extract::run::run(rt, &plan, &bar)?;
    tracing::info!(
        "{} examples, {} tokens -> {} ({:.1} MB, {:.3} of raw f32) in {:.1}s",
        summary.examples,
        summary.tokens,
        summary.cache.display(),
        summary.bytes_on_disk as f64 / 1e6,
        summary.bytes_on_disk as f64 / summary.raw_f32_bytes.max(1) as f64,
        summary.seconds
    );
    Ok(serde_json::to_string(&summary)?)
}
