//! One tower of a retrieval run: its cache, its model, a reader of its
//! cached examples, its embeddings; both towers' weights as one file
//! (used by training, [`super::train`], and by `sherl-fit search`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};

use super::join::SplitPairs;
use super::loss::l2_normalize;
use super::recall::{recall, similarity, Recall};
use crate::backbone::BackboneDir;
use crate::cache::{Cache, DecodedChunk};
use crate::fit::batcher::Batch;
use crate::fit::checks::{check_backbone, model_spec};
use crate::fit::config::FitConfig;
use crate::fit::eval::forward_in_parts;
use crate::fit::memory::{check_memory, memory_estimate};
use crate::fit::method::Method;
use crate::fit::model::Model;
use crate::fit::worker::step_parts;
use crate::Result;

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
pub(super) struct Reader<'a> {
    cache: &'a Cache,
    positions: &'a [usize],
    memo: HashMap<usize, DecodedChunk>,
    limit: usize,
}

impl<'a> Reader<'a> {
    /// A reader of `t`'s cache keeping at most `limit` decoded chunks.
    pub(super) fn new(t: &'a Tower, limit: usize) -> Self {
        Reader {
            cache: &t.cache,
            positions: &t.positions,
            memo: HashMap::new(),
            limit: limit.max(1),
        }
    }

    /// The chunk that holds the example at `position`.
    pub(super) fn chunk_of(&self, position: u64) -> usize {
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
    pub(super) fn batch(
        &mut self,
        positions: &[u64],
        hidden: usize,
        dev: &Device,
    ) -> Result<Batch> {
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
pub(super) fn fit_batch(cfg: &FitConfig, len: usize, n: usize) -> usize {
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
pub(super) fn evaluate(
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
pub(super) fn snapshot(
    image: &Tower,
    text: &Tower,
    log_scale: &Var,
) -> Result<BTreeMap<String, Tensor>> {
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
