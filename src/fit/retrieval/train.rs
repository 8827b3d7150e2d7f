//! `sherl-fit run --task retrieval`: two towers trained together from two
//! caches joined by id ([`super::join`]), as a [`Task`] of the
//! [`crate::fit::trainer::Trainer`].
//!
//! Each tower ([`super::tower`]) is the model of its method
//! ([`Model::build`](crate::fit::model::Model::build), as for
//! classification) whose head projects the pooled sequence to the joint
//! width instead of to classes; its output is L2-normalised. A training
//! batch is `B` distinct images of the train split, each with one of its
//! captions drawn by the seeded generator; the other pairs of the batch are
//! the negatives. Images stream chunk by chunk: per epoch a seeded order of
//! the image chunks, `shuffle_chunks` chunks at a time decoded, their
//! images shuffled and cut into batches; captions are read by random access
//! (a few decoded text chunks kept). Every epoch the valid split is
//! embedded (both towers, no dropout) and scored with Recall@K
//! ([`super::recall`]); the best epoch by valid rsum is kept and scored on
//! test, and a few test queries go to `examples.json`
//! ([`super::examples`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use super::config::{fit_settings, RetrievalConfig};
use super::examples::{query_examples, EXAMPLES_FILE};
use super::join::{join_caches, SplitPairs};
use super::loss::{hinge, infonce, l2_normalize, scale, Loss, INIT_LOG_SCALE};
use super::tower::{evaluate, fit_batch, restore, snapshot, tower, Reader, Tower};
use crate::cache::Cache;
use crate::fit::batcher::Batch;
use crate::fit::config::FitConfig;
use crate::fit::error::FitError;
use crate::fit::nn::Mode;
use crate::fit::params::Group;
use crate::fit::run_dir::{EpochTask, Summary, SummaryTask, TaskName, CONFIG_FILE};
use crate::fit::trainer::{Claim, EpochEval, FitReporter, ParamGroup, Task, TaskSummary, Trainer};
use crate::rng::{SplitMix64, Stream};
use crate::Result;

/// What a retrieval run needs.
#[derive(Debug, Clone)]
pub struct RetrievalPlan {
    /// The image cache.
    pub image_cache: PathBuf,
    /// The caption cache.
    pub text_cache: PathBuf,
    /// The image backbone directory.
    pub image_backbone: PathBuf,
    /// The text backbone directory.
    pub text_backbone: PathBuf,
    /// Directory holding run directories.
    pub out: PathBuf,
    /// Shared settings (epochs, lr, batch size, seed, K, pooling...); its
    /// `method` is not used.
    pub config: FitConfig,
    /// Towers, joint width, loss.
    pub retrieval: RetrievalConfig,
    /// candle device.
    pub device: Device,
    /// Threads for the evaluation's parts (1: one after the other).
    pub workers: usize,
}

/// The joined caches' train, valid and test pairs.
struct Splits {
    train: SplitPairs,
    valid: SplitPairs,
    test: Option<SplitPairs>,
    /// Images and captions per split, for the summary.
    counts: BTreeMap<String, [usize; 2]>,
}

/// Run (or, if `summary.json` exists, return) the retrieval run of `plan`.
pub fn run(plan: &RetrievalPlan, reporter: &dyn FitReporter) -> Result<Summary> {
    let cfg = &plan.config;
    let rc = &plan.retrieval;
    cfg.validate().map_err(FitError::settings)?;
    rc.validate().map_err(FitError::settings)?;
    let image_cache = Arc::new(Cache::open(&plan.image_cache)?);
    let text_cache = Arc::new(Cache::open(&plan.text_cache)?);
    let splits = splits(plan, &image_cache, &text_cache, reporter)?;
    let run_id = rc.run_id(
        cfg,
        &image_cache.manifest().settings_hash,
        &text_cache.manifest().settings_hash,
    );
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
    // The text tower's fresh weights come from a seed of their own, drawn
    // from the run's seed, so the two towers' initial weights differ.
    let text_seed = SplitMix64::new(cfg.seed).next_u64();
    let image = tower(
        image_cache,
        &plan.image_backbone,
        cfg,
        rc.image_method,
        rc.joint_dim,
        cfg.seed,
        &plan.device,
    )?;
    let text = tower(
        text_cache,
        &plan.text_backbone,
        cfg,
        rc.text_method,
        rc.joint_dim,
        text_seed,
        &plan.device,
    )?;
    let _lock = match trainer.claim(&[EXAMPLES_FILE])? {
        Claim::Finished(s) => return Ok(*s),
        Claim::Held(lock) => lock,
    };
    write_config(plan, &trainer, &image, &text)?;
    trainer.fit(&mut Retrieval::new(plan, &image, &text, splits)?)
}

/// The joined caches' splits (a note when there is no test split);
/// refused without train or valid pairs.
fn splits(
    plan: &RetrievalPlan,
    image: &Cache,
    text: &Cache,
    reporter: &dyn FitReporter,
) -> Result<Splits> {
    let joined = join_caches(image, text)?;
    let train = joined.split("train").cloned().ok_or_else(|| {
        FitError::cache_lacks(format!(
            "{}: no pairs in a 'train' split",
            plan.image_cache.display()
        ))
    })?;
    let valid = crate::data::VALID_SPLIT_NAMES
        .iter()
        .find_map(|n| joined.split(n))
        .cloned()
        .ok_or_else(|| {
            FitError::cache_lacks(format!(
                "{}: no pairs in a 'valid' split",
                plan.image_cache.display()
            ))
        })?;
    let test = joined.split("test").cloned();
    if test.is_none() {
        reporter.note("the caches have no 'test' split: test metrics will be null");
    }
    let counts = joined
        .splits
        .iter()
        .map(|(k, s)| (k.clone(), [s.images.len(), s.captions.len()]))
        .collect();
    Ok(Splits {
        train,
        valid,
        test,
        counts,
    })
}

/// `config.json` of a retrieval run: the shared settings, the retrieval
/// settings, and each tower's cache and model.
fn write_config(
    plan: &RetrievalPlan,
    trainer: &Trainer,
    image: &Tower,
    text: &Tower,
) -> Result<()> {
    let cache_record = |t: &Tower, path: &Path| {
        let m = t.cache.manifest();
        serde_json::json!({
            "path": path,
            "settings_hash": m.settings_hash,
            "backbone": m.backbone,
            "layers": m.settings.layers,
            "image": m.image,
            "inputs": t.model.inputs(),
            "trainable_params": t.model.params.trainable_count(),
            "frozen_params": t.model.params.frozen_count(),
        })
    };
    let config = serde_json::json!({
        "task": "retrieval",
        "run_id": trainer.run_id,
        "config": fit_settings(&plan.config),
        "retrieval": plan.retrieval,
        "image_cache": cache_record(image, &plan.image_cache),
        "text_cache": cache_record(text, &plan.text_cache),
        "sherl_version": env!("CARGO_PKG_VERSION"),
    });
    crate::fsutil::write_atomic(
        &trainer.run_dir.join(CONFIG_FILE),
        &serde_json::to_vec_pretty(&config).expect("config serialises"),
    )
}

/// A training batch: the images and one caption of each.
struct Pairs {
    image: Batch,
    text: Batch,
}

/// Retrieval as a [`Task`].
struct Retrieval<'a> {
    plan: &'a RetrievalPlan,
    image: &'a Tower,
    text: &'a Tower,
    splits: Splits,
    /// InfoNCE's log-scale (learnt with `--loss infonce`).
    log_scale: Var,
    learn_scale: bool,
    /// Train images (indices into `splits.train`) by the image chunk that
    /// holds them.
    by_chunk: BTreeMap<usize, Vec<usize>>,
    /// The image chunks trained on (all, or a `--train-examples` subset).
    chunks: Vec<usize>,
    n_train: usize,
    batch_size: usize,
    image_reader: Reader<'a>,
    text_reader: Reader<'a>,
    /// The epoch's batches not read yet: image and caption positions.
    pending: std::vec::IntoIter<(Vec<u64>, Vec<u64>)>,
    /// The epoch's loss sum and batches.
    loss_sum: f64,
    batches: usize,
    /// All epochs' training pairs.
    train_pairs: usize,
}

impl<'a> Retrieval<'a> {
    fn new(
        plan: &'a RetrievalPlan,
        image: &'a Tower,
        text: &'a Tower,
        splits: Splits,
    ) -> Result<Self> {
        let cfg = &plan.config;
        let log_scale = Var::from_tensor(&Tensor::new(INIT_LOG_SCALE as f32, &plan.device)?)?;
        let image_reader = Reader::new(image, cfg.shuffle_chunks);
        let mut by_chunk: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, &p) in splits.train.images.iter().enumerate() {
            by_chunk
                .entry(image_reader.chunk_of(p))
                .or_default()
                .push(i);
        }
        let mut chunks: Vec<usize> = by_chunk.keys().copied().collect();
        if let Some(n) = cfg.train_examples {
            chunks = crate::fit::batcher::subset_chunks(&image.cache, chunks, cfg.seed, n);
        }
        let n_train = chunks.iter().map(|c| by_chunk[c].len()).sum();
        let image_tokens = image
            .cache
            .chunks()
            .first()
            .map_or(1, |c| (c.tokens / u64::from(c.examples.max(1))) as usize);
        Ok(Retrieval {
            plan,
            image,
            text,
            splits,
            log_scale,
            learn_scale: plan.retrieval.loss == Loss::Infonce,
            by_chunk,
            chunks,
            n_train,
            batch_size: fit_batch(cfg, image_tokens, cfg.batch_size),
            image_reader,
            text_reader: Reader::new(text, 64),
            pending: Vec::new().into_iter(),
            loss_sum: 0.0,
            batches: 0,
            train_pairs: 0,
        })
    }

    /// Recall@K of `pairs` with the current weights.
    fn recall(&self, pairs: &SplitPairs) -> Result<super::recall::Recall> {
        let p = self.plan;
        evaluate(
            self.image, self.text, pairs, &p.config, &p.device, p.workers,
        )
    }
}

impl Task for Retrieval<'_> {
    type Batch = Pairs;

    fn param_groups(&self) -> Vec<ParamGroup> {
        let weight_decay = self.plan.config.weight_decay;
        let mut groups: Vec<ParamGroup> = [Group::New, Group::Pretrained]
            .into_iter()
            .map(|g| ParamGroup {
                lr: g,
                vars: [self.image, self.text]
                    .iter()
                    .flat_map(|t| t.model.params.vars(g))
                    .collect(),
                weight_decay,
            })
            .collect();
        if self.learn_scale {
            // The temperature is not decayed (CLIP).
            groups.push(ParamGroup {
                lr: Group::New,
                vars: vec![self.log_scale.clone()],
                weight_decay: 0.0,
            });
        }
        groups
    }

    fn steps_per_epoch(&self) -> usize {
        self.n_train.div_ceil(self.batch_size)
    }

    /// The epoch's batches, drawn now from the epoch's own generator in
    /// the order the loop over them would draw: the chunk order; per window
    /// of `shuffle_chunks` chunks, its images' order, then one caption per
    /// image, batch by batch.
    fn start_epoch(&mut self, epoch: usize) -> Result<()> {
        let cfg = &self.plan.config;
        let train = &self.splits.train;
        let mut rng = SplitMix64::for_stream(cfg.seed, Stream::Epoch(epoch as u64));
        let mut order = self.chunks.clone();
        rng.shuffle_scaled(&mut order);
        let mut batches = Vec::new();
        for window in order.chunks(cfg.shuffle_chunks.max(1)) {
            let mut members: Vec<usize> = window
                .iter()
                .flat_map(|c| self.by_chunk[c].clone())
                .collect();
            rng.shuffle_scaled(&mut members);
            for b in members.chunks(self.batch_size) {
                let images: Vec<u64> = b.iter().map(|&i| train.images[i]).collect();
                let captions: Vec<u64> = b
                    .iter()
                    .map(|&i| {
                        let own = &train.captions_of[i];
                        train.captions[own[rng.below_scaled(own.len())]]
                    })
                    .collect();
                batches.push((images, captions));
            }
        }
        self.pending = batches.into_iter();
        self.loss_sum = 0.0;
        self.batches = 0;
        Ok(())
    }

    fn next_batch(&mut self) -> Result<Option<Pairs>> {
        let Some((images, captions)) = self.pending.next() else {
            return Ok(None);
        };
        let dev = &self.plan.device;
        Ok(Some(Pairs {
            image: self.image_reader.batch(&images, self.image.hidden, dev)?,
            text: self.text_reader.batch(&captions, self.text.hidden, dev)?,
        }))
    }

    fn forward_backward(
        &mut self,
        batch: &Pairs,
        dropout: &mut SplitMix64,
        _vars: &[Var],
    ) -> Result<(f32, GradStore)> {
        let zi = self
            .image
            .model
            .forward(&batch.image, &mut Mode::Train(dropout))?
            .logits;
        let zt = self
            .text
            .model
            .forward(&batch.text, &mut Mode::Train(dropout))?
            .logits;
        let (zi, zt) = (l2_normalize(&zi)?, l2_normalize(&zt)?);
        let rc = &self.plan.retrieval;
        let loss = match rc.loss {
            Loss::Infonce => infonce(&zi, &zt, self.log_scale.as_tensor())?,
            Loss::Hinge => hinge(&zi, &zt, rc.margin)?,
        };
        let loss_v = loss.to_scalar::<f32>()?;
        let grads = loss.backward()?;
        self.batches += 1;
        self.loss_sum += f64::from(loss_v);
        self.train_pairs += batch.image.len();
        Ok((loss_v, grads))
    }

    fn end_epoch(&mut self, seconds: f64) -> Result<EpochEval> {
        let v = self.recall(&self.splits.valid)?;
        let scale = if self.learn_scale {
            Some(f64::from(
                scale(self.log_scale.as_tensor())?.to_scalar::<f32>()?,
            ))
        } else {
            None
        };
        Ok(EpochEval {
            train_loss: self.loss_sum / self.batches.max(1) as f64,
            task: EpochTask::Retrieval {
                valid_rsum: v.rsum,
                valid: v,
                pairs_per_second: self.n_train as f64 / seconds.max(1e-9),
                scale,
            },
        })
    }

    fn snapshot(&self) -> Result<BTreeMap<String, Tensor>> {
        snapshot(self.image, self.text, &self.log_scale)
    }

    fn carried(&self) -> serde_json::Value {
        serde_json::json!({ "train_pairs": self.train_pairs })
    }

    fn set_carried(&mut self, value: &serde_json::Value) -> Result<()> {
        self.train_pairs = crate::fit::train::carried_count(value, "train_pairs")?;
        Ok(())
    }

    fn restore(&self, weights: &BTreeMap<String, Tensor>, source: &Path) -> Result<()> {
        restore(self.image, self.text, &self.log_scale, weights, source)
    }

    fn finish(&mut self, run_dir: &Path, train_seconds: f64) -> Result<TaskSummary> {
        let p = self.plan;
        let rc = &p.retrieval;
        let v = self.recall(&self.splits.valid)?;
        let t = match &self.splits.test {
            Some(s) => {
                let r = self.recall(s)?;
                let examples =
                    query_examples(self.image, self.text, s, &p.config, &p.device, p.workers)?;
                crate::fsutil::write_atomic(
                    &run_dir.join(EXAMPLES_FILE),
                    &serde_json::to_vec_pretty(&examples).expect("examples serialise"),
                )?;
                Some(r)
            }
            None => None,
        };
        let (it, tt) = (
            self.image.model.params.trainable_count(),
            self.text.model.params.trainable_count(),
        );
        Ok(TaskSummary {
            method: format!("{}+{}", rc.image_method.name(), rc.text_method.name()),
            trainable_params: it + tt + usize::from(self.learn_scale),
            frozen_params: self.image.model.params.frozen_count()
                + self.text.model.params.frozen_count(),
            task: SummaryTask::Retrieval {
                task: TaskName::Retrieval,
                image_method: rc.image_method.name().into(),
                text_method: rc.text_method.name().into(),
                loss: rc.loss.name().into(),
                joint_dim: rc.joint_dim,
                valid_rsum: v.rsum,
                test_rsum: t.map(|r| r.rsum),
                valid: v,
                test: t,
                image_trainable_params: it,
                text_trainable_params: tt,
                pairs_per_second: self.train_pairs as f64 / train_seconds.max(1e-9),
                pairs: self.splits.counts.clone(),
                image_cache: self.image.cache.manifest().settings_hash.clone(),
                text_cache: self.text.cache.manifest().settings_hash.clone(),
            },
        })
    }
}
