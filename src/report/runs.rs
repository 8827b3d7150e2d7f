//! `sherl-fit report`: summarise a directory of runs.
//!
//! Reads every complete run `RUNS/<run id>/` (one with a `summary.json`,
//! plus its `config.json` and `metrics.jsonl`), groups the runs whose
//! settings are equal except for the seed (and that were trained on the
//! same cache), and writes to the output directory (default
//! `RUNS/report`):
//!
//! - `report.md`: the table returned in [`Report::markdown`], best group
//!   first by mean valid accuracy, with mean ± sample standard deviation over
//!   the seeds, and the pictures below;
//! - `report.csv` and `report.json`: the same numbers, unrounded;
//! - `learning_curves.{png,svg}`: valid accuracy (%) per epoch, mean over
//!   seeds, one line per group, shaded mean ± sample std over seeds;
//! - `layer_weights.{png,svg}`: SHERL's layer weights (alpha averaged over
//!   the valid split's real tokens, then over seeds) per early layer, one
//!   bar per `sherl` group with ± sample std error bars; only when some run
//!   has them.
//!
//! Retrieval runs (`--task retrieval`) get their own table in `report.md`
//! (Recall@1/5/10 both ways, rsum, trainable parameters, peak memory,
//! seconds per epoch; best first by mean valid rsum) and `retrieval.csv`,
//! and `retrieval_examples.{png,svg}` shows the best group's text queries
//! with their top 5 test images (`gallery`).
//!
//! Run directories without `summary.json` (running, killed, or failed with
//! an `error.json`) are listed in [`Report::skipped`] with the reason.
//! Unknown JSON fields are ignored and missing optional ones are tolerated,
//! so reports keep working as the run format grows.
//!
//! Here: the report's types, grouping and statistics; `read` reads run
//! directories, `table` writes the CSV and Markdown, `plot` the pictures.

mod gallery;
mod plot;
mod read;
mod retrieval;
mod table;

pub use retrieval::RetrievalGroupRow;

use read::{load_run, Run};
use table::{to_csv, to_markdown};

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Serialize;
use serde_json::{json, Value};

pub use crate::error::report::ReportError;
use crate::{Error, Result};

/// What [`report`] reads and where it writes.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// Directory holding run directories (`sherl-fit run --out`).
    pub runs: PathBuf,
    /// Output directory (created if missing); `RUNS/report` by default.
    pub out: PathBuf,
    /// The setting the "selected on valid" table has one row per value of
    /// (`method` by default).
    pub select_by: String,
}

impl ReportOptions {
    /// Report on `runs`, writing to `runs/report`.
    pub fn new(runs: impl Into<PathBuf>) -> Self {
        let runs = runs.into();
        let out = runs.join("report");
        ReportOptions {
            runs,
            out,
            select_by: "method".into(),
        }
    }
}

/// Mean and sample standard deviation of one metric over a group's seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stat {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (n - 1 denominator); `None` for one value.
    pub std: Option<f64>,
    /// Number of values (seeds that reported this metric).
    pub n: usize,
}

impl Stat {
    /// Mean and sample std of `values`; `None` when empty.
    pub fn of(values: &[f64]) -> Option<Stat> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let std = (n > 1).then(|| {
            let ss: f64 = values.iter().map(|v| (v - mean).powi(2)).sum();
            (ss / (n - 1) as f64).sqrt()
        });
        Some(Stat { mean, std, n })
    }
}

/// One point of a group's mean learning curve.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurvePoint {
    /// 1-based epoch.
    pub epoch: usize,
    /// Valid accuracy at this epoch, mean over the seeds that reached it.
    pub valid_accuracy: f64,
    /// Sample standard deviation (n - 1) over those seeds; `None` for one.
    pub std: Option<f64>,
    /// Lowest valid accuracy of those seeds at this epoch.
    pub min: f64,
    /// Highest valid accuracy of those seeds at this epoch.
    pub max: f64,
    /// Seeds averaged.
    pub n: usize,
}

/// A group's mean SHERL weight of one early layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerWeight {
    /// `hidden_states` index of the layer.
    pub layer: usize,
    /// Weight, mean over the seeds that reported it.
    pub mean: f64,
    /// Sample standard deviation (n - 1) over those seeds; `None` for one.
    pub std: Option<f64>,
    /// Lowest weight of those seeds.
    pub min: f64,
    /// Highest weight of those seeds.
    pub max: f64,
    /// Seeds averaged.
    pub n: usize,
}

/// One row of the report: the runs whose settings differ only by seed.
#[derive(Debug, Clone, Serialize)]
pub struct GroupRow {
    /// Method (`sherl`, `linear-probe`, ...).
    pub method: String,
    /// Method plus the settings that tell this group apart from the other
    /// groups of its method, e.g. `sherl late_trainable=true lr=0.001`.
    pub label: String,
    /// The settings part of `label` (empty when the method has one group).
    pub settings_label: String,
    /// The run's `config` object (`config.json`) without `seed`.
    pub settings: Value,
    /// Cache settings hash the runs were trained on, when known.
    pub cache: Option<String>,
    /// Seeds, in run-directory order.
    pub seeds: Vec<u64>,
    /// Run ids (directory names), in the same order.
    pub run_ids: Vec<String>,
    /// Valid accuracy of the best checkpoint.
    pub valid_accuracy: Stat,
    /// Test accuracy (`None` when no run has a test split).
    pub test_accuracy: Option<Stat>,
    /// Valid macro-F1.
    pub valid_macro_f1: Option<Stat>,
    /// Test macro-F1.
    pub test_macro_f1: Option<Stat>,
    /// Trainable parameters (largest over seeds; they are normally equal).
    pub trainable_params: Option<u64>,
    /// Peak resident memory, MiB: the largest over seeds.
    pub peak_memory_mib: Option<f64>,
    /// Training seconds per epoch, mean over seeds.
    pub seconds_per_epoch: Option<f64>,
    /// Valid accuracy per epoch (`metrics.jsonl`), mean over seeds.
    pub valid_accuracy_curve: Vec<CurvePoint>,
    /// SHERL layer weights, mean over seeds, by layer (empty if none).
    pub layer_weights: Vec<LayerWeight>,
}

/// What [`report`] found and wrote.
#[derive(Debug, Clone)]
pub struct Report {
    /// Groups, best first (mean valid accuracy, ties by valid macro-F1,
    /// then label; test never enters the order).
    pub groups: Vec<GroupRow>,
    /// Retrieval groups, best first (mean valid rsum, ties by label).
    pub retrieval_groups: Vec<RetrievalGroupRow>,
    /// The Markdown report (also written as `report.md`).
    pub markdown: String,
    /// Files written, in the order written.
    pub files: Vec<PathBuf>,
    /// Run directories left out, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    /// Data left out of included runs (unreadable `metrics.jsonl` lines).
    pub warnings: Vec<String>,
}

/// The note under the table: how groups are ordered and what the numbers are.
pub const SELECTION_NOTE: &str = "Groups are sorted by mean valid accuracy, best first (ties by mean valid macro-F1, then by label): settings are selected on the valid split only; test numbers are reported for the selected settings, never used to choose them. Values are mean ± sample standard deviation (n − 1) over seeds; \"-\" means no value (no test split; one seed for ±); (k/n): only k of the n seeds reported the metric.";

/// Summarise the runs in `opts.runs` and write the report to `opts.out`.
///
/// Fails when `opts.runs` cannot be listed, when it holds no complete run
/// (the error names how many directories were skipped and why the first
/// was), or when an output file cannot be written.
pub fn report(opts: &ReportOptions) -> Result<Report> {
    let entries = std::fs::read_dir(&opts.runs).map_err(|e| Error::io(&opts.runs, e))?;
    let out_canon = std::fs::canonicalize(&opts.out).ok();
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(&opts.runs, e))?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if hidden || !path.is_dir() {
            continue;
        }
        let is_out = path == opts.out
            || out_canon.is_some() && std::fs::canonicalize(&path).ok() == out_canon;
        if !is_out {
            dirs.push(path);
        }
    }
    dirs.sort();

    let mut runs = Vec::new();
    let mut retrieval_runs = Vec::new();
    let mut skipped = Vec::new();
    for dir in dirs {
        if retrieval::is_retrieval(&dir) {
            match retrieval::load(&dir) {
                Ok(run) => retrieval_runs.push(run),
                Err(reason) => skipped.push((dir, reason)),
            }
            continue;
        }
        match load_run(&dir) {
            Ok(run) => runs.push(run),
            Err(reason) => skipped.push((dir, reason)),
        }
    }
    if runs.is_empty() && retrieval_runs.is_empty() {
        let first = skipped
            .first()
            .map(|(d, r)| format!(": {}: {r}", d.display()))
            .unwrap_or_default();
        return Err(ReportError::NoCompleteRuns {
            runs: opts.runs.clone(),
            skipped: skipped.len(),
            first,
        }
        .into());
    }

    let mut warnings: Vec<String> = Vec::new();
    for r in &runs {
        if let Some(e) = &r.curve_error {
            warnings.push(format!(
                "{e}; the run is reported without its learning curve"
            ));
        }
        if !r.unreadable_lines.is_empty() {
            let lines: Vec<String> = r.unreadable_lines.iter().map(|n| n.to_string()).collect();
            warnings.push(format!(
                "{}: could not read line(s) {} of metrics.jsonl; the learning curve leaves them out",
                opts.runs.join(&r.id).display(),
                lines.join(", ")
            ));
        }
    }
    let groups = build_groups(runs);
    if opts.select_by != "method"
        && !groups.is_empty()
        && !groups
            .iter()
            .any(|g| g.settings.get(&opts.select_by).is_some())
    {
        let known: BTreeSet<&str> = groups
            .iter()
            .filter_map(|g| g.settings.as_object())
            .flat_map(|o| o.keys().map(String::as_str))
            .collect();
        return Err(ReportError::UnknownSetting {
            key: opts.select_by.clone(),
            known: known.into_iter().collect::<Vec<_>>().join(", "),
        }
        .into());
    }
    let retrieval_groups = retrieval::build(retrieval_runs);
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let mut files = Vec::new();

    let retrieval_csv = opts.out.join("retrieval.csv");
    let retrieval_md = if retrieval_groups.is_empty() {
        if retrieval_csv.exists() {
            std::fs::remove_file(&retrieval_csv).map_err(|e| Error::io(&retrieval_csv, e))?;
        }
        String::new()
    } else {
        crate::fsutil::write_atomic(
            &retrieval_csv,
            &retrieval::to_csv(&retrieval_groups, &retrieval_csv)?,
        )?;
        files.push(retrieval_csv);
        retrieval::markdown(&retrieval_groups)
    };

    let csv_path = opts.out.join("report.csv");
    crate::fsutil::write_atomic(&csv_path, &to_csv(&groups, &csv_path)?)?;
    files.push(csv_path);

    let json_path = opts.out.join("report.json");
    let doc = json!({
        "runs": opts.runs,
        "note": SELECTION_NOTE,
        "groups": groups,
        "retrieval_groups": retrieval_groups,
        "skipped": skipped
            .iter()
            .map(|(d, r)| json!({ "dir": d, "reason": r }))
            .collect::<Vec<_>>(),
    });
    let bytes = serde_json::to_vec_pretty(&doc).map_err(|e| Error::Json {
        path: json_path.clone(),
        source: e,
    })?;
    crate::fsutil::write_atomic(&json_path, &bytes)?;
    files.push(json_path);

    let mut pictures = plot::draw_all(&groups, &opts.out)?;
    pictures.extend(gallery::draw(&retrieval_groups, &opts.runs, &opts.out)?);
    let markdown = to_markdown(opts, &groups, &retrieval_md, &skipped, &pictures);
    let md_path = opts.out.join("report.md");
    crate::fsutil::write_atomic(&md_path, markdown.as_bytes())?;
    files.push(md_path);
    files.extend(pictures.into_iter().flat_map(|p| p.files));

    Ok(Report {
        groups,
        retrieval_groups,
        markdown,
        files,
        skipped,
        warnings,
    })
}

/// JSON with object keys sorted at every level, no whitespace.
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, &Value> = m.iter().collect();
            let parts: Vec<String> = sorted
                .into_iter()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), canonical(v)))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => {
            let parts: Vec<String> = a.iter().map(canonical).collect();
            format!("[{}]", parts.join(","))
        }
        other => other.to_string(),
    }
}

/// A setting's value as shown in a label: strings bare, numbers as the user
/// wrote them, the rest as JSON. A single-precision setting (dropout) is
/// stored widened to f64 in `config.json` (0.1 becomes
/// 0.10000000149011612); it is shown as the shortest decimal that gives the
/// same f32 back. Also used for the defaults in `sherl-fit run --help`.
pub fn setting_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            let narrow = x as f32;
            if f64::from(narrow) == x && narrow.to_string().len() < x.to_string().len() {
                narrow.to_string()
            } else {
                x.to_string()
            }
        }
        other => canonical(other),
    }
}

/// [`setting_text`], or `-` for a setting a run does not have.
fn show_value(v: Option<&Value>) -> String {
    v.map_or_else(|| "-".to_string(), setting_text)
}

fn build_groups(runs: Vec<Run>) -> Vec<GroupRow> {
    let mut by_key: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    for run in runs {
        by_key.entry(run.key()).or_default().push(run);
    }
    let groups: Vec<Vec<Run>> = by_key.into_values().collect();

    // Settings that differ between the groups of one method go in the label;
    // the cache goes in every label when the groups do not share one.
    let caches: BTreeSet<Option<&str>> = groups.iter().map(|g| g[0].cache.as_deref()).collect();
    let show_cache = caches.len() > 1;
    let mut differing: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut methods: BTreeMap<&str, Vec<&Run>> = BTreeMap::new();
    for g in &groups {
        methods.entry(g[0].method.as_str()).or_default().push(&g[0]);
    }
    for (method, firsts) in &methods {
        let keys: BTreeSet<&String> = firsts.iter().flat_map(|r| r.settings.keys()).collect();
        let set = differing.entry(method).or_default();
        for key in keys {
            if key == "method" {
                continue;
            }
            let values: BTreeSet<String> = firsts
                .iter()
                .map(|r| show_value(r.settings.get(key)))
                .collect();
            if values.len() > 1 {
                set.insert(key.clone());
            }
        }
    }

    let mut rows: Vec<GroupRow> = groups
        .iter()
        .map(|g| {
            let first = &g[0];
            let mut parts: Vec<String> = differing[first.method.as_str()]
                .iter()
                .map(|k| format!("{k}={}", show_value(first.settings.get(k))))
                .collect();
            if show_cache {
                parts.push(format!(
                    "cache={}",
                    first.cache.as_deref().map_or("-", crate::hash::abbrev)
                ));
            }
            let settings_label = parts.join(" ");
            let label = if settings_label.is_empty() {
                first.method.clone()
            } else {
                format!("{} {settings_label}", first.method)
            };
            group_row(g, label, settings_label)
        })
        .collect();
    // valid split only: accuracy, then macro-F1, then the label (never test)
    rows.sort_by(|a, b| {
        let f1 = |r: &GroupRow| {
            r.valid_macro_f1
                .as_ref()
                .map_or(f64::NEG_INFINITY, |s| s.mean)
        };
        b.valid_accuracy
            .mean
            .total_cmp(&a.valid_accuracy.mean)
            .then_with(|| f1(b).total_cmp(&f1(a)))
            .then_with(|| a.label.cmp(&b.label))
    });
    rows
}

fn group_row(g: &[Run], label: String, settings_label: String) -> GroupRow {
    let first = &g[0];
    let collect =
        |f: &dyn Fn(&Run) -> Option<f64>| -> Vec<f64> { g.iter().filter_map(f).collect() };
    let valid_accuracy = Stat::of(&collect(&|r| Some(r.valid_accuracy))).expect("non-empty group");

    // Per epoch and per layer: the seeds' values, in run order.
    let mut curve: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for r in g {
        for (&epoch, &acc) in &r.curve {
            curve.entry(epoch).or_default().push(acc);
        }
    }
    let mut weights: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for r in g {
        let Some(w) = &r.summary.layer_weights else {
            continue;
        };
        let layers: Vec<usize> = match &r.summary.layer_weight_layers {
            Some(l) if l.len() == w.len() => l.clone(),
            _ => (0..w.len()).collect(),
        };
        for (layer, &v) in layers.into_iter().zip(w) {
            weights.entry(layer).or_default().push(v);
        }
    }

    let peak = g
        .iter()
        .filter_map(|r| r.summary.peak_rss_bytes)
        .filter(|&b| b > 0)
        .max();
    GroupRow {
        method: first.method.clone(),
        label,
        settings_label,
        settings: Value::Object(first.settings.clone()),
        cache: first.cache.clone(),
        seeds: g.iter().map(|r| r.seed).collect(),
        run_ids: g.iter().map(|r| r.id.clone()).collect(),
        valid_accuracy,
        test_accuracy: Stat::of(&collect(&|r| r.summary.test_accuracy)),
        valid_macro_f1: Stat::of(&collect(&|r| r.summary.valid_macro_f1)),
        test_macro_f1: Stat::of(&collect(&|r| r.summary.test_macro_f1)),
        trainable_params: g.iter().filter_map(|r| r.summary.trainable_params).max(),
        peak_memory_mib: peak.map(|b| b as f64 / (1024.0 * 1024.0)),
        seconds_per_epoch: Stat::of(&collect(&|r| r.summary.seconds_per_epoch)).map(|s| s.mean),
        valid_accuracy_curve: curve
            .into_iter()
            .filter_map(|(epoch, values)| {
                let (s, min, max) = spread(&values)?;
                Some(CurvePoint {
                    epoch,
                    valid_accuracy: s.mean,
                    std: s.std,
                    min,
                    max,
                    n: s.n,
                })
            })
            .collect(),
        layer_weights: weights
            .into_iter()
            .filter_map(|(layer, values)| {
                let (s, min, max) = spread(&values)?;
                Some(LayerWeight {
                    layer,
                    mean: s.mean,
                    std: s.std,
                    min,
                    max,
                    n: s.n,
                })
            })
            .collect(),
    }
}

/// Mean, sample std, min and max of `values`; `None` when empty.
fn spread(values: &[f64]) -> Option<(Stat, f64, f64)> {
    let s = Stat::of(values)?;
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((s, min, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_precision_settings_show_as_written() {
        assert_eq!(show_value(Some(&json!(0.1f32))), "0.1");
        assert_eq!(show_value(Some(&json!(0.001))), "0.001");
        assert_eq!(show_value(Some(&json!(0.5))), "0.5");
        assert_eq!(show_value(Some(&json!(3))), "3");
        assert_eq!(show_value(Some(&json!("mean"))), "mean");
        assert_eq!(show_value(None), "-");
    }
}
