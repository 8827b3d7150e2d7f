//! Evaluation of a model on one split of the cache (dropout off).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::batcher::{Batch, BatchPlan, Batches};
use super::metrics::Tally;
use super::model::{Inference, Model, Output};
use super::worker::{part_ranges, step_parts};
use crate::cache::Cache;
use crate::Result;

/// Predicted class per example.
pub(super) fn argmax(out: &Output) -> Result<Vec<u32>> {
    Ok(out.logits.argmax(1)?.to_vec1::<u32>()?)
}

/// Evaluate on one split (no dropout). With `alpha`, also average SHERL's
/// layer weights over the split's real tokens.
pub fn evaluate(
    cache: &Arc<Cache>,
    model: &Model,
    plan: BatchPlan,
    dev: &Device,
    alpha: bool,
    workers: usize,
) -> Result<(Tally, Option<Vec<f64>>)> {
    let mut tally = Tally::new(model.spec().classes);
    let mut sums: Option<Vec<f64>> = None;
    let mut tokens = 0f64;
    let model_eval = model.inference();
    for batch in Batches::new(cache, plan, dev)? {
        let batch = batch?;
        let out = forward_in_parts(&model_eval, &batch, step_parts(dev), workers)?;
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

/// An evaluation forward pass over `batch` cut into `parts` row ranges run
/// on up to `workers` threads, the outputs joined in row order (each
/// example's values are those of a pass over the whole batch).
pub fn forward_in_parts(
    model: &Inference,
    batch: &Batch,
    parts: usize,
    workers: usize,
) -> Result<Output> {
    let ranges = part_ranges(batch.len(), parts);
    if ranges.len() <= 1 {
        return model.forward(batch);
    }
    let outs = super::worker::map_parts(&ranges, workers >= 2, |r| {
        let (m, part) = (model.clone(), batch.rows(r.clone()));
        move || m.forward(&part?)
    });
    let outs: Vec<Output> = outs.into_iter().collect::<Result<_>>()?;
    let logits = Tensor::cat(
        &outs.iter().map(|o| o.logits.clone()).collect::<Vec<_>>(),
        0,
    )?;
    let alpha = match outs
        .iter()
        .map(|o| o.alpha.clone())
        .collect::<Option<Vec<Tensor>>>()
    {
        Some(a) => Some(Tensor::cat(&a, 0)?),
        None => None,
    };
    Ok(Output { logits, alpha })
}
