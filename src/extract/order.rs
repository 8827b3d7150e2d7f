//! Stage two of `sherl-extract run`: tokenize the dataset and put its
//! examples in cache order (FORMAT.md §3.4: by split, train first, then by
//! length, then in dataset order), so consecutive examples have similar
//! lengths and batches need little padding.

use super::error::ExtractError;
use crate::cache::ExampleMeta;
use crate::data::Dataset;
use crate::extract::tokenize::Tokenizer;
use crate::Result;

/// Canonical split order: train, valid/validation/dev, test, then others
/// (the order of examples in a cache).
pub fn split_rank(name: &str) -> (u8, String) {
    let r = match name {
        "train" => 0,
        "valid" | "validation" | "dev" | "val" => 1,
        "test" => 2,
        _ => 3,
    };
    (r, name.to_string())
}

/// The dataset's split names in cache order ([`split_rank`]).
pub fn split_names(data: &Dataset) -> Vec<String> {
    let mut names: Vec<String> = data.report.split_counts.keys().cloned().collect();
    names.sort_by_key(|n| split_rank(n));
    names
}

/// The examples of a cache, tokenized and in cache order.
#[derive(Debug, Clone)]
pub struct CacheOrder {
    /// Split names; `ExampleMeta::split` indexes them.
    pub split_names: Vec<String>,
    /// Every example, `position` set to its place in the cache.
    pub examples: Vec<ExampleMeta>,
}

impl CacheOrder {
    /// Real tokens of all examples.
    pub fn tokens(&self) -> u64 {
        self.examples.iter().map(|e| e.len() as u64).sum()
    }
}

/// Tokenize every example of `data` and sort them into cache order. Warns
/// (through `tracing`) when no split can serve as validation split.
pub fn tokenize(data: &Dataset, tokenizer: &Tokenizer) -> Result<CacheOrder> {
    let split_names = split_names(data);
    if !split_names
        .iter()
        .any(|n| crate::data::VALID_SPLIT_NAMES.contains(&n.as_str()))
    {
        tracing::warn!(
            "the cache will have no validation split (splits: {}): sherl-fit needs one to pick the best epoch; cut one with --split train=0.8,valid=0.1,test=0.1 (add --group-column COL to keep groups together) or give --valid FILE",
            split_names.join(", ")
        );
    }
    // Tokenize on every core, each thread a consecutive slice of the
    // examples, joined back in dataset order (the result does not depend on
    // the number of threads).
    let one = |ex: &crate::data::Example| -> Result<ExampleMeta> {
        let enc = tokenizer.encode(&ex.text, ex.text_pair.as_deref())?;
        if enc.is_empty() {
            return Err(ExtractError::EmptyExample { id: ex.id.clone() }.into());
        }
        let split = split_names
            .iter()
            .position(|n| n == &ex.split)
            .expect("split names come from the examples") as u32;
        Ok(ExampleMeta {
            position: 0,
            id: ex.id.clone(),
            split,
            label: ex.label,
            type_ids: enc.type_ids.iter().map(|&t| t.min(255) as u8).collect(),
            ids: enc.ids,
            image: None,
        })
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = data.examples.len().div_ceil(threads.max(1)).max(1);
    let parts: Vec<Result<Vec<ExampleMeta>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = data
            .examples
            .chunks(per)
            .map(|part| scope.spawn(move || part.iter().map(one).collect::<Result<Vec<_>>>()))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(crate::Error::Runtime("a tokenizer thread panicked".into()))
                })
            })
            .collect()
    });
    let mut examples = Vec::with_capacity(data.examples.len());
    for p in parts {
        examples.extend(p?);
    }
    // Cache order: split, then length, then dataset order (stable sort).
    examples.sort_by_key(|e| (e.split, e.len()));
    for (p, e) in examples.iter_mut().enumerate() {
        e.position = p as u64;
    }
    Ok(CacheOrder {
        split_names,
        examples,
    })
}
