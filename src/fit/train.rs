//! `sherl-fit run`: train one model from the cache, evaluate on the valid
//! split every epoch, keep the best checkpoint, score the test split with
//! it, and write the run directory (the files are typed in
//! [`super::run_dir`]; the checks before a run are in [`super::checks`] and
//! [`super::memory`], evaluation in [`super::eval`]).
//!
//! Run directory `RUNS/<run id>/`: `config.json` (written before training),
//! `metrics.jsonl` (one line per epoch, flushed as it is written),
//! `weights.safetensors` (trainable weights of the best epoch so far,
//! replaced atomically on each improvement), `summary.json` (written last;
//! its presence means the run is complete), `error.json` (a run that
//! stopped on bad numbers or input, with the reason).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use candle_nn::optim::ParamsAdamW;

use super::optim::{clip_scale, AdamW};

use super::batcher::{split_len, Batch, BatchPlan, Batches};
use super::checks::{check_backbone, model_spec, split_id};
use super::config::FitConfig;
use super::eval::{argmax, evaluate};
use super::memory::{check_memory, memory_estimate, peak_rss_bytes};
use super::metrics::Tally;
use super::model::{Model, Shared};
use super::nn::direct_grads::{Collected, Collector};
use super::nn::Mode;
use super::params::{Group, Params};
use super::run_dir::{
    EpochMetrics, RunCache, RunConfig, RunError, RunModel, Summary, ERROR_FILE, METRICS_FILE,
    RUN_LOCK, SUMMARY_FILE, WEIGHTS_FILE,
};
use crate::backbone::BackboneDir;
use crate::cache::Cache;
use crate::data::args::TrainedColumns;
use crate::fit::error::FitError;
use crate::rng::{SplitMix64, Stream};
use crate::{Error, Result};

/// What `run` needs.
#[derive(Debug, Clone)]
pub struct FitPlan {
    /// Cache directory.
    pub cache: PathBuf,
    /// Backbone directory (config.json, model.safetensors).
    pub backbone: PathBuf,
    /// Directory holding run directories.
    pub out: PathBuf,
    /// Settings.
    pub config: FitConfig,
    /// candle device.
    pub device: Device,
    /// Cache decoder threads.
    pub decode_threads: usize,
    /// Threads that run the parts of a CPU batch side by side (see
    /// [`step_parts`]); 1 runs them one after the other.
    pub workers: usize,
}

/// Parts a training batch is split into on the CPU: two, always, so that
/// results do not depend on the thread count; on a GPU one.
pub fn step_parts(dev: &Device) -> usize {
    if dev.is_cpu() {
        2
    } else {
        1
    }
}

/// Row ranges of `parts` near-equal consecutive parts of `n` examples (no
/// empty part).
pub fn part_ranges(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    (0..parts)
        .map(|k| (k * n / parts)..((k + 1) * n / parts))
        .filter(|r| !r.is_empty())
        .collect()
}

/// Forward and backward of one training batch: the loss (the batch mean),
/// the predictions, and the gradients. The batch is cut into
/// [`part_ranges`]`(B, parts)`, each part's loss scaled by its share of the
/// batch, so the parts' gradients add up to the whole batch's; dropout masks
/// are the parts' rows of the whole batch's ([`Mode::TrainRows`]), so the
/// step computes what one pass over the whole batch would, up to the order
/// of floating-point sums. Parts run on up to `workers` threads.
pub fn forward_backward(
    model: &Model,
    batch: &Batch,
    rng: &mut SplitMix64,
    parts: usize,
    workers: usize,
    vars: &[candle_core::Var],
) -> Result<(f32, Vec<u32>, GradStore)> {
    let n = batch.len();
    let ranges = part_ranges(n, parts);
    if ranges.len() <= 1 {
        let out = model.forward(batch, &mut Mode::Train(rng))?;
        let loss = candle_nn::loss::cross_entropy(&out.logits, &batch.labels)?;
        let (mut grads, direct) = backward(&loss)?;
        direct.merge_into(&mut grads)?;
        return Ok((loss.to_scalar::<f32>()?, argmax(&out)?, grads));
    }
    type PartResult = Result<(f32, Vec<u32>, GradStore, Collected, SplitMix64)>;
    let start = rng.clone();
    let run_part =
        move |model: &Shared, part: Batch, first: usize, mut g: SplitMix64| -> PartResult {
            // Counted on whichever thread runs the part (train memory).
            let _counted = super::alloc_track::track();
            let out = model.forward(
                &part,
                &mut Mode::TrainRows {
                    rng: &mut g,
                    first,
                    batch: n,
                },
            )?;
            let share = part.len() as f64 / n as f64;
            let loss = (candle_nn::loss::cross_entropy(&out.logits, &part.labels)? * share)?;
            let (grads, direct) = backward(&loss)?;
            Ok((loss.to_scalar::<f32>()?, argmax(&out)?, grads, direct, g))
        };
    let shared = model.shared();
    let results: Vec<PartResult> = super::worker::map_parts(&ranges, workers >= 2, |r| {
        let (m, part, g, first) = (
            shared.clone(),
            batch.rows(r.clone()),
            start.clone(),
            r.start,
        );
        move || run_part(&m, part?, first, g)
    });
    let mut loss = 0f32;
    let mut preds = Vec::with_capacity(n);
    let mut grads: Option<GradStore> = None;
    let mut direct = Collected::default();
    for r in results {
        let (l, p, g, d, end) = r?;
        loss += l;
        preds.extend(p);
        *rng = end;
        direct.add(d)?;
        grads = Some(match grads {
            None => g,
            Some(mut acc) => {
                for v in vars {
                    if let Some(x) = g.get(v.as_tensor()) {
                        let sum = match acc.get(v.as_tensor()) {
                            Some(a) => (a + x)?,
                            None => x.clone(),
                        };
                        acc.insert(v.as_tensor(), sum);
                    }
                }
                acc
            }
        });
    }
    let mut grads = grads.expect("at least one part");
    direct.merge_into(&mut grads)?;
    Ok((loss, preds, grads))
}

/// `loss.backward()`, the fused layers' weight gradients collected apart
/// from candle's store (see [`crate::fit::nn::direct_grads`]): the caller
/// adds them in.
fn backward(loss: &Tensor) -> Result<(GradStore, Collected)> {
    let collector = Collector::start();
    let grads = loss.backward()?;
    Ok((grads, collector.finish()?))
}

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
        tracing::info!(
            "epoch {}: train loss {:.4} acc {:.4} | valid loss {:.4} acc {:.4} F1 {:.4} | {:.1}s",
            m.epoch,
            m.train_loss,
            m.train_accuracy,
            m.valid_loss,
            m.valid_accuracy,
            m.valid_macro_f1,
            m.seconds
        );
    }
    fn note(&self, message: &str) {
        tracing::info!("{message}");
    }
}

/// Run (or, if `summary.json` exists, return) the run described by `plan`.
pub fn run(plan: &FitPlan, reporter: &dyn FitReporter) -> Result<Summary> {
    let cfg = &plan.config;
    cfg.validate().map_err(FitError::settings)?;
    let cache = Arc::new(Cache::open(&plan.cache)?);
    let m = cache.manifest().clone();
    if m.labels.len() < 2 {
        return Err(FitError::cache_lacks(format!(
            "{}: the cache has {} label(s); classification needs at least 2",
            plan.cache.display(),
            m.labels.len()
        )));
    }
    let dir = BackboneDir::open(&plan.backbone)?;
    let (arch, ckpt) = check_backbone(&cache, &dir)?;
    let spec = model_spec(cfg, &cache, &arch)?;
    let train_split = split_id(&cache, &["train"]).ok_or_else(|| {
        FitError::cache_lacks(format!(
            "{}: no examples in a 'train' split (splits: {:?})",
            plan.cache.display(),
            m.splits
        ))
    })?;
    let valid_split = split_id(&cache, crate::data::VALID_SPLIT_NAMES).ok_or_else(|| {
        FitError::cache_lacks(format!(
            "{}: no examples in a 'valid' split (splits: {:?}); extract with --split or --valid",
            plan.cache.display(),
            m.splits
        ))
    })?;
    let test_split = split_id(&cache, &["test"]);
    if test_split.is_none() {
        reporter.note("the cache has no 'test' split: test metrics will be null");
    }

    let run_id = cfg.run_id(&m.settings_hash);
    let run_dir = plan.out.join(&run_id);
    let summary_path = run_dir.join(SUMMARY_FILE);
    if let Some(s) = Summary::read(&run_dir)? {
        reporter.note(&format!(
            "{run_id}: already complete ({}), not re-run",
            summary_path.display()
        ));
        return Ok(s);
    }
    // Everything that can refuse the run is checked before the run
    // directory is created: a refused command changes nothing on disk.
    check_memory(&memory_estimate(
        &spec,
        &arch.sizes(),
        cfg,
        m.settings.max_len,
        &m.settings.layers,
    ))?;
    let model = Model::build(
        spec.clone(),
        &m.settings.layers,
        &arch,
        &ckpt,
        cfg.seed,
        &plan.device,
    )?;
    // The model holds copies of the weights it uses: unmap the checkpoint.
    drop(ckpt);
    let inputs = model.inputs().to_vec();
    let positions: Vec<usize> = inputs
        .iter()
        .map(|&i| {
            cache
                .layer_position(i)
                .expect("Model::build checked the layers are cached")
        })
        .collect();
    std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
    // One process per run directory: a second `run` (or a second sweep on
    // the same --out) is refused while the first holds the lock, and the
    // operating system releases it when the holder dies, however it dies.
    let _lock =
        crate::fsutil::DirLock::try_acquire(&run_dir, RUN_LOCK)?.ok_or_else(|| Error::Locked {
            path: run_dir.clone(),
            what: "this run",
            lock: run_dir.join(RUN_LOCK),
        })?;
    // It may have finished while we waited for nothing: look again under the lock.
    if let Some(s) = Summary::read(&run_dir)? {
        reporter.note(&format!(
            "{run_id}: already complete ({}), not re-run",
            summary_path.display()
        ));
        return Ok(s);
    }
    for stale in [METRICS_FILE, ERROR_FILE, WEIGHTS_FILE] {
        let p = run_dir.join(stale);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    RunConfig {
        cache: RunCache {
            backbone: m.backbone.clone(),
            layers: m.settings.layers.clone(),
            max_len: m.settings.max_len,
            path: plan.cache.clone(),
            settings_hash: m.settings_hash.clone(),
            columns: Some(TrainedColumns::from_options(&m.dataset.options)),
            image: m.image.clone(),
        },
        config: cfg.clone(),
        labels: m.labels.clone(),
        model: RunModel {
            classes: spec.classes,
            early_layers: spec.method.early_layers().unwrap_or_default().to_vec(),
            frozen_params: model.params.frozen_count(),
            inputs,
            probe_layer: spec.method.probe_layer().unwrap_or(arch.num_layers()),
            side_dim: spec.method.side_dim().unwrap_or(0),
            trainable_params: model.params.trainable_count(),
        },
        run_id: run_id.clone(),
        sherl_version: env!("CARGO_PKG_VERSION").to_owned(),
        spec: Some(spec.clone()),
    }
    .write(&run_dir)?;

    let outcome = train_loop(
        plan,
        &cache,
        &model,
        &positions,
        train_split,
        valid_split,
        test_split,
        &run_dir,
        reporter,
    );
    match outcome {
        Ok(mut s) => {
            s.run_id = run_id;
            s.run_dir = run_dir.clone();
            s.cache = m.settings_hash.clone();
            s.write(&run_dir)?;
            Ok(s)
        }
        Err(e) => {
            // Keep what was written (metrics, best weights) and say why it
            // stopped.
            RunError::record(&run_dir, &run_id, &e);
            Err(e)
        }
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

#[allow(clippy::too_many_arguments)]
fn train_loop(
    plan: &FitPlan,
    cache: &Arc<Cache>,
    model: &Model,
    positions: &[usize],
    train_split: u32,
    valid_split: u32,
    test_split: Option<u32>,
    run_dir: &Path,
    reporter: &dyn FitReporter,
) -> Result<Summary> {
    let cfg = &plan.config;
    let classes = model.spec().classes;
    let new_vars = model.params.vars(Group::New);
    let pre_vars = model.params.vars(Group::Pretrained);
    let all_vars: Vec<_> = new_vars.iter().chain(pre_vars.iter()).cloned().collect();
    let mut opt_new = AdamW::new(
        new_vars,
        ParamsAdamW {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;
    let mut opt_pre = if pre_vars.is_empty() {
        None
    } else {
        Some(AdamW::new(
            pre_vars,
            ParamsAdamW {
                lr: cfg.lr_pretrained,
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        )?)
    };
    let n_train = cfg
        .train_examples
        .map_or(split_len(cache, train_split) as usize, |n| {
            n.min(split_len(cache, train_split) as usize)
        });
    let steps_per_epoch = n_train.div_ceil(cfg.batch_size);
    let total_steps = steps_per_epoch * cfg.epochs;
    let mut dropout_rng = SplitMix64::for_stream(cfg.seed, Stream::Dropout);
    let metrics_path = run_dir.join(METRICS_FILE);
    let mut metrics_file =
        std::fs::File::create(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
    let weights_path = run_dir.join(WEIGHTS_FILE);
    let mut best: Option<(f64, usize, BTreeMap<String, Tensor>)> = None;
    let mut weights_sha256 = String::new();
    let mut step = 0usize;
    let mut step_peak: Option<u64> = None;
    let mut train_seconds = 0.0;
    let mut train_tokens = 0usize;
    let batch_plan = |split: u32, shuffle: Option<(u64, u64)>| BatchPlan {
        split,
        positions: positions.to_vec(),
        batch_size: if shuffle.is_some() {
            cfg.batch_size
        } else {
            cfg.batch_size.max(64)
        },
        max_tokens: cfg.max_tokens_per_batch,
        shuffle,
        buffer_chunks: cfg.shuffle_chunks,
        subset: if split == train_split {
            cfg.train_examples.map(|n| (cfg.seed, n))
        } else {
            None
        },
        threads: plan.decode_threads.max(1),
    };
    for epoch in 1..=cfg.epochs {
        let _span = tracing::info_span!("epoch", n = epoch).entered();
        reporter.epoch_start(epoch, cfg.epochs, steps_per_epoch as u64);
        let t = Instant::now();
        let mut tally = Tally::new(classes);
        let mut tokens = 0usize;
        let mut lr_now = cfg.lr;
        for batch in Batches::new(
            cache,
            batch_plan(train_split, Some((cfg.seed, epoch as u64))),
            &plan.device,
        )? {
            let batch = batch?;
            // The step's own memory: everything allocated from here to the
            // optimiser's update (super::alloc_track).
            let counted = super::alloc_track::StepWindow::start();
            let (loss_v, preds, mut grads) = forward_backward(
                model,
                &batch,
                &mut dropout_rng,
                step_parts(&plan.device),
                plan.workers,
                &all_vars,
            )?;
            if !loss_v.is_finite() {
                return Err(Error::Diverged(diverged_message(
                    loss_v,
                    epoch,
                    step,
                    cfg,
                    opt_pre.is_some(),
                    best.as_ref().map(|_| weights_path.as_path()),
                )));
            }
            let clip = if cfg.grad_clip > 0.0 {
                clip_scale(&grads, &all_vars, cfg.grad_clip)?.1
            } else {
                None
            };
            let mult = cfg.schedule(step.min(total_steps.saturating_sub(1)), total_steps.max(1));
            lr_now = cfg.lr * mult;
            opt_new.set_learning_rate(lr_now);
            opt_new.step(&mut grads, clip)?;
            if let Some(o) = opt_pre.as_mut() {
                o.set_learning_rate(cfg.lr_pretrained * mult);
                o.step(&mut grads, clip)?;
            }
            drop(grads);
            counted.finish(&mut step_peak);
            step += 1;
            tokens += batch.tokens;
            tally.add(f64::from(loss_v), &preds, &batch.label_vec);
            reporter.step(loss_v);
        }
        let secs = t.elapsed().as_secs_f64();
        train_seconds += secs;
        train_tokens += tokens;
        let te = Instant::now();
        let (valid, _) = evaluate(
            cache,
            model,
            batch_plan(valid_split, None),
            &plan.device,
            false,
            plan.workers,
        )?;
        let em = EpochMetrics {
            epoch,
            train_loss: tally.loss(),
            train_accuracy: tally.accuracy(),
            valid_loss: valid.loss(),
            valid_accuracy: valid.accuracy(),
            valid_macro_f1: valid.macro_f1(),
            seconds: secs,
            eval_seconds: te.elapsed().as_secs_f64(),
            tokens_per_second: tokens as f64 / secs.max(1e-9),
            lr: lr_now,
            gate: model.gate()?,
        };
        writeln!(metrics_file, "{}", em.line())
            .and_then(|_| metrics_file.flush())
            .map_err(|e| Error::io(&metrics_path, e))?;
        reporter.epoch_end(&em);
        if best.as_ref().is_none_or(|b| em.valid_accuracy > b.0) {
            let snap = model.params.snapshot()?;
            weights_sha256 = Params::save(&snap, &weights_path)?;
            best = Some((em.valid_accuracy, epoch, snap));
        }
    }
    let (_, best_epoch, snap) = best.expect("at least one epoch ran");
    model.params.restore(&snap, &weights_path)?;
    let (valid, weights) = evaluate(
        cache,
        model,
        batch_plan(valid_split, None),
        &plan.device,
        true,
        plan.workers,
    )?;
    let test = match test_split {
        Some(s) => Some(
            evaluate(
                cache,
                model,
                batch_plan(s, None),
                &plan.device,
                false,
                plan.workers,
            )?
            .0,
        ),
        None => None,
    };
    let layer_weight_layers = model
        .spec()
        .method
        .early_layers()
        .map(|e| e[..e.len() - 1].to_vec());
    Ok(Summary {
        run_id: String::new(),
        method: model.spec().method.kind().name().into(),
        seed: cfg.seed,
        valid_accuracy: valid.accuracy(),
        test_accuracy: test.as_ref().map(Tally::accuracy),
        valid_macro_f1: valid.macro_f1(),
        test_macro_f1: test.as_ref().map(Tally::macro_f1),
        best_epoch,
        epochs: cfg.epochs,
        trainable_params: model.params.trainable_count(),
        frozen_params: model.params.frozen_count(),
        peak_rss_bytes: peak_rss_bytes(),
        train_seconds,
        seconds_per_epoch: train_seconds / cfg.epochs as f64,
        train_tokens_per_second: train_tokens as f64 / train_seconds.max(1e-9),
        layer_weights: weights,
        layer_weight_layers,
        run_dir: PathBuf::new(),
        cache: String::new(),
        weights_sha256: Some(weights_sha256),
        device: Some(crate::fit::device_name(&plan.device)),
        matmul: plan.device.is_cpu().then(crate::fit::nn::gemm::kernel),
        train_memory: step_peak
            .map(|p| super::run_dir::TrainMemory::new(model.params.trainable_count(), p)),
    })
}
