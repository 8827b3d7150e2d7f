//! `predict --run RUNS` where RUNS is a directory of runs (what `sherl-fit
//! run --out` and `sweep` write), not a run: the runs it holds are listed
//! (id, method, valid and test accuracy, best first), or with `--best` the
//! run with the best valid accuracy is taken, and said so.

use std::path::{Path, PathBuf};

use crate::fit::error::FitError;
use crate::fit::run_dir::{SummaryView, CONFIG_FILE, SUMMARY_FILE};
use crate::Result;

/// Runs shown in the listing of a directory of runs.
const SHOWN: usize = 8;

/// One run of a directory of runs.
#[derive(Debug, Clone)]
pub struct ListedRun {
    /// Its directory.
    pub path: PathBuf,
    /// Its run id (the directory name when its summary has none).
    pub id: String,
    /// Its method, from `summary.json`.
    pub method: Option<String>,
    /// Valid accuracy of its best checkpoint (`None`: not finished, or
    /// not a classification run).
    pub valid_accuracy: Option<f64>,
    /// Test accuracy of its best checkpoint.
    pub test_accuracy: Option<f64>,
}

/// The runs in `dir` (its sub-directories holding a `config.json`; hidden
/// ones skipped), best valid accuracy first, unfinished runs last, ties in
/// name order. A summary that cannot be read lists the run without
/// accuracy.
pub fn list_runs(dir: &Path) -> Result<Vec<ListedRun>> {
    let mut runs = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| crate::Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| crate::Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with('.') || !path.is_dir() || !path.join(CONFIG_FILE).is_file() {
            continue;
        }
        let summary_path = path.join(SUMMARY_FILE);
        let summary: SummaryView = if summary_path.is_file() {
            crate::fsutil::read_json(&summary_path).unwrap_or_default()
        } else {
            SummaryView::default()
        };
        runs.push(ListedRun {
            id: summary.run_id.clone().unwrap_or(name),
            path,
            method: summary.method,
            valid_accuracy: summary.valid_accuracy.filter(|a| a.is_finite()),
            test_accuracy: summary.test_accuracy.filter(|a| a.is_finite()),
        });
    }
    runs.sort_by(|a, b| {
        let key = |r: &ListedRun| r.valid_accuracy.unwrap_or(f64::NEG_INFINITY);
        key(b).total_cmp(&key(a)).then_with(|| a.path.cmp(&b.path))
    });
    Ok(runs)
}

/// The run `run` names: itself when it holds a `config.json` (or is not a
/// directory: the run's own checks then say what is wrong); for a
/// directory of runs, the one with the best valid accuracy when `best`,
/// else an error listing the runs it holds.
pub fn resolve_run(run: &Path, best: bool) -> Result<PathBuf> {
    if !run.is_dir() || run.join(CONFIG_FILE).exists() {
        return Ok(run.to_owned());
    }
    let runs = list_runs(run)?;
    let bad = |message: String| -> crate::Error {
        FitError::BadRun {
            path: run.to_owned(),
            message,
        }
        .into()
    };
    if runs.is_empty() {
        return Err(bad(format!(
            "no {CONFIG_FILE}: not a run directory, and no run directory (one holding \
             {CONFIG_FILE}) in it; pass --run RUNS/<run id>"
        )));
    }
    if best {
        let Some(top) = runs.iter().find(|r| r.valid_accuracy.is_some()) else {
            return Err(bad(format!(
                "--best: none of its {} runs has finished with a valid accuracy (no \
                 summary.json, or retrieval runs)\n{}",
                runs.len(),
                table(&runs)
            )));
        };
        tracing::info!(
            "--best: took run {} ({}, valid accuracy {}) of the {} runs in {}",
            top.id,
            top.method.as_deref().unwrap_or("?"),
            accuracy(top.valid_accuracy),
            runs.len(),
            run.display()
        );
        return Ok(top.path.clone());
    }
    Err(bad(format!(
        "a directory of {} runs, not a run (no {CONFIG_FILE}); pass --run {}/<run id>, \
         or --best to take the run with the best valid accuracy:\n{}",
        runs.len(),
        run.display(),
        table(&runs)
    )))
}

fn accuracy(a: Option<f64>) -> String {
    a.map_or_else(|| "-".to_owned(), |a| format!("{a:.4}"))
}

/// The first [`SHOWN`] runs, one line each, and how many more there are.
fn table(runs: &[ListedRun]) -> String {
    let mut lines = vec![format!(
        "  {:<28} {:<14} {:>8} {:>8}",
        "run", "method", "valid", "test"
    )];
    for r in runs.iter().take(SHOWN) {
        lines.push(format!(
            "  {:<28} {:<14} {:>8} {:>8}",
            r.id,
            r.method.as_deref().unwrap_or("(unfinished)"),
            accuracy(r.valid_accuracy),
            accuracy(r.test_accuracy)
        ));
    }
    if runs.len() > SHOWN {
        lines.push(format!("  ... and {} more", runs.len() - SHOWN));
    }
    lines.join("\n")
}
