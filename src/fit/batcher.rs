//! Batches for training and evaluation, streamed from the mapped cache.
//!
//! Nothing loads the whole cache: the chunks of one split are decoded on
//! background threads with bounded look-ahead ([`Cache::stream`]). For
//! training, the chunk order is a seeded permutation per epoch and examples
//! pass through a seeded shuffle buffer of a few chunks, so each chunk is
//! decompressed once per epoch and memory stays bounded by the settings.
//! Padding is re-created per batch (the cache stores real tokens only), up
//! to the batch's longest example.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::batching::{batch_ranges, PaddedBatch};
use crate::cache::{Cache, ChunkStream, DecodedChunk, ExampleMeta, LayerValues};
use crate::fit::error::FitError;
use crate::rng::{SplitMix64, Stream};
use crate::Result;

/// One batch.
#[derive(Debug)]
pub struct Batch {
    /// Requested hidden states, each `[B, S, D]` (zeros at padding).
    pub layers: Vec<Tensor>,
    /// `[B, S]` f32, 1 at real tokens.
    pub mask: Tensor,
    /// `[B]` u32 class ids.
    pub labels: Tensor,
    /// Class ids as numbers.
    pub label_vec: Vec<u32>,
    /// Token ids `[B, S]` u32 (0 at padding).
    pub token_ids: Tensor,
    /// Segment ids `[B, S]` u32.
    pub type_ids: Tensor,
    /// Real tokens in the batch.
    pub tokens: usize,
    /// Example ids.
    pub ids: Vec<String>,
}

impl Batch {
    /// Examples `rows` of this batch, padding unchanged (the same padded
    /// length, so a part sees exactly the values the whole batch does).
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Result<Batch> {
        let (start, len) = (rows.start, rows.len());
        let narrow = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, start, len)?) };
        let mask = narrow(&self.mask)?;
        let tokens = mask.sum_all()?.to_scalar::<f32>()? as usize;
        Ok(Batch {
            layers: self.layers.iter().map(narrow).collect::<Result<_>>()?,
            mask,
            labels: narrow(&self.labels)?,
            label_vec: self.label_vec[rows.clone()].to_vec(),
            token_ids: narrow(&self.token_ids)?,
            type_ids: narrow(&self.type_ids)?,
            tokens,
            ids: self.ids[rows].to_vec(),
        })
    }

    /// Examples in the batch.
    pub fn len(&self) -> usize {
        self.label_vec.len()
    }

    /// Whether the batch has no example.
    pub fn is_empty(&self) -> bool {
        self.label_vec.is_empty()
    }

    /// A batch of examples tokenized outside any cache (prediction): the
    /// padded inputs `pb`, the requested hidden states as `[B, S, hidden]`
    /// row-major values (zeros at padding), and the examples' ids. Labels
    /// are unknown: all 0.
    pub fn from_padded(
        pb: &PaddedBatch,
        layers: Vec<Vec<f32>>,
        hidden: usize,
        ids: Vec<String>,
        dev: &Device,
    ) -> Result<Batch> {
        let to_u32 = |a: &ndarray::Array2<i64>| a.iter().map(|&x| x as u32).collect();
        Parts {
            seq: pb.ids.ncols(),
            hidden,
            layers,
            mask: pb.mask.iter().map(|&m| m as f32).collect(),
            token_ids: to_u32(&pb.ids),
            type_ids: to_u32(&pb.types),
            labels: vec![0; ids.len()],
            tokens: pb.real_tokens(),
            ids,
        }
        .into_batch(dev)
    }
}

/// The contents of a batch of `ids.len()` examples padded to `seq` tokens,
/// row-major; [`Parts::into_batch`] gives each tensor its shape, the one
/// place a [`Batch`]'s layout is defined (for training, evaluation and
/// prediction alike).
struct Parts {
    seq: usize,
    hidden: usize,
    /// One `[B * S * hidden]` vector per requested hidden state.
    layers: Vec<Vec<f32>>,
    mask: Vec<f32>,
    token_ids: Vec<u32>,
    type_ids: Vec<u32>,
    labels: Vec<u32>,
    tokens: usize,
    ids: Vec<String>,
}

impl Parts {
    fn into_batch(self, dev: &Device) -> Result<Batch> {
        let (b, s, h) = (self.ids.len(), self.seq, self.hidden);
        Ok(Batch {
            layers: self
                .layers
                .into_iter()
                .map(|v| Tensor::from_vec(v, (b, s, h), dev))
                .collect::<candle_core::Result<_>>()?,
            mask: Tensor::from_vec(self.mask, (b, s), dev)?,
            labels: Tensor::from_vec(self.labels.clone(), b, dev)?,
            label_vec: self.labels,
            token_ids: Tensor::from_vec(self.token_ids, (b, s), dev)?,
            type_ids: Tensor::from_vec(self.type_ids, (b, s), dev)?,
            tokens: self.tokens,
            ids: self.ids,
        })
    }
}

/// How to batch one split.
#[derive(Debug, Clone)]
pub struct BatchPlan {
    /// Split id (index into the manifest's `split_names`).
    pub split: u32,
    /// Cache layer positions to load, in the order wanted.
    pub positions: Vec<usize>,
    /// Most examples per batch.
    pub batch_size: usize,
    /// Most padded tokens per batch (B x longest).
    pub max_tokens: usize,
    /// `Some((seed, epoch))`: seeded chunk permutation and shuffle buffer.
    pub shuffle: Option<(u64, u64)>,
    /// Shuffle buffer size in chunks.
    pub buffer_chunks: usize,
    /// Decoder threads.
    pub threads: usize,
    /// `Some((seed, n))`: only a seeded subset of whole chunks holding about
    /// `n` examples of the split, the same subset whatever the epoch.
    pub subset: Option<(u64, usize)>,
}

/// Chunk ids that hold examples of `split` (contiguous: the cache is
/// ordered by split).
pub fn split_chunks(cache: &Cache, split: u32) -> Vec<usize> {
    let m = cache.manifest();
    let mut start = 0u64;
    for name in &m.split_names[..split as usize] {
        start += m.splits.get(name).copied().unwrap_or(0);
    }
    let end = start
        + m.splits
            .get(&m.split_names[split as usize])
            .copied()
            .unwrap_or(0);
    cache
        .chunks()
        .iter()
        .enumerate()
        .filter(|(_, c)| c.first_example < end && c.first_example + u64::from(c.examples) > start)
        .map(|(i, _)| i)
        .collect()
}

/// A seeded choice of whole chunks from `chunks` holding at least `n`
/// examples (fewer if the split is smaller), kept in cache order.
pub fn subset_chunks(cache: &Cache, mut chunks: Vec<usize>, seed: u64, n: usize) -> Vec<usize> {
    SplitMix64::for_stream(seed, Stream::ChunkSubset).shuffle_scaled(&mut chunks);
    let mut total = 0usize;
    let mut keep = Vec::new();
    for c in chunks {
        if total >= n {
            break;
        }
        total += cache.chunks()[c].examples as usize;
        keep.push(c);
    }
    keep.sort_unstable();
    keep
}

/// Number of examples of a split.
pub fn split_len(cache: &Cache, split: u32) -> u64 {
    let m = cache.manifest();
    m.splits
        .get(&m.split_names[split as usize])
        .copied()
        .unwrap_or(0)
}

/// One example waiting in the shuffle buffer: its metadata and where its
/// rows are in its decoded chunk, shared with the chunk's other examples
/// (the values are widened to f32 only when its batch is built, straight
/// into the batch).
struct Item {
    meta: ExampleMeta,
    layers: Arc<Vec<LayerValues>>,
    /// The example's first row in the chunk's layers.
    row: usize,
}

/// Iterator over batches of one split.
pub struct Batches {
    stream: ChunkStream,
    plan: BatchPlan,
    rng: Option<SplitMix64>,
    buffer: Vec<Item>,
    /// Batches already cut, served before anything else.
    ready: Vec<Vec<Item>>,
    buffer_target: usize,
    done_streaming: bool,
    hidden: usize,
    device: Device,
    chunk_size: usize,
}

impl Batches {
    /// Start batching `plan.split` of `cache`.
    pub fn new(cache: &Arc<Cache>, plan: BatchPlan, device: &Device) -> Result<Self> {
        let mut chunks = split_chunks(cache, plan.split);
        if let Some((seed, n)) = plan.subset {
            chunks = subset_chunks(cache, chunks, seed, n);
        }
        let mut rng = plan
            .shuffle
            .map(|(seed, epoch)| SplitMix64::for_stream(seed, Stream::Epoch(epoch)));
        if let Some(r) = rng.as_mut() {
            r.shuffle_scaled(&mut chunks);
        }
        let chunk_size = cache.manifest().settings.chunk_size as usize;
        // Decoded chunks kept ready: training refills its shuffle buffer
        // (`buffer_chunks` chunks) all at once, so the decoders may run that
        // far ahead; with only `2 x threads` ready, every refill waited for
        // the decoders (a tenth of a UniPT epoch). Still bounded by the
        // settings, in stored 16-bit form.
        let ahead = plan.threads * 2
            + if plan.shuffle.is_some() {
                plan.buffer_chunks
            } else {
                0
            };
        let stream = cache.stream(chunks, plan.positions.clone(), plan.threads, ahead);
        let buffer_target = if rng.is_some() {
            plan.buffer_chunks.max(1) * chunk_size
        } else {
            plan.batch_size
        };
        Ok(Batches {
            stream,
            hidden: cache.manifest().backbone.hidden,
            buffer: Vec::new(),
            ready: Vec::new(),
            buffer_target,
            done_streaming: false,
            rng,
            plan,
            device: device.clone(),
            chunk_size,
        })
    }

    fn absorb(&mut self, c: DecodedChunk<LayerValues>) {
        let offsets = c.offsets();
        let layers = Arc::new(c.layers);
        for (k, meta) in c.meta.into_iter().enumerate() {
            if meta.split != self.plan.split {
                continue;
            }
            self.buffer.push(Item {
                meta,
                layers: Arc::clone(&layers),
                row: offsets[k],
            });
        }
    }

    fn fill(&mut self) -> Result<()> {
        if !self.ready.is_empty() {
            return Ok(());
        }
        while !self.done_streaming && self.buffer.len() < self.buffer_target + self.chunk_size {
            match self.stream.next() {
                Some(c) => self.absorb(c?),
                None => self.done_streaming = true,
            }
        }
        Ok(())
    }

    /// Cut `items` (in order) into batches under the size and token limits.
    fn cut(&self, items: Vec<Item>) -> Vec<Vec<Item>> {
        let lengths: Vec<usize> = items.iter().map(|it| it.meta.len()).collect();
        let ranges = batch_ranges(&lengths, self.plan.max_tokens, self.plan.batch_size);
        let mut items = items.into_iter();
        ranges
            .into_iter()
            .map(|r| items.by_ref().take(r.len()).collect())
            .collect()
    }

    fn take_batch(&mut self) -> Vec<Item> {
        if let Some(b) = self.ready.pop() {
            return b;
        }
        let Some(mut rng) = self.rng.take() else {
            // Evaluation: in cache order.
            let n = self.buffer.len().min(self.plan.batch_size);
            let first: Vec<Item> = self.buffer.drain(..n).collect();
            let mut batches = self.cut(first);
            let b = batches.remove(0);
            // put back what did not fit in the first batch
            for (k, rest) in batches.into_iter().flatten().enumerate() {
                self.buffer.insert(k, rest);
            }
            return b;
        };
        // Training: take the buffer's worth of examples in a seeded random
        // order, group them by length (so batches need little padding),
        // cut into batches and serve the batches in a seeded random order.
        let n = self.buffer.len().min(self.buffer_target);
        let mut pick: Vec<Item> = Vec::with_capacity(n);
        for _ in 0..n {
            let i = rng.below_scaled(self.buffer.len());
            pick.push(self.buffer.swap_remove(i));
        }
        pick.sort_by_key(|it| it.meta.len());
        let mut batches = self.cut(pick);
        rng.shuffle_scaled(&mut batches);
        self.rng = Some(rng);
        let first = batches.pop().expect("at least one example was picked");
        self.ready = batches;
        first
    }

    fn build(&self, items: Vec<Item>) -> Result<Batch> {
        let b = items.len();
        let s = items.iter().map(|i| i.meta.len()).max().unwrap_or(1);
        let h = self.hidden;
        let n_layers = self.plan.positions.len();
        // Each value written once: the example's rows, then its padding.
        let mut layers: Vec<Vec<f32>> = (0..n_layers)
            .map(|_| Vec::with_capacity(b * s * h))
            .collect();
        let mut mask = vec![0f32; b * s];
        let mut tok = vec![0u32; b * s];
        let mut typ = vec![0u32; b * s];
        let mut labels = Vec::with_capacity(b);
        let mut ids = Vec::with_capacity(b);
        let mut tokens = 0;
        for (r, it) in items.into_iter().enumerate() {
            let len = it.meta.len();
            tokens += len;
            let values = it.row * h..(it.row + len) * h;
            for (out, stored) in layers.iter_mut().zip(it.layers.iter()) {
                stored.append_f32(values.clone(), out);
                out.resize((r + 1) * s * h, 0.0);
            }
            for t in 0..len {
                mask[r * s + t] = 1.0;
                // Image examples have no token ids (FORMAT.md §3.1.1):
                // zeros, read by no image model.
                tok[r * s + t] = it.meta.ids.get(t).copied().unwrap_or(0);
                typ[r * s + t] = it.meta.type_ids.get(t).map_or(0, |&x| u32::from(x));
            }
            labels.push(it.meta.label.ok_or_else(|| {
                FitError::cache_lacks(format!(
                    "example {} has no label: the cache was extracted with --no-labels",
                    it.meta.id
                ))
            })?);
            ids.push(it.meta.id);
        }
        Parts {
            seq: s,
            hidden: h,
            layers,
            mask,
            token_ids: tok,
            type_ids: typ,
            labels,
            tokens,
            ids,
        }
        .into_batch(&self.device)
    }
}

impl Iterator for Batches {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        if let Err(e) = self.fill() {
            return Some(Err(e));
        }
        if self.buffer.is_empty() && self.ready.is_empty() {
            return None;
        }
        let items = self.take_batch();
        Some(self.build(items))
    }
}
