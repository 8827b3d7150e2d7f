//! Sweeps: a grid file expands into many [`FitConfig`]s that all train on
//! the same cache (the backbone never runs again).
//!
//! Grid file: a JSON object whose keys are `sherl-fit run` option names
//! (`lr` or `late-trainable`, dashes or underscores) and whose values are
//! lists (axes of a cartesian product) or single values (fixed for every
//! run). Alternatively `"runs": [{...}, ...]` lists explicit settings; any
//! other keys are then the base every listed run starts from. Runs are
//! numbered in a deterministic order (axes sorted by name, last axis
//! fastest), so `--worker I/M` partitions are stable across machines.

use serde_json::{Map, Value};

use super::config::FitConfig;
use crate::{Error, Result};

fn normalise(key: &str) -> String {
    key.replace('-', "_")
}

fn to_config(settings: &Map<String, Value>) -> Result<FitConfig> {
    let mut base = serde_json::to_value(FitConfig::default()).expect("serializes");
    let obj = base.as_object_mut().expect("FitConfig is an object");
    for (k, v) in settings {
        obj.insert(normalise(k), v.clone());
    }
    let cfg: FitConfig = serde_json::from_value(base).map_err(|e| {
        Error::Config(format!(
            "grid: {e} (settings {})",
            Value::Object(settings.clone())
        ))
    })?;
    cfg.validate().map_err(|m| {
        Error::Config(format!(
            "grid: {m} (settings {})",
            Value::Object(settings.clone())
        ))
    })?;
    Ok(cfg)
}

/// Expand a grid into run settings, in a deterministic order.
pub fn expand(grid: &Value) -> Result<Vec<FitConfig>> {
    let obj = grid
        .as_object()
        .ok_or_else(|| Error::Config("grid: the file must hold a JSON object".into()))?;
    let mut base = Map::new();
    let mut axes: Vec<(String, Vec<Value>)> = Vec::new();
    let mut explicit = None;
    let mut keys: Vec<&String> = obj.keys().collect();
    keys.sort();
    for k in keys {
        let v = &obj[k];
        if k == "runs" {
            let list = v
                .as_array()
                .ok_or_else(|| Error::Config("grid: \"runs\" must be a list of objects".into()))?;
            explicit = Some(list.clone());
        } else if let Some(list) = v.as_array() {
            // early_layers is itself a list: a list of lists is an axis
            let is_list_field = normalise(k) == "early_layers";
            if is_list_field && !list.iter().all(Value::is_array) {
                base.insert(normalise(k), v.clone());
            } else {
                if list.is_empty() {
                    return Err(Error::Config(format!(
                        "grid: axis \"{k}\" is an empty list"
                    )));
                }
                axes.push((normalise(k), list.clone()));
            }
        } else {
            base.insert(normalise(k), v.clone());
        }
    }
    let mut settings: Vec<Map<String, Value>> = Vec::new();
    match explicit {
        Some(list) => {
            if !axes.is_empty() {
                return Err(Error::Config(
                    "grid: use either list-valued axes or an explicit \"runs\" list, not both"
                        .into(),
                ));
            }
            for (i, r) in list.iter().enumerate() {
                let o = r
                    .as_object()
                    .ok_or_else(|| Error::Config(format!("grid: runs[{i}] is not an object")))?;
                let mut m = base.clone();
                for (k, v) in o {
                    m.insert(normalise(k), v.clone());
                }
                settings.push(m);
            }
        }
        None => {
            settings.push(base);
            for (k, values) in &axes {
                let mut next = Vec::with_capacity(settings.len() * values.len());
                for s in &settings {
                    for v in values {
                        let mut m = s.clone();
                        m.insert(k.clone(), v.clone());
                        next.push(m);
                    }
                }
                settings = next;
            }
        }
    }
    if settings.is_empty() {
        return Err(Error::Config("grid: no runs".into()));
    }
    let mut out: Vec<FitConfig> = Vec::with_capacity(settings.len());
    for s in &settings {
        let c = to_config(s)?;
        if !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
}

/// Indices of the runs worker `index` of `count` takes: every `count`-th
/// run starting at `index`. Every run belongs to exactly one worker.
pub fn partition(runs: usize, index: u32, count: u32) -> Vec<usize> {
    (0..runs).filter(|k| *k as u32 % count == index).collect()
}

/// Parse `I/M`.
pub fn parse_worker(s: &str) -> Result<(u32, u32)> {
    let bad = || {
        Error::Config(format!(
            "--worker {s}: expected I/M with 0 <= I < M, e.g. 0/4"
        ))
    };
    let (i, m) = s.split_once('/').ok_or_else(bad)?;
    let (i, m): (u32, u32) = (
        i.trim().parse().map_err(|_| bad())?,
        m.trim().parse().map_err(|_| bad())?,
    );
    if m == 0 || i >= m {
        return Err(bad());
    }
    Ok((i, m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::model::Method;

    #[test]
    fn cartesian_product_in_a_stable_order() {
        let g = serde_json::json!({"seed": [0, 1, 2], "method": ["sherl", "linear-probe"], "epochs": 2});
        let runs = expand(&g).unwrap();
        assert_eq!(runs.len(), 6);
        // axes sorted by name (method, seed), last fastest
        assert_eq!((runs[0].method, runs[0].seed), (Method::Sherl, 0));
        assert_eq!((runs[1].method, runs[1].seed), (Method::Sherl, 1));
        assert_eq!((runs[3].method, runs[3].seed), (Method::LinearProbe, 0));
        assert!(runs.iter().all(|r| r.epochs == 2));
    }

    #[test]
    fn dashes_explicit_runs_and_errors() {
        let g = serde_json::json!({"late-trainable": [false, true]});
        let runs = expand(&g).unwrap();
        assert!(!runs[0].late_trainable && runs[1].late_trainable);
        let g = serde_json::json!({"epochs": 3, "runs": [{"method": "unipt"}, {"method": "sherl", "lr": 0.01}]});
        let runs = expand(&g).unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].method, Method::Unipt);
        assert_eq!(runs[1].lr, 0.01);
        assert!(runs.iter().all(|r| r.epochs == 3));
        let g = serde_json::json!({"early-layers": [[0, 5], [0, 3, 5]]});
        assert_eq!(expand(&g).unwrap().len(), 2);
        let e = expand(&serde_json::json!({"learning_rate": [1]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("learning_rate"), "{e}");
        assert!(expand(&serde_json::json!({"epochs": [0]})).is_err());
        assert!(expand(&serde_json::json!({"seed": []})).is_err());
    }

    #[test]
    fn worker_partition_covers_every_run_once() {
        for runs in [0usize, 1, 7, 30] {
            for m in 1..6u32 {
                let mut all: Vec<usize> = (0..m).flat_map(|i| partition(runs, i, m)).collect();
                all.sort_unstable();
                assert_eq!(all, (0..runs).collect::<Vec<_>>());
            }
        }
        assert_eq!(parse_worker("1/4").unwrap(), (1, 4));
        assert!(parse_worker("4/4").is_err() && parse_worker("x").is_err());
    }
}
