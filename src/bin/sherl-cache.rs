//! `sherl-cache`: look into, check and combine feature caches.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::json;

use sherl::cache::manifest::{Manifest, MANIFEST};
use sherl::cache::Cache;
use sherl::cli::{init_output, main_wrapper, print_line, OutputArgs};
use sherl::extract::run::PARTIAL_MANIFEST;

/// Tools for sherl feature caches.
#[derive(Debug, Parser)]
#[command(name = "sherl-cache", version, about, long_about = None)]
struct Args {
    #[command(flatten)]
    output: OutputArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Summarise a cache: splits, tokens, layers, dtype, size, provenance.
    Inspect {
        /// Cache directory.
        cache: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Decode everything and check every checksum and invariant; exits 2
    /// naming the shard and frame at fault.
    Verify {
        /// Cache directory.
        cache: PathBuf,
    },
    /// Combine the partial caches of `sherl-extract run --shard-of I/N`
    /// workers into one cache (shards are hard-linked when possible, else copied).
    Merge {
        /// Worker output directories (each holds manifest.part.json).
        #[arg(required = true)]
        parts: Vec<PathBuf>,
        /// New cache directory (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    main_wrapper(|| {
        let args = Args::parse();
        init_output(&args.output);
        match args.command {
            Command::Inspect { cache, json } => inspect(&cache, json),
            Command::Verify { cache } => verify(&cache),
            Command::Merge { parts, out } => merge(&parts, &out),
        }
    })
}

fn inspect(dir: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let cache = Cache::open(dir)?;
    let m = cache.manifest();
    let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
    let raw = m.tokens * m.settings.layers.len() as u64 * m.backbone.hidden as u64 * 4;
    let summary = json!({
        "cache": dir,
        "format_version": m.format_version,
        "created_at": m.created_at,
        "examples": m.examples,
        "tokens": m.tokens,
        "layers": m.settings.layers,
        "hidden": m.backbone.hidden,
        "backbone_layers": m.backbone.num_layers,
        "dtype": m.settings.dtype.name(),
        "shuffle": m.settings.shuffle,
        "zstd_level": m.settings.zstd_level,
        "max_len": m.settings.max_len,
        "labels": m.labels,
        "splits": m.splits,
        "shards": m.shards.len(),
        "chunks": cache.chunks().len(),
        "bytes_on_disk": bytes,
        "raw_f32_bytes": raw,
        "ratio_to_raw_f32": bytes as f64 / raw.max(1) as f64,
        "bytes_per_token": bytes as f64 / m.tokens.max(1) as f64,
        "settings_hash": m.settings_hash,
        "provenance": {
            "onnx_sha256": m.backbone.onnx.sha256,
            "safetensors_sha256": m.backbone.safetensors.as_ref().map(|f| &f.sha256),
            "tokenizer_sha256": m.backbone.tokenizer.sha256,
            "checkpoint_prefix": m.backbone.checkpoint_prefix,
            "data": m.dataset.files,
            "dataset_options": m.dataset.options,
            "rows_read": m.dataset.rows_read,
            "skipped_bad_rows": m.dataset.skipped_bad_rows,
            "dropped_labels": m.dataset.dropped_labels,
            "sherl_version": m.sherl_version,
        },
    });
    if as_json {
        print_line(&summary.to_string())?;
        return Ok(ExitCode::SUCCESS);
    }
    let splits: Vec<String> = m.splits.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let text = format!(
        "cache       {}\nformat      v{} (sherl {}), created {}\nexamples    {} ({})\ntokens      {} (mean {:.1} per example)\nlabels      {}\nlayers      hidden_states {:?} of 0..={} (hidden {})\nencoding    {} (byte shuffle {}), zstd level {}, chunks of {} examples\nsize        {:.1} MB in {} shards / {} chunks = {:.1} bytes per token, {:.3} of raw f32 ({:.1} MB)\nbackbone    onnx {} / safetensors {} / tokenizer {}\ndata        {}",
        dir.display(),
        m.format_version,
        m.sherl_version,
        m.created_at,
        m.examples,
        splits.join(", "),
        m.tokens,
        m.tokens as f64 / m.examples.max(1) as f64,
        m.labels.join(", "),
        m.settings.layers,
        m.backbone.num_layers,
        m.backbone.hidden,
        m.settings.dtype.name(),
        if m.settings.shuffle { "on" } else { "off" },
        m.settings.zstd_level,
        m.settings.chunk_size,
        bytes as f64 / 1e6,
        m.shards.len(),
        cache.chunks().len(),
        bytes as f64 / m.tokens.max(1) as f64,
        bytes as f64 / raw.max(1) as f64,
        raw as f64 / 1e6,
        short(&m.backbone.onnx.sha256),
        m.backbone.safetensors.as_ref().map_or("-", |f| short(&f.sha256)),
        short(&m.backbone.tokenizer.sha256),
        m.dataset
            .files
            .iter()
            .map(|f| format!("{} ({})", f.path, short(&f.sha256)))
            .collect::<Vec<_>>()
            .join(", "),
    );
    print_line(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

fn verify(dir: &Path) -> anyhow::Result<ExitCode> {
    let t = std::time::Instant::now();
    let cache = Cache::open(dir)?;
    let n = cache.manifest().shards.len();
    let frames =
        cache.verify(|i, path| tracing::info!("shard {}/{n} ok: {}", i + 1, path.display()))?;
    let m = cache.manifest();
    print_line(
        &json!({
            "cache": dir,
            "ok": true,
            "shards": n,
            "frames": frames,
            "examples": m.examples,
            "tokens": m.tokens,
            "seconds": t.elapsed().as_secs_f64(),
        })
        .to_string(),
    )?;
    Ok(ExitCode::SUCCESS)
}

fn merge(parts: &[PathBuf], out: &Path) -> anyhow::Result<ExitCode> {
    let mut manifests = Vec::new();
    for p in parts {
        let m = Manifest::read(&p.join(PARTIAL_MANIFEST)).with_context(|| {
            format!(
                "{}: not a finished worker part (no {PARTIAL_MANIFEST})",
                p.display()
            )
        })?;
        manifests.push((p.clone(), m));
    }
    let (first_dir, first) = &manifests[0];
    let Some(w0) = first.worker else {
        bail!("{}: not a worker part", first_dir.display());
    };
    let mut by_index = BTreeMap::new();
    let mut seen_workers = BTreeMap::new();
    for (dir, m) in &manifests {
        if m.settings_hash != first.settings_hash {
            bail!(
                "{} was extracted with different settings than {} (settings_hash {} vs {}); refusing to merge",
                dir.display(),
                first_dir.display(),
                &m.settings_hash[..12],
                &first.settings_hash[..12]
            );
        }
        let w = m.worker.context("a part without worker information")?;
        if w.count != w0.count {
            bail!(
                "{}: worker of {} parts, others of {}",
                dir.display(),
                w.count,
                w0.count
            );
        }
        if let Some(other) = seen_workers.insert(w.index, dir.clone()) {
            bail!(
                "{} and {} are both worker {}",
                other.display(),
                dir.display(),
                w.index
            );
        }
        for s in &m.shards {
            if by_index.insert(s.index, (dir.clone(), s.clone())).is_some() {
                bail!("shard {} appears in more than one part", s.index);
            }
        }
    }
    if seen_workers.len() != w0.count as usize {
        let missing: Vec<String> = (0..w0.count)
            .filter(|i| !seen_workers.contains_key(i))
            .map(|i| i.to_string())
            .collect();
        bail!(
            "missing worker part(s) {} of {}",
            missing.join(", "),
            w0.count
        );
    }
    // The whole cache's size, from the split counts every part carries
    // (each part's own `examples` covers only its shards).
    let total: u64 = first.splits.values().sum();
    let n_shards = total.div_ceil(first.settings.examples_per_shard) as u32;
    if let Some(k) = (0..n_shards).find(|k| !by_index.contains_key(k)) {
        bail!("shard {k} is missing from the parts");
    }
    if let Some(k) = by_index.keys().find(|&&k| k >= n_shards) {
        bail!("shard {k} is beyond the {n_shards} shards the split counts imply");
    }
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        bail!("{}: must not exist or be empty", out.display());
    }
    std::fs::create_dir_all(out.join("shards"))
        .with_context(|| format!("{}: cannot create", out.display()))?;
    let mut shards = Vec::new();
    for (_, (dir, s)) in by_index {
        let src = dir.join(&s.file);
        let dst = out.join(&s.file);
        // Check each shard before taking it.
        sherl::cache::open_shard(&src)?;
        if std::fs::hard_link(&src, &dst).is_err() {
            let tmp = dst.with_extension("shrd.tmp");
            std::fs::copy(&src, &tmp)
                .with_context(|| format!("copy {} -> {}", src.display(), tmp.display()))?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &dst)?;
        }
        shards.push(s);
    }
    let mut m = first.clone();
    m.worker = None;
    m.examples = shards.iter().map(|s| s.examples).sum();
    m.tokens = shards.iter().map(|s| s.tokens).sum();
    m.shards = shards;
    m.created_at = sherl::cache::manifest::now_rfc3339();
    sherl::fsutil::write_atomic(&out.join(MANIFEST), &serde_json::to_vec_pretty(&m)?)?;
    // Open it as a reader would, so a bad merge never looks like a cache.
    let cache = Cache::open(out)?;
    print_line(
        &json!({
            "cache": out,
            "parts": parts.len(),
            "shards": cache.manifest().shards.len(),
            "examples": cache.manifest().examples,
            "tokens": cache.manifest().tokens,
        })
        .to_string(),
    )?;
    Ok(ExitCode::SUCCESS)
}
