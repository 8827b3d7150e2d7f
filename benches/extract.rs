//! Extraction benchmark, driven by `pipelines/bench-extract.sh` (read that
//! script first; it builds, fetches the assets and runs everything).
//!
//! `harness = false`: a plain binary with three subcommands.
//!
//! - `subset`: write an evenly spaced sample of a dataset as a CSV with the
//!   columns `category,text,movie_name` (for the `sherl-extract run` runs of
//!   the script: storage per dtype and peak memory).
//! - `measure`: in one process, on the library API:
//!   (a) `BackboneSession::run` alone over exactly the batches sherl builds
//!   against `sherl::extract::run::run` end to end (alternating order),
//!   (b) length-bucketed batches against padding every example to 128,
//!   (d) decode throughput of the cache (a) wrote, single-threaded
//!   `read_chunk` and `Cache::stream`, plus the single-threaded CPU cost of
//!   re-compressing it (what the compression thread competes with ORT for).
//! - `report`: merge `measure`'s JSON and the script's JSON lines into one
//!   JSON file and print the final table.
//!
//! `cargo bench` appends `--bench` to the arguments; it is ignored.

// A measuring tool, not the library: clippy.toml's reader/writer rules
// (sherl::fsutil) do not apply.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use sherl::backbone::BackboneDir;
use sherl::batching::PaddedBatch;
use sherl::cache::format::encode_values;
use sherl::cache::format::values::shuffle_payload;
use sherl::cache::manifest::ExtractSettings;
use sherl::cache::shard::writer::zstd_frame;
use sherl::cache::shard::{compress_chunk, ShardSpec};
use sherl::cache::writer::shard_ranges;
use sherl::cache::{Cache, ExampleMeta};
use sherl::data::args::DatasetArgs;
use sherl::extract::pipeline::{padded_batch, shard_batches, ChunkBuilder};
use sherl::extract::runtime::{BackboneSession, Device, OptLevel, SessionConfig};
use sherl::extract::tokenize::{Encoded, Tokenizer};
use sherl::extract::{ExtractPlan, ExtractReporter, LayerChoice};

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Debug, Parser)]
#[command(name = "extract-bench", about = "sherl extraction benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write N evenly spaced examples of the dataset as category,text,movie_name CSV.
    Subset(Box<SubsetArgs>),
    /// Measure (a) overhead, (b) bucketing vs padding, (d) decode throughput.
    Measure(Box<MeasureArgs>),
    /// Merge the results and print the final table.
    Report {
        /// JSON written by `measure`.
        #[arg(long)]
        lib: PathBuf,
        /// JSON lines written by the script (storage and peak-memory runs).
        #[arg(long)]
        cli: PathBuf,
        /// Merged JSON to write.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct SubsetArgs {
    /// Output CSV.
    #[arg(long)]
    out: PathBuf,
    /// Examples to keep (all if larger than the dataset).
    #[arg(long)]
    n: usize,
    #[command(flatten)]
    data: DatasetArgs,
}

#[derive(Debug, clap::Args)]
struct MeasureArgs {
    /// Backbone directory (tokenizer.json, config.json, model.safetensors).
    #[arg(long)]
    backbone: PathBuf,
    /// ONNX model (from `sherl-extract export-onnx`).
    #[arg(long)]
    model: PathBuf,
    /// Work directory for the caches (emptied of earlier bench caches).
    #[arg(long)]
    work: PathBuf,
    /// Where to write the JSON results.
    #[arg(long)]
    json: PathBuf,
    /// Repetitions of (a), alternating which variant goes first.
    #[arg(long, default_value_t = 2)]
    reps: usize,
    /// (b): examples (first N of the dataset) for bucketed vs padded-to-128.
    #[arg(long, default_value_t = 2000)]
    padded_subset: usize,
    /// (b): repetitions of each variant.
    #[arg(long, default_value_t = 1)]
    padded_reps: usize,
    /// (d): threads for `Cache::stream`.
    #[arg(long, default_value_t = 2)]
    stream_threads: usize,
    /// ONNX Runtime intra-op threads (default: ONNX Runtime's, one per core).
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    data: DatasetArgs,
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let cli = Cli::parse_from(args);
    let r = match cli.command {
        Command::Subset(s) => subset(&s.out, s.n, &s.data),
        Command::Measure(m) => measure(&m),
        Command::Report { lib, cli, out } => report(&lib, &cli, &out),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("extract bench: error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

// --- subset ---------------------------------------------------------------

fn subset(out: &Path, n: usize, data: &DatasetArgs) -> AnyResult<()> {
    let ds = sherl::data::load(&data.to_plan()?)?;
    let total = ds.examples.len();
    let n = n.min(total);
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut w = csv::Writer::from_path(out)?;
    w.write_record(["category", "text", "movie_name"])?;
    for i in 0..n {
        let ex = &ds.examples[i * total / n];
        let label = ex
            .label
            .map(|l| ds.label_names[l as usize].as_str())
            .unwrap_or("");
        w.write_record([label, ex.text.as_str(), ex.group.as_deref().unwrap_or("")])?;
    }
    w.flush()?;
    eprintln!(
        "subset: {n} of {total} examples (every {:.2}th) -> {}",
        total as f64 / n.max(1) as f64,
        out.display()
    );
    Ok(())
}

// --- measure --------------------------------------------------------------

/// The padded batches `sherl-extract run` runs `examples` (in cache order)
/// in: the library's shards ([`shard_ranges`]) and per-shard batches
/// ([`shard_batches`], [`padded_batch`]), so batches never cross a shard
/// boundary.
fn bucketed_batches(examples: &[ExampleMeta], s: &ExtractSettings) -> Vec<PaddedBatch> {
    let mut out = Vec::new();
    for slot in shard_ranges(examples.len(), s.examples_per_shard, None) {
        let shard = &examples[slot.examples];
        for r in shard_batches(shard, s) {
            out.push(padded_batch(&shard[r]));
        }
    }
    out
}

/// CPU seconds (user + system) this process has used so far, from
/// `/proc/self/stat` (assumes the usual 100 clock ticks per second).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (tick(11) + tick(12)) / 100.0
}

/// The 1, 5 and 15 minute load averages (other work on the machine shows up here).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[derive(Debug, Clone, Copy, Default)]
struct BareRun {
    seconds: f64,
    cpu_seconds: f64,
    open_seconds: f64,
    real: u64,
    padded: u64,
}

/// Open a fresh session and time `BackboneSession::run` alone over `batches`.
fn bare_ort(
    rt: &sherl::extract::runtime::Runtime,
    model: &Path,
    cfg: &SessionConfig,
    batches: &[PaddedBatch],
    layers: &[usize],
) -> AnyResult<BareRun> {
    let t = Instant::now();
    let (mut session, _) = BackboneSession::open(rt, model, cfg)?;
    let open_seconds = t.elapsed().as_secs_f64();
    let mut r = BareRun {
        open_seconds,
        ..BareRun::default()
    };
    let (t, cpu) = (Instant::now(), cpu_seconds());
    for b in batches {
        let (i, m, ty) = b.views();
        let outs = session.run(i, m, ty, layers)?;
        std::hint::black_box(&outs);
        r.real += b.real_tokens() as u64;
        r.padded += b.padded_tokens() as u64;
    }
    r.seconds = t.elapsed().as_secs_f64();
    r.cpu_seconds = cpu_seconds() - cpu;
    Ok(r)
}

/// Records when the extraction loop starts and ends (the time before
/// `start` is setup: reading, tokenizing, hashing, opening the session).
#[derive(Default)]
struct Timing {
    start: Mutex<Option<Instant>>,
    finish: Mutex<Option<Instant>>,
}

impl ExtractReporter for Timing {
    fn start(&self, _: u64, _: u64) {
        *self.start.lock().expect("not poisoned") = Some(Instant::now());
    }
    fn advance(&self, _: u64, _: u64) {}
    fn note(&self, message: &str) {
        eprintln!("  sherl: {message}");
    }
    fn finish(&self) {
        *self.finish.lock().expect("not poisoned") = Some(Instant::now());
    }
}

fn tps(tokens: u64, secs: f64) -> f64 {
    tokens as f64 / secs.max(1e-9)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn fmin(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                dir_bytes(&p)
            } else {
                e.metadata().map(|m| m.len()).unwrap_or(0)
            }
        })
        .sum()
}

/// Replay what `write_shard`'s producer does with each batch's outputs
/// besides running ORT (strip padding per example and layer, check
/// finiteness, append to chunk buffers that are handed off every
/// `chunk_size` examples), on synthetic outputs of the same shapes.
/// Returns (wall, CPU) seconds.
fn strip_cost(
    batches: &[PaddedBatch],
    n_layers: usize,
    hidden: usize,
    chunk_size: usize,
) -> AnyResult<(f64, f64)> {
    let (mut wall, mut cpu) = (0.0, 0.0);
    let mut chunks = ChunkBuilder::new(chunk_size, n_layers);
    for b in batches {
        let (rows, seq) = b.ids.dim();
        let h = ndarray::Array3::<f32>::from_elem((rows, seq, hidden), 0.5);
        let outs: Vec<_> = (0..n_layers)
            .map(|_| sherl::extract::runtime::HiddenStates::Owned(h.clone()))
            .collect();
        let (t, c) = (Instant::now(), cpu_seconds());
        for (i, &len) in b.lengths.iter().enumerate() {
            let meta = ExampleMeta {
                position: 0,
                id: String::new(),
                split: 0,
                label: None,
                ids: vec![0; len],
                type_ids: vec![0; len],
                image: None,
            };
            if let Some(chunk) = chunks.push(&outs, i, &meta) {
                // the compression thread's finiteness check
                if chunk.layers.iter().flatten().any(|v| !v.is_finite()) {
                    return Err("non-finite".into());
                }
                std::hint::black_box(chunk);
            }
        }
        wall += t.elapsed().as_secs_f64();
        cpu += cpu_seconds() - c;
    }
    Ok((wall, cpu))
}

/// Write `bytes` to `path` and `sync_all` it; (write, sync) seconds.
fn fsync_probe(path: &Path, bytes: u64) -> AnyResult<(f64, f64)> {
    use std::io::Write;
    let block = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    let f = f.into_inner().map_err(|e| e.into_error())?;
    let write_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    f.sync_all()?;
    let sync_s = t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(path)?;
    Ok((write_s, sync_s))
}

fn measure(a: &MeasureArgs) -> AnyResult<()> {
    let load_start = loadavg();
    let rt = sherl::extract::runtime::init(None)?;
    let cfg = SessionConfig {
        device: Device::Cpu,
        threads: a.threads,
        opt_level: OptLevel::All,
    };
    let settings = ExtractSettings::default();
    let dir = BackboneDir::open(&a.backbone)?;
    let n_layers = dir.config()?.num_hidden_layers;
    let layers: Vec<usize> = (0..=n_layers - settings.late_layers).collect();
    let caches = a.work.join("caches");
    if caches.exists() {
        std::fs::remove_dir_all(&caches)?;
    }
    std::fs::create_dir_all(&caches)?;
    println!(
        "ONNX Runtime {} on CPU, intra-op threads {}, {} cores",
        rt.library().display(),
        a.threads
            .map_or("default (one per core)".to_string(), |t| t.to_string()),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // Load + tokenize into cache order: the library's stages.
    let t = Instant::now();
    let plan = a.data.to_plan()?;
    let ds = sherl::data::load(&plan)?;
    let load_s = t.elapsed().as_secs_f64();
    let tokenizer = Tokenizer::from_file(&dir.tokenizer_path(), settings.max_len)?;
    let t = Instant::now();
    let order = sherl::extract::order::tokenize(&ds, &tokenizer)?;
    let tokenize_s = t.elapsed().as_secs_f64();
    let n_examples = order.examples.len();
    let total_tokens = order.tokens();
    println!(
        "dataset: {n_examples} examples, {total_tokens} tokens (load {load_s:.2}s, tokenize {tokenize_s:.2}s), stored layers {layers:?}"
    );

    // (a) bare ORT vs sherl's full write path.
    let batches = bucketed_batches(&order.examples, &settings);
    let padded_total: u64 = batches.iter().map(|b| b.padded_tokens() as u64).sum();
    println!(
        "(a) {} batches, {} padded token slots ({:.1}% padding)",
        batches.len(),
        padded_total,
        100.0 * (padded_total - total_tokens) as f64 / padded_total as f64
    );
    let mut bare_runs: Vec<BareRun> = Vec::new();
    let mut e2e: Vec<Value> = Vec::new();
    let mut last_cache: Option<PathBuf> = None;
    for rep in 0..a.reps.max(1) {
        let order = if rep % 2 == 0 {
            ["bare", "sherl"]
        } else {
            ["sherl", "bare"]
        };
        for which in order {
            if which == "bare" {
                let r = bare_ort(rt, &a.model, &cfg, &batches, &layers)?;
                println!(
                    "  rep {rep} bare ORT   : {:>8.2}s  {:>8.0} tokens/s (session open {:.2}s, not counted; CPU {:.1}s; load {})",
                    r.seconds,
                    tps(r.real, r.seconds),
                    r.open_seconds,
                    r.cpu_seconds,
                    loadavg()
                );
                bare_runs.push(r);
            } else {
                let out = caches.join(format!("e2e-{rep}"));
                if let Some(prev) = last_cache.take() {
                    std::fs::remove_dir_all(&prev)?;
                }
                let plan = ExtractPlan {
                    backbone: a.backbone.clone(),
                    model: a.model.clone(),
                    out: out.clone(),
                    dataset: plan.clone(),
                    layers: LayerChoice::Default,
                    settings: settings.clone(),
                    resume: false,
                    worker: None,
                    compress_threads: 1,
                    session: cfg.clone(),
                    image: Default::default(),
                };
                let timing = Timing::default();
                let (t, cpu) = (Instant::now(), cpu_seconds());
                let s = sherl::extract::run::run(rt, &plan, &timing)?;
                let wall = t.elapsed().as_secs_f64();
                let cpu = cpu_seconds() - cpu;
                let start = timing
                    .start
                    .lock()
                    .expect("not poisoned")
                    .ok_or("no start")?;
                let finish = timing
                    .finish
                    .lock()
                    .expect("not poisoned")
                    .ok_or("no finish")?;
                let setup = start.duration_since(t).as_secs_f64();
                let looped = finish.duration_since(start).as_secs_f64();
                let fin = wall - setup - looped;
                println!(
                    "  rep {rep} sherl run  : {:>8.2}s  {:>8.0} tokens/s end to end (setup {setup:.2}s, loop {looped:.2}s = {:.0} tokens/s, finalize {fin:.2}s; CPU {cpu:.1}s; load {})",
                    s.seconds,
                    tps(s.tokens_run, s.seconds),
                    tps(s.tokens_run, looped),
                    loadavg()
                );
                e2e.push(json!({
                    "seconds": s.seconds,
                    "wall_seconds": wall,
                    "setup_seconds": setup,
                    "loop_seconds": looped,
                    "finalize_seconds": fin,
                    "cpu_seconds": cpu,
                    "tokens_run": s.tokens_run,
                    "padded_tokens_run": s.padded_tokens_run,
                    "bytes_on_disk": s.bytes_on_disk,
                    "raw_f32_bytes": s.raw_f32_bytes,
                    "tokens_per_second": tps(s.tokens_run, s.seconds),
                    "loop_tokens_per_second": tps(s.tokens_run, looped),
                    "device": s.device,
                }));
                last_cache = Some(out);
            }
        }
    }
    let bare_secs: Vec<f64> = bare_runs.iter().map(|r| r.seconds).collect();
    let e2e_secs: Vec<f64> = e2e
        .iter()
        .map(|v| v["seconds"].as_f64().unwrap_or(0.0))
        .collect();
    let loop_secs: Vec<f64> = e2e
        .iter()
        .map(|v| v["loop_seconds"].as_f64().unwrap_or(0.0))
        .collect();
    let tokens_run = e2e[0]["tokens_run"].as_u64().unwrap_or(0);
    let padded_run = e2e[0]["padded_tokens_run"].as_u64().unwrap_or(0);
    let bare_best = fmin(&bare_secs);
    let overhead = |secs: f64| 100.0 * (secs / bare_best - 1.0);
    let a_json = json!({
        "examples": n_examples,
        "tokens": total_tokens,
        "batches": batches.len(),
        "padded_tokens": padded_total,
        "same_batches_as_sherl": padded_run == padded_total && tokens_run == total_tokens,
        "load_seconds": load_s,
        "tokenize_seconds": tokenize_s,
        "bare": {
            "seconds": bare_secs,
            "session_open_seconds": bare_runs.iter().map(|r| r.open_seconds).collect::<Vec<_>>(),
            "cpu_seconds": bare_runs.iter().map(|r| r.cpu_seconds).collect::<Vec<_>>(),
            "best_seconds": bare_best,
            "median_seconds": median(&bare_secs),
            "best_tokens_per_second": tps(total_tokens, bare_best),
            "median_tokens_per_second": tps(total_tokens, median(&bare_secs)),
        },
        "sherl": {
            "runs": e2e,
            "best_seconds": fmin(&e2e_secs),
            "median_seconds": median(&e2e_secs),
            "best_tokens_per_second": tps(tokens_run, fmin(&e2e_secs)),
            "median_tokens_per_second": tps(tokens_run, median(&e2e_secs)),
            "best_loop_seconds": fmin(&loop_secs),
            "best_loop_tokens_per_second": tps(tokens_run, fmin(&loop_secs)),
        },
        "overhead_pct_best": overhead(fmin(&e2e_secs)),
        "overhead_pct_median": 100.0 * (median(&e2e_secs) / median(&bare_secs) - 1.0),
        "loop_overhead_pct_best": overhead(fmin(&loop_secs)),
        "goal_pct": 5.0,
    });
    println!(
        "(a) best: bare {:.0} tokens/s, sherl {:.0} tokens/s end to end ({:+.1}%), loop only {:.0} tokens/s ({:+.1}%)",
        tps(total_tokens, bare_best),
        tps(tokens_run, fmin(&e2e_secs)),
        overhead(fmin(&e2e_secs)),
        tps(tokens_run, fmin(&loop_secs)),
        overhead(fmin(&loop_secs)),
    );

    // Where sherl's extra time goes, part 1: what the producer thread does
    // besides ORT, replayed on synthetic outputs of the same shapes.
    let hidden_cfg = dir.config()?.hidden_size;
    let strip = strip_cost(
        &batches,
        layers.len(),
        hidden_cfg,
        settings.chunk_size as usize,
    )?;
    println!(
        "(a) producer work besides ORT (real_rows + is_finite + chunk buffers), replayed: {:.2}s wall, {:.2}s CPU",
        strip.0, strip.1
    );

    // (b) bucketed vs padded to max-len, on the first examples.
    let first_n = sherl::data::Dataset {
        examples: ds.examples.iter().take(a.padded_subset).cloned().collect(),
        ..ds.clone()
    };
    let n_b = first_n.examples.len();
    let sub_ordered = sherl::extract::order::tokenize(&first_n, &tokenizer)?;
    let sub_bucketed = bucketed_batches(&sub_ordered.examples, &settings);
    let first_n: Vec<Encoded> = first_n
        .examples
        .iter()
        .map(|ex| tokenizer.encode(&ex.text, ex.text_pair.as_deref()))
        .collect::<Result<_, _>>()?;
    let per_batch = (settings.max_tokens_per_batch / settings.max_len).max(1);
    let sub_padded: Vec<PaddedBatch> = first_n
        .chunks(per_batch)
        .map(|c| {
            let refs: Vec<&Encoded> = c.iter().collect();
            PaddedBatch::new(&refs, Some(settings.max_len))
        })
        .collect();
    let mut b_runs: Vec<(&str, BareRun)> = Vec::new();
    for rep in 0..a.padded_reps.max(1) {
        let order: [(&str, &[PaddedBatch]); 2] = if rep % 2 == 0 {
            [("bucketed", &sub_bucketed), ("padded", &sub_padded)]
        } else {
            [("padded", &sub_padded), ("bucketed", &sub_bucketed)]
        };
        for (name, bs) in order {
            let r = bare_ort(rt, &a.model, &cfg, bs, &layers)?;
            println!(
                "  (b) rep {rep} {name:<8}: {} real / {} padded tokens, {:.2}s, {:.0} real tokens/s",
                r.real,
                r.padded,
                r.seconds,
                tps(r.real, r.seconds)
            );
            b_runs.push((name, r));
        }
    }
    let b_variant = |name: &str, batches: usize| {
        let runs: Vec<BareRun> = b_runs
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, r)| *r)
            .collect();
        let secs: Vec<f64> = runs.iter().map(|r| r.seconds).collect();
        let best = fmin(&secs);
        json!({
            "batches": batches,
            "real_tokens": runs[0].real,
            "padded_tokens": runs[0].padded,
            "seconds": secs,
            "best_seconds": best,
            "real_tokens_per_second": tps(runs[0].real, best),
            "padded_tokens_per_second": tps(runs[0].padded, best),
        })
    };
    let bucketed_j = b_variant("bucketed", sub_bucketed.len());
    let padded_j = b_variant("padded", sub_padded.len());
    let speedup = padded_j["best_seconds"].as_f64().unwrap_or(0.0)
        / bucketed_j["best_seconds"].as_f64().unwrap_or(1.0);
    let b_json = json!({
        "examples": n_b,
        "subset": if n_b < n_examples { format!("first {n_b} of {n_examples} examples (dataset order)") } else { "all examples".to_string() },
        "padded_batch_examples": per_batch,
        "bucketed": bucketed_j,
        "padded_to_max_len": padded_j,
        "max_len": settings.max_len,
        "speedup": speedup,
    });
    drop((sub_bucketed, sub_padded, batches));

    // (d) decode throughput of the last (a) cache; plus the CPU cost of
    // compressing it, single-threaded (the work of the compression thread).
    let cache_dir = last_cache.ok_or("no cache written")?;
    let cache = Arc::new(Cache::open(&cache_dir)?);
    let m = cache.manifest();
    let positions: Vec<usize> = (0..m.settings.layers.len()).collect();
    let n_chunks = cache.chunks().len();
    let hidden = m.backbone.hidden;
    let cache_tokens: u64 = cache.chunks().iter().map(|c| c.tokens).sum();
    let decoded_bytes = cache_tokens * positions.len() as u64 * hidden as u64 * 4;
    let t = Instant::now();
    let mut check = 0usize;
    for id in 0..n_chunks {
        let c = cache.read_chunk(id, &positions)?;
        check += c.layers.iter().map(Vec::len).sum::<usize>();
        std::hint::black_box(&c);
    }
    let single_s = t.elapsed().as_secs_f64();
    if (check * 4) as u64 != decoded_bytes {
        return Err(format!("decoded {} bytes, expected {decoded_bytes}", check * 4).into());
    }
    let t = Instant::now();
    let mut check = 0usize;
    let depth = 2 * a.stream_threads.max(1);
    for c in cache.stream(
        (0..n_chunks).collect(),
        positions.clone(),
        a.stream_threads,
        depth,
    ) {
        // widened here, as a consumer would (the stream leaves 16-bit
        // frames in their stored form)
        let c = c?.into_f32();
        check += c.layers.iter().map(Vec::len).sum::<usize>();
        std::hint::black_box(&c);
    }
    let stream_s = t.elapsed().as_secs_f64();
    if (check * 4) as u64 != decoded_bytes {
        return Err(format!("streamed {} bytes, expected {decoded_bytes}", check * 4).into());
    }
    println!(
        "(d) {n_chunks} chunks, {cache_tokens} tokens x {} layers: read_chunk {:.0} MB/s, stream({}) {:.0} MB/s",
        positions.len(),
        decoded_bytes as f64 / 1e6 / single_s,
        a.stream_threads,
        decoded_bytes as f64 / 1e6 / stream_s
    );
    let spec = ShardSpec::of(m);
    let mut compress_s = 0.0;
    let mut compressed = 0u64;
    let mut compress_cpu = 0.0;
    // Stage by stage, with the library's steps (unfused: encode, then
    // shuffle), then its zstd frame and the writer's CRC.
    let (mut enc_s, mut shuf_s, mut zstd_s, mut crc_s) = (0.0, 0.0, 0.0, 0.0);
    for id in 0..n_chunks {
        let c = cache.read_chunk(id, &positions)?;
        let (t, cpu) = (Instant::now(), cpu_seconds());
        let cc = compress_chunk(&spec, &c.meta, &c.layers)?;
        compress_s += t.elapsed().as_secs_f64();
        compress_cpu += cpu_seconds() - cpu;
        compressed += cc.frames.iter().map(|f| f.2.len() as u64).sum::<u64>();
        for values in &c.layers {
            let t = Instant::now();
            let raw = encode_values(values, hidden, spec.dtype);
            enc_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let raw = if spec.shuffle {
                shuffle_payload(&raw, values.len() / hidden, spec.dtype)
            } else {
                raw
            };
            shuf_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let frame = zstd_frame(&raw, spec.zstd_level)?;
            zstd_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            std::hint::black_box(crc32fast::hash(&frame));
            crc_s += t.elapsed().as_secs_f64();
        }
    }
    println!(
        "(d) compression stages, one thread: encode {} {enc_s:.2}s, shuffle {shuf_s:.2}s, zstd {} {zstd_s:.2}s, crc32 {crc_s:.2}s",
        spec.dtype.name(),
        spec.zstd_level
    );
    // Part 3: the seal of each shard (fsync) stalls the producer, so ORT
    // idles; probe it with one shard-sized file.
    let shards = cache.manifest().shards.len().max(1);
    let shard_bytes = dir_bytes(&cache_dir) / shards as u64;
    let (write_s, sync_s) = fsync_probe(&a.work.join("fsync-probe.bin"), shard_bytes)?;
    println!(
        "(d) fsync probe: {:.0} MB written in {write_s:.2}s, sync_all {sync_s:.2}s (x {shards} shards)",
        shard_bytes as f64 / 1e6
    );
    println!(
        "(d) re-compressing the cache ({} zstd {}, shuffle {}) on one thread: {compress_s:.2}s CPU ({:.0} tokens/s)",
        spec.dtype.name(),
        spec.zstd_level,
        spec.shuffle,
        tps(cache_tokens, compress_s)
    );
    let d_json = json!({
        "cache": cache_dir,
        "cache_bytes": dir_bytes(&cache_dir),
        "chunks": n_chunks,
        "tokens": cache_tokens,
        "layers": positions.len(),
        "dtype": spec.dtype.name(),
        "decoded_f32_bytes": decoded_bytes,
        "read_chunk": {
            "threads": 1,
            "seconds": single_s,
            "mb_per_second": decoded_bytes as f64 / 1e6 / single_s,
            "tokens_per_second": tps(cache_tokens, single_s),
        },
        "stream": {
            "threads": a.stream_threads,
            "depth": depth,
            "seconds": stream_s,
            "mb_per_second": decoded_bytes as f64 / 1e6 / stream_s,
            "tokens_per_second": tps(cache_tokens, stream_s),
        },
        "compress_one_thread": {
            "seconds": compress_s,
            "cpu_seconds": compress_cpu,
            "stages_seconds": {
                "encode": enc_s,
                "shuffle": shuf_s,
                "zstd": zstd_s,
                "crc32": crc_s,
            },
            "frame_bytes": compressed,
            "tokens_per_second": tps(cache_tokens, compress_s),
        },
    });
    drop(cache);
    let e2e_setup: Vec<f64> = e2e
        .iter()
        .map(|v| v["setup_seconds"].as_f64().unwrap_or(0.0))
        .collect();
    let where_json = json!({
        "extra_seconds_best": fmin(&e2e_secs) - bare_best,
        "extra_seconds_median": median(&e2e_secs) - median(&bare_secs),
        "setup_seconds_median": median(&e2e_setup),
        "producer_strip_seconds": strip.0,
        "producer_strip_cpu_seconds": strip.1,
        "compress_seconds": compress_s,
        "compress_cpu_seconds": compress_cpu,
        "shards": shards,
        "fsync_probe": {
            "bytes": shard_bytes,
            "write_seconds": write_s,
            "sync_seconds": sync_s,
            "sync_seconds_all_shards": sync_s * shards as f64,
        },
    });

    let out = json!({
        "session": {
            "device": "cpu",
            "intra_threads": a.threads,
            "opt_level": "all",
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "ort_library": rt.library(),
        },
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "settings": settings,
        "a_overhead": a_json,
        "a_where_time_goes": where_json,
        "b_bucketing": b_json,
        "d_decode": d_json,
    });
    if let Some(p) = a.json.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&a.json, serde_json::to_vec_pretty(&out)?)?;
    Ok(())
}

// --- report ---------------------------------------------------------------

fn f(v: &Value, path: &[&str]) -> f64 {
    let mut v = v;
    for k in path {
        v = &v[*k];
    }
    v.as_f64().unwrap_or(f64::NAN)
}

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

fn report(lib: &Path, cli: &Path, out: &Path) -> AnyResult<()> {
    let lib: Value = serde_json::from_slice(&std::fs::read(lib)?)?;
    let mut storage = Vec::new();
    let mut rss = Vec::new();
    for line in std::fs::read_to_string(cli)?.lines() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)?;
        match v["kind"].as_str() {
            Some("storage") => storage.push(v),
            Some("rss") => rss.push(v),
            _ => return Err(format!("unknown line in {}: {line}", cli.display()).into()),
        }
    }
    let mut t = String::new();
    use std::fmt::Write;
    let a = &lib["a_overhead"];
    let hr = "-".repeat(78);
    writeln!(t, "{hr}")?;
    writeln!(
        t,
        "sherl extraction benchmark: MiniLM-L6 (CPU, {} cores, ORT intra-op threads {})",
        lib["session"]["cores"],
        lib["session"]["intra_threads"]
            .as_u64()
            .map_or("default".to_string(), |n| n.to_string())
    )?;
    writeln!(t, "{hr}")?;
    writeln!(
        t,
        "(a) extraction, {} examples / {} tokens / {} batches ({} padded slots), {} reps",
        a["examples"],
        a["tokens"],
        a["batches"],
        a["padded_tokens"],
        a["bare"]["seconds"].as_array().map_or(0, Vec::len)
    )?;
    writeln!(
        t,
        "    {:<34} {:>10} {:>12} {:>10}",
        "", "best s", "tokens/s", "overhead"
    )?;
    writeln!(
        t,
        "    {:<34} {:>10.2} {:>12.0} {:>10}",
        "bare ORT (BackboneSession::run)",
        f(a, &["bare", "best_seconds"]),
        f(a, &["bare", "best_tokens_per_second"]),
        "-"
    )?;
    writeln!(
        t,
        "    {:<34} {:>10.2} {:>12.0} {:>9.1}%",
        "sherl run, end to end (summary)",
        f(a, &["sherl", "best_seconds"]),
        f(a, &["sherl", "best_tokens_per_second"]),
        f(a, &["overhead_pct_best"])
    )?;
    writeln!(
        t,
        "    {:<34} {:>10.2} {:>12.0} {:>9.1}%",
        "sherl run, extraction loop only",
        f(a, &["sherl", "best_loop_seconds"]),
        f(a, &["sherl", "best_loop_tokens_per_second"]),
        f(a, &["loop_overhead_pct_best"])
    )?;
    let secs = |k: &str| -> String {
        a[k]["seconds"]
            .as_array()
            .map(|v| {
                v.iter()
                    .map(|x| format!("{:.2}", x.as_f64().unwrap_or(0.0)))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    let cpus = |v: &Value| -> String {
        v.as_array()
            .map(|v| {
                v.iter()
                    .map(|x| format!("{:.1}", x.as_f64().unwrap_or(f64::NAN)))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    writeln!(
        t,
        "    all bare runs (s): {} (process CPU s: {})",
        secs("bare"),
        cpus(&a["bare"]["cpu_seconds"])
    )?;
    if let Some(runs) = a["sherl"]["runs"].as_array() {
        for (i, r) in runs.iter().enumerate() {
            writeln!(
                t,
                "    sherl run {i}: {:.2}s = setup {:.2}s + loop {:.2}s + finalize {:.2}s (process CPU {:.1}s)",
                f(r, &["seconds"]),
                f(r, &["setup_seconds"]),
                f(r, &["loop_seconds"]),
                f(r, &["finalize_seconds"]),
                f(r, &["cpu_seconds"])
            )?;
        }
    }
    writeln!(
        t,
        "    median overhead {:+.1}% (goal <= 5%); same batches as sherl: {}",
        f(a, &["overhead_pct_median"]),
        a["same_batches_as_sherl"]
    )?;
    let d = &lib["d_decode"];
    let w = &lib["a_where_time_goes"];
    let st = &d["compress_one_thread"]["stages_seconds"];
    writeln!(
        t,
        "    where the extra {:.2}s (best vs best; median {:.2}s) can go, each measured alone:",
        f(w, &["extra_seconds_best"]),
        f(w, &["extra_seconds_median"])
    )?;
    writeln!(
        t,
        "      setup before the first batch (read, tokenize, sha256 of model files, session): {:.2}s",
        f(w, &["setup_seconds_median"])
    )?;
    writeln!(
        t,
        "      producer thread, strip padding + is_finite + chunk buffers (replayed): {:.2}s",
        f(w, &["producer_strip_seconds"])
    )?;
    writeln!(
        t,
        "      compression thread, compress_chunk on 1 thread: {:.2}s (encode {:.2} + shuffle {:.2} + zstd {:.2}; crc32 {:.2})",
        f(w, &["compress_seconds"]),
        f(st, &["encode"]),
        f(st, &["shuffle"]),
        f(st, &["zstd"]),
        f(st, &["crc32"])
    )?;
    writeln!(
        t,
        "      shard seals, fsync with ORT idle: probe {:.2}s per {:.0} MB shard x {} shards = {:.2}s",
        f(w, &["fsync_probe", "sync_seconds"]),
        f(w, &["fsync_probe", "bytes"]) / 1e6,
        u(w, "shards"),
        f(w, &["fsync_probe", "sync_seconds_all_shards"])
    )?;

    let b = &lib["b_bucketing"];
    writeln!(t, "{hr}")?;
    writeln!(
        t,
        "(b) bucketing vs padding to {} (bare ORT), {}",
        b["max_len"],
        b["subset"].as_str().unwrap_or("")
    )?;
    writeln!(
        t,
        "    {:<26} {:>8} {:>12} {:>12} {:>10} {:>14}",
        "", "batches", "real tok", "padded tok", "best s", "real tokens/s"
    )?;
    for (name, k) in [
        ("length-bucketed", "bucketed"),
        ("padded to max-len", "padded_to_max_len"),
    ] {
        let v = &b[k];
        writeln!(
            t,
            "    {:<26} {:>8} {:>12} {:>12} {:>10.2} {:>14.0}",
            name,
            u(v, "batches"),
            u(v, "real_tokens"),
            u(v, "padded_tokens"),
            f(v, &["best_seconds"]),
            f(v, &["real_tokens_per_second"])
        )?;
    }
    writeln!(t, "    speedup of bucketing: {:.2}x", f(b, &["speedup"]))?;

    writeln!(t, "{hr}")?;
    let sub = storage
        .first()
        .map(|v| {
            format!(
                "{} examples / {} tokens",
                v["summary"]["examples"], v["summary"]["tokens"]
            )
        })
        .unwrap_or_default();
    writeln!(t, "(c) bytes on disk per token (sherl-extract run, {sub})")?;
    writeln!(
        t,
        "    {:<6} {:<8} {:>5} {:>14} {:>12} {:>10} {:>8}",
        "dtype", "shuffle", "zstd", "bytes/token", "x raw f32", "goal", "ok"
    )?;
    let mut storage_rows = Vec::new();
    for v in &storage {
        let s = &v["summary"];
        let bytes = f(s, &["bytes_on_disk"]);
        let raw = f(s, &["raw_f32_bytes"]);
        let tokens = f(s, &["tokens"]);
        let ratio = bytes / raw;
        let dtype = v["dtype"].as_str().unwrap_or("");
        let goal = match dtype {
            "f16" => Some(0.45),
            "int8" => Some(0.25),
            _ => None,
        };
        writeln!(
            t,
            "    {:<6} {:<8} {:>5} {:>14.1} {:>12.3} {:>10} {:>8}",
            dtype,
            if v["shuffle"].as_bool().unwrap_or(false) {
                "on"
            } else {
                "off"
            },
            v["zstd_level"],
            bytes / tokens,
            ratio,
            goal.map_or("-".to_string(), |g| format!("<= {g:.2}")),
            goal.map_or("-", |g| if ratio <= g { "yes" } else { "NO" })
        )?;
        storage_rows.push(json!({
            "dtype": dtype,
            "shuffle": v["shuffle"],
            "zstd_level": v["zstd_level"],
            "bytes_on_disk": s["bytes_on_disk"],
            "raw_f32_bytes": s["raw_f32_bytes"],
            "tokens": s["tokens"],
            "bytes_per_token": bytes / tokens,
            "raw_f32_bytes_per_token": raw / tokens,
            "ratio_to_raw_f32": ratio,
            "goal": goal,
            "seconds": s["seconds"],
        }));
    }
    if let Some(v) = storage.first() {
        let s = &v["summary"];
        writeln!(
            t,
            "    raw f32 = {:.0} bytes/token ({} layers x hidden x 4)",
            f(s, &["raw_f32_bytes"]) / f(s, &["tokens"]),
            s["layers"].as_array().map_or(0, Vec::len)
        )?;
    }

    writeln!(t, "{hr}")?;
    writeln!(
        t,
        "(d) decode throughput (f32 out), cache of (a): {} tokens x {} layers, {:.0} MB decoded",
        d["tokens"],
        d["layers"],
        f(d, &["decoded_f32_bytes"]) / 1e6
    )?;
    for (name, k) in [
        ("read_chunk, 1 thread".to_string(), "read_chunk"),
        (
            format!("Cache::stream, {} threads", d["stream"]["threads"]),
            "stream",
        ),
    ] {
        writeln!(
            t,
            "    {:<28} {:>8.2}s {:>10.0} MB/s {:>12.0} tokens/s",
            name,
            f(d, &[k, "seconds"]),
            f(d, &[k, "mb_per_second"]),
            f(d, &[k, "tokens_per_second"])
        )?;
    }

    writeln!(t, "{hr}")?;
    writeln!(t, "(e) peak memory of sherl-extract run (f16 defaults)")?;
    let mut rss_rows = Vec::new();
    for v in &rss {
        let s = &v["summary"];
        writeln!(
            t,
            "    {:>6} examples {:>8} tokens: max RSS {:>8.1} MiB, {:>7.2}s, {:>7.0} tokens/s ({})",
            u(s, "examples"),
            u(s, "tokens"),
            f(v, &["max_rss_kb"]) / 1024.0,
            f(s, &["seconds"]),
            f(s, &["tokens_run"]) / f(s, &["seconds"]),
            v["method"].as_str().unwrap_or("")
        )?;
        rss_rows.push(json!({
            "examples": s["examples"],
            "tokens": s["tokens"],
            "max_rss_kb": v["max_rss_kb"],
            "method": v["method"],
            "seconds": s["seconds"],
            "bytes_on_disk": s["bytes_on_disk"],
            "raw_f32_bytes": s["raw_f32_bytes"],
        }));
    }
    writeln!(
        t,
        "load average (1/5/15 min) at the start of (a): {}, at the end of (d): {}",
        lib["loadavg_start"].as_str().unwrap_or("?"),
        lib["loadavg_end"].as_str().unwrap_or("?")
    )?;
    writeln!(t, "{hr}")?;
    print!("{t}");

    let merged = json!({
        "session": lib["session"],
        "loadavg_start": lib["loadavg_start"],
        "loadavg_end": lib["loadavg_end"],
        "settings": lib["settings"],
        "a_overhead": lib["a_overhead"],
        "a_where_time_goes": lib["a_where_time_goes"],
        "b_bucketing": lib["b_bucketing"],
        "c_storage": storage_rows,
        "d_decode": lib["d_decode"],
        "e_peak_memory": rss_rows,
    });
    if let Some(p) = out.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(out, serde_json::to_vec_pretty(&merged)?)?;
    println!("results: {}", out.display());
    Ok(())
}
