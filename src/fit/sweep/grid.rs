//! A sweep's grid file expanded into run settings, in a deterministic
//! order (see [`super`]).

use serde_json::{Map, Value};

use crate::fit::config::FitConfig;
use crate::fit::error::FitError;
use crate::fit::retrieval::config::RetrievalConfig;
use crate::Result;

fn normalise(key: &str) -> String {
    key.replace('-', "_")
}

/// Refuse an object that spells one setting two ways (`late-trainable` and
/// `late_trainable`): which one wins would be an accident of key order.
fn check_spellings(obj: &Map<String, Value>, what: &str) -> Result<()> {
    let mut seen: std::collections::BTreeMap<String, &str> = Default::default();
    for k in obj.keys() {
        if let Some(other) = seen.insert(normalise(k), k) {
            return Err(FitError::grid(format!(
                "{what} sets \"{other}\" and \"{k}\", the same setting spelt two ways; keep one"
            )));
        }
    }
    Ok(())
}

fn to_config(settings: &Map<String, Value>) -> Result<FitConfig> {
    let mut base = serde_json::to_value(FitConfig::default()).expect("serializes");
    let obj = base.as_object_mut().expect("FitConfig is an object");
    for (k, v) in settings {
        obj.insert(normalise(k), v.clone());
    }
    let cfg: FitConfig = serde_json::from_value(base).map_err(|e| {
        FitError::grid(format!(
            "{e} (settings {})",
            Value::Object(settings.clone())
        ))
    })?;
    cfg.validate().map_err(|m| {
        FitError::grid(format!(
            "{m} (settings {})",
            Value::Object(settings.clone())
        ))
    })?;
    Ok(cfg)
}

/// The most runs a grid may expand to unless `--max-runs` says otherwise.
/// Every run is a separate training process (seconds on a toy cache,
/// minutes to hours on a real one), so 10,000 runs is already days of
/// compute: a grid past it is far more often an axis listed by mistake
/// than a plan, and refusing it costs nothing, while expanding it costs
/// memory (about a kilobyte per run) and time before the first line.
/// The bound counts the whole grid: every `--worker I/M` expands it whole
/// to number the runs the same way.
pub const DEFAULT_MAX_RUNS: usize = 10_000;

/// Expand a grid into run settings, in a deterministic order, refusing a
/// grid of more than [`DEFAULT_MAX_RUNS`] runs ([`expand_with`]).
pub fn expand(grid: &Value) -> Result<Vec<FitConfig>> {
    expand_with(grid, DEFAULT_MAX_RUNS)
}

/// [`expand`] with at most `max_runs` runs (`--max-runs`): the grid's
/// runs are counted before anything is expanded. Settings that give the
/// same run (a value equal to the default, say) are kept once; the check
/// is a hash set of each run's settings, so expansion takes time linear in
/// the runs.
pub fn expand_with(grid: &Value, max_runs: usize) -> Result<Vec<FitConfig>> {
    let settings = expand_settings(grid, max_runs)?;
    let mut seen = std::collections::HashSet::with_capacity(settings.len());
    let mut out: Vec<FitConfig> = Vec::with_capacity(settings.len());
    for s in &settings {
        let c = to_config(s)?;
        if seen.insert(settings_key(&c)) {
            out.push(c);
        }
    }
    Ok(out)
}

/// A run's settings as one string, equal for equal settings (the run
/// dedup's key: `FitConfig` holds floats, so it is not `Hash`).
fn settings_key<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("settings serialize")
}

/// The settings of a retrieval run that are not [`FitConfig`]'s: each
/// tower's method, the joint width, the loss and its margin.
const RETRIEVAL_KEYS: [&str; 5] = ["image_method", "text_method", "joint_dim", "loss", "margin"];

/// Expand a grid of retrieval runs (`sherl-fit sweep --task retrieval`):
/// as [`expand`], and each run's `image_method`, `text_method`,
/// `joint_dim`, `loss` and `margin` (defaults of `sherl-fit run --task
/// retrieval` where not set) go to its [`RetrievalConfig`]. `method` is
/// refused: each tower has its own.
pub fn expand_retrieval(grid: &Value) -> Result<Vec<(FitConfig, RetrievalConfig)>> {
    expand_retrieval_with(grid, DEFAULT_MAX_RUNS)
}

/// [`expand_retrieval`] with at most `max_runs` runs (as [`expand_with`]).
pub fn expand_retrieval_with(
    grid: &Value,
    max_runs: usize,
) -> Result<Vec<(FitConfig, RetrievalConfig)>> {
    let settings = expand_settings(grid, max_runs)?;
    let mut seen = std::collections::HashSet::with_capacity(settings.len());
    let mut out: Vec<(FitConfig, RetrievalConfig)> = Vec::with_capacity(settings.len());
    for s in &settings {
        if s.contains_key("method") {
            return Err(FitError::grid(
                "a retrieval grid sets image_method and text_method (one per tower), not method",
            ));
        }
        let (mut fit, mut retrieval) = (Map::new(), Map::new());
        for (k, v) in s {
            if RETRIEVAL_KEYS.contains(&k.as_str()) {
                retrieval.insert(k.clone(), v.clone());
            } else {
                fit.insert(k.clone(), v.clone());
            }
        }
        let shown = || Value::Object(s.clone());
        let rc: RetrievalConfig = serde_json::from_value(Value::Object(retrieval))
            .map_err(|e| FitError::grid(format!("{e} (settings {})", shown())))?;
        rc.validate()
            .map_err(|m| FitError::grid(format!("{m} (settings {})", shown())))?;
        let pair = (to_config(&fit)?, rc);
        if seen.insert(settings_key(&pair)) {
            out.push(pair);
        }
    }
    Ok(out)
}

/// How many runs a grid's axes make (their lengths multiplied), or `None`
/// past `usize::MAX`.
fn count_runs(axes: &[(String, Vec<Value>)]) -> Option<usize> {
    axes.iter()
        .try_fold(1usize, |n, (_, values)| n.checked_mul(values.len()))
}

/// Refuse `count` runs (`None`: more than `usize::MAX`) past `max_runs`,
/// saying where they come from (`made`) and how to go on.
fn check_count(count: Option<usize>, max_runs: usize, made: &str) -> Result<()> {
    let shown = match count {
        Some(n) if n <= max_runs => return Ok(()),
        Some(n) => n.to_string(),
        None => format!("more than {}", usize::MAX),
    };
    Err(FitError::grid(format!(
        "{shown} runs ({made}), more than the {max_runs} a sweep expands unless told \
         otherwise; pass --max-runs {} (or more) if you mean it, or trim the grid",
        count.map_or_else(|| "N".to_owned(), |n| n.to_string())
    )))
}

/// The grid's settings objects (keys normalised), in a deterministic order;
/// refused before expanding when they would be more than `max_runs`.
fn expand_settings(grid: &Value, max_runs: usize) -> Result<Vec<Map<String, Value>>> {
    let obj = grid
        .as_object()
        .ok_or_else(|| FitError::grid("the file must hold a JSON object"))?;
    check_spellings(obj, "the file")?;
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
                .ok_or_else(|| FitError::grid("\"runs\" must be a list of objects"))?;
            explicit = Some(list.clone());
        } else if let Some(list) = v.as_array() {
            // early_layers is itself a list: a list of lists is an axis
            let is_list_field = normalise(k) == "early_layers";
            if is_list_field && !list.iter().all(Value::is_array) {
                base.insert(normalise(k), v.clone());
            } else {
                if list.is_empty() {
                    return Err(FitError::grid(format!("axis \"{k}\" is an empty list")));
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
                return Err(FitError::grid(
                    "use either list-valued axes or an explicit \"runs\" list, not both",
                ));
            }
            check_count(Some(list.len()), max_runs, "the \"runs\" list")?;
            for (i, r) in list.iter().enumerate() {
                let o = r
                    .as_object()
                    .ok_or_else(|| FitError::grid(format!("runs[{i}] is not an object")))?;
                check_spellings(o, &format!("runs[{i}]"))?;
                let mut m = base.clone();
                for (k, v) in o {
                    m.insert(normalise(k), v.clone());
                }
                settings.push(m);
            }
        }
        None => {
            let made = axes
                .iter()
                .map(|(k, v)| format!("{k} {}", v.len()))
                .collect::<Vec<_>>()
                .join(" x ");
            check_count(count_runs(&axes), max_runs, &format!("axes {made}"))?;
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
        return Err(FitError::grid("no runs"));
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::method::{Method, MethodConfig};

    #[test]
    fn cartesian_product_in_a_stable_order() {
        let g = serde_json::json!({"seed": [0, 1, 2], "method": ["sherl", "linear-probe"], "epochs": 2});
        let runs = expand(&g).unwrap();
        assert_eq!(runs.len(), 6);
        // axes sorted by name (method, seed), last fastest
        assert_eq!((runs[0].kind(), runs[0].seed), (Method::Sherl, 0));
        assert_eq!((runs[1].kind(), runs[1].seed), (Method::Sherl, 1));
        assert_eq!((runs[3].kind(), runs[3].seed), (Method::LinearProbe, 0));
        assert!(runs.iter().all(|r| r.epochs == 2));
    }

    #[test]
    fn dashes_explicit_runs_and_errors() {
        let g = serde_json::json!({"late-trainable": [false, true]});
        let runs = expand(&g).unwrap();
        let trainable = |c: &FitConfig| match &c.method {
            MethodConfig::Sherl(s) => s.late_trainable,
            other => panic!("{other:?}"),
        };
        assert!(!trainable(&runs[0]) && trainable(&runs[1]));
        let g = serde_json::json!({"epochs": 3, "runs": [{"method": "unipt"}, {"method": "sherl", "lr": 0.01}]});
        let runs = expand(&g).unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].kind(), Method::Unipt);
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

    /// A setting of another method than the run's is refused, naming it,
    /// the method it belongs to and the run's settings.
    #[test]
    fn misplaced_settings_are_refused() {
        let e = expand(&serde_json::json!({"method": ["sherl", "lora"], "lora_rank": 4}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"lora_rank\" applies to method lora only, not sherl")
                && e.contains("(settings {"),
            "{e}"
        );
        let e = expand(&serde_json::json!({"runs": [{"method": "unipt", "late-trainable": true}]}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"late_trainable\" applies to method sherl only, not unipt"),
            "{e}"
        );
        let runs = expand(&serde_json::json!({"runs": [
            {"method": "lora", "lora_rank": 4}, {"method": "adapter", "reduction": 8}
        ]}))
        .unwrap();
        assert_eq!(runs.len(), 2);
    }

    /// The runs are counted before expansion (overflow-checked) and
    /// refused past the bound; equal settings are kept once.
    #[test]
    fn runs_are_counted_before_expanding_and_kept_once() {
        let g = serde_json::json!({"seed": [0, 1, 2], "epochs": [1, 2]});
        assert_eq!(expand_with(&g, 6).unwrap().len(), 6);
        let e = expand_with(&g, 5).unwrap_err().to_string();
        assert!(
            e.contains("6 runs (axes epochs 2 x seed 3)") && e.contains("--max-runs 6"),
            "{e}"
        );
        let e = expand_with(&serde_json::json!({"runs": [{}, {}, {}]}), 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 runs (the \"runs\" list)"), "{e}");
        let many: Vec<(String, Vec<Value>)> = (0..20)
            .map(|i| (format!("k{i}"), vec![Value::Null; 1000]))
            .collect();
        assert_eq!(count_runs(&many), None);
        let e = check_count(None, 10, "x").unwrap_err().to_string();
        assert!(e.contains(&format!("more than {} runs", usize::MAX)), "{e}");
        // duplicates (the same value twice, a default spelt out) are one run
        let g = serde_json::json!({"seed": [0, 0, 1], "lr": [0.001, 1e-3]});
        assert_eq!(expand(&g).unwrap().len(), 2);
        let g = serde_json::json!({"image_method": ["sherl", "sherl"], "seed": [0, 1]});
        assert_eq!(expand_retrieval(&g).unwrap().len(), 2);
    }

    #[test]
    fn one_setting_spelt_two_ways_is_refused() {
        let e = expand(&serde_json::json!({"late-trainable": [true], "late_trainable": [false]}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("late-trainable") && e.contains("late_trainable"),
            "{e}"
        );
        let e = expand(&serde_json::json!({"runs": [{"grad-clip": 1.0, "grad_clip": 0.5}]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("runs[0]") && e.contains("grad_clip"), "{e}");
        // One spelling each in the base and in a run is an override, not a clash.
        let runs =
            expand(&serde_json::json!({"grad-clip": 1.0, "runs": [{"grad_clip": 0.5}]})).unwrap();
        assert_eq!(runs[0].grad_clip, 0.5);
    }

    #[test]
    fn retrieval_grid_splits_tower_settings_from_shared_ones() {
        use crate::fit::retrieval::loss::Loss;
        let g = serde_json::json!({
            "image-method": ["sherl", "full-ft"],
            "text_method": "linear-probe",
            "loss": ["infonce", "hinge"],
            "joint-dim": 32,
            "lr": 0.01,
            "seed": [0, 1]
        });
        let runs = expand_retrieval(&g).unwrap();
        assert_eq!(runs.len(), 8);
        // axes sorted by name (image_method, loss, seed), last fastest
        assert_eq!(runs[0].1.image_method, Method::Sherl);
        assert_eq!((runs[0].1.loss, runs[0].0.seed), (Loss::Infonce, 0));
        assert_eq!((runs[3].1.loss, runs[3].0.seed), (Loss::Hinge, 1));
        assert_eq!(runs[4].1.image_method, Method::FullFt);
        assert!(runs.iter().all(|(c, r)| c.lr == 0.01
            && r.joint_dim == 32
            && r.text_method == Method::LinearProbe
            && r.margin == RetrievalConfig::default().margin));
        let e = expand_retrieval(&serde_json::json!({"method": ["sherl"]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not method"), "{e}");
        let e = expand_retrieval(&serde_json::json!({"joint_dim": [0]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--joint-dim 0"), "{e}");
        let e = expand_retrieval(&serde_json::json!({"image_method": ["nope"]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        // A classification grid does not know the towers.
        assert!(expand(&serde_json::json!({"image_method": ["sherl"]})).is_err());
    }
}
