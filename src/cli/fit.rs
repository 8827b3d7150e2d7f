//! `sherl-fit`'s commands as library functions: each takes the parsed
//! flags ([`super::fit_args`]) and returns the JSON line the command
//! prints on stdout, so that the binary and the Python package
//! (`sherl.fit`, `sherl.predict`, `sherl.export`) run the same code with
//! the same defaults and errors. Logs and progress go to stderr, as the
//! binary's do.

use std::cell::RefCell;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[cfg(feature = "extract")]
use super::fit_args::PredictArgs;
use super::fit_args::{BlasSource, RunArgs};
use super::OutputArgs;
use crate::fit::retrieval::config::Task;
use crate::fit::run_dir::EpochMetrics;
use crate::fit::sweep::SweepInputs;
use crate::fit::train::{FitPlan, FitReporter, LogReporter};

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

/// The compute threads `run` sets before any tensor work
/// (`RAYON_NUM_THREADS`, which candle reads): training splits each CPU
/// batch in two parts run side by side
/// (`crate::fit::train::forward_backward`), each on half the threads: two
/// threads that never meet at a barrier do more than candle's per-op
/// parallelism on small tensors. A retrieval step is one pass (its loss
/// needs the whole batch): all threads for candle's ops.
pub fn set_run_threads(r: &RunArgs) {
    let threads = r.threads.unwrap_or_else(super::compute_threads);
    let per_part = match r.retrieval.task {
        Task::Classification => (threads / 2).max(1),
        Task::Retrieval => threads.max(1),
    };
    super::set_compute_threads(Some(per_part));
}

/// `sherl-fit run`: train one model into `RUNS/<run id>/`. Returns the
/// summary JSON line (what `summary.json` holds); the closing line for a
/// person goes to stderr unless `--quiet`. Call [`set_run_threads`] first.
pub fn run(a: RunArgs, output: &OutputArgs, blas: BlasSource) -> anyhow::Result<String> {
    let inputs = a.inputs()?;
    let config = a.settings.resolve(a.config.as_deref())?;
    let retrieval = match inputs {
        SweepInputs::Retrieval { .. } => Some(a.retrieval.resolve()?),
        SweepInputs::Classification { .. } => None,
    };
    init_blas(&a.blas, blas)?;
    let (device, fallback) = crate::fit::device(&a.device)?;
    match fallback {
        Some(why) => tracing::info!("device auto: training on the CPU ({why})"),
        None => tracing::debug!("training on {}", crate::fit::device_name(&device)),
    }
    let bar = Bar {
        visible: output.progress(),
        bar: RefCell::new(None),
        inner: LogReporter,
    };
    let summary = match inputs {
        SweepInputs::Retrieval {
            image_cache,
            text_cache,
            image_backbone,
            text_backbone,
        } => {
            let plan = crate::fit::retrieval::train::RetrievalPlan {
                image_cache,
                text_cache,
                image_backbone,
                text_backbone,
                out: a.out.clone(),
                config,
                retrieval: retrieval.unwrap_or_default(),
                device,
                workers: 1,
            };
            let summary = crate::fit::retrieval::train::run(&plan, &bar)?;
            if let Some(pb) = bar.bar.borrow_mut().take() {
                pb.finish_and_clear();
            }
            summary
        }
        SweepInputs::Classification { cache, backbone } => {
            let plan = FitPlan {
                cache,
                backbone,
                out: a.out.clone(),
                config,
                device,
                decode_threads: a.decode_threads,
                workers: a.threads.unwrap_or_else(super::compute_threads).min(2),
            };
            crate::fit::train::run(&plan, &bar)?
        }
    };
    let line = serde_json::to_string(&summary)?;
    if !output.quiet {
        eprintln!("{}", human_line(&summary));
    }
    Ok(line)
}

/// `run`'s closing line for a person (stderr; stdout keeps the JSON line):
/// the best checkpoint's scores, where the run is, how to use it.
fn human_line(s: &crate::fit::run_dir::Summary) -> String {
    use crate::fit::run_dir::SummaryTask;
    let dir = s.run_dir.display();
    let test =
        |t: Option<f64>| t.map_or_else(|| "no test split".to_owned(), |t| format!("test {t:.4}"));
    match &s.task {
        SummaryTask::Classification {
            valid_accuracy,
            test_accuracy,
            ..
        } => format!(
            "{} run {}: valid accuracy {valid_accuracy:.4}, {} (best epoch {} of {}); run in {dir}; label new data with: sherl-fit predict --run {dir} --data FILE",
            s.method,
            s.run_id,
            test(*test_accuracy),
            s.best_epoch,
            s.epochs,
        ),
        SummaryTask::Retrieval {
            valid_rsum, test_rsum, ..
        } => format!(
            "{} run {}: valid rsum {valid_rsum:.2}, {} (best epoch {} of {}); run in {dir}; query it with: sherl-fit search --run {dir} --image-backbone DIR --text-backbone DIR --text QUERY",
            s.method,
            s.run_id,
            test_rsum.map_or_else(|| "no test split".to_owned(), |t| format!("test rsum {t:.2}")),
            s.best_epoch,
            s.epochs,
        ),
    }
}

/// Picks the fused CPU ops' matrix kernel from `--blas` (or `SHERL_BLAS`:
/// `source` says which, and errors name it).
pub fn init_blas(flag: &str, source: BlasSource) -> anyhow::Result<()> {
    use crate::fit::kernels::gemm::BlasChoice;
    let choice = match flag {
        "auto" | "" => BlasChoice::Auto,
        "off" | "gemm" => BlasChoice::Off,
        path => BlasChoice::Path(PathBuf::from(path)),
    };
    let kernel = crate::fit::kernels::gemm::init_blas(&choice)
        .map_err(|e| anyhow::anyhow!("{}: {e}", source.describe(flag)))?;
    tracing::debug!("matrix kernel: {kernel}");
    Ok(())
}

/// `sherl-fit predict`: label `--data` with a run. The prediction lines go
/// to `--out` when given, else to stdout; returns the summary JSON line
/// (which the binary prints on stdout with `--out`, else logs).
#[cfg(feature = "extract")]
pub fn predict(a: PredictArgs, blas: BlasSource) -> anyhow::Result<String> {
    init_blas(&a.blas, blas)?;
    let rt = crate::extract::runtime::init_for(a.runtime.ort_lib.as_deref(), a.runtime.device)?;
    let plan = crate::predict::PredictPlan {
        run: a.run.clone(),
        best: a.best,
        model: a.model.clone(),
        backbone: a.backbone.clone(),
        data: a.data.clone(),
        text_chars: a.text_chars,
        out: a.out.clone(),
        session: a.runtime.session_config(),
        batch_size: a.batch_size,
    };
    let s = crate::predict::predict(rt, &plan)?;
    Ok(serde_json::to_string(&s)?)
}

/// `sherl-fit export`: write the run in `run` as a standalone ONNX model
/// in `out`, with the backbone `backbone`, or when `None` the one the run
/// recorded (when its ONNX model is still there with the recorded sha256,
/// as `predict` finds it; else an error asking for `--backbone`). A
/// retrieval run is written as two encoders, with `image_backbone` and
/// `text_backbone` (each, when `None`, the one its cache recorded).
/// Returns the summary JSON line.
#[cfg(feature = "extract")]
pub fn export(
    run: PathBuf,
    backbone: Option<PathBuf>,
    image_backbone: Option<PathBuf>,
    text_backbone: Option<PathBuf>,
    out: PathBuf,
) -> anyhow::Result<String> {
    use crate::predict::export::retrieval;
    if retrieval::is_retrieval_run(&run)? {
        if backbone.is_some() {
            return Err(crate::Error::setting(
                "--backbone",
                "a retrieval run has two backbones: pass --image-backbone and --text-backbone",
            )
            .into());
        }
        let plan = retrieval::RetrievalExportPlan {
            run,
            image_backbone,
            text_backbone,
            out,
        };
        let s = retrieval::export_retrieval(&plan)?;
        return Ok(serde_json::to_string(&s)?);
    }
    if let Some(flag) = [
        ("--image-backbone", &image_backbone),
        ("--text-backbone", &text_backbone),
    ]
    .iter()
    .find_map(|(f, v)| v.is_some().then_some(*f))
    {
        return Err(crate::Error::setting(
            flag,
            format!("{flag} is for retrieval runs; a classification run takes --backbone"),
        )
        .into());
    }
    let backbone = match backbone {
        Some(b) => b,
        None => {
            let rc = crate::fit::run_dir::RunConfig::read(&run)?;
            crate::predict::checks::backbone_dir(None, None, &rc)?.0
        }
    };
    let plan = crate::predict::export::ExportPlan { run, backbone, out };
    let s = crate::predict::export::export(&plan)?;
    Ok(serde_json::to_string(&s)?)
}
