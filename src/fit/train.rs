//! `sherl-fit run`: train one model from the cache, evaluate on the valid
//! split every epoch, keep the best checkpoint, score the test split with
//! it, and write the run directory.
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

use candle_core::{DType, Device, Tensor};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};

use super::batcher::{split_len, BatchPlan, Batches};
use super::config::FitConfig;
use super::metrics::Tally;
use super::model::{Method, Model, ModelSpec, Output};
use super::nn::Mode;
use super::params::{Group, Params};
use super::run_dir::{
    EpochMetrics, RunCache, RunConfig, RunError, RunModel, Summary, ERROR_FILE, METRICS_FILE,
    RUN_LOCK, SUMMARY_FILE, WEIGHTS_FILE,
};
use crate::backbone::{BackboneDir, BertConfig, Checkpoint};
use crate::cache::Cache;
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

/// Peak resident set size of this process (VmHWM), bytes; 0 if unknown.
pub fn peak_rss_bytes() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn split_id(cache: &Cache, names: &[&str]) -> Option<u32> {
    let m = cache.manifest();
    m.split_names
        .iter()
        .position(|n| names.contains(&n.as_str()))
        .filter(|&i| m.splits.get(&m.split_names[i]).copied().unwrap_or(0) > 0)
        .map(|i| i as u32)
}

/// Resolve the model spec for `cfg` on this cache.
pub fn model_spec(cfg: &FitConfig, cache: &Cache, bert: &BertConfig) -> Result<ModelSpec> {
    let m = cache.manifest();
    let n = bert.num_hidden_layers;
    let k = cfg.late_layers;
    if k == 0 || k > n {
        return Err(Error::Config(format!(
            "--late-layers {k} must be between 1 and {n}"
        )));
    }
    let side_dim = cfg.side_dim.unwrap_or(bert.hidden_size / cfg.reduction);
    if side_dim == 0 {
        return Err(Error::Config(format!(
            "side width {} / {} is 0",
            bert.hidden_size, cfg.reduction
        )));
    }
    let early = match &cfg.early_layers {
        Some(v) => v.clone(),
        None => m
            .settings
            .layers
            .iter()
            .copied()
            .filter(|&i| i <= n - k)
            .collect(),
    };
    Ok(ModelSpec {
        method: cfg.method,
        late_layers: k,
        late_trainable: cfg.late_trainable,
        side_dim,
        early_layers: early,
        probe_layer: cfg.probe_layer.unwrap_or(n),
        pool: cfg.pool,
        dropout: cfg.dropout,
        classes: m.labels.len(),
    })
}

/// Check that `backbone` is the one the cache was made with.
pub fn check_backbone(cache: &Cache, dir: &BackboneDir) -> Result<(BertConfig, Checkpoint)> {
    let m = cache.manifest();
    let cfg = dir.config()?;
    let ckpt = Checkpoint::open(&dir.safetensors_path())?;
    if let Some(want) = &m.backbone.safetensors {
        let got = ckpt.sha256();
        if got != want.sha256 {
            return Err(Error::Config(format!(
                "{}: sha256 {} differs from the one the cache {} was extracted with ({}); use the same backbone",
                dir.safetensors_path().display(),
                &got[..12],
                cache.dir().display(),
                &want.sha256[..12]
            )));
        }
    }
    check_config(
        &cfg,
        m.backbone.config.as_ref(),
        &dir.config_path(),
        cache.dir(),
    )?;
    if cfg.num_hidden_layers != m.backbone.num_layers || cfg.hidden_size != m.backbone.hidden {
        return Err(Error::Config(format!(
            "{}: {} layers x {} hidden, but the cache was made by a backbone with {} x {}",
            dir.config_path().display(),
            cfg.num_hidden_layers,
            cfg.hidden_size,
            m.backbone.num_layers,
            m.backbone.hidden
        )));
    }
    Ok((cfg, ckpt))
}

/// Refuse a backbone `config.json` that differs from the one recorded when
/// the cache was extracted (`recorded`, the manifest's `backbone.config`),
/// naming the fields that differ: the late layers and the full model are
/// built from it, so 6 heads instead of 12, or another activation, would
/// silently compute something else on the same cache. A cache extracted
/// without a config (a user's ONNX model) has nothing to compare.
pub fn check_config(
    cfg: &BertConfig,
    recorded: Option<&serde_json::Value>,
    config_path: &Path,
    cache_dir: &Path,
) -> Result<()> {
    let Some(recorded) = recorded else {
        return Ok(());
    };
    let now = serde_json::to_value(cfg).expect("config serializes");
    let (Some(now), Some(then)) = (now.as_object(), recorded.as_object()) else {
        return Ok(());
    };
    let null = serde_json::Value::Null;
    let mut keys: Vec<&String> = now.keys().chain(then.keys()).collect();
    keys.sort();
    keys.dedup();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter_map(|k| {
            let (a, b) = (now.get(k).unwrap_or(&null), then.get(k).unwrap_or(&null));
            (a != b).then(|| format!("{k} is {a} here, {b} in the cache"))
        })
        .collect();
    if diffs.is_empty() {
        return Ok(());
    }
    Err(Error::Config(format!(
        "{}: differs from the config.json the cache {} was extracted with ({}); use the same backbone",
        config_path.display(),
        cache_dir.display(),
        diffs.join("; ")
    )))
}

/// A rough upper estimate of the memory one training run needs, so that an
/// absurd setting is refused with numbers instead of being killed by the
/// kernel. See [`memory_estimate`].
#[derive(Debug, Clone, Copy)]
pub struct MemoryEstimate {
    /// Parameters, their gradients and AdamW's two moments (4 bytes each;
    /// frozen parameters count once).
    pub params_bytes: f64,
    /// Activations of the largest batch, forward and backward.
    pub activation_bytes: f64,
    /// Tokens in that batch (padded).
    pub batch_tokens: f64,
}

impl MemoryEstimate {
    /// Everything, plus a fixed allowance for the runtime and the cache
    /// decoder's look-ahead.
    pub fn total(&self) -> f64 {
        self.params_bytes + self.activation_bytes + 256.0 * MIB
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// Estimate a run's memory from its shapes. Deliberately generous: it
/// counts every intermediate of the forward pass at the longest sequence
/// and doubles it for the backward pass (the demo's full fine-tuning,
/// measured at 3.1 GiB peak, is estimated at about 4 GiB).
pub fn memory_estimate(
    spec: &ModelSpec,
    bert: &BertConfig,
    cfg: &FitConfig,
    max_len: usize,
    cached: &[usize],
) -> MemoryEstimate {
    let f = |x: usize| x as f64;
    let (dm, d, inter, n, k) = (
        f(bert.hidden_size),
        f(spec.side_dim),
        f(bert.intermediate_size),
        f(bert.num_hidden_layers),
        f(spec.late_layers),
    );
    let (heads, classes, s) = (
        f(bert.num_attention_heads),
        f(spec.classes),
        f(max_len.max(1)),
    );
    let layer = 4.0 * dm * dm + 2.0 * dm * inter + 9.0 * dm + inter;
    let proj = |m: f64| m * (dm * d + 3.0 * d);
    // Floats per token kept by one transformer layer that is trained
    // through: residual stream, q/k/v, norms, FFN, attention rows.
    let layer_act = 16.0 * dm + 4.0 * inter + 4.0 * heads * s;
    let m = f(spec.early_layers.len().max(1));
    let (trainable, frozen, per_token, backward) = match spec.method {
        Method::Sherl => {
            let new = proj(m) + d + 1.0 + d * dm + 3.0 * dm + 1.0 + dm * classes + classes;
            let late = k * layer;
            let (t, fz) = if spec.late_trainable {
                (new + late, 0.0)
            } else {
                (new, late)
            };
            (
                t,
                fz,
                2.0 * m * dm + 8.0 * m * d + 6.0 * dm + k * layer_act,
                2.0,
            )
        }
        Method::LateLayer => (k * layer + dm * classes, 0.0, 2.0 * dm + k * layer_act, 2.0),
        Method::LinearProbe => {
            // Frozen layers run from the deepest cached layer up to the probe.
            let from = cached
                .iter()
                .copied()
                .filter(|&i| i <= spec.probe_layer)
                .max();
            let steps = f(spec.probe_layer.saturating_sub(from.unwrap_or(0)));
            let act = 2.0 * dm + if steps > 0.0 { layer_act } else { 0.0 };
            (dm * classes + classes, steps * layer, act, 1.0)
        }
        Method::Unipt => {
            let new = proj(n + 1.0) + d * d + 5.0 * d + 1.0 + d * classes + classes;
            (new, 0.0, 2.0 * (n + 1.0) * dm + 8.0 * (n + 2.0) * d, 2.0)
        }
        Method::FullFt => {
            let emb =
                (f(bert.vocab_size) + f(bert.max_position_embeddings) + f(bert.type_vocab_size))
                    * dm;
            (emb + n * layer + dm * classes, 0.0, n * layer_act, 2.0)
        }
    };
    let train_tokens = f(cfg.max_tokens_per_batch).min(f(cfg.batch_size) * s);
    let eval_tokens = f(cfg.max_tokens_per_batch).min(f(cfg.batch_size.max(64)) * s);
    let activation_bytes =
        (4.0 * per_token * backward * train_tokens).max(4.0 * per_token * eval_tokens);
    MemoryEstimate {
        params_bytes: 4.0 * (4.0 * trainable + frozen),
        activation_bytes,
        batch_tokens: train_tokens.max(eval_tokens),
    }
}

/// Memory a run may use: `SHERL_MEMORY_LIMIT` (bytes, or with a K/M/G
/// suffix, as the dataset flags' sizes) when set, else the kernel's `MemAvailable`; `None` when neither
/// is known (then nothing is refused).
pub fn memory_budget() -> Result<Option<(f64, &'static str)>> {
    if let Ok(v) = std::env::var("SHERL_MEMORY_LIMIT") {
        return match crate::data::args::parse_size(&v) {
            Ok(bytes) if bytes > 0 => Ok(Some((bytes as f64, "SHERL_MEMORY_LIMIT"))),
            _ => Err(Error::Config(format!(
                "SHERL_MEMORY_LIMIT={v}: expected a size in bytes, optionally with K, M or G (KiB, MiB, GiB), e.g. 8G"
            ))),
        };
    }
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
        return Ok(None);
    };
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| (kb * 1024.0, "MemAvailable")))
}

/// Refuse a run whose estimate exceeds the memory budget.
pub fn check_memory(est: &MemoryEstimate) -> Result<()> {
    let Some((budget, source)) = memory_budget()? else {
        return Ok(());
    };
    let gib = |b: f64| b / (1024.0 * MIB);
    if est.total() > budget {
        return Err(Error::TooLarge(format!(
            "this run would need about {:.1} GiB ({:.1} GiB of parameters, gradients and optimizer state; {:.1} GiB of activations for a batch of {:.0} tokens), but {:.1} GiB is available ({source}); lower --side-dim, --batch-size or --max-tokens-per-batch (or set SHERL_MEMORY_LIMIT if the estimate is wrong for this machine)",
            gib(est.total()),
            gib(est.params_bytes),
            gib(est.activation_bytes),
            est.batch_tokens,
            gib(budget)
        )));
    }
    Ok(())
}

/// Run (or, if `summary.json` exists, return) the run described by `plan`.
pub fn run(plan: &FitPlan, reporter: &dyn FitReporter) -> Result<Summary> {
    let cfg = &plan.config;
    cfg.validate().map_err(Error::Config)?;
    let cache = Arc::new(Cache::open(&plan.cache)?);
    let m = cache.manifest().clone();
    if m.labels.len() < 2 {
        return Err(Error::Config(format!(
            "{}: the cache has {} label(s); classification needs at least 2",
            plan.cache.display(),
            m.labels.len()
        )));
    }
    let dir = BackboneDir::open(&plan.backbone)?;
    let (bert, ckpt) = check_backbone(&cache, &dir)?;
    let spec = model_spec(cfg, &cache, &bert)?;

    let train_split = split_id(&cache, &["train"]).ok_or_else(|| {
        Error::Config(format!(
            "{}: no examples in a 'train' split (splits: {:?})",
            plan.cache.display(),
            m.splits
        ))
    })?;
    let valid_split = split_id(&cache, crate::data::VALID_SPLIT_NAMES).ok_or_else(|| {
        Error::Config(format!(
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
        &bert,
        cfg,
        m.settings.max_len,
        &m.settings.layers,
    ))?;
    let model = Model::build(
        spec.clone(),
        &m.settings.layers,
        &bert,
        &ckpt,
        cfg.seed,
        &plan.device,
    )?;
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
        },
        config: cfg.clone(),
        labels: m.labels.clone(),
        model: RunModel {
            classes: spec.classes,
            early_layers: spec.early_layers.clone(),
            frozen_params: model.params.frozen_count(),
            inputs,
            probe_layer: spec.probe_layer,
            side_dim: spec.side_dim,
            trainable_params: model.params.trainable_count(),
        },
        run_id: run_id.clone(),
        sherl_version: env!("CARGO_PKG_VERSION").to_owned(),
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
            // stopped; the weights' checksum lets predict use them safely.
            // Recording the failure must not hide it: if that fails too
            // (the disk that stopped training is full), say so and return
            // the original error.
            let weights = run_dir.join(WEIGHTS_FILE);
            let record = (|| {
                let weights_sha256 = if weights.exists() {
                    Some(crate::fsutil::sha256_file(&weights)?)
                } else {
                    None
                };
                RunError {
                    error: e.to_string(),
                    run_id: run_id.clone(),
                    weights_sha256,
                }
                .write(&run_dir)
            })();
            if let Err(also) = record {
                tracing::warn!("could not record the failure in error.json: {also}");
            }
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
            let out = model.forward(&batch, &mut Mode::Train(&mut dropout_rng))?;
            let loss = candle_nn::loss::cross_entropy(&out.logits, &batch.labels)?;
            let loss_v = loss.to_scalar::<f32>()?;
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
            let mut grads = loss.backward()?;
            if cfg.grad_clip > 0.0 {
                clip_gradients(&mut grads, &all_vars, cfg.grad_clip)?;
            }
            let mult = cfg.schedule(step.min(total_steps.saturating_sub(1)), total_steps.max(1));
            lr_now = cfg.lr * mult;
            opt_new.set_learning_rate(lr_now);
            opt_new.step(&grads)?;
            if let Some(o) = opt_pre.as_mut() {
                o.set_learning_rate(cfg.lr_pretrained * mult);
                o.step(&grads)?;
            }
            step += 1;
            tokens += batch.tokens;
            tally.add(f64::from(loss_v), &argmax(&out)?, &batch.label_vec);
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
    )?;
    let test = match test_split {
        Some(s) => Some(evaluate(cache, model, batch_plan(s, None), &plan.device, false)?.0),
        None => None,
    };
    let layer_weight_layers = (model.spec().method == Method::Sherl).then(|| {
        let e = &model.spec().early_layers;
        e[..e.len() - 1].to_vec()
    });
    Ok(Summary {
        run_id: String::new(),
        method: model.spec().method.name().into(),
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
    })
}

fn argmax(out: &Output) -> Result<Vec<u32>> {
    Ok(out.logits.argmax(1)?.to_vec1::<u32>()?)
}

/// Scale all gradients so their global L2 norm is at most `max_norm`.
/// Returns the norm before clipping.
pub fn clip_gradients(
    grads: &mut candle_core::backprop::GradStore,
    vars: &[candle_core::Var],
    max_norm: f64,
) -> Result<f64> {
    let mut total = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            total += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
    }
    let norm = total.sqrt();
    if norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * s)?);
            }
        }
    }
    Ok(norm)
}

/// Evaluate on one split (no dropout). With `alpha`, also average SHERL's
/// layer weights over the split's real tokens.
pub fn evaluate(
    cache: &Arc<Cache>,
    model: &Model,
    plan: BatchPlan,
    dev: &Device,
    alpha: bool,
) -> Result<(Tally, Option<Vec<f64>>)> {
    let mut tally = Tally::new(model.spec().classes);
    let mut sums: Option<Vec<f64>> = None;
    let mut tokens = 0f64;
    for batch in Batches::new(cache, plan, dev)? {
        let batch = batch?;
        let out = model.forward(&batch, &mut Mode::Eval)?;
        let loss =
            candle_nn::loss::cross_entropy(&out.logits, &batch.labels)?.to_scalar::<f32>()?;
        tally.add(f64::from(loss), &argmax(&out)?, &batch.label_vec);
        if let (true, Some(a)) = (alpha, out.alpha.as_ref()) {
            // sum over real tokens: alpha [B, S, M-1] * mask [B, S, 1]
            let masked = a
                .broadcast_mul(&batch.mask.unsqueeze(2)?)?
                .sum((0, 1))?
                .to_dtype(DType::F64)?;
            let v = masked.to_vec1::<f64>()?;
            let s = sums.get_or_insert_with(|| vec![0.0; v.len()]);
            for (x, y) in s.iter_mut().zip(v) {
                *x += y;
            }
            tokens += batch.tokens as f64;
        }
    }
    Ok((
        tally,
        sums.map(|s| s.into_iter().map(|x| x / tokens.max(1.0)).collect()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::model::Pool;
    use serde_json::json;

    fn minilm() -> BertConfig {
        serde_json::from_value(json!({
            "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
            "num_attention_heads": 12, "intermediate_size": 1536,
            "max_position_embeddings": 512, "type_vocab_size": 2
        }))
        .unwrap()
    }

    fn spec(method: Method, side_dim: usize) -> ModelSpec {
        ModelSpec {
            method,
            late_layers: 1,
            late_trainable: false,
            side_dim,
            early_layers: (0..=5).collect(),
            probe_layer: 6,
            pool: Pool::Mean,
            dropout: 0.1,
            classes: 2,
        }
    }

    /// The estimate bounds the peaks measured in the README's demo table
    /// (MiniLM, batch 32, max_len 128: full-ft 3,178 MiB, sherl 980 MiB,
    /// linear probe 224 MiB) without being absurdly above them.
    #[test]
    fn memory_estimate_bounds_the_measured_peaks() {
        let cfg = FitConfig::default();
        let all: Vec<usize> = (0..=6).collect();
        let mib =
            |m: Method| memory_estimate(&spec(m, 96), &minilm(), &cfg, 128, &all).total() / MIB;
        for (m, measured) in [
            (Method::FullFt, 3178.0),
            (Method::Sherl, 980.0),
            (Method::LinearProbe, 224.0),
        ] {
            let est = mib(m);
            assert!(est >= measured && est < 4.0 * measured, "{m:?}: {est} MiB");
        }
        // the absurd side width of the attack: terabytes, refused
        let huge = memory_estimate(
            &spec(Method::Sherl, 100_000_000),
            &minilm(),
            &cfg,
            128,
            &all,
        );
        assert!(huge.total() > 1e12, "{}", huge.total());
    }
}
