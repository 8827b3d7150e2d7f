//! `examples.json` of a retrieval run: a few text queries of the test
//! split, each with its top images under the best weights (written by
//! [`super::train`], drawn by `sherl-fit report`).

use std::collections::HashMap;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::join::SplitPairs;
use super::tower::{embed, Tower};
use crate::fit::config::FitConfig;
use crate::Result;

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
pub(super) fn query_examples(
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
