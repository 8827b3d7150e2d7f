//! `sherl-cache`: look into, check and combine feature caches.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;

use sherl::cache::Cache;
use sherl::cli::{init_output, main_wrapper, print_line, OutputArgs};
use sherl::hash::abbrev;

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
    /// Compare two caches of the same examples value by value (e.g. one
    /// extracted on a GPU against one from the CPU). Prints one JSON object;
    /// exits 1 when a value is outside the tolerance, 2 when the caches hold
    /// different examples. A value passes when |a-b| <= steps x step + atol,
    /// `step` being the spacing of the coarser storage type at that value
    /// (one f16 ulp for f16 caches).
    Compare {
        /// Reference cache.
        a: PathBuf,
        /// Cache compared with it.
        b: PathBuf,
        /// Storage steps allowed.
        #[arg(long, default_value_t = 2.0)]
        steps: f32,
        /// Absolute slack.
        #[arg(long, default_value_t = 1e-4)]
        atol: f32,
    },
    /// Combine the partial caches of `sherl-extract run --shard-of I/N`
    /// workers into one cache (shards are hard-linked when possible, else
    /// copied). Everything is checked first and the cache is assembled in a
    /// temporary directory renamed to --out at the end: a failed merge leaves
    /// nothing behind.
    Merge {
        /// Worker output directories (each holds manifest.part.json).
        #[arg(required = true)]
        parts: Vec<PathBuf>,
        /// New cache directory (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the cache's examples as NumPy .npy files for other frameworks:
    /// hidden_states.{i}.npy ([tokens, hidden], the real tokens of every
    /// example in cache order; float16 for f16 caches, else float32),
    /// offsets.npy, labels.npy (-1: none), splits.npy, input_ids.npy,
    /// token_type_ids.npy (int64; text caches only) and meta.json. Written to a temporary
    /// directory renamed to --out at the end.
    Export {
        /// Cache directory.
        cache: PathBuf,
        /// New directory (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Stored layers to export: `all` or indices and ranges (0-5,6).
        #[arg(long, default_value = "all")]
        layers: String,
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
            Command::Compare { a, b, steps, atol } => compare(&a, &b, steps, atol),
            Command::Export { cache, out, layers } => export(&cache, &out, &layers),
        }
    })
}

fn inspect(dir: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let cache = Cache::open(dir)?;
    let m = cache.manifest();
    let bytes: u64 = m.shards.iter().fold(0u64, |a, s| a.saturating_add(s.bytes));
    let raw = m.raw_f32_bytes();
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
            "tokenizer_sha256": m.backbone.tokenizer.as_ref().map(|f| &f.sha256),
            "image": m.image,
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
        abbrev(&m.backbone.onnx.sha256),
        m.backbone.safetensors.as_ref().map_or("-", |f| abbrev(&f.sha256)),
        m.backbone.tokenizer.as_ref().map_or("-", |f| abbrev(&f.sha256)),
        m.dataset
            .files
            .iter()
            .map(|f| format!("{} ({})", f.path, abbrev(&f.sha256)))
            .collect::<Vec<_>>()
            .join(", "),
    );
    print_line(&text)?;
    Ok(ExitCode::SUCCESS)
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

fn compare(a: &Path, b: &Path, steps: f32, atol: f32) -> anyhow::Result<ExitCode> {
    let (ca, cb) = (Cache::open(a)?, Cache::open(b)?);
    let tol = sherl::cache::compare::Tolerance { steps, atol };
    let r = sherl::cache::compare::compare(&ca, &cb, tol)?;
    print_line(&serde_json::to_string(&r)?)?;
    if r.ok() {
        Ok(ExitCode::SUCCESS)
    } else {
        tracing::warn!(
            "{} of {} values differ by more than {steps} steps + {atol}",
            r.outside,
            r.values
        );
        Ok(ExitCode::from(1))
    }
}

fn export(dir: &Path, out: &Path, layers: &str) -> anyhow::Result<ExitCode> {
    let t = std::time::Instant::now();
    let cache = Cache::open(dir)?;
    let layers = sherl::cache::export::parse_layer_list(layers)
        .map_err(|m| sherl::Error::setting("--layers", m))?;
    let s = sherl::cache::export::export(&cache, out, layers.as_deref())?;
    let mut v = serde_json::to_value(&s)?;
    v["seconds"] = json!(t.elapsed().as_secs_f64());
    print_line(&v.to_string())?;
    Ok(ExitCode::SUCCESS)
}

fn merge(parts: &[PathBuf], out: &Path) -> anyhow::Result<ExitCode> {
    let summary = sherl::cache::merge::merge(parts, out)?;
    print_line(
        &json!({
            "cache": summary.cache,
            "parts": summary.parts,
            "shards": summary.shards,
            "examples": summary.examples,
            "tokens": summary.tokens,
        })
        .to_string(),
    )?;
    Ok(ExitCode::SUCCESS)
}
