//! `sherl-extract sample`: run the backbone over the first examples of a
//! dataset and measure what it produces (token lengths, per-layer mean and
//! standard deviation over real tokens, throughput). The binary prints the
//! [`SampleReport`].

use std::path::PathBuf;

use super::error::ExtractError;
use crate::backbone::BackboneDir;
use crate::batching::{real_rows, PaddedBatch};
use crate::data::{Dataset, DatasetPlan};
use crate::extract::runtime::{BackboneSession, Runtime, SessionConfig};
use crate::extract::tokenize::Tokenizer;
use crate::Result;

/// Examples `sample` runs when not told otherwise.
pub const DEFAULT_LIMIT: usize = 64;
/// Examples per ONNX Runtime call of `sample` when not told otherwise.
pub const DEFAULT_BATCH_SIZE: usize = 16;

/// What to sample.
#[derive(Debug, Clone)]
pub struct SamplePlan {
    /// Backbone directory (tokenizer.json).
    pub backbone: PathBuf,
    /// ONNX model (default `BACKBONE/model.onnx`).
    pub model: Option<PathBuf>,
    /// Dataset to read.
    pub dataset: DatasetPlan,
    /// Truncation, special tokens included.
    pub max_len: usize,
    /// How many examples to run.
    pub limit: usize,
    /// Examples per ONNX Runtime call.
    pub batch_size: usize,
    /// ONNX Runtime session settings.
    pub session: SessionConfig,
}

/// Statistics of one hidden state over the sampled real tokens.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerStats {
    /// `hidden_states.i`.
    pub layer: usize,
    /// Mean value.
    pub mean: f64,
    /// Standard deviation.
    pub std: f64,
    /// The first values of the first example's first token.
    pub first_cls_head: Vec<f32>,
}

/// What `sample` found.
#[derive(Debug, Clone)]
pub struct SampleReport {
    /// The dataset read (counts, labels, splits).
    pub dataset: Dataset,
    /// Examples run.
    pub sampled: usize,
    /// Their real tokens.
    pub tokens: usize,
    /// Their token lengths, sorted.
    pub lengths: Vec<usize>,
    /// Hidden width.
    pub hidden: usize,
    /// Per stored layer.
    pub layers: Vec<LayerStats>,
    /// Device used.
    pub device: String,
    /// Why `auto` fell back to the CPU, if it did.
    pub fallback_reason: Option<String>,
    /// Seconds spent running the backbone.
    pub seconds: f64,
}

impl SampleReport {
    /// Real tokens per second.
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Run `plan`'s sample.
pub fn sample(rt: &Runtime, plan: &SamplePlan) -> Result<SampleReport> {
    if plan.batch_size == 0 || plan.limit == 0 {
        return Err(ExtractError::SampleSize.into());
    }
    let dir = BackboneDir::open(&plan.backbone)?;
    let tokenizer = Tokenizer::from_file(&dir.tokenizer_path(), plan.max_len)?;
    let dataset = crate::data::load(&plan.dataset)?;
    let model = plan.model.clone().unwrap_or_else(|| dir.onnx_path());
    let (mut session, choice) = BackboneSession::open(rt, &model, &plan.session)?;
    let layers = session.layers().to_vec();
    if layers.is_empty() {
        session.check_layers(&[0])?;
    }

    let n = plan.limit.min(dataset.examples.len());
    let mut encoded = Vec::with_capacity(n);
    for ex in &dataset.examples[..n] {
        encoded.push(tokenizer.encode(&ex.text, ex.text_pair.as_deref())?);
    }
    // Per-layer running statistics over real tokens.
    let mut sum = vec![0f64; layers.len()];
    let mut sum_sq = vec![0f64; layers.len()];
    let mut count = vec![0u64; layers.len()];
    let mut first_cls: Vec<Vec<f32>> = vec![Vec::new(); layers.len()];
    let mut hidden = 0;
    let t = std::time::Instant::now();
    for (bi, chunk) in encoded.chunks(plan.batch_size).enumerate() {
        let refs: Vec<&_> = chunk.iter().collect();
        let batch = PaddedBatch::new(&refs, None);
        let (ids, mask, types) = batch.views();
        let outs = session.run(ids, mask, types, &layers)?;
        for (li, h) in outs.iter().enumerate() {
            hidden = h.shape()[2];
            for (b, &len) in batch.lengths.iter().enumerate() {
                let rows = real_rows(h.view(), b, len);
                if bi == 0 && b == 0 {
                    first_cls[li] = rows[..hidden.min(3)].to_vec();
                }
                for v in rows {
                    sum[li] += f64::from(v);
                    sum_sq[li] += f64::from(v) * f64::from(v);
                }
                count[li] += (len * hidden) as u64;
            }
        }
    }
    let seconds = t.elapsed().as_secs_f64();
    let mut lengths: Vec<usize> = encoded.iter().map(|e| e.len()).collect();
    lengths.sort_unstable();
    let layers = layers
        .iter()
        .enumerate()
        .map(|(li, &layer)| {
            let c = count[li].max(1) as f64;
            let mean = sum[li] / c;
            let std = (sum_sq[li] / c - mean * mean).max(0.0).sqrt();
            LayerStats {
                layer,
                mean,
                std,
                first_cls_head: std::mem::take(&mut first_cls[li]),
            }
        })
        .collect();
    Ok(SampleReport {
        dataset,
        sampled: n,
        tokens: lengths.iter().sum(),
        lengths,
        hidden,
        layers,
        device: choice.device,
        fallback_reason: choice.fallback_reason,
        seconds,
    })
}
