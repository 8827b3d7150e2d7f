//! `sherl-extract run`: tokenize a dataset, run the backbone in
//! length-bucketed batches, and write the feature cache.
//!
//! Pipeline per shard: the calling thread batches consecutive examples
//! (the cache stores examples ordered by split, then length, so consecutive
//! examples have similar lengths and batches need little padding), runs ONNX
//! Runtime, strips padding and fills chunk buffers; full chunks go through a
//! bounded queue to compression threads, and a writer thread appends them in
//! order to the shard's temporary file. Queues are bounded, so peak memory is
//! set by the settings (batch budget, chunk size, threads), not by the
//! dataset's size. Shards are sealed by rename; `manifest.json` is written
//! last. `--resume` keeps every sealed shard whose header matches the
//! settings and recomputes the rest; each shard's content depends only on the
//! settings and its examples, so the result equals an uninterrupted run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::backbone::BackboneDir;
use crate::batching::{batch_ranges, real_rows, real_rows_slice, PaddedBatch};
use crate::cache::format::SHARD_FORMAT_VERSION;
use crate::cache::manifest::{
    short_hash, BackboneInfo, DatasetInfo, ExtractSettings, FileInfo, Manifest, ShardInfo,
    WorkerInfo, MANIFEST, PENDING,
};
use crate::cache::shard::{compress_chunk, CompressedChunk, ExampleMeta, ShardSpec, ShardWriter};
use crate::cache::{shard_file_name, FORMAT_VERSION};
use crate::data::{DatasetPlan, SplitSource};
use crate::runtime::{BackboneSession, Runtime, SessionConfig};
use crate::tokenize::{Encoded, Tokenizer};
use crate::{Error, Result};

/// Which stored layers to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerChoice {
    /// What SHERL needs for `late_layers` K: `hidden_states.0 ..= N-K`.
    Default,
    /// Every hidden state `0..=N`.
    All,
    /// An explicit list.
    List(Vec<usize>),
}

impl std::str::FromStr for LayerChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "default" | "sherl" => Ok(LayerChoice::Default),
            "all" => Ok(LayerChoice::All),
            _ => {
                let mut v = Vec::new();
                for part in s.split(',') {
                    if let Some((a, b)) = part.split_once('-') {
                        let (a, b): (usize, usize) = (
                            a.trim()
                                .parse()
                                .map_err(|_| format!("bad layer range '{part}'"))?,
                            b.trim()
                                .parse()
                                .map_err(|_| format!("bad layer range '{part}'"))?,
                        );
                        if a > b {
                            return Err(format!("bad layer range '{part}'"));
                        }
                        v.extend(a..=b);
                    } else {
                        v.push(part.trim().parse().map_err(|_| {
                            format!(
                                "bad layer '{part}' (expected all, default, or a list like 0-5,6)"
                            )
                        })?);
                    }
                }
                v.sort_unstable();
                v.dedup();
                Ok(LayerChoice::List(v))
            }
        }
    }
}

/// Everything `run` needs, validated by the binary.
#[derive(Debug, Clone)]
pub struct ExtractPlan {
    /// Backbone directory (tokenizer.json, config.json, model.safetensors).
    pub backbone: PathBuf,
    /// ONNX model (default `BACKBONE/model.onnx`).
    pub model: PathBuf,
    /// Output cache directory.
    pub out: PathBuf,
    /// Dataset to read.
    pub dataset: DatasetPlan,
    /// Layer choice.
    pub layers: LayerChoice,
    /// Settings (its `layers` field is filled in by `run`).
    pub settings: ExtractSettings,
    /// Continue an interrupted extraction.
    pub resume: bool,
    /// `--shard-of I/N`.
    pub worker: Option<WorkerInfo>,
    /// Compression threads.
    pub compress_threads: usize,
    /// ONNX Runtime session settings.
    pub session: SessionConfig,
}

/// Progress callbacks (the binary draws them; the library never prints).
pub trait ExtractReporter: Sync {
    /// Work to do: examples and tokens this process will run.
    fn start(&self, examples: u64, tokens: u64);
    /// `examples`/`tokens` more were run.
    fn advance(&self, examples: u64, tokens: u64);
    /// A line for the user (device choice, skipped shards...).
    fn note(&self, message: &str);
    /// Done.
    fn finish(&self);
}

/// A reporter that reports nothing.
#[derive(Debug, Default)]
pub struct Silent;

impl ExtractReporter for Silent {
    fn start(&self, _: u64, _: u64) {}
    fn advance(&self, _: u64, _: u64) {}
    fn note(&self, message: &str) {
        tracing::info!("{message}");
    }
    fn finish(&self) {}
}

/// What `run` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExtractSummary {
    /// Cache directory.
    pub cache: PathBuf,
    /// Examples in the cache (or this worker's part).
    pub examples: u64,
    /// Real tokens.
    pub tokens: u64,
    /// Stored layers.
    pub layers: Vec<usize>,
    /// Shards written by this process.
    pub shards_written: usize,
    /// Shards kept from an earlier run (`--resume`).
    pub shards_resumed: usize,
    /// Bytes of all shards.
    pub bytes_on_disk: u64,
    /// tokens x layers x hidden x 4.
    pub raw_f32_bytes: u64,
    /// Real tokens run through the backbone by this process.
    pub tokens_run: u64,
    /// Token slots including padding run by this process.
    pub padded_tokens_run: u64,
    /// Seconds spent.
    pub seconds: f64,
    /// Device used.
    pub device: String,
    /// Whether this is a partial (worker) cache.
    pub partial: bool,
}

/// A tokenized example in cache order.
struct Item {
    meta: ExampleMeta,
}

/// Canonical split order: train, valid/validation/dev, test, then others
/// (the order of examples in a cache).
pub fn split_rank(name: &str) -> (u8, String) {
    let r = match name {
        "train" => 0,
        "valid" | "validation" | "dev" | "val" => 1,
        "test" => 2,
        _ => 3,
    };
    (r, name.to_string())
}

fn file_info(path: &Path) -> Result<FileInfo> {
    Ok(FileInfo {
        path: path.display().to_string(),
        sha256: crate::fsutil::sha256_path(path)?,
    })
}

fn dataset_options(plan: &DatasetPlan) -> serde_json::Value {
    let r = &plan.read;
    let col = |c: &Option<crate::data::Column>| c.as_ref().map(|c| c.to_string());
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
        "text_column": r.text_column.to_string(),
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

/// sha256 hex of the canonical JSON of what determines the cache's bytes.
fn settings_hash(
    backbone: &BackboneInfo,
    dataset: &DatasetInfo,
    settings: &ExtractSettings,
) -> String {
    let canon = json!({
        // The shard layout's version, so the hash (and the shard headers that
        // carry it) stay those of format version 1 (FORMAT.md §5.1).
        "format_version": SHARD_FORMAT_VERSION,
        "backbone": {
            "onnx": backbone.onnx.sha256,
            "safetensors": backbone.safetensors.as_ref().map(|f| f.sha256.clone()),
            "tokenizer": backbone.tokenizer.sha256,
            "config": backbone.config,
        },
        "dataset": {
            "files": dataset.files.iter().map(|f| f.sha256.clone()).collect::<Vec<_>>(),
            "options": dataset.options,
        },
        "settings": settings,
    });
    crate::backbone::hex_digest(&Sha256::digest(canon.to_string().as_bytes()))
}

/// Run the extraction described by `plan`.
pub fn run(
    rt: &Runtime,
    plan: &ExtractPlan,
    reporter: &dyn ExtractReporter,
) -> Result<ExtractSummary> {
    let t0 = std::time::Instant::now();
    let s = &plan.settings;
    if s.chunk_size == 0
        || s.examples_per_shard == 0
        || s.max_tokens_per_batch == 0
        || s.max_batch == 0
    {
        return Err(Error::Config(
            "--chunk-size, --examples-per-shard, --max-tokens-per-batch and --max-batch must be positive".into(),
        ));
    }
    if !(-7..=22).contains(&s.zstd_level) {
        return Err(Error::Config(format!(
            "--zstd-level {} is outside -7..=22",
            s.zstd_level
        )));
    }
    if plan.out.join(MANIFEST).exists() {
        return Err(Error::Config(format!(
            "{}: already a complete cache (manifest.json exists); choose another --out or delete it",
            plan.out.display()
        )));
    }
    let dir = BackboneDir::open(&plan.backbone)?;
    let config = if dir.config_path().exists() {
        Some(dir.config()?)
    } else {
        None
    };
    if let Some(c) = &config {
        if s.max_len > c.max_position_embeddings {
            return Err(Error::Config(format!(
                "--max-len {} exceeds the backbone's max_position_embeddings {}",
                s.max_len, c.max_position_embeddings
            )));
        }
    }
    let tokenizer = Tokenizer::from_file(&dir.tokenizer_path(), s.max_len)?;

    // --- Session and layers ------------------------------------------------
    let (mut session, choice) = BackboneSession::open(rt, &plan.model, &plan.session)?;
    if let Some(reason) = &choice.fallback_reason {
        reporter.note(&format!("device auto: running on CPU ({reason})"));
    }
    let n_layers = match &config {
        Some(c) => c.num_hidden_layers,
        None => *session.layers().last().ok_or_else(|| Error::Onnx {
            path: plan.model.clone(),
            message: "no hidden_states.i outputs (see `sherl-extract inspect-onnx`)".into(),
        })?,
    };
    if s.late_layers == 0 || s.late_layers > n_layers {
        return Err(Error::Config(format!(
            "--late-layers {} must be between 1 and the backbone's {n_layers} layers",
            s.late_layers
        )));
    }
    let layers: Vec<usize> = match &plan.layers {
        LayerChoice::Default => (0..=n_layers - s.late_layers).collect(),
        LayerChoice::All => (0..=n_layers).collect(),
        LayerChoice::List(v) => v.clone(),
    };
    if let Some(&bad) = layers.iter().find(|&&l| l > n_layers) {
        return Err(Error::Config(format!(
            "layer {bad} does not exist (the backbone has hidden_states.0..={n_layers})"
        )));
    }
    if layers.is_empty() {
        return Err(Error::Config("no layers to store".into()));
    }
    session.check_layers(&layers)?;

    // --- Dataset -----------------------------------------------------------
    let data = crate::data::load(&plan.dataset)?;
    let mut files = Vec::new();
    match &plan.dataset.source {
        SplitSource::Files(fs) => {
            for (_, p) in fs {
                files.push(file_info(p)?);
            }
        }
        SplitSource::Single { path, .. } => files.push(file_info(path)?),
    }
    let mut split_names: Vec<String> = data.report.split_counts.keys().cloned().collect();
    split_names.sort_by_key(|n| split_rank(n));
    if !split_names
        .iter()
        .any(|n| crate::data::VALID_SPLIT_NAMES.contains(&n.as_str()))
    {
        tracing::warn!(
            "the cache will have no validation split (splits: {}): sherl-fit needs one to pick the best epoch; cut one with --split train=0.8,valid=0.1,test=0.1 (add --group-column COL to keep groups together) or give --valid FILE",
            split_names.join(", ")
        );
    }
    let mut items = Vec::with_capacity(data.examples.len());
    for ex in &data.examples {
        let enc: Encoded = tokenizer.encode(&ex.text, ex.text_pair.as_deref())?;
        if enc.is_empty() {
            return Err(Error::Config(format!(
                "example {} tokenized to nothing",
                ex.id
            )));
        }
        let split = split_names
            .iter()
            .position(|n| n == &ex.split)
            .expect("split names come from the examples") as u32;
        items.push(Item {
            meta: ExampleMeta {
                position: 0,
                id: ex.id.clone(),
                split,
                label: ex.label,
                type_ids: enc.type_ids.iter().map(|&t| t.min(255) as u8).collect(),
                ids: enc.ids,
            },
        });
    }
    // Cache order: split, then length, then dataset order (stable sort).
    items.sort_by_key(|it| (it.meta.split, it.meta.len()));
    for (p, it) in items.iter_mut().enumerate() {
        it.meta.position = p as u64;
    }

    // --- Provenance and settings hash --------------------------------------
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
    let backbone = BackboneInfo {
        onnx: file_info(&plan.model)?,
        safetensors,
        tokenizer: file_info(&dir.tokenizer_path())?,
        checkpoint_prefix: prefix,
        config: config
            .as_ref()
            .map(|c| serde_json::to_value(c).expect("config serializes")),
        num_layers: n_layers,
        hidden: 0, // filled after the first batch if no config
    };
    let hidden = match &config {
        Some(c) => c.hidden_size,
        None => probe_hidden(&mut session, &layers)?,
    };
    let backbone = BackboneInfo { hidden, ..backbone };
    let dataset = DatasetInfo {
        files,
        options: dataset_options(&plan.dataset),
        rows_read: data.report.rows_read,
        skipped_bad_rows: data.report.skipped_bad_rows,
        dropped_labels: data.report.dropped_labels.clone(),
    };
    let settings = ExtractSettings {
        layers: layers.clone(),
        ..s.clone()
    };
    let hash = settings_hash(&backbone, &dataset, &settings);
    let mut splits = BTreeMap::new();
    for it in &items {
        *splits
            .entry(split_names[it.meta.split as usize].clone())
            .or_insert(0u64) += 1;
    }
    let total_tokens: u64 = items.iter().map(|i| i.meta.len() as u64).sum();
    let mut manifest = Manifest {
        format_version: FORMAT_VERSION,
        sherl_version: env!("CARGO_PKG_VERSION").into(),
        created_at: String::new(),
        settings_hash: hash.clone(),
        manifest_sha256: None, // set when written (Manifest::write)
        settings: settings.clone(),
        backbone,
        dataset,
        labels: data.label_names.clone(),
        split_names,
        splits,
        examples: items.len() as u64,
        tokens: total_tokens,
        worker: plan.worker,
        shards: Vec::new(),
    };

    // --- Output directory, resume check -----------------------------------
    let _lock = prepare_out_dir(&plan.out, &manifest, plan.resume)?;

    let spec = ShardSpec {
        dtype: s.dtype,
        shuffle: s.shuffle,
        zstd_level: s.zstd_level,
        n_layers: layers.len() as u32,
        hidden: hidden as u32,
        max_len: s.max_len as u32,
        chunk_size: s.chunk_size,
        settings_hash: short_hash(&hash),
    };
    let per_shard = s.examples_per_shard as usize;
    let n_shards = items.len().div_ceil(per_shard);
    let mine: Vec<usize> = (0..n_shards)
        .filter(|k| plan.worker.is_none_or(|w| *k as u32 % w.count == w.index))
        .collect();

    // Which shards are already sealed (resume)?
    let mut todo = Vec::new();
    let mut infos: BTreeMap<usize, ShardInfo> = BTreeMap::new();
    for &k in &mine {
        let range = k * per_shard..((k + 1) * per_shard).min(items.len());
        let rel = shard_file_name(k as u32);
        let path = plan.out.join(&rel);
        if plan.resume && path.exists() {
            match crate::cache::open_shard(&path) {
                Ok(r)
                    if r.header().settings_hash == spec.settings_hash
                        && r.header().first_example == range.start as u64
                        && r.header().n_examples == range.len() as u64 =>
                {
                    let bytes = std::fs::metadata(&path)
                        .map_err(|e| Error::io(&path, e))?
                        .len();
                    infos.insert(
                        k,
                        ShardInfo {
                            file: rel,
                            index: k as u32,
                            first_example: range.start as u64,
                            examples: range.len() as u64,
                            tokens: r.header().n_tokens,
                            bytes,
                        },
                    );
                    continue;
                }
                Ok(_) => {
                    return Err(Error::Config(format!(
                        "{}: sealed with different settings; refusing to mix it into this cache",
                        path.display()
                    )))
                }
                Err(e) => reporter.note(&format!(
                    "{} is unreadable ({e}); recomputing it",
                    path.display()
                )),
            }
        }
        todo.push((k, range));
    }
    let resumed = infos.len();
    if resumed > 0 {
        reporter.note(&format!(
            "resume: {resumed} sealed shard(s) kept, {} to compute",
            todo.len()
        ));
    }

    let run_examples: u64 = todo.iter().map(|(_, r)| r.len() as u64).sum();
    let run_tokens: u64 = todo
        .iter()
        .flat_map(|(_, r)| items[r.clone()].iter())
        .map(|i| i.meta.len() as u64)
        .sum();
    reporter.start(run_examples, run_tokens);
    let mut padded_run = 0u64;
    let mut tokens_run = 0u64;
    for (k, range) in &todo {
        let _span = tracing::info_span!("shard", idx = k).entered();
        let path = plan.out.join(shard_file_name(*k as u32));
        let (sealed, padded) = write_shard(
            &mut session,
            &items[range.clone()],
            &layers,
            spec,
            *k as u32,
            &path,
            plan.compress_threads.max(1),
            s,
            reporter,
        )?;
        padded_run += padded;
        tokens_run += sealed.tokens;
        infos.insert(
            *k,
            ShardInfo {
                file: shard_file_name(*k as u32),
                index: *k as u32,
                first_example: sealed.first_example,
                examples: sealed.examples,
                tokens: sealed.tokens,
                bytes: sealed.bytes,
            },
        );
    }
    reporter.finish();

    manifest.shards = infos.into_values().collect();
    manifest.created_at = crate::cache::manifest::now_rfc3339();
    let partial = plan.worker.is_some();
    if partial {
        manifest.examples = manifest.shards.iter().map(|s| s.examples).sum();
        manifest.tokens = manifest.shards.iter().map(|s| s.tokens).sum();
    }
    let name = if partial { PARTIAL_MANIFEST } else { MANIFEST };
    // Sealed: from format version 2 on it carries its own checksum.
    manifest.write(&plan.out.join(name))?;
    let pending = plan.out.join(PENDING);
    std::fs::remove_file(&pending).map_err(|e| Error::io(&pending, e))?;
    crate::fsutil::sync_dir(&plan.out)?;
    let bytes_on_disk: u64 = manifest.shards.iter().map(|s| s.bytes).sum();
    Ok(ExtractSummary {
        cache: plan.out.clone(),
        examples: manifest.examples,
        tokens: manifest.tokens,
        layers: layers.clone(),
        shards_written: todo.len(),
        shards_resumed: resumed,
        bytes_on_disk,
        raw_f32_bytes: manifest.tokens * layers.len() as u64 * hidden as u64 * 4,
        tokens_run,
        padded_tokens_run: padded_run,
        seconds: t0.elapsed().as_secs_f64(),
        device: choice.device,
        partial,
    })
}

/// File name of a worker's partial manifest.
pub const PARTIAL_MANIFEST: &str = crate::cache::manifest::PART_MANIFEST;

fn probe_hidden(session: &mut BackboneSession, layers: &[usize]) -> Result<usize> {
    let e = Encoded {
        ids: vec![101, 102],
        type_ids: vec![0, 0],
    };
    let b = PaddedBatch::new(&[&e], None);
    let (i, m, t) = b.views();
    let out = session.run(i, m, t, &layers[..1])?;
    Ok(out[0].shape()[2])
}

/// File that holds the writer lock of a cache directory (FORMAT.md §1, §7).
/// The file stays in the directory; readers and `sherl-cache merge` ignore
/// it, and a directory holding nothing else counts as empty.
pub const LOCK: &str = ".lock";

/// The writer lock of a cache directory: an OS advisory lock on its
/// [`LOCK`] file ([`crate::fsutil::DirLock`]), held while this value lives
/// and released by the operating system when the process ends, however it
/// ends (so a killed writer never leaves a stale lock).
pub type WriterLock = crate::fsutil::DirLock;

/// Take the writer lock of `out` (created if needed), or refuse when another
/// process holds it.
fn lock_out_dir(out: &Path) -> Result<WriterLock> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    match crate::fsutil::DirLock::try_acquire(out, LOCK)? {
        Some(lock) => Ok(lock),
        None => Err(Error::Locked {
            path: out.to_path_buf(),
            what: "this cache",
            lock: out.join(LOCK),
        }),
    }
}

/// Whether `out` holds anything but the lock file.
fn has_content(out: &Path) -> Result<bool> {
    if !out.is_dir() {
        return Ok(false);
    }
    for entry in std::fs::read_dir(out).map_err(|e| Error::io(out, e))? {
        let entry = entry.map_err(|e| Error::io(out, e))?;
        if entry.file_name() != LOCK {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The refusals of [`prepare_out_dir`]; reads only. Returns whether `out`
/// holds an earlier extraction to resume.
fn check_out_dir(out: &Path, manifest: &Manifest, resume: bool) -> Result<bool> {
    let pending = out.join(PENDING);
    let non_empty = has_content(out)?;
    if non_empty && !resume {
        return Err(Error::Config(format!(
            "{}: directory is not empty; pass --resume to continue an interrupted extraction, or choose another --out",
            out.display()
        )));
    }
    // A directory killed before it recorded its settings holds no sealed
    // shard: nothing to keep, start it afresh.
    let sealed_shards = std::fs::read_dir(out.join("shards"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| e.path().extension().is_some_and(|x| x == "shrd"))
        })
        .unwrap_or(false);
    if resume && non_empty && !pending.exists() && sealed_shards {
        return Err(Error::Config(format!(
            "{}: cannot resume: it holds shards but no {PENDING} recording their settings; start in an empty --out",
            out.display()
        )));
    }
    if resume && non_empty && pending.exists() {
        let old = Manifest::read(&pending)
            .map_err(|e| Error::Config(format!("{}: cannot resume: {e}", out.display())))?;
        let mut diffs = Vec::new();
        let a = serde_json::to_value(&old).expect("serializes");
        let b = serde_json::to_value(manifest).expect("serializes");
        for key in [
            "settings_hash",
            "settings",
            "backbone",
            "dataset",
            "labels",
            "split_names",
            "examples",
            "worker",
        ] {
            if a.get(key) != b.get(key) {
                diffs.push(key);
            }
        }
        if !diffs.is_empty() {
            return Err(Error::Config(format!(
                "{}: cannot resume with different settings (differs: {}); use the original flags or another --out",
                out.display(),
                diffs.join(", ")
            )));
        }
    }
    Ok(non_empty)
}

/// Create the output directory, or check it for `--resume` (the settings of
/// the interrupted run, in `extract.pending.json`, must equal these), and
/// take its writer lock. A refusal changes nothing on disk: the checks run
/// before the lock is taken, and again under the lock (another writer may
/// have changed the directory in between).
fn prepare_out_dir(out: &Path, manifest: &Manifest, resume: bool) -> Result<WriterLock> {
    check_out_dir(out, manifest, resume)?;
    let lock = lock_out_dir(out)?;
    check_out_dir(out, manifest, resume)?;
    let shards = out.join("shards");
    std::fs::create_dir_all(&shards).map_err(|e| Error::io(&shards, e))?;
    // Left-over temporary shards of a killed run are never valid.
    for entry in std::fs::read_dir(&shards).map_err(|e| Error::io(&shards, e))? {
        let p = entry.map_err(|e| Error::io(&shards, e))?.path();
        if p.extension().is_some_and(|e| e == "tmp") {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    // Sealed like the manifest (FORMAT.md §5.2), so --resume reads it with
    // the same checks.
    manifest.write(&out.join(PENDING))?;
    Ok(lock)
}

struct ChunkJob {
    seq: usize,
    meta: Vec<ExampleMeta>,
    layers: Vec<Vec<f32>>,
}

/// Run and write one shard. Returns the sealed shard and the padded token
/// slots that were run.
#[allow(clippy::too_many_arguments)]
fn write_shard(
    session: &mut BackboneSession,
    items: &[Item],
    layers: &[usize],
    spec: ShardSpec,
    index: u32,
    path: &Path,
    threads: usize,
    s: &ExtractSettings,
    reporter: &dyn ExtractReporter,
) -> Result<(crate::cache::shard::SealedShard, u64)> {
    let first = items.first().map_or(0, |i| i.meta.position);
    let mut writer = ShardWriter::create(path, spec, index, first)?;
    let chunk_size = s.chunk_size as usize;
    let hidden = spec.hidden as usize;
    let (job_tx, job_rx) = mpsc::sync_channel::<ChunkJob>(threads);
    let job_rx = std::sync::Mutex::new(job_rx);
    let (done_tx, done_rx) = mpsc::sync_channel::<(usize, Result<CompressedChunk>)>(threads);
    let mut padded = 0u64;

    let result: Result<()> = std::thread::scope(|scope| {
        for _ in 0..threads {
            let (rx, tx) = (&job_rx, done_tx.clone());
            scope.spawn(move || loop {
                let job = {
                    let guard = match rx.lock() {
                        Ok(g) => g,
                        Err(_) => break,
                    };
                    guard.recv()
                };
                let Ok(job) = job else { break };
                let r = compress_chunk(&spec, &job.meta, &job.layers);
                if tx.send((job.seq, r)).is_err() {
                    break;
                }
            });
        }
        drop(done_tx);
        let writer_ref = &mut writer;
        let writer_thread = scope.spawn(move || -> Result<()> {
            let mut pending = BTreeMap::new();
            let mut next = 0usize;
            let mut first_err = None;
            for (seq, r) in done_rx {
                pending.insert(seq, r);
                while let Some(r) = pending.remove(&next) {
                    next += 1;
                    match r {
                        Ok(c) if first_err.is_none() => {
                            if let Err(e) = writer_ref.push(c) {
                                first_err = Some(e);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
            }
            match first_err {
                Some(e) => Err(e),
                None => Ok(()),
            }
        });

        // Producer: batches of consecutive examples under the token budget.
        let mut produce = || -> Result<()> {
            let mut chunk_meta: Vec<ExampleMeta> = Vec::with_capacity(chunk_size);
            let mut chunk_layers: Vec<Vec<f32>> = vec![Vec::new(); layers.len()];
            let mut seq = 0usize;
            let lengths: Vec<usize> = items.iter().map(|i| i.meta.len()).collect();
            for range in batch_ranges(&lengths, s.max_tokens_per_batch, s.max_batch) {
                let (start, end) = (range.start, range.end);
                let encs: Vec<Encoded> = items[start..end]
                    .iter()
                    .map(|i| Encoded {
                        ids: i.meta.ids.clone(),
                        type_ids: i.meta.type_ids.iter().map(|&t| u32::from(t)).collect(),
                    })
                    .collect();
                let refs: Vec<&Encoded> = encs.iter().collect();
                let batch = PaddedBatch::new(&refs, None);
                let (ids, mask, types) = batch.views();
                let outs = session.run(ids, mask, types, layers)?;
                if let Some(o) = outs.first() {
                    if o.shape()[2] != hidden {
                        return Err(Error::Runtime(format!(
                            "the model returned hidden size {}, expected {hidden}",
                            o.shape()[2]
                        )));
                    }
                }
                padded += batch.padded_tokens() as u64;
                for (b, it) in items[start..end].iter().enumerate() {
                    for (l, h) in outs.iter().enumerate() {
                        // One copy straight into the chunk buffer; the
                        // compression thread checks the values are finite.
                        match real_rows_slice(h, b, it.meta.len()) {
                            Some(rows) => chunk_layers[l].extend_from_slice(rows),
                            None => {
                                chunk_layers[l].extend_from_slice(&real_rows(h, b, it.meta.len()))
                            }
                        }
                    }
                    chunk_meta.push(it.meta.clone());
                    if chunk_meta.len() == chunk_size {
                        let job = ChunkJob {
                            seq,
                            meta: std::mem::take(&mut chunk_meta),
                            layers: std::mem::replace(
                                &mut chunk_layers,
                                vec![Vec::new(); layers.len()],
                            ),
                        };
                        seq += 1;
                        job_tx
                            .send(job)
                            .map_err(|_| Error::Config("compression threads stopped".into()))?;
                    }
                }
                reporter.advance((end - start) as u64, batch.real_tokens() as u64);
            }
            if !chunk_meta.is_empty() {
                job_tx
                    .send(ChunkJob {
                        seq,
                        meta: chunk_meta,
                        layers: chunk_layers,
                    })
                    .map_err(|_| Error::Config("compression threads stopped".into()))?;
            }
            Ok(())
        };
        let produced = produce();
        drop(job_tx);
        let written = writer_thread
            .join()
            .map_err(|_| Error::Config("shard writer thread panicked".into()))?;
        produced.and(written)
    });
    result?;
    Ok((writer.seal()?, padded))
}
