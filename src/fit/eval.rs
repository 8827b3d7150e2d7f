//! Evaluation of a model on one split of the cache (dropout off).

use std::sync::Arc;

use candle_core::{DType, Device};

use super::batcher::{BatchPlan, Batches};
use super::metrics::Tally;
use super::model::{Model, Output};
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
) -> Result<(Tally, Option<Vec<f64>>)> {
    let mut tally = Tally::new(model.spec().classes);
    let mut sums: Option<Vec<f64>> = None;
    let mut tokens = 0f64;
    let model_eval = model.inference();
    for batch in Batches::new(cache, plan, dev)? {
        let batch = batch?;
        let out = model_eval.forward(&batch)?;
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
