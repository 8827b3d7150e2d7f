//! The process pool of a sweep: every planned run trained by a `sherl-fit
//! run` child, `jobs` at a time; and the child's side, which stops when the
//! sweep is gone.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::fit::run_dir::RUN_LOCK;
use crate::fit::sweep::plan::{PlannedRun, SweepPlan};
use crate::{Error, Result};

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
/// `unsafe` outside the few places the crate allows it. Does nothing when the
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

/// A run's log `OUT/.sweep/<run id>.log`, opened for appending: it is
/// appended to, never truncated, as two sweeps that start the same run (a
/// requeued worker) must not cut the log of the one training it, and its
/// handle is the child's stderr, so it cannot be written atomically.
#[expect(
    clippy::disallowed_methods,
    reason = "an append-only log handed to a child process as its stderr"
)]
fn open_log(log: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
}

enum Attempt {
    Done(String),
    Busy,
    Failed(String),
}

/// One sweep's pool: what every worker thread shares.
struct Pool<'a> {
    plan: &'a SweepPlan,
    reporter: &'a dyn SweepReporter,
    /// `OUT/.sweep`: each run's settings file and log.
    settings_dir: PathBuf,
    /// `RAYON_NUM_THREADS` of each child.
    threads_each: usize,
    /// Runs of this worker.
    total: usize,
    /// Runs settled so far (done before included).
    finished: AtomicUsize,
    /// Run ids that failed.
    failed: Mutex<Vec<String>>,
    /// Runs training now.
    in_flight: Mutex<Vec<&'a PlannedRun>>,
    /// Epochs of the runs that ended.
    settled_epochs: AtomicUsize,
    /// Epochs this sweep has to train.
    total_epochs: usize,
    /// The last count of epochs reported (each is reported once).
    last_shown: AtomicUsize,
    started: Instant,
}

impl<'a> Pool<'a> {
    /// Train `r` with its settings `file` in a `sherl-fit run` child.
    fn attempt(&self, r: &PlannedRun, file: &Path) -> Attempt {
        let plan = self.plan;
        let log = self.settings_dir.join(format!("{}.log", r.run_id));
        let opened = open_log(&log).and_then(|mut f| {
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
                .env("RAYON_NUM_THREADS", self.threads_each.to_string())
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
    }

    /// Report how a run ended.
    fn settle(&self, r: &PlannedRun, a: Attempt) {
        let n = self.finished.fetch_add(1, Ordering::Relaxed) + 1;
        let why = match a {
            Attempt::Done(line) => return self.reporter.finished(n, self.total, r, &line),
            Attempt::Busy => "another process still holds its lock".to_string(),
            Attempt::Failed(why) => why,
        };
        let log = self.settings_dir.join(format!("{}.log", r.run_id));
        self.reporter.failed(n, self.total, r, &why, &log);
        if let Ok(mut f) = self.failed.lock() {
            f.push(r.run_id.clone());
        }
    }

    /// Epochs trained so far: runs in flight are counted by the lines of
    /// their metrics.jsonl, finished ones in full.
    fn epochs_done(&self) -> usize {
        let running: usize = self.in_flight.lock().map_or(0, |runs| {
            runs.iter()
                .map(|r| {
                    let m = self.plan.out.join(&r.run_id).join("metrics.jsonl");
                    crate::fsutil::read_text(&m, crate::fsutil::METADATA_LIMIT)
                        .map_or(0, |t| t.lines().count().min(r.config.epochs))
                })
                .sum()
        });
        self.settled_epochs.load(Ordering::Relaxed) + running
    }

    /// Report the progress when it changed (when a run ends, and from the
    /// ticker).
    fn show_progress(&self) {
        let done = self.epochs_done();
        if self.last_shown.swap(done, Ordering::Relaxed) != done {
            self.reporter
                .progress(done, self.total_epochs, self.started.elapsed());
        }
    }

    /// Train `r` unless another process holds it.
    fn take(&self, r: &'a PlannedRun, file: &Path) -> Attempt {
        let dir = self.plan.out.join(&r.run_id);
        match crate::fsutil::DirLock::is_held(&dir, RUN_LOCK) {
            Ok(true) => Attempt::Busy,
            Ok(false) => {
                if let Ok(mut f) = self.in_flight.lock() {
                    f.push(r);
                }
                let a = self.attempt(r, file);
                if let Ok(mut f) = self.in_flight.lock() {
                    f.retain(|x| x.run_id != r.run_id);
                }
                self.settled_epochs
                    .fetch_add(r.config.epochs, Ordering::Relaxed);
                self.show_progress();
                a
            }
            Err(e) => Attempt::Failed(e.to_string()),
        }
    }
}

/// The runs not complete yet, each with its settings file written to
/// `settings_dir`; the outcome counts the others.
fn prepare<'a>(
    plan: &SweepPlan,
    runs: &'a [PlannedRun],
    settings_dir: &Path,
) -> Result<(SweepOutcome, Vec<(&'a PlannedRun, PathBuf)>)> {
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
            && !crate::fsutil::DirLock::is_held(&dir, RUN_LOCK)?
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
    Ok((outcome, todo))
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
    let settings_dir = plan.out.join(".sweep");
    std::fs::create_dir_all(&settings_dir).map_err(|e| Error::io(&settings_dir, e))?;
    let (mut outcome, todo) = prepare(plan, runs, &settings_dir)?;
    let jobs = plan.jobs.max(1);
    reporter.start(&outcome, todo.len(), jobs);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = Pool {
        plan,
        reporter,
        settings_dir,
        threads_each: (cores / jobs).max(1),
        total: runs.len(),
        finished: AtomicUsize::new(outcome.done_before),
        failed: Mutex::new(Vec::new()),
        in_flight: Mutex::new(Vec::new()),
        settled_epochs: AtomicUsize::new(0),
        total_epochs: todo.iter().map(|(r, _)| r.config.epochs).sum(),
        last_shown: AtomicUsize::new(usize::MAX),
        started: Instant::now(),
    };
    let busy = run_pool(&pool, todo, jobs);
    // Runs another process held: wait for it, then take what it left.
    for (r, file) in busy {
        let dir = plan.out.join(&r.run_id);
        let held = crate::fsutil::DirLock::acquire(&dir, RUN_LOCK)?;
        drop(held);
        if dir.join("summary.json").exists() {
            pool.finished.fetch_add(1, Ordering::Relaxed);
            outcome.done_before += 1;
            reporter.note(&format!(
                "run {} {}: finished by another process",
                r.index, r.run_id
            ));
        } else {
            pool.settle(r, pool.attempt(r, &file));
        }
    }
    outcome.failed = pool.failed.into_inner().unwrap_or_default();
    Ok(outcome)
}

/// `jobs` worker threads take the runs in order, and a ticker reports the
/// progress every 2 s; returns the runs another process was training.
fn run_pool<'a>(
    pool: &Pool<'a>,
    todo: Vec<(&'a PlannedRun, PathBuf)>,
    jobs: usize,
) -> Vec<(&'a PlannedRun, PathBuf)> {
    let queue = Mutex::new(todo.into_iter());
    let busy = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..jobs)
            .map(|_| {
                scope.spawn(|| loop {
                    let next = queue.lock().ok().and_then(|mut q| q.next());
                    let Some((r, file)) = next else { break };
                    match pool.take(r, &file) {
                        Attempt::Busy => {
                            pool.reporter.note(&format!(
                                "run {} {}: another process is training it; waiting for it at the end",
                                r.index, r.run_id
                            ));
                            if let Ok(mut b) = busy.lock() {
                                b.push((r, file));
                            }
                        }
                        a => pool.settle(r, a),
                    }
                })
            })
            .collect();
        if pool.total_epochs > 0 {
            scope.spawn(|| {
                let mut ticks = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    ticks += 1;
                    if ticks.is_multiple_of(10) {
                        pool.show_progress();
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
    busy.into_inner().unwrap_or_default()
}
