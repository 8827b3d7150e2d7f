//! `sherl-fit`: phase two. Trains SHERL (and baselines) from a feature
//! cache with candle, without re-running the backbone.
//! Its command line is `sherl::cli::fit_args`; this file dispatches.

/// mimalloc, counting the training steps' own memory
/// (`sherl::fit::alloc_track`: `train_memory` in summary.json).
#[global_allocator]
static GLOBAL: sherl::fit::alloc_track::Tracking<mimalloc::MiMalloc> =
    sherl::fit::alloc_track::Tracking(mimalloc::MiMalloc);

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use sherl::cli::fit_args::{BlasSource, Command, RunArgs, SweepArgs};
#[cfg(feature = "extract")]
use sherl::cli::fit_args::{PredictArgs, SearchArgs};
use sherl::cli::{init_output, main_wrapper, print_line, OutputArgs};

fn main() -> ExitCode {
    sherl::cli::tune_allocator();
    GLOBAL.installed();
    main_wrapper(|| {
        let args = sherl::cli::fit_args::parse();
        if let Command::Run(r) = &args.command {
            sherl::cli::fit::set_run_threads(r);
            sherl::fit::sweep::exit_with_parent();
        }
        init_output(&args.output);
        let blas = args.blas_source;
        match args.command {
            Command::Run(a) => run(*a, &args.output, blas),
            #[cfg(feature = "extract")]
            Command::Predict(a) => predict(*a, blas),
            #[cfg(feature = "extract")]
            Command::Search(a) => search(*a, blas),
            #[cfg(feature = "extract")]
            Command::Export {
                run,
                backbone,
                image_backbone,
                text_backbone,
                out,
            } => {
                print_line(&sherl::cli::fit::export(
                    run,
                    backbone,
                    image_backbone,
                    text_backbone,
                    out,
                )?)?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Sweep(a) => sweep(*a, blas),
            Command::Report {
                runs,
                out,
                select_by,
            } => report(runs, out, select_by),
        }
    })
}

fn run(a: RunArgs, output: &OutputArgs, blas: BlasSource) -> anyhow::Result<ExitCode> {
    print_line(&sherl::cli::fit::run(a, output, blas)?)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "extract")]
fn predict(a: PredictArgs, blas: BlasSource) -> anyhow::Result<ExitCode> {
    let to_file = a.out.is_some();
    let summary = sherl::cli::fit::predict(a, blas)?;
    if to_file {
        print_line(&summary)?;
    } else {
        tracing::info!("{summary}");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "extract")]
fn search(a: SearchArgs, blas: BlasSource) -> anyhow::Result<ExitCode> {
    use sherl::predict::query::search;
    use sherl::predict::search::{hit_line, summary, Query, SearchPlan};
    use std::io::Write;
    sherl::cli::fit::init_blas(&a.blas, blas)?;
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
    // --out is checked and created before the query runs; written under a
    // temporary name, renamed when complete.
    let out_file = match &a.out {
        Some(p) => {
            let inputs: Vec<(&str, &std::path::Path)> =
                a.image.iter().map(|i| ("--image", i.as_path())).collect();
            Some(sherl::predict::output::create_output(p, &inputs)?)
        }
        None => None,
    };
    let hits = search(rt, &plan, &a.runtime.session_config())?;
    match out_file {
        Some(mut f) => {
            let p = f.path().to_path_buf();
            for h in &hits {
                writeln!(f, "{}", hit_line(h))
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            f.commit()?;
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

fn sweep(a: SweepArgs, blas: BlasSource) -> anyhow::Result<ExitCode> {
    let inputs = a.inputs.inputs("sweep")?;
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
        max_runs: a.max_runs,
    };
    let runs = sherl::fit::sweep::plan_runs(&plan)?;
    if a.dry_run {
        // Nothing is written: the plan only.
        for r in &runs {
            print_line(&serde_json::to_string(r)?)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Every run is given this --blas: a library that does not load is
    // refused here, naming where the value came from, not in every run.
    sherl::cli::fit::init_blas(&a.blas, blas)?;
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

fn report(runs: PathBuf, out: Option<PathBuf>, select_by: String) -> anyhow::Result<ExitCode> {
    let mut opts = sherl::report::ReportOptions::new(&runs);
    if let Some(o) = out {
        opts.out = o;
    }
    opts.select_by = select_by;
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
