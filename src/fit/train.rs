//! `sherl-fit run`: classification as a [`Task`] of the
//! [`super::trainer::Trainer`]: batches streamed from one cache,
//! cross-entropy, accuracy and macro-F1 on the valid split (the best epoch
//! by valid accuracy), the test split scored with the best checkpoint. The
//! checks before a run are in [`super::checks`] and [`super::memory`],
//! evaluation in [`super::eval`], the run directory's files in
//! [`super::run_dir`].
//!
//! Run directory `RUNS/<run id>/`: `config.json` (written before training),
//! `metrics.jsonl` (one line per epoch, flushed as it is written),
//! `weights.safetensors` (trainable weights of the best epoch so far,
//! replaced atomically on each improvement), `summary.json` (written last;
//! its presence means the run is complete), `error.json` (a run that
//! stopped on bad numbers or input, with the reason).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use super::batcher::{split_len, Batch, BatchPlan, Batches};
use super::checks::{check_backbone, model_spec, split_id};
use super::config::FitConfig;
use super::eval::{argmax, evaluate};
use super::kernels::direct_grads::{Collected, Collector};
use super::memory::{check_memory, memory_estimate};
use super::metrics::Tally;
use super::model::{Model, Shared};
use super::nn::Mode;
use super::params::Group;
use super::run_dir::{EpochTask, RunCache, RunConfig, RunModel, Summary, SummaryTask};
use super::trainer::{Claim, EpochEval, ParamGroup, Task, TaskSummary, Trainer};
pub use super::trainer::{FitReporter, LogReporter};
use super::worker::{part_ranges, step_parts};
use crate::backbone::BackboneDir;
use crate::cache::Cache;
use crate::data::args::TrainedColumns;
use crate::fit::error::FitError;
use crate::rng::SplitMix64;
use crate::Result;

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
/// from candle's store (see [`crate::fit::kernels::direct_grads`]): the caller
/// adds them in.
fn backward(loss: &Tensor) -> Result<(GradStore, Collected)> {
    let collector = Collector::start();
    let grads = loss.backward()?;
    Ok((grads, collector.finish()?))
}

/// The three splits of a classification run (cache split ids).
#[derive(Debug, Clone, Copy)]
struct Splits {
    train: u32,
    valid: u32,
    test: Option<u32>,
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
    let splits = splits(plan, &cache, reporter)?;
    let run_id = cfg.run_id(&m.settings_hash);
    let trainer = Trainer {
        config: cfg,
        run_dir: plan.out.join(&run_id),
        run_id,
        device: &plan.device,
        reporter,
    };
    if let Some(s) = trainer.finished()? {
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
    let _lock = match trainer.claim(&[])? {
        Claim::Finished(s) => return Ok(*s),
        Claim::Held(lock) => lock,
    };
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
        run_id: trainer.run_id.clone(),
        sherl_version: env!("CARGO_PKG_VERSION").to_owned(),
        spec: Some(spec.clone()),
    }
    .write(&trainer.run_dir)?;
    trainer.fit(&mut Classification::new(
        plan, &cache, &model, positions, splits,
    ))
}

/// The cache's train, valid and test splits (a note when there is no
/// test split); refused without train or valid.
fn splits(plan: &FitPlan, cache: &Cache, reporter: &dyn FitReporter) -> Result<Splits> {
    let names = &cache.manifest().splits;
    let train = split_id(cache, &["train"]).ok_or_else(|| {
        FitError::cache_lacks(format!(
            "{}: no examples in a 'train' split (splits: {names:?})",
            plan.cache.display(),
        ))
    })?;
    let valid = split_id(cache, crate::data::VALID_SPLIT_NAMES).ok_or_else(|| {
        FitError::cache_lacks(format!(
            "{}: no examples in a 'valid' split (splits: {names:?}); extract with --split or --valid",
            plan.cache.display(),
        ))
    })?;
    let test = split_id(cache, &["test"]);
    if test.is_none() {
        reporter.note("the cache has no 'test' split: test metrics will be null");
    }
    Ok(Splits { train, valid, test })
}

/// Classification as a [`Task`].
struct Classification<'a> {
    plan: &'a FitPlan,
    cache: &'a Arc<Cache>,
    model: &'a Model,
    /// Cache positions of the model's inputs.
    positions: Vec<usize>,
    splits: Splits,
    steps_per_epoch: usize,
    /// The epoch's training batches, while it runs.
    batches: Option<Batches>,
    /// The epoch's training loss and predictions.
    tally: Tally,
    /// The epoch's real training tokens.
    tokens: usize,
    /// All epochs' real training tokens.
    train_tokens: usize,
}

impl<'a> Classification<'a> {
    fn new(
        plan: &'a FitPlan,
        cache: &'a Arc<Cache>,
        model: &'a Model,
        positions: Vec<usize>,
        splits: Splits,
    ) -> Self {
        let cfg = &plan.config;
        let in_split = split_len(cache, splits.train) as usize;
        let n_train = cfg.train_examples.map_or(in_split, |n| n.min(in_split));
        Classification {
            plan,
            cache,
            model,
            positions,
            splits,
            steps_per_epoch: n_train.div_ceil(cfg.batch_size),
            batches: None,
            tally: Tally::new(model.spec().classes),
            tokens: 0,
            train_tokens: 0,
        }
    }

    /// Batches of `split`: shuffled with `shuffle` (training), or in cache
    /// order in batches of at least 64 (evaluation).
    fn batch_plan(&self, split: u32, shuffle: Option<(u64, u64)>) -> BatchPlan {
        let cfg = &self.plan.config;
        BatchPlan {
            split,
            positions: self.positions.clone(),
            batch_size: if shuffle.is_some() {
                cfg.batch_size
            } else {
                cfg.batch_size.max(64)
            },
            max_tokens: cfg.max_tokens_per_batch,
            shuffle,
            buffer_chunks: cfg.shuffle_chunks,
            subset: if split == self.splits.train {
                cfg.train_examples.map(|n| (cfg.seed, n))
            } else {
                None
            },
            threads: self.plan.decode_threads.max(1),
        }
    }

    /// Loss, accuracy and macro-F1 of `split` (no dropout), and with
    /// `alpha` SHERL's layer weights averaged over its real tokens.
    fn evaluate(&self, split: u32, alpha: bool) -> Result<(Tally, Option<Vec<f64>>)> {
        evaluate(
            self.cache,
            self.model,
            self.batch_plan(split, None),
            &self.plan.device,
            alpha,
            self.plan.workers,
        )
    }
}

impl Task for Classification<'_> {
    type Batch = Batch;

    fn param_groups(&self) -> Vec<ParamGroup> {
        let weight_decay = self.plan.config.weight_decay;
        [Group::New, Group::Pretrained]
            .into_iter()
            .map(|g| ParamGroup {
                lr: g,
                vars: self.model.params.vars(g),
                weight_decay,
            })
            .collect()
    }

    fn steps_per_epoch(&self) -> usize {
        self.steps_per_epoch
    }

    fn start_epoch(&mut self, epoch: usize) -> Result<()> {
        self.tally = Tally::new(self.model.spec().classes);
        self.tokens = 0;
        let shuffle = Some((self.plan.config.seed, epoch as u64));
        self.batches = Some(Batches::new(
            self.cache,
            self.batch_plan(self.splits.train, shuffle),
            &self.plan.device,
        )?);
        Ok(())
    }

    fn next_batch(&mut self) -> Result<Option<Batch>> {
        let next = self.batches.as_mut().and_then(Iterator::next).transpose()?;
        if next.is_none() {
            self.batches = None;
        }
        Ok(next)
    }

    fn forward_backward(
        &mut self,
        batch: &Batch,
        dropout: &mut SplitMix64,
        vars: &[Var],
    ) -> Result<(f32, GradStore)> {
        let (loss, preds, grads) = forward_backward(
            self.model,
            batch,
            dropout,
            step_parts(&self.plan.device),
            self.plan.workers,
            vars,
        )?;
        self.tokens += batch.tokens;
        self.tally.add(f64::from(loss), &preds, &batch.label_vec);
        Ok((loss, grads))
    }

    fn end_epoch(&mut self, seconds: f64) -> Result<EpochEval> {
        self.train_tokens += self.tokens;
        let (valid, _) = self.evaluate(self.splits.valid, false)?;
        Ok(EpochEval {
            train_loss: self.tally.loss(),
            task: EpochTask::Classification {
                train_accuracy: self.tally.accuracy(),
                valid_loss: valid.loss(),
                valid_accuracy: valid.accuracy(),
                valid_macro_f1: valid.macro_f1(),
                tokens_per_second: self.tokens as f64 / seconds.max(1e-9),
                gate: self.model.gate()?,
            },
        })
    }

    fn snapshot(&self) -> Result<BTreeMap<String, Tensor>> {
        self.model.params.snapshot()
    }

    fn carried(&self) -> serde_json::Value {
        serde_json::json!({ "train_tokens": self.train_tokens })
    }

    fn set_carried(&mut self, value: &serde_json::Value) -> Result<()> {
        self.train_tokens = carried_count(value, "train_tokens")?;
        Ok(())
    }

    fn restore(&self, weights: &BTreeMap<String, Tensor>, source: &Path) -> Result<()> {
        self.model.params.restore(weights, source)
    }

    fn finish(&mut self, _run_dir: &Path, train_seconds: f64) -> Result<TaskSummary> {
        let (valid, weights) = self.evaluate(self.splits.valid, true)?;
        let test = match self.splits.test {
            Some(s) => Some(self.evaluate(s, false)?.0),
            None => None,
        };
        let spec = self.model.spec();
        let layer_weight_layers = spec
            .method
            .early_layers()
            .map(|e| e[..e.len() - 1].to_vec());
        Ok(TaskSummary {
            method: spec.method.kind().name().into(),
            trainable_params: self.model.params.trainable_count(),
            frozen_params: self.model.params.frozen_count(),
            task: SummaryTask::Classification {
                valid_accuracy: valid.accuracy(),
                test_accuracy: test.as_ref().map(Tally::accuracy),
                valid_macro_f1: valid.macro_f1(),
                test_macro_f1: test.as_ref().map(Tally::macro_f1),
                train_tokens_per_second: self.train_tokens as f64 / train_seconds.max(1e-9),
                layer_weights: weights,
                layer_weight_layers,
                cache: self.cache.manifest().settings_hash.clone(),
            },
        })
    }
}

/// The count `key` of a task's carried totals (a checkpoint's `task`).
pub(crate) fn carried_count(value: &serde_json::Value, key: &str) -> Result<usize> {
    value[key]
        .as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| crate::Error::Checkpoint {
            path: crate::fit::checkpoint::STATE_FILE.into(),
            message: format!("'task.{key}' is missing or not a count"),
        })
}
