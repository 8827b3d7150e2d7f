//! The report's tables: `report.csv` (unrounded) and `report.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::plot;
use super::{canonical, show_value, GroupRow, ReportOptions, Stat, SELECTION_NOTE};
use crate::{Error, Result};

fn opt_num<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

pub(super) fn to_csv(groups: &[GroupRow], path: &Path) -> Result<Vec<u8>> {
    let err = |e: csv::Error| Error::io(path, std::io::Error::other(e));
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "rank",
        "method",
        "label",
        "settings_label",
        "seeds",
        "valid_accuracy_mean",
        "valid_accuracy_std",
        "test_accuracy_mean",
        "test_accuracy_std",
        "test_accuracy_n",
        "valid_macro_f1_mean",
        "valid_macro_f1_std",
        "test_macro_f1_mean",
        "test_macro_f1_std",
        "trainable_params",
        "peak_memory_mib",
        "seconds_per_epoch",
        "cache",
        "run_ids",
        "settings_json",
    ])
    .map_err(err)?;
    for (i, g) in groups.iter().enumerate() {
        let mean = |s: &Option<Stat>| opt_num(s.as_ref().map(|s| s.mean));
        let std = |s: &Option<Stat>| opt_num(s.as_ref().and_then(|s| s.std));
        let valid = Some(g.valid_accuracy.clone());
        w.write_record([
            (i + 1).to_string(),
            g.method.clone(),
            g.label.clone(),
            g.settings_label.clone(),
            g.seeds.len().to_string(),
            mean(&valid),
            std(&valid),
            mean(&g.test_accuracy),
            std(&g.test_accuracy),
            g.test_accuracy.as_ref().map_or(0, |s| s.n).to_string(),
            mean(&g.valid_macro_f1),
            std(&g.valid_macro_f1),
            mean(&g.test_macro_f1),
            std(&g.test_macro_f1),
            opt_num(g.trainable_params),
            opt_num(g.peak_memory_mib),
            opt_num(g.seconds_per_epoch),
            g.cache.clone().unwrap_or_default(),
            g.run_ids.join(" "),
            canonical(&g.settings),
        ])
        .map_err(err)?;
    }
    w.into_inner()
        .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))
}

/// `81.23 ± 0.45` (percent), `-` when absent, `(k/n)` when partial.
fn pct(s: Option<&Stat>, seeds: usize) -> String {
    let Some(s) = s else {
        return "-".to_string();
    };
    let mut t = match s.std {
        Some(sd) => format!("{:.2} ± {:.2}", 100.0 * s.mean, 100.0 * sd),
        None => format!("{:.2}", 100.0 * s.mean),
    };
    if s.n < seeds {
        t.push_str(&format!(" ({}/{seeds})", s.n));
    }
    t
}

/// 1234567 -> `1,234,567`.
pub(super) fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Text safe inside a Markdown table cell.
pub(super) fn cell(s: &str) -> String {
    let s = s.replace(['\n', '\r'], " ").replace('|', "\\|");
    if s.is_empty() {
        "-".to_string()
    } else {
        s
    }
}

pub(super) fn to_markdown(
    opts: &ReportOptions,
    groups: &[GroupRow],
    retrieval: &str,
    skipped: &[(PathBuf, String)],
    pictures: &[plot::Picture],
) -> String {
    use std::fmt::Write as _;
    let runs: usize = groups.iter().map(|g| g.seeds.len()).sum();
    let mut md = String::new();
    let _ = writeln!(md, "# sherl runs: {}\n", opts.runs.display());
    if groups.is_empty() {
        // Retrieval runs only: their own section, below.
        let _ = writeln!(
            md,
            "No classification run; {} run director{} skipped.\n",
            skipped.len(),
            if skipped.len() == 1 { "y" } else { "ies" }
        );
    } else {
        classification_tables(&mut md, groups, skipped, runs, &opts.select_by);
    }
    md.push_str(retrieval);
    if !pictures.is_empty() {
        md.push_str("## Pictures\n\n");
        for p in pictures {
            let _ = writeln!(
                md,
                "![{}]({}.png)\n\nSVG: [{}.svg]({}.svg)\n",
                p.title, p.stem, p.stem, p.stem
            );
        }
    }
    if !skipped.is_empty() {
        md.push_str("## Skipped run directories\n\n");
        for (dir, reason) in skipped {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| dir.display().to_string());
            let _ = writeln!(md, "- `{name}`: {}", reason.replace(['\n', '\r'], " "));
        }
        md.push('\n');
    }
    md
}

/// The classification table and its settings list.
fn classification_tables(
    md: &mut String,
    groups: &[GroupRow],
    skipped: &[(PathBuf, String)],
    runs: usize,
    select_by: &str,
) {
    use std::fmt::Write as _;
    let _ = writeln!(
        md,
        "{runs} complete run(s) in {} group(s); {} run director{} skipped.\n",
        groups.len(),
        skipped.len(),
        if skipped.len() == 1 { "y" } else { "ies" }
    );
    md.push_str(
        "| # | method | settings | seeds | valid acc (%) | test acc (%) | valid macro-F1 (%) | test macro-F1 (%) | trainable params | peak mem (MiB) | s/epoch |\n",
    );
    md.push_str("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (i, g) in groups.iter().enumerate() {
        let n = g.seeds.len();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {n} | {} | {} | {} | {} | {} | {} | {} |",
            i + 1,
            cell(&g.method),
            cell(&g.settings_label),
            pct(Some(&g.valid_accuracy), n),
            pct(g.test_accuracy.as_ref(), n),
            pct(g.valid_macro_f1.as_ref(), n),
            pct(g.test_macro_f1.as_ref(), n),
            g.trainable_params.map_or("-".to_string(), thousands),
            g.peak_memory_mib
                .map_or("-".to_string(), |m| format!("{m:.0}")),
            g.seconds_per_epoch
                .map_or("-".to_string(), |s| format!("{s:.2}")),
        );
    }
    let _ = writeln!(md, "\n{SELECTION_NOTE}\n");
    selected_table(md, groups, select_by);

    // What every group of a method shares (the labels show the rest).
    md.push_str("## Settings\n\n");
    let mut methods: BTreeMap<&str, Vec<&GroupRow>> = BTreeMap::new();
    for g in groups {
        methods.entry(g.method.as_str()).or_default().push(g);
    }
    for (method, gs) in methods {
        let first = gs[0].settings.as_object().cloned().unwrap_or_default();
        let shared: Vec<String> = first
            .iter()
            .filter(|(k, v)| {
                k.as_str() != "method"
                    && gs
                        .iter()
                        .all(|g| g.settings.get(k.as_str()).map(canonical) == Some(canonical(v)))
            })
            .map(|(k, v)| format!("{k}={}", show_value(Some(v))))
            .collect();
        let _ = writeln!(
            md,
            "- `{method}` ({} group(s)), shared: {}",
            gs.len(),
            if shared.is_empty() {
                "-".to_string()
            } else {
                format!("`{}`", shared.join(" "))
            }
        );
    }
    md.push('\n');
}

/// The groups a `select_by` value selects: for each value of that setting
/// (`method` by default), the group with the best mean valid accuracy (the
/// first of that value in the sorted `groups`), with how many settings and
/// runs the value had, so methods compare at the tuning budget they got.
/// Returns, per value: the selected group's index, settings and runs.
pub(super) fn selected(groups: &[GroupRow], select_by: &str) -> Vec<(String, usize, usize, usize)> {
    let mut out: Vec<(String, usize, usize, usize)> = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        let value = if select_by == "method" {
            g.method.clone()
        } else {
            show_value(g.settings.get(select_by))
        };
        match out.iter_mut().find(|(v, ..)| *v == value) {
            Some((_, _, settings, runs)) => {
                *settings += 1;
                *runs += g.seeds.len();
            }
            None => out.push((value, i, 1, g.seeds.len())),
        }
    }
    out
}

/// The table of [`selected`] groups.
fn selected_table(md: &mut String, groups: &[GroupRow], select_by: &str) {
    use std::fmt::Write as _;
    let _ = writeln!(md, "## Selected on valid, one per {select_by}\n");
    let _ = writeln!(
        md,
        "| {select_by} | selected settings | settings tried | runs | seeds | valid acc (%) | test acc (%) | test macro-F1 (%) | trainable params | peak mem (MiB) |"
    );
    md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (value, i, settings, runs) in selected(groups, select_by) {
        let g = &groups[i];
        let n = g.seeds.len();
        let _ = writeln!(
            md,
            "| {} | {} | {settings} | {runs} | {n} | {} | {} | {} | {} | {} |",
            cell(&value),
            cell(&g.label),
            pct(Some(&g.valid_accuracy), n),
            pct(g.test_accuracy.as_ref(), n),
            pct(g.test_macro_f1.as_ref(), n),
            g.trainable_params.map_or("-".to_string(), thousands),
            g.peak_memory_mib
                .map_or("-".to_string(), |m| format!("{m:.0}")),
        );
    }
    let _ = writeln!(
        md,
        "\nEach row is the group with the best mean valid accuracy among those of its {select_by} \
         (ties as above); its test numbers are reported, never used to choose. \"settings \
         tried\" and \"runs\" are the tuning budget that {select_by} got.\n"
    );
}
