//! `sherl-fit run --task retrieval`: two towers trained together from two
//! caches joined by id ([`super::join`]).
//!
//! Each tower is the model of its method ([`Model::build`], as for
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
//! test.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::optim::ParamsAdamW;

use crate::fit::optim::{clip_scale, AdamW};
use serde::{Deserialize, Serialize};

use super::config::{fit_settings, RetrievalConfig};
use super::join::{join_caches, SplitPairs};
use super::loss::{hinge, infonce, l2_normalize, scale, Loss, INIT_LOG_SCALE};
use super::recall::{recall, similarity, Recall};
use crate::backbone::BackboneDir;
use crate::cache::{Cache, DecodedChunk};
use crate::fit::batcher::Batch;
use crate::fit::checks::{check_backbone, model_spec};
use crate::fit::config::FitConfig;
use crate::fit::error::FitError;
use crate::fit::eval::forward_in_parts;
use crate::fit::memory::{check_memory, memory_estimate, peak_rss_bytes};
use crate::fit::method::Method;
use crate::fit::model::Model;
use crate::fit::nn::Mode;
use crate::fit::params::{Group, Params};
use crate::fit::run_dir::{
    RunError, CONFIG_FILE, ERROR_FILE, METRICS_FILE, RUN_LOCK, SUMMARY_FILE, WEIGHTS_FILE,
};
use crate::fit::train::{step_parts, FitReporter};
use crate::rng::{SplitMix64, Stream};
use crate::{Error, Result};

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

/// One epoch's line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetrievalEpoch {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss over the epoch's batches.
    pub train_loss: f64,
    /// Valid rsum.
    pub valid_rsum: f64,
    /// Valid Recall@K both ways.
    pub valid: Recall,
    /// Training seconds.
    pub seconds: f64,
    /// Evaluation seconds.
    pub eval_seconds: f64,
    /// Training pairs per second.
    pub pairs_per_second: f64,
    /// Learning rate at the epoch's last step.
    pub lr: f64,
    /// InfoNCE's scale (1 / temperature) at the end of the epoch.
    pub scale: Option<f64>,
}

/// `summary.json` of a retrieval run (and its last stdout line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetrievalSummary {
    /// `retrieval`.
    pub task: String,
    /// Run id.
    pub run_id: String,
    /// `<image method>+<text method>`.
    pub method: String,
    /// The image tower's method.
    pub image_method: String,
    /// The caption tower's method.
    pub text_method: String,
    /// Loss.
    pub loss: String,
    /// Joint width.
    pub joint_dim: usize,
    /// Seed.
    pub seed: u64,
    /// Valid rsum of the best checkpoint.
    pub valid_rsum: f64,
    /// Test rsum of the best checkpoint (null without a test split).
    pub test_rsum: Option<f64>,
    /// Valid Recall@K of the best checkpoint.
    pub valid: Recall,
    /// Test Recall@K of the best checkpoint.
    pub test: Option<Recall>,
    /// Epoch of the best checkpoint (1-based).
    pub best_epoch: usize,
    /// Epochs run.
    pub epochs: usize,
    /// Trainable parameters, both towers and the temperature.
    pub trainable_params: usize,
    /// Of which the image tower's.
    pub image_trainable_params: usize,
    /// Of which the caption tower's.
    pub text_trainable_params: usize,
    /// Frozen parameters loaded (both towers).
    pub frozen_params: usize,
    /// Peak resident memory of the process, bytes.
    pub peak_rss_bytes: u64,
    /// Seconds spent training (all epochs, excluding evaluation).
    pub train_seconds: f64,
    /// Mean training seconds per epoch.
    pub seconds_per_epoch: f64,
    /// Training pairs per second.
    pub pairs_per_second: f64,
    /// Train pairs (images) and captions, valid, test.
    pub pairs: BTreeMap<String, [usize; 2]>,
    /// Run directory.
    pub run_dir: PathBuf,
    /// Image cache settings hash.
    pub image_cache: String,
    /// Caption cache settings hash.
    pub text_cache: String,
    /// sha256 of `weights.safetensors` (the best epoch's weights of both
    /// towers, prefixed `image/` and `text/`, and `log_scale`).
    pub weights_sha256: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The fused CPU ops' matrix kernel (CPU only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matmul: Option<String>,
    /// Both towers' training memory, counted as for classification
    /// ([`crate::fit::run_dir::TrainMemory`]); absent when not measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_memory: Option<crate::fit::run_dir::TrainMemory>,
}

/// `examples.json`: a few text queries of the test split, each with its top
/// images (`sherl-fit report` draws them).
pub const EXAMPLES_FILE: &str = "examples.json";
/// Queries in `examples.json`.
pub const EXAMPLE_QUERIES: usize = 4;
/// Images listed per query in `examples.json`.
pub const EXAMPLE_TOP: usize = 5;

/// One image of a query's top list in `examples.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExampleHit {
    /// 1-based place in the list (ties in cache order).
    pub rank: usize,
    /// Image (pair) id.
    pub id: String,
    /// Cosine similarity with the query.
    pub score: f64,
    /// The image file, when the table the image cache was extracted from
    /// is still readable and unchanged.
    pub image: Option<String>,
}

/// One text query of `examples.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryExample {
    /// Caption id `<pair>#<k>`.
    pub caption_id: String,
    /// The caption (from its table, as the image files).
    pub caption: Option<String>,
    /// The caption's own image.
    pub image_id: String,
    /// Rank of the own image among the split's images, 1-based, counted
    /// as Recall@K counts it (a tie ranks against it).
    pub rank: usize,
    /// The best [`EXAMPLE_TOP`] images.
    pub top: Vec<ExampleHit>,
}

/// The first caption of [`EXAMPLE_QUERIES`] images spread evenly over
/// `pairs`, each with its top images, with the current weights.
fn query_examples(
    image: &Tower,
    text: &Tower,
    pairs: &SplitPairs,
    cfg: &FitConfig,
    dev: &Device,
    workers: usize,
) -> Result<Vec<QueryExample>> {
    let n = pairs.images.len();
    let q = EXAMPLE_QUERIES.min(n);
    let owners: Vec<usize> = (0..q).map(|j| j * n / q.max(1)).collect();
    let caps: Vec<u64> = owners
        .iter()
        .map(|&i| pairs.captions[pairs.captions_of[i][0]])
        .collect();
    let zi = embed(image, &pairs.images, cfg, dev, workers)?;
    let zt = embed(text, &caps, cfg, dev, workers)?;
    let sim: Vec<Vec<f32>> = zt.matmul(&zi.t()?)?.to_vec2()?;
    let files = super::tables::table_column(&image.cache, "image");
    let texts = super::tables::table_column(&text.cache, "caption");
    let cap_ids: HashMap<u64, String> = super::join::entries(&text.cache)?
        .into_iter()
        .map(|e| (e.position, e.id))
        .collect();
    let mut out = Vec::with_capacity(q);
    for (j, row) in sim.iter().enumerate() {
        let own = owners[j];
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let rank = 1 + (0..n).filter(|&i| i != own && row[i] >= row[own]).count();
        let caption_id = cap_ids.get(&caps[j]).cloned().unwrap_or_default();
        out.push(QueryExample {
            caption: texts.get(&caption_id).cloned(),
            caption_id,
            image_id: pairs.image_ids[own].clone(),
            rank,
            top: order
                .iter()
                .take(EXAMPLE_TOP)
                .enumerate()
                .map(|(r, &i)| ExampleHit {
                    rank: r + 1,
                    id: pairs.image_ids[i].clone(),
                    score: f64::from(row[i]),
                    image: files.get(&pairs.image_ids[i]).cloned(),
                })
                .collect(),
        });
    }
    Ok(out)
}

/// One tower: its cache, model and the cache positions of its inputs.
pub(crate) struct Tower {
    pub(crate) cache: Arc<Cache>,
    pub(crate) model: Model,
    positions: Vec<usize>,
    pub(crate) hidden: usize,
}

/// Open a cache, check its backbone, build the tower's model.
pub(crate) fn tower(
    cache: Arc<Cache>,
    backbone: &Path,
    cfg: &FitConfig,
    method: Method,
    joint_dim: usize,
    seed: u64,
    dev: &Device,
) -> Result<Tower> {
    let dir = BackboneDir::open(backbone)?;
    let (arch, ckpt) = check_backbone(&cache, &dir)?;
    let tower_cfg = cfg.for_method(method);
    let mut spec = model_spec(&tower_cfg, &cache, &arch)?;
    spec.classes = joint_dim;
    let m = cache.manifest();
    check_memory(&memory_estimate(
        &spec,
        &arch.sizes(),
        &tower_cfg,
        m.settings.max_len,
        &m.settings.layers,
    ))?;
    let model = Model::build(spec, &m.settings.layers, &arch, &ckpt, seed, dev)?;
    let positions = model
        .inputs()
        .iter()
        .map(|&i| {
            cache
                .layer_position(i)
                .expect("Model::build checked the layers are cached")
        })
        .collect();
    Ok(Tower {
        hidden: m.backbone.hidden,
        cache,
        model,
        positions,
    })
}

/// Decoded chunks of one cache, read on demand, at most `limit` kept.
struct Reader<'a> {
    cache: &'a Cache,
    positions: &'a [usize],
    memo: HashMap<usize, DecodedChunk>,
    limit: usize,
}

impl<'a> Reader<'a> {
    fn new(t: &'a Tower, limit: usize) -> Self {
        Reader {
            cache: &t.cache,
            positions: &t.positions,
            memo: HashMap::new(),
            limit: limit.max(1),
        }
    }

    fn chunk_of(&self, position: u64) -> usize {
        self.cache
            .chunks()
            .partition_point(|c| c.first_example + u64::from(c.examples) <= position)
    }

    /// Make sure the chunks of `positions` are decoded (when the memo
    /// would pass its limit, only the chunks this call needs are kept: a
    /// batch's own chunks are never dropped); returns `(chunk, row)` per
    /// position.
    fn load(&mut self, positions: &[u64]) -> Result<Vec<(usize, usize)>> {
        let need: Vec<usize> = positions.iter().map(|&p| self.chunk_of(p)).collect();
        let mut missing: Vec<usize> = need
            .iter()
            .copied()
            .filter(|c| !self.memo.contains_key(c))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if self.memo.len() + missing.len() > self.limit {
            self.memo.retain(|c, _| need.contains(c));
        }
        for c in missing {
            let d = self.cache.read_chunk(c, self.positions)?;
            self.memo.insert(c, d);
        }
        Ok(positions
            .iter()
            .zip(need)
            .map(|(&p, c)| (c, (p - self.cache.chunks()[c].first_example) as usize))
            .collect())
    }

    /// A batch of the examples at `positions` (padded to the longest).
    fn batch(&mut self, positions: &[u64], hidden: usize, dev: &Device) -> Result<Batch> {
        let at = self.load(positions)?;
        let lens: Vec<usize> = at
            .iter()
            .map(|&(c, k)| self.memo[&c].meta[k].len())
            .collect();
        let (b, s) = (at.len(), lens.iter().copied().max().unwrap_or(1).max(1));
        let n_layers = self.positions.len();
        let mut layers = vec![vec![0f32; b * s * hidden]; n_layers];
        let mut mask = vec![0f32; b * s];
        let mut tok = vec![0u32; b * s];
        let mut typ = vec![0u32; b * s];
        let mut ids = Vec::with_capacity(b);
        let mut tokens = 0;
        for (r, &(c, k)) in at.iter().enumerate() {
            let chunk = &self.memo[&c];
            let offsets = chunk.offsets();
            let meta = &chunk.meta[k];
            let len = lens[r];
            tokens += len;
            for (l, values) in chunk.layers.iter().enumerate() {
                layers[l][r * s * hidden..(r * s + len) * hidden]
                    .copy_from_slice(&values[offsets[k] * hidden..offsets[k + 1] * hidden]);
            }
            for t in 0..len {
                mask[r * s + t] = 1.0;
                tok[r * s + t] = meta.ids.get(t).copied().unwrap_or(0);
                typ[r * s + t] = meta.type_ids.get(t).map_or(0, |&x| u32::from(x));
            }
            ids.push(meta.id.clone());
        }
        Ok(Batch {
            layers: layers
                .into_iter()
                .map(|v| Tensor::from_vec(v, (b, s, hidden), dev))
                .collect::<candle_core::Result<_>>()?,
            mask: Tensor::from_vec(mask, (b, s), dev)?,
            labels: Tensor::zeros(b, candle_core::DType::U32, dev)?,
            label_vec: vec![0; b],
            token_ids: Tensor::from_vec(tok, (b, s), dev)?,
            type_ids: Tensor::from_vec(typ, (b, s), dev)?,
            tokens,
            ids,
        })
    }
}

/// Examples per batch of a tower whose longest example has `len` tokens.
fn fit_batch(cfg: &FitConfig, len: usize, n: usize) -> usize {
    (cfg.max_tokens_per_batch / len.max(1))
        .clamp(1, n.max(1))
        .min(n.max(1))
}

/// The L2-normalised embeddings `[n, J]` of the examples at `positions`
/// (in that order), evaluation mode.
pub(crate) fn embed(
    t: &Tower,
    positions: &[u64],
    cfg: &FitConfig,
    dev: &Device,
    workers: usize,
) -> Result<Tensor> {
    let inf = t.model.inference();
    let mut reader = Reader::new(t, 2);
    let eval_batch = cfg.batch_size.max(64);
    let mut outs = Vec::new();
    let mut i = 0;
    while i < positions.len() {
        let end = (i + eval_batch).min(positions.len());
        let longest = reader
            .load(&positions[i..end])?
            .iter()
            .map(|&(c, k)| reader.memo[&c].meta[k].len())
            .max()
            .unwrap_or(1);
        let end = i + fit_batch(cfg, longest, end - i);
        let batch = reader.batch(&positions[i..end], t.hidden, dev)?;
        let out = forward_in_parts(&inf, &batch, step_parts(dev), workers)?;
        outs.push(out.logits);
        i = end;
    }
    l2_normalize(&Tensor::cat(&outs, 0)?)
}

/// Recall@K of one split with the current weights.
fn evaluate(
    image: &Tower,
    text: &Tower,
    pairs: &SplitPairs,
    cfg: &FitConfig,
    dev: &Device,
    workers: usize,
) -> Result<Recall> {
    let zi = embed(image, &pairs.images, cfg, dev, workers)?;
    let zt = embed(text, &pairs.captions, cfg, dev, workers)?;
    recall(&similarity(&zi, &zt)?, pairs.images.len(), &pairs.owner)
}

/// Both towers' trainable weights (prefixed `image/`, `text/`) and the
/// log-scale.
fn snapshot(image: &Tower, text: &Tower, log_scale: &Var) -> Result<BTreeMap<String, Tensor>> {
    let mut all = BTreeMap::new();
    for (prefix, t) in [("image/", image), ("text/", text)] {
        for (k, v) in t.model.params.snapshot()? {
            all.insert(format!("{prefix}{k}"), v);
        }
    }
    all.insert("log_scale".into(), log_scale.as_tensor().copy()?);
    Ok(all)
}

/// Put `all` (as [`snapshot`] made it) back into both towers and the log-scale.
pub(crate) fn restore(
    image: &Tower,
    text: &Tower,
    log_scale: &Var,
    all: &BTreeMap<String, Tensor>,
    source: &Path,
) -> Result<()> {
    for (prefix, t) in [("image/", image), ("text/", text)] {
        let part: BTreeMap<String, Tensor> = all
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
            .collect();
        t.model.params.restore(&part, source)?;
    }
    log_scale.set(&all["log_scale"])?;
    Ok(())
}

/// Run (or, if `summary.json` exists, return) the retrieval run of `plan`.
pub fn run(plan: &RetrievalPlan, reporter: &dyn FitReporter) -> Result<RetrievalSummary> {
    let cfg = &plan.config;
    let rc = &plan.retrieval;
    cfg.validate().map_err(FitError::settings)?;
    rc.validate().map_err(FitError::settings)?;
    let image_cache = Arc::new(Cache::open(&plan.image_cache)?);
    let text_cache = Arc::new(Cache::open(&plan.text_cache)?);
    let joined = join_caches(&image_cache, &text_cache)?;
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
    let (ih, th) = (
        image_cache.manifest().settings_hash.clone(),
        text_cache.manifest().settings_hash.clone(),
    );
    let run_id = rc.run_id(cfg, &ih, &th);
    let run_dir = plan.out.join(&run_id);
    if let Some(s) = read_summary(&run_dir)? {
        reporter.note(&format!("{run_id}: already complete, not re-run"));
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
    std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
    let _lock =
        crate::fsutil::DirLock::try_acquire(&run_dir, RUN_LOCK)?.ok_or_else(|| Error::Locked {
            path: run_dir.clone(),
            what: "this run",
            lock: run_dir.join(RUN_LOCK),
        })?;
    if let Some(s) = read_summary(&run_dir)? {
        return Ok(s);
    }
    for stale in [METRICS_FILE, ERROR_FILE, WEIGHTS_FILE, EXAMPLES_FILE] {
        let p = run_dir.join(stale);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
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
        "run_id": run_id,
        "config": fit_settings(cfg),
        "retrieval": rc,
        "image_cache": cache_record(&image, &plan.image_cache),
        "text_cache": cache_record(&text, &plan.text_cache),
        "sherl_version": env!("CARGO_PKG_VERSION"),
    });
    crate::fsutil::write_atomic(
        &run_dir.join(CONFIG_FILE),
        &serde_json::to_vec_pretty(&config).expect("config serialises"),
    )?;
    let pairs: BTreeMap<String, [usize; 2]> = joined
        .splits
        .iter()
        .map(|(k, s)| (k.clone(), [s.images.len(), s.captions.len()]))
        .collect();
    let outcome = train_loop(
        plan,
        &image,
        &text,
        &train,
        &valid,
        test.as_ref(),
        &run_dir,
        reporter,
    );
    match outcome {
        Ok(mut s) => {
            s.run_id = run_id;
            s.run_dir = run_dir.clone();
            s.image_cache = ih;
            s.text_cache = th;
            s.pairs = pairs;
            let bytes = serde_json::to_vec_pretty(&s).expect("summary serialises");
            crate::fsutil::write_atomic(&run_dir.join(SUMMARY_FILE), &bytes)?;
            Ok(s)
        }
        Err(e) => {
            RunError::record(&run_dir, &run_id, &e);
            Err(e)
        }
    }
}

/// A finished run's summary, if there is one.
fn read_summary(run_dir: &Path) -> Result<Option<RetrievalSummary>> {
    let p = run_dir.join(SUMMARY_FILE);
    if !p.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| Error::Json { path: p, source })
}

#[allow(clippy::too_many_arguments)]
fn train_loop(
    plan: &RetrievalPlan,
    image: &Tower,
    text: &Tower,
    train: &SplitPairs,
    valid: &SplitPairs,
    test: Option<&SplitPairs>,
    run_dir: &Path,
    reporter: &dyn FitReporter,
) -> Result<RetrievalSummary> {
    let cfg = &plan.config;
    let rc = &plan.retrieval;
    let dev = &plan.device;
    let log_scale = Var::from_tensor(&Tensor::new(INIT_LOG_SCALE as f32, dev)?)?;
    let new_vars: Vec<Var> = [image, text]
        .iter()
        .flat_map(|t| t.model.params.vars(Group::New))
        .collect();
    let pre_vars: Vec<Var> = [image, text]
        .iter()
        .flat_map(|t| t.model.params.vars(Group::Pretrained))
        .collect();
    let learn_scale = rc.loss == Loss::Infonce;
    let mut all_vars: Vec<Var> = new_vars.iter().chain(pre_vars.iter()).cloned().collect();
    if learn_scale {
        all_vars.push(log_scale.clone());
    }
    let adamw = |vars: Vec<Var>, lr: f64, wd: f64| {
        AdamW::new(
            vars,
            ParamsAdamW {
                lr,
                weight_decay: wd,
                ..Default::default()
            },
        )
    };
    let mut opt_new = adamw(new_vars, cfg.lr, cfg.weight_decay)?;
    // The temperature is not decayed (CLIP).
    let mut opt_scale = if learn_scale {
        Some(adamw(vec![log_scale.clone()], cfg.lr, 0.0)?)
    } else {
        None
    };
    let mut opt_pre = if pre_vars.is_empty() {
        None
    } else {
        Some(adamw(pre_vars, cfg.lr_pretrained, cfg.weight_decay)?)
    };

    // Train images grouped by the image chunk that holds them.
    let reader0 = Reader::new(image, 1);
    let mut by_chunk: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, &p) in train.images.iter().enumerate() {
        by_chunk.entry(reader0.chunk_of(p)).or_default().push(i);
    }
    let mut chunks: Vec<usize> = by_chunk.keys().copied().collect();
    if let Some(n) = cfg.train_examples {
        chunks = crate::fit::batcher::subset_chunks(&image.cache, chunks, cfg.seed, n);
    }
    let n_train: usize = chunks.iter().map(|c| by_chunk[c].len()).sum();
    let image_tokens = image
        .cache
        .chunks()
        .first()
        .map_or(1, |c| (c.tokens / u64::from(c.examples.max(1))) as usize);
    let batch_size = fit_batch(cfg, image_tokens, cfg.batch_size);
    let steps_per_epoch = n_train.div_ceil(batch_size);
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
    let mut train_pairs = 0usize;
    let mut image_reader = Reader::new(image, cfg.shuffle_chunks);
    let mut text_reader = Reader::new(text, 64);
    for epoch in 1..=cfg.epochs {
        reporter.epoch_start(epoch, cfg.epochs, steps_per_epoch as u64);
        let t0 = Instant::now();
        let mut rng = SplitMix64::for_stream(cfg.seed, Stream::Epoch(epoch as u64));
        let mut order = chunks.clone();
        rng.shuffle_scaled(&mut order);
        let (mut loss_sum, mut batches, mut lr_now) = (0f64, 0usize, cfg.lr);
        for window in order.chunks(cfg.shuffle_chunks.max(1)) {
            let mut members: Vec<usize> = window.iter().flat_map(|c| by_chunk[c].clone()).collect();
            rng.shuffle_scaled(&mut members);
            for b in members.chunks(batch_size) {
                let img_pos: Vec<u64> = b.iter().map(|&i| train.images[i]).collect();
                let cap_pos: Vec<u64> = b
                    .iter()
                    .map(|&i| {
                        let own = &train.captions_of[i];
                        train.captions[own[rng.below_scaled(own.len())]]
                    })
                    .collect();
                let ib = image_reader.batch(&img_pos, image.hidden, dev)?;
                let tb = text_reader.batch(&cap_pos, text.hidden, dev)?;
                // The step's own memory, as for classification
                // (crate::fit::alloc_track).
                let counted = crate::fit::alloc_track::StepWindow::start();
                let zi = image
                    .model
                    .forward(&ib, &mut Mode::Train(&mut dropout_rng))?
                    .logits;
                let zt = text
                    .model
                    .forward(&tb, &mut Mode::Train(&mut dropout_rng))?
                    .logits;
                let (zi, zt) = (l2_normalize(&zi)?, l2_normalize(&zt)?);
                let loss = match rc.loss {
                    Loss::Infonce => infonce(&zi, &zt, log_scale.as_tensor())?,
                    Loss::Hinge => hinge(&zi, &zt, rc.margin)?,
                };
                let loss_v = loss.to_scalar::<f32>()?;
                if !loss_v.is_finite() {
                    return Err(Error::Diverged(format!(
                        "training loss became {loss_v} at epoch {epoch}, step {step}; lower --lr \
                         (now {}) or --grad-clip (now {})",
                        cfg.lr, cfg.grad_clip
                    )));
                }
                let mut grads = loss.backward()?;
                let clip = if cfg.grad_clip > 0.0 {
                    clip_scale(&grads, &all_vars, cfg.grad_clip)?.1
                } else {
                    None
                };
                let mult =
                    cfg.schedule(step.min(total_steps.saturating_sub(1)), total_steps.max(1));
                lr_now = cfg.lr * mult;
                opt_new.set_learning_rate(lr_now);
                opt_new.step(&mut grads, clip)?;
                if let Some(o) = opt_scale.as_mut() {
                    o.set_learning_rate(lr_now);
                    o.step(&mut grads, clip)?;
                }
                if let Some(o) = opt_pre.as_mut() {
                    o.set_learning_rate(cfg.lr_pretrained * mult);
                    o.step(&mut grads, clip)?;
                }
                drop(grads);
                counted.finish(&mut step_peak);
                step += 1;
                batches += 1;
                loss_sum += f64::from(loss_v);
                train_pairs += b.len();
                reporter.step(loss_v);
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        train_seconds += secs;
        let te = Instant::now();
        let v = evaluate(image, text, valid, cfg, dev, plan.workers)?;
        let scale_now = if learn_scale {
            Some(f64::from(scale(log_scale.as_tensor())?.to_scalar::<f32>()?))
        } else {
            None
        };
        let em = RetrievalEpoch {
            epoch,
            train_loss: loss_sum / batches.max(1) as f64,
            valid_rsum: v.rsum,
            valid: v,
            seconds: secs,
            eval_seconds: te.elapsed().as_secs_f64(),
            pairs_per_second: n_train as f64 / secs.max(1e-9),
            lr: lr_now,
            scale: scale_now,
        };
        let line = serde_json::to_string(&em).expect("metrics serialise");
        writeln!(metrics_file, "{line}")
            .and_then(|_| metrics_file.flush())
            .map_err(|e| Error::io(&metrics_path, e))?;
        reporter.note(&format!(
            "epoch {epoch}: train loss {:.4} | valid R@1/5/10 i2t {:.1}/{:.1}/{:.1} t2i {:.1}/{:.1}/{:.1} rsum {:.1} | {secs:.1}s",
            em.train_loss, v.i2t[0], v.i2t[1], v.i2t[2], v.t2i[0], v.t2i[1], v.t2i[2], v.rsum
        ));
        if best.as_ref().is_none_or(|b| v.rsum > b.0) {
            let snap = snapshot(image, text, &log_scale)?;
            weights_sha256 = Params::save(&snap, &weights_path)?;
            best = Some((v.rsum, epoch, snap));
        }
    }
    let (_, best_epoch, snap) = best.expect("at least one epoch ran");
    restore(image, text, &log_scale, &snap, &weights_path)?;
    let v = evaluate(image, text, valid, cfg, dev, plan.workers)?;
    let t = match test {
        Some(s) => {
            let r = evaluate(image, text, s, cfg, dev, plan.workers)?;
            let examples = query_examples(image, text, s, cfg, dev, plan.workers)?;
            crate::fsutil::write_atomic(
                &run_dir.join(EXAMPLES_FILE),
                &serde_json::to_vec_pretty(&examples).expect("examples serialise"),
            )?;
            Some(r)
        }
        None => None,
    };
    let (it, tt) = (
        image.model.params.trainable_count(),
        text.model.params.trainable_count(),
    );
    Ok(RetrievalSummary {
        task: "retrieval".into(),
        run_id: String::new(),
        method: format!("{}+{}", rc.image_method.name(), rc.text_method.name()),
        image_method: rc.image_method.name().into(),
        text_method: rc.text_method.name().into(),
        loss: rc.loss.name().into(),
        joint_dim: rc.joint_dim,
        seed: cfg.seed,
        valid_rsum: v.rsum,
        test_rsum: t.map(|r| r.rsum),
        valid: v,
        test: t,
        best_epoch,
        epochs: cfg.epochs,
        trainable_params: it + tt + usize::from(learn_scale),
        image_trainable_params: it,
        text_trainable_params: tt,
        frozen_params: image.model.params.frozen_count() + text.model.params.frozen_count(),
        peak_rss_bytes: peak_rss_bytes(),
        train_seconds,
        seconds_per_epoch: train_seconds / cfg.epochs as f64,
        pairs_per_second: train_pairs as f64 / train_seconds.max(1e-9),
        pairs: BTreeMap::new(),
        run_dir: PathBuf::new(),
        image_cache: String::new(),
        text_cache: String::new(),
        weights_sha256,
        device: crate::fit::device_name(dev),
        matmul: dev.is_cpu().then(crate::fit::nn::gemm::kernel),
        train_memory: step_peak
            .map(|p| crate::fit::run_dir::TrainMemory::new(it + tt + usize::from(learn_scale), p)),
    })
}
