//! Retrieval runs in the report (`sherl-fit run --task retrieval`): read,
//! grouped by their settings except the seed (and by both caches), ranked
//! by mean valid rsum, and shown in their own table: Recall@1/5/10 both
//! ways and rsum on test, valid rsum, trainable parameters, peak memory
//! and seconds per epoch; `retrieval.csv` holds the same numbers
//! unrounded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use super::{canonical, show_value, Stat};
use crate::fit::run_dir::{CONFIG_FILE, SUMMARY_FILE};
use crate::{Error, Result};

/// One complete retrieval run.
#[derive(Debug, Clone)]
pub(super) struct RetrievalRun {
    id: String,
    method: String,
    seed: u64,
    /// `config` without `seed`, with the `retrieval` settings added.
    settings: Map<String, Value>,
    /// Both caches' settings hashes.
    caches: String,
    summary: Value,
}

/// Whether `dir` holds a retrieval run (its `config.json` says so).
pub(super) fn is_retrieval(dir: &Path) -> bool {
    crate::fsutil::read_json::<Value>(&dir.join(CONFIG_FILE))
        .is_ok_and(|v| v["task"] == "retrieval")
}

fn read_value(path: &Path) -> std::result::Result<Value, String> {
    super::read::read_json(path)
}

/// Read one retrieval run directory; `Err` is the reason to skip it.
pub(super) fn load(dir: &Path) -> std::result::Result<RetrievalRun, String> {
    let summary_path = dir.join(SUMMARY_FILE);
    if !summary_path.exists() {
        return Err(super::read::incomplete_reason(dir));
    }
    let summary = read_value(&summary_path)?;
    if !summary["valid_rsum"].is_number() {
        return Err(format!("{}: no valid_rsum", summary_path.display()));
    }
    let config_path = dir.join(CONFIG_FILE);
    let config = read_value(&config_path)?;
    let (Some(fit), Some(retrieval)) = (
        config["config"].as_object(),
        config["retrieval"].as_object(),
    ) else {
        return Err(format!(
            "{}: no \"config\" and \"retrieval\" objects",
            config_path.display()
        ));
    };
    let mut settings = fit.clone();
    let seed = settings
        .remove("seed")
        .and_then(|s| s.as_u64())
        .or_else(|| summary["seed"].as_u64())
        .ok_or_else(|| format!("{}: no seed", config_path.display()))?;
    for (k, v) in retrieval {
        settings.insert(k.clone(), v.clone());
    }
    let hash = |k: &str| config[k]["settings_hash"].as_str().unwrap_or("").to_owned();
    let id = summary["run_id"].as_str().map_or_else(
        || {
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        },
        str::to_owned,
    );
    Ok(RetrievalRun {
        id,
        method: summary["method"].as_str().unwrap_or("unknown").to_owned(),
        seed,
        settings,
        caches: format!("{}+{}", hash("image_cache"), hash("text_cache")),
        summary,
    })
}

/// One row of the retrieval table: the runs whose settings differ only by
/// seed.
#[derive(Debug, Clone, Serialize)]
pub struct RetrievalGroupRow {
    /// `<image method>+<text method>`.
    pub method: String,
    /// Method plus the settings that tell this group apart from the others.
    pub label: String,
    /// The settings part of `label`.
    pub settings_label: String,
    /// `config` without `seed`, plus the `retrieval` settings.
    pub settings: Value,
    /// Both caches' settings hashes, `<image>+<text>`.
    pub caches: String,
    /// Seeds, in run-directory order.
    pub seeds: Vec<u64>,
    /// Run ids, in the same order.
    pub run_ids: Vec<String>,
    /// Valid rsum of the best checkpoint (the selection metric).
    pub valid_rsum: Stat,
    /// Test rsum.
    pub test_rsum: Option<Stat>,
    /// Test image -> text Recall@1, @5, @10 (%).
    pub test_i2t: [Option<Stat>; 3],
    /// Test text -> image Recall@1, @5, @10 (%).
    pub test_t2i: [Option<Stat>; 3],
    /// Trainable parameters (largest over seeds).
    pub trainable_params: Option<u64>,
    /// Peak resident memory, MiB, the largest over seeds.
    pub peak_memory_mib: Option<f64>,
    /// Training seconds per epoch, mean over seeds.
    pub seconds_per_epoch: Option<f64>,
}

/// Group, label and rank (best mean valid rsum first, ties by label).
pub(super) fn build(runs: Vec<RetrievalRun>) -> Vec<RetrievalGroupRow> {
    let mut by_key: BTreeMap<String, Vec<RetrievalRun>> = BTreeMap::new();
    for r in runs {
        let key = format!(
            "{}\u{0}{}",
            canonical(&Value::Object(r.settings.clone())),
            r.caches
        );
        by_key.entry(key).or_default().push(r);
    }
    let groups: Vec<Vec<RetrievalRun>> = by_key.into_values().collect();
    let keys: BTreeSet<&String> = groups.iter().flat_map(|g| g[0].settings.keys()).collect();
    let differing: Vec<&String> = keys
        .into_iter()
        .filter(|k| !matches!(k.as_str(), "image_method" | "text_method" | "method"))
        .filter(|k| {
            groups
                .iter()
                .map(|g| show_value(g[0].settings.get(k.as_str())))
                .collect::<BTreeSet<_>>()
                .len()
                > 1
        })
        .collect();
    let show_caches = groups
        .iter()
        .map(|g| g[0].caches.as_str())
        .collect::<BTreeSet<_>>()
        .len()
        > 1;
    let mut rows: Vec<RetrievalGroupRow> = groups
        .iter()
        .map(|g| {
            let first = &g[0];
            let mut parts: Vec<String> = differing
                .iter()
                .map(|k| format!("{k}={}", show_value(first.settings.get(k.as_str()))))
                .collect();
            if show_caches {
                let short: Vec<&str> = first.caches.split('+').map(crate::hash::abbrev).collect();
                parts.push(format!("caches={}", short.join("+")));
            }
            let settings_label = parts.join(" ");
            let label = if settings_label.is_empty() {
                first.method.clone()
            } else {
                format!("{} {settings_label}", first.method)
            };
            row(g, label, settings_label)
        })
        .collect();
    // the valid split only: test never enters the order
    rows.sort_by(|a, b| {
        b.valid_rsum
            .mean
            .total_cmp(&a.valid_rsum.mean)
            .then_with(|| a.label.cmp(&b.label))
    });
    rows
}

fn row(g: &[RetrievalRun], label: String, settings_label: String) -> RetrievalGroupRow {
    let first = &g[0];
    let stat = |f: &dyn Fn(&Value) -> Option<f64>| {
        Stat::of(&g.iter().filter_map(|r| f(&r.summary)).collect::<Vec<_>>())
    };
    let at = |dir: &'static str, k: usize| stat(&move |s: &Value| s["test"][dir][k].as_f64());
    let peak = g
        .iter()
        .filter_map(|r| r.summary["peak_rss_bytes"].as_u64())
        .filter(|&b| b > 0)
        .max();
    RetrievalGroupRow {
        method: first.method.clone(),
        label,
        settings_label,
        settings: Value::Object(first.settings.clone()),
        caches: first.caches.clone(),
        seeds: g.iter().map(|r| r.seed).collect(),
        run_ids: g.iter().map(|r| r.id.clone()).collect(),
        valid_rsum: stat(&|s| s["valid_rsum"].as_f64()).expect("every run has valid_rsum"),
        test_rsum: stat(&|s| s["test_rsum"].as_f64()),
        test_i2t: [at("i2t", 0), at("i2t", 1), at("i2t", 2)],
        test_t2i: [at("t2i", 0), at("t2i", 1), at("t2i", 2)],
        trainable_params: g
            .iter()
            .filter_map(|r| r.summary["trainable_params"].as_u64())
            .max(),
        peak_memory_mib: peak.map(|b| b as f64 / (1024.0 * 1024.0)),
        seconds_per_epoch: stat(&|s| s["seconds_per_epoch"].as_f64()).map(|s| s.mean),
    }
}

/// `12.3 ± 0.4` (already in percent or rsum units), `-` when absent,
/// `(k/n)` when only k of the n seeds have it.
fn num(s: Option<&Stat>, seeds: usize) -> String {
    let Some(s) = s else {
        return "-".to_string();
    };
    let mut t = match s.std {
        Some(sd) => format!("{:.1} ± {:.1}", s.mean, sd),
        None => format!("{:.1}", s.mean),
    };
    if s.n < seeds {
        t.push_str(&format!(" ({}/{seeds})", s.n));
    }
    t
}

/// The Markdown section of the retrieval groups.
pub(super) fn markdown(rows: &[RetrievalGroupRow]) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let runs: usize = rows.iter().map(|g| g.seeds.len()).sum();
    let _ = writeln!(
        md,
        "## Retrieval\n\n{runs} complete retrieval run(s) in {} group(s). Recall@K (%) on the \
         test split, image → text (i2t) and text → image (t2i); rsum is their sum (at most \
         600).\n",
        rows.len()
    );
    md.push_str(
        "| # | towers (image+text) | settings | seeds | valid rsum | test i2t R@1 | R@5 | R@10 | test t2i R@1 | R@5 | R@10 | test rsum | trainable params | peak mem (MiB) | s/epoch |\n",
    );
    md.push_str("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (i, g) in rows.iter().enumerate() {
        let n = g.seeds.len();
        let k = |s: &[Option<Stat>; 3], j: usize| num(s[j].as_ref(), n);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            i + 1,
            super::table::cell(&g.method),
            super::table::cell(&g.settings_label),
            num(Some(&g.valid_rsum), n),
            k(&g.test_i2t, 0),
            k(&g.test_i2t, 1),
            k(&g.test_i2t, 2),
            k(&g.test_t2i, 0),
            k(&g.test_t2i, 1),
            k(&g.test_t2i, 2),
            num(g.test_rsum.as_ref(), n),
            g.trainable_params
                .map_or("-".to_string(), super::table::thousands),
            g.peak_memory_mib
                .map_or("-".to_string(), |m| format!("{m:.0}")),
            g.seconds_per_epoch
                .map_or("-".to_string(), |s| format!("{s:.2}")),
        );
    }
    md.push_str(
        "\nGroups are sorted by mean valid rsum, best first (ties by label): settings \
         are selected on the valid split only. Values are mean ± sample standard deviation \
         (n − 1) over seeds.\n\n",
    );
    md
}

/// `retrieval.csv`: the same numbers, unrounded.
pub(super) fn to_csv(rows: &[RetrievalGroupRow], path: &Path) -> Result<Vec<u8>> {
    let err = |e: csv::Error| Error::io(path, std::io::Error::other(e));
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut head: Vec<String> = [
        "rank",
        "method",
        "label",
        "settings_label",
        "seeds",
        "valid_rsum_mean",
        "valid_rsum_std",
        "test_rsum_mean",
        "test_rsum_std",
    ]
    .map(String::from)
    .to_vec();
    for dir in ["i2t", "t2i"] {
        for k in [1, 5, 10] {
            head.push(format!("test_{dir}_r{k}_mean"));
            head.push(format!("test_{dir}_r{k}_std"));
        }
    }
    head.extend(
        [
            "trainable_params",
            "peak_memory_mib",
            "seconds_per_epoch",
            "caches",
            "run_ids",
            "settings_json",
        ]
        .map(String::from),
    );
    w.write_record(&head).map_err(err)?;
    let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    for (i, g) in rows.iter().enumerate() {
        let mean = |s: Option<&Stat>| opt(s.map(|s| s.mean));
        let std = |s: Option<&Stat>| opt(s.and_then(|s| s.std));
        let mut rec = vec![
            (i + 1).to_string(),
            g.method.clone(),
            g.label.clone(),
            g.settings_label.clone(),
            g.seeds.len().to_string(),
            mean(Some(&g.valid_rsum)),
            std(Some(&g.valid_rsum)),
            mean(g.test_rsum.as_ref()),
            std(g.test_rsum.as_ref()),
        ];
        for s in g.test_i2t.iter().chain(&g.test_t2i) {
            rec.push(mean(s.as_ref()));
            rec.push(std(s.as_ref()));
        }
        rec.extend([
            g.trainable_params
                .map(|p| p.to_string())
                .unwrap_or_default(),
            opt(g.peak_memory_mib),
            opt(g.seconds_per_epoch),
            g.caches.clone(),
            g.run_ids.join(" "),
            canonical(&g.settings),
        ]);
        w.write_record(&rec).map_err(err)?;
    }
    w.into_inner()
        .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))
}
