//! Reading one run directory for the report: its summary (tolerantly, see
//! [`crate::fit::run_dir::SummaryView`]), settings, learning curve, or the
//! reason it is skipped.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::canonical;
use crate::fit::run_dir::{SummaryView, CONFIG_FILE, ERROR_FILE, METRICS_FILE, SUMMARY_FILE};
use crate::Error;

/// One complete run, read.
#[derive(Debug, Clone)]
pub(super) struct Run {
    pub(super) id: String,
    pub(super) method: String,
    pub(super) seed: u64,
    pub(super) valid_accuracy: f64,
    /// `config` without `seed` (an object).
    pub(super) settings: serde_json::Map<String, Value>,
    pub(super) cache: Option<String>,
    pub(super) summary: SummaryView,
    /// epoch -> valid accuracy.
    pub(super) curve: BTreeMap<usize, f64>,
    /// Lines of `metrics.jsonl` that could not be read (1-based).
    pub(super) unreadable_lines: Vec<usize>,
}

impl Run {
    pub(super) fn key(&self) -> String {
        let mut k = canonical(&Value::Object(self.settings.clone()));
        k.push('\u{0}');
        k.push_str(self.cache.as_deref().unwrap_or(""));
        k
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> std::result::Result<T, String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e).to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Error::Json {
            path: path.to_path_buf(),
            source: e,
        }
        .to_string()
    })
}

/// Why a directory without `summary.json` is not in the report.
pub(super) fn incomplete_reason(dir: &Path) -> String {
    let error_path = dir.join(ERROR_FILE);
    if error_path.exists() {
        return match read_json::<Value>(&error_path) {
            Ok(v) => match v.get("error").and_then(Value::as_str) {
                Some(e) => format!("failed: {e}"),
                None => "failed (error.json has no \"error\" message)".to_string(),
            },
            Err(e) => format!("failed (unreadable error.json: {e})"),
        };
    }
    let metrics = dir.join(METRICS_FILE);
    if metrics.exists() {
        let epochs = std::fs::read_to_string(&metrics)
            .map(|s| s.lines().filter(|l| !l.trim().is_empty()).count())
            .unwrap_or(0);
        format!("incomplete: no summary.json (still running, or killed after {epochs} epoch(s))")
    } else if dir.join(CONFIG_FILE).exists() {
        "incomplete: no summary.json (still running, or killed before the first epoch ended)"
            .to_string()
    } else {
        "not a run directory: no summary.json, config.json or error.json".to_string()
    }
}

/// A run's stored settings as this version writes them: a run of an
/// earlier version recorded every method's settings, which are left out
/// (so its group is that of the same settings trained now). Settings that
/// are not a run's settings (a hand-written file) are taken as they are.
fn stored_settings(config: &Value) -> Option<serde_json::Map<String, Value>> {
    let raw = config.as_object()?;
    let Ok(c) = crate::fit::config::FitConfig::from_stored(config.clone()) else {
        return Some(raw.clone());
    };
    match serde_json::to_value(c) {
        Ok(Value::Object(mut m)) => {
            // only the keys the run recorded, and its own settings
            m.retain(|k, _| raw.contains_key(k) || k == "method");
            Some(m)
        }
        _ => Some(raw.clone()),
    }
}

/// Read one run directory; `Err` is the reason to skip it.
pub(super) fn load_run(dir: &Path) -> std::result::Result<Run, String> {
    let summary_path = dir.join(SUMMARY_FILE);
    if !summary_path.exists() {
        return Err(incomplete_reason(dir));
    }
    let (curve, unreadable_lines) = read_curve(&dir.join(METRICS_FILE));
    let summary: SummaryView = read_json(&summary_path)?;
    let Some(valid_accuracy) = summary.valid_accuracy else {
        return Err(format!("{}: no valid_accuracy", summary_path.display()));
    };
    let config_path = dir.join(CONFIG_FILE);
    let config: Value = read_json(&config_path)?;
    let Some(mut settings) = config.get("config").and_then(stored_settings) else {
        return Err(format!("{}: no \"config\" object", config_path.display()));
    };
    let config_seed = settings.remove("seed").and_then(|s| s.as_u64());
    let Some(seed) = summary.seed.or(config_seed) else {
        return Err(format!(
            "{}: no seed (in summary.json or config.json)",
            summary_path.display()
        ));
    };
    let method = summary
        .method
        .clone()
        .or_else(|| {
            settings
                .get("method")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_else(|| "unknown".to_string());
    let cache = summary.cache.clone().or_else(|| {
        config
            .pointer("/cache/settings_hash")
            .and_then(Value::as_str)
            .map(String::from)
    });
    let id = summary.run_id.clone().unwrap_or_else(|| {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    Ok(Run {
        id,
        method,
        seed,
        valid_accuracy,
        settings,
        cache,
        curve,
        unreadable_lines,
        summary,
    })
}

/// Valid accuracy per epoch from `metrics.jsonl` (a missing file gives an
/// empty curve), and the 1-based numbers of the lines that are not JSON
/// objects with `epoch` and `valid_accuracy`: those are left out of the
/// curve and the report says so.
fn read_curve(path: &Path) -> (BTreeMap<usize, f64>, Vec<usize>) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return (BTreeMap::new(), Vec::new());
    };
    let mut curve = BTreeMap::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let point = serde_json::from_str::<Value>(line).ok().and_then(|v| {
            let epoch = usize::try_from(v.get("epoch")?.as_u64()?).ok()?;
            let acc = v.get("valid_accuracy")?.as_f64()?;
            Some((epoch, acc))
        });
        match point {
            Some((epoch, acc)) => {
                curve.insert(epoch, acc);
            }
            None => bad.push(i + 1),
        }
    }
    (curve, bad)
}
