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
//!
//! A retrieval sweep (`--task retrieval`, two caches) takes the same grid
//! plus each tower's `image_method`/`text_method`, `joint_dim`, `loss` and
//! `margin` ([`expand_retrieval`]).
//!
//! About 490 lines of code plus the grid-expansion tests: the grid, the
//! worker partition and the process pool that runs it.

use serde_json::{Map, Value};

use super::config::FitConfig;
use super::error::FitError;
use super::retrieval::config::RetrievalConfig;
use crate::{Error, Result};

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

/// Expand a grid into run settings, in a deterministic order.
pub fn expand(grid: &Value) -> Result<Vec<FitConfig>> {
    let mut out: Vec<FitConfig> = Vec::new();
    for s in &expand_settings(grid)? {
        let c = to_config(s)?;
        if !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
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
    let mut out: Vec<(FitConfig, RetrievalConfig)> = Vec::new();
    for s in &expand_settings(grid)? {
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
        if !out.contains(&pair) {
            out.push(pair);
        }
    }
    Ok(out)
}

/// The grid's settings objects (keys normalised), in a deterministic order.
fn expand_settings(grid: &Value) -> Result<Vec<Map<String, Value>>> {
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

/// Indices of the runs worker `index` of `count` takes: every `count`-th
/// run starting at `index`. Every run belongs to exactly one worker.
pub fn partition(runs: usize, index: u32, count: u32) -> Vec<usize> {
    (0..runs).filter(|k| *k as u32 % count == index).collect()
}

/// Parse `I/M` (the parser `--shard-of` uses too).
pub fn parse_worker(s: &str) -> Result<(u32, u32)> {
    let w = crate::cache::manifest::WorkerInfo::parse("--worker", s)?;
    Ok((w.index, w.count))
}

/// Environment variable through which a sweep tells each `sherl-fit run`
/// child its pid; the child stops when that process is gone
/// ([`exit_with_parent`]).
pub const PARENT_PID_ENV: &str = "SHERL_SWEEP_PID";

/// Exit code of a run refused because another process holds its lock
/// (the binaries exit with [`crate::EXIT_BUSY`] then).
const EXIT_BUSY: i32 = crate::EXIT_BUSY as i32;

/// In a `sherl-fit run` started by a sweep: stop this process when the
/// sweep that started it is gone (killed with `kill -9` included), so no
/// orphan keeps training, or holding a run's lock, behind a rerun. A
/// watcher thread compares the parent pid with the one the sweep passed
/// every 200 ms; plain safe Rust, where `PR_SET_PDEATHSIG` would need
/// `unsafe` outside the crate's one permitted place. Does nothing when the
/// variable is unset or off unix.
pub fn exit_with_parent() {
    #[cfg(unix)]
    {
        let Some(want) = std::env::var(PARENT_PID_ENV)
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
        else {
            return;
        };
        let watch = move || loop {
            if std::os::unix::process::parent_id() != want {
                eprintln!(
                    "sherl-fit: the sweep that started this run (pid {want}) is gone; stopping"
                );
                std::process::exit(2);
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        if let Err(e) = std::thread::Builder::new()
            .name("parent-watch".into())
            .spawn(watch)
        {
            tracing::warn!("cannot watch the parent sweep: {e}");
        }
    }
}

/// What a sweep does.
#[derive(Debug, Clone)]
pub struct SweepPlan {
    /// The cache(s) every run trains on.
    pub inputs: SweepInputs,
    /// Grid file.
    pub grid: std::path::PathBuf,
    /// Directory of run directories.
    pub out: std::path::PathBuf,
    /// Runs at once.
    pub jobs: usize,
    /// This worker and the number of workers (`--worker I/M`).
    pub worker: (u32, u32),
    /// Re-run runs that stopped with an error.
    pub retry_failed: bool,
    /// `--device` passed to every run.
    pub device: String,
    /// `--blas` passed to every run.
    pub blas: String,
    /// The `sherl-fit` executable that trains one run.
    pub exe: std::path::PathBuf,
}

/// What every run of a sweep trains on.
#[derive(Debug, Clone)]
pub enum SweepInputs {
    /// One cache and its backbone (`--task classification`).
    Classification {
        /// Feature cache.
        cache: std::path::PathBuf,
        /// Backbone directory.
        backbone: std::path::PathBuf,
    },
    /// An image cache and a caption cache with their backbones (`--task
    /// retrieval`).
    Retrieval {
        /// Image cache.
        image_cache: std::path::PathBuf,
        /// Caption cache.
        text_cache: std::path::PathBuf,
        /// Image backbone directory.
        image_backbone: std::path::PathBuf,
        /// Text backbone directory.
        text_backbone: std::path::PathBuf,
    },
}

impl SweepInputs {
    /// The `sherl-fit run` arguments naming the inputs.
    fn args(&self) -> Vec<std::ffi::OsString> {
        let pairs: Vec<(&str, &std::path::Path)> = match self {
            SweepInputs::Classification { cache, backbone } => {
                vec![("--cache", cache), ("--backbone", backbone)]
            }
            SweepInputs::Retrieval {
                image_cache,
                text_cache,
                image_backbone,
                text_backbone,
            } => vec![
                ("--task", std::path::Path::new("retrieval")),
                ("--image-cache", image_cache),
                ("--text-cache", text_cache),
                ("--image-backbone", image_backbone),
                ("--text-backbone", text_backbone),
            ],
        };
        pairs
            .into_iter()
            .flat_map(|(flag, path)| [flag.into(), path.as_os_str().to_owned()])
            .collect()
    }
}

/// One run of the grid, as planned.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedRun {
    /// Position in the expanded grid.
    pub index: usize,
    /// Run id (directory name under `out`).
    pub run_id: String,
    /// Settings (of a retrieval run: the shared ones; its `method` unused).
    pub config: FitConfig,
    /// A retrieval run's towers, joint width and loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retrieval: Option<RetrievalConfig>,
}

impl PlannedRun {
    /// The `sherl-fit run` flags of a retrieval run's own settings.
    fn retrieval_args(&self) -> Vec<String> {
        let Some(rc) = &self.retrieval else {
            return Vec::new();
        };
        vec![
            "--image-method".into(),
            rc.image_method.name().into(),
            "--text-method".into(),
            rc.text_method.name().into(),
            "--joint-dim".into(),
            rc.joint_dim.to_string(),
            "--loss".into(),
            rc.loss.name().into(),
            "--margin".into(),
            rc.margin.to_string(),
        ]
    }
}

/// Expand the grid file for this worker (nothing is written).
pub fn plan_runs(plan: &SweepPlan) -> Result<Vec<PlannedRun>> {
    let bytes = std::fs::read(&plan.grid).map_err(|e| Error::io(&plan.grid, e))?;
    let grid: Value = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
        path: plan.grid.clone(),
        source: e,
    })?;
    let in_file = |e: Error| match e {
        Error::Fit(source) => FitError::GridFile {
            path: plan.grid.clone(),
            source: Box::new(source),
        }
        .into(),
        other => other,
    };
    let hash = |cache: &std::path::Path| -> Result<String> {
        Ok(
            crate::cache::Manifest::read(&cache.join(crate::cache::manifest::MANIFEST))?
                .settings_hash,
        )
    };
    let (wi, wm) = plan.worker;
    match &plan.inputs {
        SweepInputs::Classification { cache, .. } => {
            let runs = expand(&grid).map_err(in_file)?;
            let h = hash(cache)?;
            Ok(partition(runs.len(), wi, wm)
                .into_iter()
                .map(|k| PlannedRun {
                    index: k,
                    run_id: runs[k].run_id(&h),
                    config: runs[k].clone(),
                    retrieval: None,
                })
                .collect())
        }
        SweepInputs::Retrieval {
            image_cache,
            text_cache,
            ..
        } => {
            let runs = expand_retrieval(&grid).map_err(in_file)?;
            let (ih, th) = (hash(image_cache)?, hash(text_cache)?);
            Ok(partition(runs.len(), wi, wm)
                .into_iter()
                .map(|k| {
                    let (cfg, rc) = &runs[k];
                    PlannedRun {
                        index: k,
                        run_id: rc.run_id(cfg, &ih, &th),
                        config: cfg.clone(),
                        retrieval: Some(rc.clone()),
                    }
                })
                .collect())
        }
    }
}

/// What happened in a sweep.
#[derive(Debug, Default)]
pub struct SweepOutcome {
    /// Runs for this worker.
    pub runs: usize,
    /// Already complete when the sweep started (or completed meanwhile by
    /// another process).
    pub done_before: usize,
    /// Stopped with an error before and skipped (no `--retry-failed`).
    pub failed_before: usize,
    /// Run ids that failed in this sweep.
    pub failed: Vec<String>,
}

/// Progress of a sweep, as the binary shows it.
pub trait SweepReporter: Sync {
    /// The sweep is about to start `to_run` runs.
    fn start(&self, outcome: &SweepOutcome, to_run: usize, jobs: usize);
    /// A run finished; `summary` is its JSON summary line.
    fn finished(&self, n: usize, total: usize, run: &PlannedRun, summary: &str);
    /// A run failed.
    fn failed(&self, n: usize, total: usize, run: &PlannedRun, why: &str, log: &std::path::Path);
    /// Something worth a line.
    fn note(&self, message: &str);
    /// Epochs trained so far of all the epochs this sweep has to train, and
    /// the time since it started (when a run ends and every 2 s, each
    /// count once).
    fn progress(&self, epochs_done: usize, epochs_total: usize, elapsed: std::time::Duration);
}

enum Attempt {
    Done(String),
    Busy,
    Failed(String),
}

/// Run the sweep: every planned run not complete yet is trained by a
/// `sherl-fit run` child process, `jobs` at a time, each with its share of
/// the cores and its stderr in `OUT/.sweep/<run id>.log`. Runs another
/// process is training (its lock is held: a second sweep on the same
/// `--out`) are left to it and waited for at the end; if that process died
/// without finishing, they are trained here.
pub fn run_sweep(
    plan: &SweepPlan,
    runs: &[PlannedRun],
    reporter: &dyn SweepReporter,
) -> Result<SweepOutcome> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let lock = super::run_dir::RUN_LOCK;
    let settings_dir = plan.out.join(".sweep");
    std::fs::create_dir_all(&settings_dir).map_err(|e| Error::io(&settings_dir, e))?;
    let mut outcome = SweepOutcome {
        runs: runs.len(),
        ..Default::default()
    };
    let mut todo = Vec::new();
    for r in runs {
        let dir = plan.out.join(&r.run_id);
        if dir.join("summary.json").exists() {
            outcome.done_before += 1;
        } else if dir.join("error.json").exists()
            && !plan.retry_failed
            && !crate::fsutil::DirLock::is_held(&dir, lock)?
        {
            outcome.failed_before += 1;
        } else {
            let file = settings_dir.join(format!("{}.json", r.run_id));
            crate::fsutil::write_atomic(
                &file,
                &serde_json::to_vec_pretty(&r.config).expect("serializes"),
            )?;
            todo.push((r, file));
        }
    }
    let jobs = plan.jobs.max(1);
    reporter.start(&outcome, todo.len(), jobs);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads_each = (cores / jobs).max(1);
    let attempt = |r: &PlannedRun, file: &std::path::Path| -> Attempt {
        let log = settings_dir.join(format!("{}.log", r.run_id));
        // Appended to, never truncated: two sweeps that start the same run
        // (a requeued worker) must not cut the log of the one training it.
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| {
                use std::io::Write;
                writeln!(
                    f,
                    "--- sweep process {}: run {}",
                    std::process::id(),
                    r.run_id
                )?;
                Ok(f)
            });
        let out = opened.and_then(|f| {
            std::process::Command::new(&plan.exe)
                .arg("--no-progress")
                .arg("run")
                .args(plan.inputs.args())
                .args(r.retrieval_args())
                .args(["--out".as_ref(), plan.out.as_os_str()])
                .args(["--config".as_ref(), file.as_os_str()])
                .args(["--device", &plan.device])
                .args(["--blas", &plan.blas])
                .env("RAYON_NUM_THREADS", threads_each.to_string())
                .env(PARENT_PID_ENV, std::process::id().to_string())
                .stderr(f)
                .output()
        });
        match out {
            Ok(o) if o.status.success() => Attempt::Done(
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .last()
                    .unwrap_or("")
                    .to_string(),
            ),
            Ok(o) if o.status.code() == Some(EXIT_BUSY) => Attempt::Busy,
            Ok(o) => Attempt::Failed(format!("exit {:?}", o.status.code())),
            Err(e) => Attempt::Failed(format!("could not start {}: {e}", plan.exe.display())),
        }
    };
    let total_epochs: usize = todo.iter().map(|(r, _)| r.config.epochs).sum();
    let queue = Mutex::new(todo.into_iter());
    let busy = Mutex::new(Vec::new());
    let failed = Mutex::new(Vec::new());
    let finished = AtomicUsize::new(outcome.done_before);
    let total = runs.len();
    let settle = |r: &PlannedRun, a: Attempt| {
        let n = finished.fetch_add(1, Ordering::Relaxed) + 1;
        let why = match a {
            Attempt::Done(line) => return reporter.finished(n, total, r, &line),
            Attempt::Busy => "another process still holds its lock".to_string(),
            Attempt::Failed(why) => why,
        };
        let log = settings_dir.join(format!("{}.log", r.run_id));
        reporter.failed(n, total, r, &why, &log);
        if let Ok(mut f) = failed.lock() {
            f.push(r.run_id.clone());
        }
    };
    // Progress in epochs over the whole sweep: runs in flight are counted
    // by the lines of their metrics.jsonl, finished ones in full.
    let in_flight: Mutex<Vec<&PlannedRun>> = Mutex::new(Vec::new());
    let settled_epochs = AtomicUsize::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let started = std::time::Instant::now();
    // Called when a run ends and by the ticker: each count is reported once.
    let last_shown = AtomicUsize::new(usize::MAX);
    let show_progress = |done: usize| {
        if last_shown.swap(done, Ordering::Relaxed) != done {
            reporter.progress(done, total_epochs, started.elapsed());
        }
    };
    let epochs_done = || {
        let running: usize = in_flight.lock().map_or(0, |runs| {
            runs.iter()
                .map(|r| {
                    let m = plan.out.join(&r.run_id).join("metrics.jsonl");
                    std::fs::read_to_string(m).map_or(0, |t| t.lines().count().min(r.config.epochs))
                })
                .sum()
        });
        settled_epochs.load(Ordering::Relaxed) + running
    };
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..jobs)
            .map(|_| {
                scope.spawn(|| loop {
                    let next = queue.lock().ok().and_then(|mut q| q.next());
                    let Some((r, file)) = next else { break };
                    let dir = plan.out.join(&r.run_id);
                    let a = match crate::fsutil::DirLock::is_held(&dir, lock) {
                        Ok(true) => Attempt::Busy,
                        Ok(false) => {
                            if let Ok(mut f) = in_flight.lock() {
                                f.push(r);
                            }
                            let a = attempt(r, &file);
                            if let Ok(mut f) = in_flight.lock() {
                                f.retain(|x| x.run_id != r.run_id);
                            }
                            settled_epochs.fetch_add(r.config.epochs, Ordering::Relaxed);
                            show_progress(epochs_done());
                            a
                        }
                        Err(e) => Attempt::Failed(e.to_string()),
                    };
                    match a {
                        Attempt::Busy => {
                            reporter.note(&format!(
                            "run {} {}: another process is training it; waiting for it at the end",
                            r.index, r.run_id
                        ));
                            if let Ok(mut b) = busy.lock() {
                                b.push((r, file));
                            }
                        }
                        a => settle(r, a),
                    }
                })
            })
            .collect();
        if total_epochs > 0 {
            scope.spawn(|| {
                let mut ticks = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    ticks += 1;
                    if ticks.is_multiple_of(10) {
                        show_progress(epochs_done());
                    }
                }
            });
        }
        for w in workers {
            // A worker that panicked has already reported nothing more to do.
            let _ = w.join();
        }
        stop.store(true, Ordering::Relaxed);
    });
    // Runs another process held: wait for it, then take what it left.
    for (r, file) in busy.into_inner().unwrap_or_default() {
        let dir = plan.out.join(&r.run_id);
        let held = crate::fsutil::DirLock::acquire(&dir, lock)?;
        drop(held);
        if dir.join("summary.json").exists() {
            finished.fetch_add(1, Ordering::Relaxed);
            outcome.done_before += 1;
            reporter.note(&format!(
                "run {} {}: finished by another process",
                r.index, r.run_id
            ));
        } else {
            settle(r, attempt(r, &file));
        }
    }
    outcome.failed = failed.into_inner().unwrap_or_default();
    Ok(outcome)
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
