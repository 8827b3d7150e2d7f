//! Reading one run directory for the report: its summary (tolerantly, see
//! [`crate::fit::run_dir::SummaryView`]), settings, learning curve, or the
//! reason it is skipped.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::canonical;
use crate::fit::run_dir::{
    for_each_metrics_line, SummaryView, CONFIG_FILE, ERROR_FILE, METRICS_FILE, SUMMARY_FILE,
};

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
    /// Why `metrics.jsonl` could not be read at all (not a regular file,
    /// too large, unreadable): the run is reported without its curve.
    pub(super) curve_error: Option<String>,
}

impl Run {
    pub(super) fn key(&self) -> String {
        let mut k = canonical(&Value::Object(self.settings.clone()));
        k.push('\u{0}');
        k.push_str(self.cache.as_deref().unwrap_or(""));
        k
    }
}

/// A run's small JSON file (a regular file, bounded, see
/// [`crate::fsutil::read_json`]); the error, naming it, is the reason to
/// skip the run.
pub(super) fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> std::result::Result<T, String> {
    crate::fsutil::read_json(path).map_err(|e| e.to_string())
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
        let mut epochs = 0usize;
        let counted = for_each_metrics_line(&metrics, |_, line| {
            if line.is_none_or(|l| !l.trim().is_empty()) {
                epochs += 1;
            }
        });
        match counted {
            Ok(()) => format!(
                "incomplete: no summary.json (still running, or killed after {epochs} epoch(s))"
            ),
            Err(e) => format!("incomplete: no summary.json, and {e}"),
        }
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
    let (curve, unreadable_lines, curve_error) = match read_curve(&dir.join(METRICS_FILE)) {
        Ok((curve, bad)) => (curve, bad, None),
        Err(e) => (BTreeMap::new(), Vec::new(), Some(e.to_string())),
    };
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
        curve_error,
        summary,
    })
}

/// Valid accuracy per epoch from `metrics.jsonl` (a missing file gives an
/// empty curve), and the 1-based numbers of the lines that are not JSON
/// objects with `epoch` and `valid_accuracy`: those are left out of the
/// curve and the report says so. Read as a stream of bounded lines
/// ([`for_each_metrics_line`]); `Err` when the file is not a regular file,
/// is too large or cannot be read.
fn read_curve(path: &Path) -> crate::Result<(BTreeMap<usize, f64>, Vec<usize>)> {
    let mut curve = BTreeMap::new();
    let mut bad = Vec::new();
    if !path.exists() && !path.is_symlink() {
        return Ok((curve, bad));
    }
    for_each_metrics_line(path, |number, line| {
        let Some(line) = line else {
            bad.push(number);
            return;
        };
        if line.trim().is_empty() {
            return;
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
            None => bad.push(number),
        }
    })?;
    Ok((curve, bad))
}
