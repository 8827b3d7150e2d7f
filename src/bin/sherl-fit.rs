//! `sherl-fit`: phase two. Trains SHERL (and baselines) from a feature
//! cache with candle, without re-running the backbone.
// The argument structs' doc comments are `--help` text read in a terminal,
// where `RUNS/<run id>` is plain text, not an HTML tag.
#![allow(rustdoc::invalid_html_tags)]

/// mimalloc, counting the training steps' own memory
/// (`sherl::fit::alloc_track`: `train_memory` in summary.json).
#[global_allocator]
static GLOBAL: sherl::fit::alloc_track::Tracking<mimalloc::MiMalloc> =
    sherl::fit::alloc_track::Tracking(mimalloc::MiMalloc);

use std::cell::RefCell;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use sherl::cli::{init_output, main_wrapper, print_line, OutputArgs};
use sherl::fit::config::{FitConfig, SettingFlags};
use sherl::fit::retrieval::config::{RetrievalFlags, Task};
use sherl::fit::run_dir::EpochMetrics;
use sherl::fit::train::{FitPlan, FitReporter, LogReporter};

/// Phase two of sherl: train from a feature cache.
#[derive(Debug, Parser)]
#[command(name = "sherl-fit", version, about, long_about = None)]
struct Args {
    #[command(flatten)]
    output: OutputArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train one model; writes RUNS/<run id>/ and prints a JSON summary.
    Run(Box<RunArgs>),
    /// Train every setting of a grid file on one cache (separate processes,
    /// --jobs at a time); finished runs are skipped, so a killed sweep resumes.
    Sweep(Box<SweepArgs>),
    /// Compare finished runs: a Markdown table on stdout (best first by
    /// valid accuracy), CSV/JSON/Markdown files and learning-curve and
    /// layer-weight pictures (PNG, SVG) in --out.
    Report {
        /// Directory holding run directories.
        runs: PathBuf,
        /// Where to write the files (default RUNS/report).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Label new texts with a trained run (runs the backbone through ONNX
    /// Runtime, then the trained modules); writes JSONL.
    #[cfg(feature = "extract")]
    Predict(Box<PredictArgs>),
    /// Query a trained retrieval run: the top K images of a split for
    /// --text, or the top K captions for --image; one JSON line per hit
    /// (rank, id, score, image file or caption).
    #[cfg(feature = "extract")]
    Search(Box<SearchArgs>),
}

#[cfg(feature = "extract")]
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("query").required(true).args(["text", "image"])))]
struct SearchArgs {
    /// Retrieval run directory (RUNS/<run id>); its caches must be where
    /// the run recorded them.
    #[arg(long)]
    run: PathBuf,
    /// A text query: the hits are the split's images.
    #[arg(long)]
    text: Option<String>,
    /// An image file as the query: the hits are the split's captions.
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
    /// Hits to return.
    #[arg(long, default_value_t = 5)]
    k: usize,
    /// The split whose cached examples are searched.
    #[arg(long, default_value = "test")]
    split: String,
    /// Image backbone directory the run's image cache was made from.
    #[arg(long)]
    image_backbone: PathBuf,
    /// Text backbone directory the run's caption cache was made from.
    #[arg(long)]
    text_backbone: PathBuf,
    /// Write the hits (JSONL) here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Matrix kernel of the fused CPU ops (as for `run`).
    #[arg(long, env = "SHERL_BLAS", default_value = "auto")]
    blas: String,
    #[command(flatten)]
    runtime: sherl::cli::RuntimeArgs,
}

#[derive(Debug, clap::Args)]
struct SweepArgs {
    /// Feature cache (classification).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Backbone directory the cache was made from (classification).
    #[arg(long)]
    backbone: Option<PathBuf>,
    /// classification (--cache, --backbone) or retrieval (--image-cache,
    /// --text-cache, --image-backbone, --text-backbone; the grid may also
    /// set image_method, text_method, joint_dim, loss, margin).
    #[arg(long, value_enum, default_value_t = Task::Classification)]
    task: Task,
    /// Retrieval: the image cache.
    #[arg(long)]
    image_cache: Option<PathBuf>,
    /// Retrieval: the caption cache.
    #[arg(long)]
    text_cache: Option<PathBuf>,
    /// Retrieval: the image backbone the image cache was made from.
    #[arg(long)]
    image_backbone: Option<PathBuf>,
    /// Retrieval: the text backbone the caption cache was made from.
    #[arg(long)]
    text_backbone: Option<PathBuf>,
    /// Grid file (JSON): option names -> lists of values, or {"runs": [...]}.
    #[arg(long)]
    grid: PathBuf,
    /// Directory for run directories (shared by all workers).
    #[arg(long)]
    out: PathBuf,
    /// Runs at once; the cores are divided among them.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Take only part I of M of the grid (e.g. a Slurm array task).
    #[arg(long, value_name = "I/M")]
    worker: Option<String>,
    /// Re-run runs that stopped with an error (error.json) instead of skipping them.
    #[arg(long)]
    retry_failed: bool,
    /// Print the expanded runs and exit.
    #[arg(long)]
    dry_run: bool,
    /// cpu, cuda, cuda:N or auto (GPU 0 if this build has CUDA and a GPU
    /// answers, else CPU, saying why). Default: auto in a build with the
    /// `cuda` feature, cpu otherwise.
    #[arg(long, default_value = sherl::fit::DEFAULT_DEVICE)]
    device: String,
    /// Matrix kernel of the fused CPU ops: auto (OpenBLAS when
    /// `fetch-assets.sh openblas` fetched it, else the built-in gemm), off
    /// (the built-in gemm), or the path of an OpenBLAS library. The two
    /// round differently: a run records its kernel in summary.json.
    #[arg(long, env = "SHERL_BLAS", default_value = "auto")]
    blas: String,
}

#[cfg(feature = "extract")]
#[derive(Debug, clap::Args)]
struct PredictArgs {
    /// Run directory (RUNS/<run id>).
    #[arg(long)]
    run: PathBuf,
    /// Backbone directory the run's cache was made from.
    #[arg(long)]
    backbone: PathBuf,
    /// ONNX model (default: BACKBONE/model.onnx).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    data: sherl::data::args::PredictDataArgs,
    /// Write predictions (JSONL) here instead of stdout; the summary line then goes to stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Repeat the first N characters of each text in its output line (… marks
    /// a cut); 0 leaves the text out.
    #[arg(long, value_name = "N", default_value_t = 80)]
    text_chars: usize,
    /// Examples per batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Matrix kernel of the fused CPU ops: auto (OpenBLAS when
    /// `fetch-assets.sh openblas` fetched it, else the built-in gemm), off
    /// (the built-in gemm), or the path of an OpenBLAS library. The two
    /// round differently: a run records its kernel in summary.json.
    #[arg(long, env = "SHERL_BLAS", default_value = "auto")]
    blas: String,
    #[command(flatten)]
    runtime: sherl::cli::RuntimeArgs,
}

/// Settings of one run. Precedence: built-in defaults, then --config FILE
/// (a JSON object with these names, snake_case), then flags.
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Feature cache written by sherl-extract run (classification).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Backbone directory the cache was made from (config.json, model.safetensors).
    #[arg(long)]
    backbone: Option<PathBuf>,
    #[command(flatten)]
    retrieval: RetrievalFlags,
    /// Directory for run directories.
    #[arg(long)]
    out: PathBuf,
    /// JSON file of settings (FitConfig fields); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: SettingFlags,
    /// cpu, cuda, cuda:N or auto (GPU 0 if this build has CUDA and a GPU
    /// answers, else CPU, saying why). Default: auto in a build with the
    /// `cuda` feature, cpu otherwise.
    #[arg(long, default_value = sherl::fit::DEFAULT_DEVICE)]
    device: String,
    /// Cache decoder threads.
    #[arg(long, default_value_t = 1)]
    decode_threads: usize,
    /// candle compute threads (default: all cores, or RAYON_NUM_THREADS). On
    /// a busy machine fewer threads can be faster: candle's parallel ops
    /// spin at barriers when cores are taken (README, "Design notes").
    #[arg(long)]
    threads: Option<usize>,
    /// Matrix kernel of the fused CPU ops: auto (OpenBLAS when
    /// `fetch-assets.sh openblas` fetched it, else the built-in gemm), off
    /// (the built-in gemm), or the path of an OpenBLAS library. The two
    /// round differently: a run records its kernel in summary.json.
    #[arg(long, env = "SHERL_BLAS", default_value = "auto")]
    blas: String,
}

/// Per-epoch progress bar on stderr.
struct Bar {
    visible: bool,
    bar: RefCell<Option<ProgressBar>>,
    inner: LogReporter,
}

impl FitReporter for Bar {
    fn epoch_start(&self, epoch: usize, epochs: usize, steps: u64) {
        if !self.visible {
            return;
        }
        let pb = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template(
                "epoch {prefix} [{bar:30}] {pos}/{len} steps {msg} ETA {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        pb.set_prefix(format!("{epoch}/{epochs}"));
        *self.bar.borrow_mut() = Some(pb);
    }
    fn step(&self, loss: f32) {
        if let Some(pb) = self.bar.borrow().as_ref() {
            pb.set_message(format!("loss {loss:.4}"));
            pb.inc(1);
        }
    }
    fn epoch_end(&self, m: &EpochMetrics) {
        if let Some(pb) = self.bar.borrow_mut().take() {
            pb.finish_and_clear();
        }
        self.inner.epoch_end(m);
    }
    fn note(&self, message: &str) {
        self.inner.note(message);
    }
}

fn main() -> ExitCode {
    sherl::cli::tune_allocator();
    GLOBAL.installed();
    main_wrapper(|| {
        let args = parse_args();
        if let Command::Run(r) = &args.command {
            // Training splits each CPU batch in two parts run side by side
            // (sherl::fit::train::forward_backward), each on half the
            // threads: two threads that never meet at a barrier do more
            // than candle's per-op parallelism on small tensors.
            // A retrieval step is one pass (its loss needs the whole
            // batch): all threads for candle's ops.
            let threads = r.threads.unwrap_or_else(sherl::cli::compute_threads);
            let per_part = match r.retrieval.task {
                Task::Classification => (threads / 2).max(1),
                Task::Retrieval => threads.max(1),
            };
            sherl::cli::set_compute_threads(Some(per_part));
            sherl::fit::sweep::exit_with_parent();
        }
        init_output(&args.output);
        match args.command {
            Command::Run(a) => run(*a, &args.output),
            #[cfg(feature = "extract")]
            Command::Predict(a) => predict(*a),
            #[cfg(feature = "extract")]
            Command::Search(a) => search(*a),
            Command::Sweep(a) => sweep(*a),
            Command::Report { runs, out } => report(runs, out),
        }
    })
}

/// The command line, with `run`'s help showing each setting's default
/// taken from `FitConfig::default()` (the flags are `Option`s so that
/// `--config` can sit between the defaults and the flags; clap alone would
/// show no default for them).
fn command_with_defaults() -> clap::Command {
    use clap::CommandFactory;
    let defaults = serde_json::to_value(FitConfig::default()).expect("FitConfig serializes");
    let defaults = defaults.as_object().cloned().unwrap_or_default();
    Args::command().mut_subcommand("run", |mut run| {
        for (key, value) in &defaults {
            // Flags without a default (null) or switches (bool) show none.
            if value.is_null() || value.is_boolean() {
                continue;
            }
            let shown = sherl::report::setting_text(value);
            if run.get_arguments().any(|a| a.get_id() == key.as_str()) {
                run = run.mut_arg(key.as_str(), |a| {
                    let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                    a.help(format!("{help} [default: {shown}]"))
                });
            }
        }
        run
    })
}

fn parse_args() -> Args {
    use clap::FromArgMatches;
    let matches = command_with_defaults().get_matches();
    Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn run(a: RunArgs, output: &OutputArgs) -> anyhow::Result<ExitCode> {
    if a.retrieval.task == Task::Retrieval {
        return run_retrieval(a, output);
    }
    let given = a.retrieval.given();
    if !given.is_empty() {
        anyhow::bail!(
            "{} belong to --task retrieval; this run is --task classification",
            given.join(", ")
        );
    }
    let (Some(cache), Some(backbone)) = (a.cache.clone(), a.backbone.clone()) else {
        anyhow::bail!("sherl-fit run needs --cache and --backbone (or --task retrieval with --image-cache, --text-cache, --image-backbone and --text-backbone)");
    };
    let config = FitConfig::resolve(a.config.as_deref(), &a.settings)?;
    init_blas(&a.blas)?;
    let (device, fallback) = sherl::fit::device(&a.device)?;
    match fallback {
        Some(why) => tracing::info!("device auto: training on the CPU ({why})"),
        None => tracing::debug!("training on {}", sherl::fit::device_name(&device)),
    }
    let plan = FitPlan {
        cache,
        backbone,
        out: a.out.clone(),
        config,
        device,
        decode_threads: a.decode_threads,
        workers: a.threads.unwrap_or_else(sherl::cli::compute_threads).min(2),
    };
    let bar = Bar {
        visible: output.progress(),
        bar: RefCell::new(None),
        inner: LogReporter,
    };
    let summary = sherl::fit::train::run(&plan, &bar)?;
    print_line(&serde_json::to_string(&summary)?)?;
    Ok(ExitCode::SUCCESS)
}

/// `sherl-fit run --task retrieval`: two caches, two towers.
fn run_retrieval(a: RunArgs, output: &OutputArgs) -> anyhow::Result<ExitCode> {
    let f = &a.retrieval;
    if a.cache.is_some() || a.backbone.is_some() {
        anyhow::bail!("--task retrieval reads --image-cache and --text-cache (with --image-backbone and --text-backbone), not --cache and --backbone");
    }
    if a.settings.method.is_some() {
        anyhow::bail!("--task retrieval takes --image-method and --text-method, not --method");
    }
    let (Some(image_cache), Some(text_cache), Some(image_backbone), Some(text_backbone)) = (
        f.image_cache.clone(),
        f.text_cache.clone(),
        f.image_backbone.clone(),
        f.text_backbone.clone(),
    ) else {
        anyhow::bail!("--task retrieval needs --image-cache, --text-cache, --image-backbone and --text-backbone");
    };
    let config = FitConfig::resolve(a.config.as_deref(), &a.settings)?;
    let retrieval = f.resolve()?;
    init_blas(&a.blas)?;
    let (device, fallback) = sherl::fit::device(&a.device)?;
    if let Some(why) = fallback {
        tracing::info!("device auto: training on the CPU ({why})");
    }
    let plan = sherl::fit::retrieval::train::RetrievalPlan {
        image_cache,
        text_cache,
        image_backbone,
        text_backbone,
        out: a.out.clone(),
        config,
        retrieval,
        device,
        workers: 1,
    };
    let bar = Bar {
        visible: output.progress(),
        bar: RefCell::new(None),
        inner: LogReporter,
    };
    let summary = sherl::fit::retrieval::train::run(&plan, &bar)?;
    if let Some(pb) = bar.bar.borrow_mut().take() {
        pb.finish_and_clear();
    }
    print_line(&serde_json::to_string(&summary)?)?;
    Ok(ExitCode::SUCCESS)
}

/// Picks the fused CPU ops' matrix kernel from `--blas`.
fn init_blas(flag: &str) -> anyhow::Result<()> {
    use sherl::fit::kernels::gemm::BlasChoice;
    let choice = match flag {
        "auto" | "" => BlasChoice::Auto,
        "off" | "gemm" => BlasChoice::Off,
        path => BlasChoice::Path(PathBuf::from(path)),
    };
    let kernel = sherl::fit::kernels::gemm::init_blas(&choice)
        .map_err(|e| anyhow::anyhow!("--blas {flag}: {e}"))?;
    tracing::debug!("matrix kernel: {kernel}");
    Ok(())
}

#[cfg(feature = "extract")]
fn predict(a: PredictArgs) -> anyhow::Result<ExitCode> {
    init_blas(&a.blas)?;
    let rt = sherl::extract::runtime::init_for(a.runtime.ort_lib.as_deref(), a.runtime.device)?;
    let plan = sherl::predict::PredictPlan {
        run: a.run.clone(),
        model: a
            .model
            .clone()
            .unwrap_or_else(|| a.backbone.join("model.onnx")),
        backbone: a.backbone.clone(),
        data: a.data.clone(),
        text_chars: a.text_chars,
        out: a.out.clone(),
        session: a.runtime.session_config(),
        batch_size: a.batch_size,
    };
    let s = sherl::predict::predict(rt, &plan)?;
    if a.out.is_some() {
        print_line(&serde_json::to_string(&s)?)?;
    } else {
        tracing::info!("{}", serde_json::to_string(&s)?);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "extract")]
fn search(a: SearchArgs) -> anyhow::Result<ExitCode> {
    use sherl::predict::query::search;
    use sherl::predict::search::{hit_line, summary, Query, SearchPlan};
    use std::io::Write;
    init_blas(&a.blas)?;
    let rt = sherl::extract::runtime::init_for(a.runtime.ort_lib.as_deref(), a.runtime.device)?;
    let query = match (a.text.clone(), a.image.clone()) {
        (Some(t), None) => Query::Text(t),
        (None, Some(i)) => Query::Image(i),
        _ => anyhow::bail!("give exactly one of --text and --image"),
    };
    let plan = SearchPlan {
        run: a.run.clone(),
        image_backbone: a.image_backbone.clone(),
        text_backbone: a.text_backbone.clone(),
        query,
        k: a.k,
        split: a.split.clone(),
    };
    let hits = search(rt, &plan, &a.runtime.session_config())?;
    match &a.out {
        Some(p) => {
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
            );
            for h in &hits {
                writeln!(f, "{}", hit_line(h))
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            f.flush()
                .with_context(|| format!("writing {}", p.display()))?;
            print_line(&summary(&plan, &hits).to_string())?;
        }
        None => {
            for h in &hits {
                print_line(&hit_line(h))?;
            }
            tracing::info!("{}", summary(&plan, &hits));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Sweep progress on stderr, results on stdout (one JSON line per run).
struct SweepLines;

impl sherl::fit::sweep::SweepReporter for SweepLines {
    fn start(&self, o: &sherl::fit::sweep::SweepOutcome, to_run: usize, jobs: usize) {
        tracing::info!(
            "sweep: {} runs for this worker; {} already done, {} failed before (skipped), {to_run} to run, {jobs} at a time",
            o.runs,
            o.done_before,
            o.failed_before
        );
    }
    fn finished(&self, n: usize, total: usize, r: &sherl::fit::sweep::PlannedRun, summary: &str) {
        tracing::info!("[{n}/{total}] run {} {} done", r.index, r.run_id);
        if let Err(e) = print_line(summary) {
            tracing::warn!("stdout: {e}");
        }
    }
    fn failed(
        &self,
        n: usize,
        total: usize,
        r: &sherl::fit::sweep::PlannedRun,
        why: &str,
        log: &std::path::Path,
    ) {
        tracing::warn!(
            "[{n}/{total}] run {} {} failed ({why}); log: {}",
            r.index,
            r.run_id,
            log.display()
        );
    }
    fn note(&self, message: &str) {
        tracing::info!("{message}");
    }
    fn progress(&self, done: usize, total: usize, elapsed: std::time::Duration) {
        let eta = if done == 0 {
            "ETA unknown until the first epoch ends".to_string()
        } else {
            let left = elapsed.as_secs_f64() * (total.saturating_sub(done)) as f64 / done as f64;
            format!("ETA {}m{:02}s", (left / 60.0) as u64, (left % 60.0) as u64)
        };
        tracing::info!(
            "sweep: {done}/{total} epochs ({:.0}%), {eta}",
            100.0 * done as f64 / total.max(1) as f64
        );
    }
}

fn sweep(a: SweepArgs) -> anyhow::Result<ExitCode> {
    use sherl::fit::sweep::SweepInputs;
    let retrieval_given = a.image_cache.is_some()
        || a.text_cache.is_some()
        || a.image_backbone.is_some()
        || a.text_backbone.is_some();
    let inputs = match a.task {
        Task::Classification => {
            if retrieval_given {
                anyhow::bail!("--image-cache, --text-cache, --image-backbone and --text-backbone belong to --task retrieval");
            }
            let (Some(cache), Some(backbone)) = (a.cache.clone(), a.backbone.clone()) else {
                anyhow::bail!("sherl-fit sweep needs --cache and --backbone (or --task retrieval with --image-cache, --text-cache, --image-backbone and --text-backbone)");
            };
            SweepInputs::Classification { cache, backbone }
        }
        Task::Retrieval => {
            if a.cache.is_some() || a.backbone.is_some() {
                anyhow::bail!("--task retrieval reads --image-cache and --text-cache (with --image-backbone and --text-backbone), not --cache and --backbone");
            }
            let (Some(image_cache), Some(text_cache), Some(image_backbone), Some(text_backbone)) = (
                a.image_cache.clone(),
                a.text_cache.clone(),
                a.image_backbone.clone(),
                a.text_backbone.clone(),
            ) else {
                anyhow::bail!("--task retrieval needs --image-cache, --text-cache, --image-backbone and --text-backbone");
            };
            SweepInputs::Retrieval {
                image_cache,
                text_cache,
                image_backbone,
                text_backbone,
            }
        }
    };
    let plan = sherl::fit::sweep::SweepPlan {
        inputs,
        grid: a.grid.clone(),
        out: a.out.clone(),
        jobs: a.jobs,
        worker: match &a.worker {
            Some(w) => sherl::fit::sweep::parse_worker(w)?,
            None => (0, 1),
        },
        retry_failed: a.retry_failed,
        device: a.device.clone(),
        blas: a.blas.clone(),
        exe: std::env::current_exe().context("locating sherl-fit")?,
    };
    let runs = sherl::fit::sweep::plan_runs(&plan)?;
    if a.dry_run {
        // Nothing is written: the plan only.
        for r in &runs {
            print_line(&serde_json::to_string(r)?)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let o = sherl::fit::sweep::run_sweep(&plan, &runs, &SweepLines)?;
    // stdout holds one JSON line per run; the table goes to stderr (and to
    // the files `sherl-fit report` writes).
    match sherl::report::report(&sherl::report::ReportOptions::new(&a.out)) {
        Ok(r) => {
            for w in &r.warnings {
                tracing::warn!("{w}");
            }
            eprintln!("{}", r.markdown);
        }
        Err(e) => tracing::warn!("no report: {e}"),
    }
    let failed = o.failed.len() + o.failed_before;
    if failed > 0 {
        tracing::warn!(
            "{failed} run(s) failed; see RUNS/<run id>/error.json and RUNS/.sweep/<run id>.log (--retry-failed runs them again)"
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn report(runs: PathBuf, out: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let mut opts = sherl::report::ReportOptions::new(&runs);
    if let Some(o) = out {
        opts.out = o;
    }
    let r = sherl::report::report(&opts)?;
    for w in &r.warnings {
        tracing::warn!("{w}");
    }
    for (dir, why) in &r.skipped {
        tracing::info!("skipped {}: {why}", dir.display());
    }
    for f in &r.files {
        tracing::info!("wrote {}", f.display());
    }
    print_line(&r.markdown)?;
    Ok(ExitCode::SUCCESS)
}
