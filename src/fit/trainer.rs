//! The training loop both tasks share. The [`Trainer`] owns the run
//! directory's lifecycle (lock, stale files, `error.json`), the epochs, the
//! optimisers (one AdamW per [`ParamGroup`]), the learning-rate schedule,
//! gradient clipping, the stop on a non-finite loss, the step memory,
//! `metrics.jsonl`, the best checkpoint and `summary.json`. A [`Task`]
//! (classification in [`super::train`], retrieval in
//! [`super::retrieval::train`]) supplies what differs: its batches, the
//! forward and backward pass of one batch, the evaluation that picks the
//! best epoch, its weights, and its part of the summary (the split of
//! burn's learner, which takes a model's train and valid steps and a data
//! loader and owns the rest).
//!
//! One step, in this order (the order fixes the random draws and the
//! floating-point results): the task reads the batch, the step's memory
//! window opens, the task runs forward and backward (drawing dropout from
//! the run's one dropout stream), a non-finite loss stops the run, the
//! gradients are clipped over every trained parameter (groups in order),
//! each group's AdamW steps at its learning rate times the schedule, and
//! the window closes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::optim::ParamsAdamW;

use super::alloc_track::StepWindow;
use super::checkpoint::{self, abort_for_test};
use super::config::FitConfig;
use super::memory::peak_rss_bytes;
use super::optim::{clip_scale, AdamW, ParamMoments};
use super::params::{Group, Params};
use super::run_dir::{
    EpochMetrics, EpochTask, RunError, Summary, SummaryTask, TrainMemory, CONFIG_FILE, ERROR_FILE,
    METRICS_FILE, RUN_LOCK, SUMMARY_FILE, WEIGHTS_FILE,
};
use crate::fsutil::DirLock;
use crate::rng::{SplitMix64, Stream};
use crate::{Error, Result};

/// Progress callbacks (drawn by the binary).
pub trait FitReporter {
    /// An epoch begins with about `steps` steps.
    fn epoch_start(&self, epoch: usize, epochs: usize, steps: u64);
    /// One optimisation step finished with this loss.
    fn step(&self, loss: f32);
    /// The epoch's metrics.
    fn epoch_end(&self, m: &EpochMetrics);
    /// A line for the user.
    fn note(&self, message: &str);
}

/// A reporter that only logs.
#[derive(Debug, Default)]
pub struct LogReporter;

impl FitReporter for LogReporter {
    fn epoch_start(&self, _: usize, _: usize, _: u64) {}
    fn step(&self, _: f32) {}
    fn epoch_end(&self, m: &EpochMetrics) {
        match &m.task {
            EpochTask::Classification {
                train_accuracy,
                valid_loss,
                valid_accuracy,
                valid_macro_f1,
                ..
            } => tracing::info!(
                "epoch {}: train loss {:.4} acc {:.4} | valid loss {:.4} acc {:.4} F1 {:.4} | {:.1}s",
                m.epoch,
                m.train_loss,
                train_accuracy,
                valid_loss,
                valid_accuracy,
                valid_macro_f1,
                m.seconds
            ),
            EpochTask::Retrieval { valid: v, .. } => tracing::info!(
                "epoch {}: train loss {:.4} | valid R@1/5/10 i2t {:.1}/{:.1}/{:.1} t2i {:.1}/{:.1}/{:.1} rsum {:.1} | {:.1}s",
                m.epoch,
                m.train_loss,
                v.i2t[0],
                v.i2t[1],
                v.i2t[2],
                v.t2i[0],
                v.t2i[1],
                v.t2i[2],
                v.rsum,
                m.seconds
            ),
        }
    }
    fn note(&self, message: &str) {
        tracing::info!("{message}");
    }
}

/// Parameters one AdamW trains.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// Which learning rate they take: `--lr` ([`Group::New`]) or
    /// `--lr-pretrained` ([`Group::Pretrained`]), times the schedule.
    pub lr: Group,
    /// The parameters (a group without any is left out).
    pub vars: Vec<Var>,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
}

/// What a task reports at the end of an epoch.
#[derive(Debug, Clone)]
pub struct EpochEval {
    /// Mean training loss of the epoch.
    pub train_loss: f64,
    /// The task's scores on the valid split and its rates.
    pub task: EpochTask,
}

/// What a task reports when training is over.
#[derive(Debug, Clone)]
pub struct TaskSummary {
    /// The method, as the summary records it.
    pub method: String,
    /// Trainable parameters (the training memory counts 12 bytes each).
    pub trainable_params: usize,
    /// Frozen parameters loaded.
    pub frozen_params: usize,
    /// The task's part of the summary: the best checkpoint's scores.
    pub task: SummaryTask,
}

/// What a task supplies to the [`Trainer`].
pub trait Task {
    /// One training batch.
    type Batch;
    /// The trained parameters, in the order gradients are clipped over.
    fn param_groups(&self) -> Vec<ParamGroup>;
    /// Optimisation steps per epoch (for the progress bar and the
    /// learning-rate schedule).
    fn steps_per_epoch(&self) -> usize;
    /// Begin training epoch `epoch` (1-based): the epoch's batch order.
    fn start_epoch(&mut self, epoch: usize) -> Result<()>;
    /// The epoch's next training batch, `None` once the epoch is done.
    fn next_batch(&mut self) -> Result<Option<Self::Batch>>;
    /// Forward and backward of one training batch, dropout drawn from
    /// `dropout`: the batch's mean loss and the gradients of `vars` (every
    /// parameter of [`Task::param_groups`]). The task adds the batch to
    /// its epoch's training statistics.
    fn forward_backward(
        &mut self,
        batch: &Self::Batch,
        dropout: &mut SplitMix64,
        vars: &[Var],
    ) -> Result<(f32, GradStore)>;
    /// The epoch's training statistics and the valid split's scores with
    /// the current weights; `seconds`: the epoch's training time.
    fn end_epoch(&mut self, seconds: f64) -> Result<EpochEval>;
    /// The trainable weights by name (saved as `weights.safetensors`).
    fn snapshot(&self) -> Result<BTreeMap<String, Tensor>>;
    /// Put weights from [`Task::snapshot`] back (read from `source`).
    fn restore(&self, weights: &BTreeMap<String, Tensor>, source: &Path) -> Result<()>;
    /// Running totals the task carries from epoch to epoch (saved in a
    /// mid-run checkpoint; `null` when there are none).
    fn carried(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Put back totals from [`Task::carried`] when a run resumes.
    fn set_carried(&mut self, _value: &serde_json::Value) -> Result<()> {
        Ok(())
    }
    /// After training, with the best epoch's weights restored: score the
    /// valid and test splits, write the task's own files into `run_dir`;
    /// `train_seconds`: all epochs' training time.
    fn finish(&mut self, run_dir: &Path, train_seconds: f64) -> Result<TaskSummary>;
}

/// Whether a run directory is this process's to train in.
pub enum Claim {
    /// The run finished before: its summary.
    Finished(Box<Summary>),
    /// The run directory is locked for this process until the lock drops.
    Held(DirLock),
}

/// Trains one run of a [`Task`] into its run directory.
pub struct Trainer<'a> {
    /// The settings (epochs, learning rates, schedule, clipping, seed).
    pub config: &'a FitConfig,
    /// Run id.
    pub run_id: String,
    /// `RUNS/<run id>`.
    pub run_dir: PathBuf,
    /// Where it trains (recorded in the summary).
    pub device: &'a Device,
    /// Progress.
    pub reporter: &'a dyn FitReporter,
}

impl Trainer<'_> {
    /// The summary of the run if it finished before (and a note saying so).
    /// An unreadable `summary.json` is an error naming it, saying how to
    /// train the run again.
    pub fn finished(&self) -> Result<Option<Summary>> {
        let s = Summary::read(&self.run_dir).map_err(|e| {
            Error::from(crate::fit::error::FitError::BadRun {
                path: self.run_dir.clone(),
                message: format!(
                    "the run's record of a finished run cannot be used ({e}); remove {} (or \
                     the run directory) to train the run again",
                    self.run_dir.join(SUMMARY_FILE).display()
                ),
            })
        })?;
        if s.is_some() {
            self.reporter.note(&format!(
                "{}: already complete ({}), not re-run",
                self.run_id,
                self.run_dir.join(SUMMARY_FILE).display()
            ));
        }
        Ok(s)
    }

    /// Create the run directory and lock it, then remove what an earlier,
    /// unfinished attempt left (`metrics.jsonl`, `error.json`, the weights
    /// and `stale`; with a mid-run checkpoint only `error.json` and
    /// `stale`, [`super::checkpoint`]). One process per run directory: a second `run` (or a
    /// second sweep on the same --out) is refused while the first holds the
    /// lock, and the operating system releases it when the holder dies,
    /// however it dies.
    pub fn claim(&self, stale: &[&str]) -> Result<Claim> {
        let dir = &self.run_dir;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let lock = DirLock::try_acquire(dir, RUN_LOCK)?.ok_or_else(|| Error::Locked {
            path: dir.clone(),
            what: "this run",
            lock: dir.join(RUN_LOCK),
        })?;
        // It may have finished while we waited for nothing: look again
        // under the lock.
        if let Some(s) = self.finished()? {
            return Ok(Claim::Finished(Box::new(s)));
        }
        // A checkpoint keeps the metrics and best weights it accounts for
        // (Trainer::train checks them, and starts over if they disagree).
        let resumable = dir.join(checkpoint::STATE_FILE).exists();
        let kept: &[&str] = if resumable {
            &[ERROR_FILE]
        } else {
            &[METRICS_FILE, ERROR_FILE, WEIGHTS_FILE]
        };
        for name in kept.iter().chain(stale) {
            let p = dir.join(name);
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        Ok(Claim::Held(lock))
    }

    /// Train `task`, keep the best epoch's weights, and write
    /// `summary.json`; a run that stops keeps what it wrote (metrics, best
    /// weights) and says why in `error.json`.
    ///
    /// Both record the sha256 of `config.json` as it was when training
    /// started (written just before by the caller, under the run's lock),
    /// so `predict` and `search` refuse a file edited afterwards.
    pub fn fit<T: Task>(&self, task: &mut T) -> Result<Summary> {
        let config_sha256 = crate::fsutil::sha256_file(&self.run_dir.join(CONFIG_FILE))?;
        match self.train(task, &config_sha256) {
            Ok(mut s) => {
                s.config_sha256 = Some(config_sha256);
                s.write(&self.run_dir)?;
                checkpoint::remove(&self.run_dir)?;
                Ok(s)
            }
            Err(e) => {
                RunError::record(&self.run_dir, &self.run_id, Some(config_sha256), &e);
                Err(e)
            }
        }
    }

    fn train<T: Task>(&self, task: &mut T, config_sha256: &str) -> Result<Summary> {
        let cfg = self.config;
        let mut opt = Optimisers::new(task.param_groups(), cfg)?;
        let steps_per_epoch = task.steps_per_epoch();
        let total_steps = steps_per_epoch * cfg.epochs;
        let metrics_path = self.run_dir.join(METRICS_FILE);
        let weights_path = self.run_dir.join(WEIGHTS_FILE);
        let mut p = match self.resume(task, &mut opt, config_sha256)? {
            Some(p) => p,
            None => {
                if weights_path.exists() {
                    std::fs::remove_file(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
                }
                Progress {
                    first_epoch: 1,
                    step: 0,
                    dropout: SplitMix64::for_stream(cfg.seed, Stream::Dropout),
                    train_seconds: 0.0,
                    step_peak: None,
                    best: Best::new(weights_path.clone()),
                    metrics: String::new(),
                }
            }
        };
        let mut metrics = metrics_log(&metrics_path, &p.metrics)?;
        let checkpoints = opt.state().is_some();
        let (mut dropout, mut best) = (
            p.dropout.clone(),
            std::mem::replace(&mut p.best, Best::new(weights_path)),
        );
        let (mut step, mut step_peak, mut train_seconds) = (p.step, p.step_peak, p.train_seconds);
        for epoch in p.first_epoch..=cfg.epochs {
            let _span = tracing::info_span!("epoch", n = epoch).entered();
            self.reporter
                .epoch_start(epoch, cfg.epochs, steps_per_epoch as u64);
            let t = Instant::now();
            let mut lr = cfg.lr;
            task.start_epoch(epoch)?;
            while let Some(batch) = task.next_batch()? {
                // The step's own memory: everything allocated from here to
                // the optimisers' update (super::alloc_track).
                let counted = StepWindow::start();
                let (loss, mut grads) = task.forward_backward(&batch, &mut dropout, &opt.vars)?;
                if !loss.is_finite() {
                    return Err(Error::Diverged(diverged_message(
                        loss,
                        epoch,
                        step,
                        cfg,
                        opt.trains_pretrained,
                        best.kept(),
                    )));
                }
                let mult =
                    cfg.schedule(step.min(total_steps.saturating_sub(1)), total_steps.max(1));
                lr = cfg.lr * mult;
                opt.step(&mut grads, cfg.grad_clip, mult)?;
                drop(grads);
                counted.finish(&mut step_peak);
                step += 1;
                self.reporter.step(loss);
            }
            let seconds = t.elapsed().as_secs_f64();
            train_seconds += seconds;
            let te = Instant::now();
            let eval = task.end_epoch(seconds)?;
            let em = EpochMetrics {
                epoch,
                train_loss: eval.train_loss,
                task: eval.task,
                seconds,
                eval_seconds: te.elapsed().as_secs_f64(),
                lr,
            };
            writeln!(metrics, "{}", em.line())
                .and_then(|_| metrics.flush())
                .map_err(|e| Error::io(&metrics_path, e))?;
            self.reporter.epoch_end(&em);
            best.offer(em.task.selection(), epoch, task)?;
            if checkpoints {
                let at = (epoch, step, train_seconds, step_peak);
                self.save_checkpoint(task, &opt, &best, &dropout, config_sha256, at)?;
                abort_for_test(epoch);
            }
        }
        let best_epoch = best.restore(task)?;
        let done = task.finish(&self.run_dir, train_seconds)?;
        Ok(Summary {
            run_id: self.run_id.clone(),
            method: done.method,
            seed: cfg.seed,
            task: done.task,
            best_epoch,
            epochs: cfg.epochs,
            trainable_params: done.trainable_params,
            frozen_params: done.frozen_params,
            peak_rss_bytes: peak_rss_bytes(),
            train_seconds,
            seconds_per_epoch: train_seconds / cfg.epochs as f64,
            run_dir: self.run_dir.clone(),
            weights_sha256: Some(best.sha256),
            config_sha256: None,
            device: Some(crate::fit::device_name(self.device)),
            matmul: self.device.is_cpu().then(crate::fit::kernels::gemm::kernel),
            train_memory: step_peak.map(|p| TrainMemory::new(done.trainable_params, p)),
        })
    }
}

/// Where a run stands when its epochs begin (fresh or resumed).
pub(super) struct Progress {
    pub(super) first_epoch: usize,
    pub(super) step: usize,
    pub(super) dropout: SplitMix64,
    pub(super) train_seconds: f64,
    pub(super) step_peak: Option<u64>,
    pub(super) best: Best,
    /// The kept lines of `metrics.jsonl`.
    pub(super) metrics: String,
}

/// Create `metrics.jsonl`, a log written one line per epoch as training
/// goes (the report and a watching user read it while the run is still
/// going), so not through [`crate::fsutil::AtomicFile`]: a run killed
/// mid-line leaves a cut last line, which the report names and leaves out.
/// A resumed run starts it with the `kept` lines of the epochs its
/// checkpoint accounts for.
#[expect(
    clippy::disallowed_methods,
    reason = "a progress log appended line by line, read while it grows"
)]
fn metrics_log(path: &Path, kept: &str) -> Result<std::fs::File> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(kept.as_bytes())
        .and_then(|_| f.flush())
        .map_err(|e| Error::io(path, e))?;
    Ok(f)
}

/// One AdamW per non-empty [`ParamGroup`], and every trained parameter in
/// group order (the gradients are clipped over them in that order).
pub(super) struct Optimisers {
    pub(super) groups: Vec<(AdamW, f64)>,
    vars: Vec<Var>,
    trains_pretrained: bool,
}

impl Optimisers {
    fn new(groups: Vec<ParamGroup>, cfg: &FitConfig) -> Result<Self> {
        let mut out = Optimisers {
            groups: Vec::new(),
            vars: Vec::new(),
            trains_pretrained: false,
        };
        for g in groups.into_iter().filter(|g| !g.vars.is_empty()) {
            let lr = match g.lr {
                Group::New => cfg.lr,
                Group::Pretrained => {
                    out.trains_pretrained = true;
                    cfg.lr_pretrained
                }
            };
            out.vars.extend(g.vars.iter().cloned());
            let params = ParamsAdamW {
                lr,
                weight_decay: g.weight_decay,
                ..Default::default()
            };
            out.groups.push((AdamW::new(g.vars, params)?, lr));
        }
        Ok(out)
    }

    /// Every group's state ([`AdamW::state`]), or `None` when one group's
    /// is not reachable (no checkpoints are written then).
    pub(super) fn state(&self) -> Option<Vec<(i32, ParamMoments)>> {
        self.groups.iter().map(|(o, _)| o.state()).collect()
    }

    /// Whether `moments` fit the groups' parameters (number and sizes).
    pub(super) fn check_moments(
        &self,
        moments: &[ParamMoments],
    ) -> std::result::Result<(), String> {
        let Some(state) = self.state() else {
            return Err("this optimiser's state cannot be restored".into());
        };
        for (g, ((_, have), got)) in state.iter().zip(moments).enumerate() {
            let sizes = |v: &ParamMoments| {
                v.iter()
                    .map(|(m, v)| (m.len(), v.len()))
                    .collect::<Vec<_>>()
            };
            if sizes(have) != sizes(got) {
                return Err(format!(
                    "the moments of optimiser group {g} do not fit the model's parameters"
                ));
            }
        }
        Ok(())
    }

    /// Put back every group's steps and moments (checked first).
    pub(super) fn set_state(&mut self, steps: &[i32], moments: Vec<ParamMoments>) -> Result<()> {
        for (((o, _), &t), m) in self.groups.iter_mut().zip(steps).zip(moments) {
            o.set_state(t, m)?;
        }
        Ok(())
    }

    /// Clip the gradients to `max_norm` (0: off), then step every group at
    /// its learning rate times `mult`.
    fn step(&mut self, grads: &mut GradStore, max_norm: f64, mult: f64) -> Result<()> {
        let clip = if max_norm > 0.0 {
            clip_scale(grads, &self.vars, max_norm)?.1
        } else {
            None
        };
        for (opt, lr) in &mut self.groups {
            opt.set_learning_rate(*lr * mult);
            opt.step(grads, clip)?;
        }
        Ok(())
    }
}

/// The best epoch so far by the valid score, its weights in memory and in
/// `weights.safetensors` (replaced atomically on each improvement).
pub(super) struct Best {
    path: PathBuf,
    pub(super) best: Option<(f64, usize, BTreeMap<String, Tensor>)>,
    pub(super) sha256: String,
}

impl Best {
    pub(super) fn new(path: PathBuf) -> Self {
        Best {
            path,
            best: None,
            sha256: String::new(),
        }
    }

    /// The weights file, once an epoch has written one.
    fn kept(&self) -> Option<&Path> {
        self.best.as_ref().map(|_| self.path.as_path())
    }

    /// Keep the task's weights if `score` beats the best so far.
    fn offer(&mut self, score: f64, epoch: usize, task: &impl Task) -> Result<()> {
        if self.best.as_ref().is_none_or(|b| score > b.0) {
            let snap = task.snapshot()?;
            self.sha256 = Params::save(&snap, &self.path)?;
            self.best = Some((score, epoch, snap));
        }
        Ok(())
    }

    /// Put the best weights back into the task; the best epoch.
    fn restore(&self, task: &impl Task) -> Result<usize> {
        let (_, epoch, snap) = self.best.as_ref().expect("at least one epoch ran");
        task.restore(snap, &self.path)?;
        Ok(*epoch)
    }
}

/// Why training stopped on a non-finite loss, with the settings that can
/// cause it and, only when there are some, where the best weights are.
fn diverged_message(
    loss: f32,
    epoch: usize,
    step: usize,
    cfg: &FitConfig,
    trains_pretrained: bool,
    kept: Option<&Path>,
) -> String {
    let mut causes = vec![format!("--lr {}", cfg.lr)];
    if trains_pretrained && cfg.lr_pretrained > 0.0 {
        causes.push(format!("--lr-pretrained {}", cfg.lr_pretrained));
    }
    if cfg.weight_decay > 0.0 {
        causes.push(format!("--weight-decay {}", cfg.weight_decay));
    }
    let clip = if cfg.grad_clip > 0.0 {
        format!("lower --grad-clip (now {})", cfg.grad_clip)
    } else {
        "set --grad-clip (now off), e.g. 1.0".to_string()
    };
    let kept = match kept {
        Some(p) => format!("the best weights so far are kept in {}", p.display()),
        None => "no epoch finished, so no weights were kept".to_string(),
    };
    format!(
        "training loss became {loss} at epoch {epoch}, step {step}; lower one of {} or {clip}; {kept}",
        causes.join(", ")
    )
}
