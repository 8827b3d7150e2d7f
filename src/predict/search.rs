//! `sherl-fit search`: the top K images of a split for a text query, or
//! the top K captions for an image query, with a trained retrieval run.
//!
//! The query goes through the frozen backbone the run's cache was made
//! with, as `sherl-fit predict` runs it (text: the tokenizer and the text
//! backbone's ONNX model through ONNX Runtime; an image: the recipe the
//! cache recorded and the ViT's ONNX model), then through the trained
//! tower of its kind: that part is [`crate::predict::search`], the
//! one place that composes both phases. Here: the run opened and checked
//! ([`Searcher::open`]) and the ranking ([`Searcher::rank`]): the gallery
//! is the split's cached examples of the other kind, embedded by the other
//! trained tower exactly as the run's evaluation embeds them. Scores are cosine similarities in the joint
//! space (both sides L2-normalised), highest first; ties keep cache order.
//!
//! Everything the run depends on is checked first: `config.json` is a
//! retrieval run's, `weights.safetensors` has the sha256 the run recorded,
//! both caches are where the run recorded them with the settings hash it
//! recorded, and each backbone's ONNX model, tokenizer or image
//! description and checkpoint are the ones its cache was extracted with.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use serde_json::json;

use super::checks::checked_weights;
use crate::cache::Cache;
use crate::fit::config::FitConfig;
use crate::fit::error::FitError;
use crate::fit::model::Model;
use crate::fit::params::Params;
use crate::fit::retrieval::config::RetrievalConfig;
use crate::fit::retrieval::join::{entries, join_caches};
use crate::fit::retrieval::loss::{l2_normalize, INIT_LOG_SCALE};
use crate::fit::retrieval::tables::table_column;
use crate::fit::retrieval::tower::{embed, restore, tower, Tower};
use crate::fit::run_dir;
use crate::rng::SplitMix64;
use crate::{Error, Result};

/// What to search for.
#[derive(Debug, Clone)]
pub enum Query {
    /// A caption: the hits are images.
    Text(String),
    /// An image file: the hits are captions.
    Image(PathBuf),
}

/// What `search` needs.
#[derive(Debug, Clone)]
pub struct SearchPlan {
    /// The retrieval run's directory.
    pub run: PathBuf,
    /// The image backbone the run's image cache was made from.
    pub image_backbone: PathBuf,
    /// The text backbone the run's caption cache was made from.
    pub text_backbone: PathBuf,
    /// The query.
    pub query: Query,
    /// Hits to return (at most the gallery's size).
    pub k: usize,
    /// The split whose examples are the gallery.
    pub split: String,
}

/// One hit (a JSONL line of `sherl-fit search`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Hit {
    /// 1-based rank.
    pub rank: usize,
    /// The image's id (text query) or the caption's id `<pair>#<k>`
    /// (image query).
    pub id: String,
    /// Cosine similarity with the query in the joint space.
    pub score: f64,
    /// Text query: the image file, from the table the image cache was
    /// extracted from (`null` when that table is no longer readable or
    /// changed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<Option<String>>,
    /// Image query: the pair (image id) the caption belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pair: Option<String>,
    /// Image query: the caption, from the table the caption cache was
    /// extracted from (`null` when that table is no longer readable or
    /// changed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption: Option<Option<String>>,
}

/// What `config.json` of a retrieval run records that search (and
/// `export`) needs.
pub(crate) struct RunRecord {
    pub(crate) run_id: String,
    pub(crate) fit: FitConfig,
    pub(crate) retrieval: RetrievalConfig,
    pub(crate) image_cache: (PathBuf, String),
    pub(crate) text_cache: (PathBuf, String),
}

/// `config.json` of a retrieval run, checked against the sha256 the run
/// recorded ([`run_dir::read_checked_config`]).
pub(crate) fn read_run(run: &Path) -> Result<RunRecord> {
    let (path, bytes, _) = run_dir::read_checked_config(run)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    let bad = |message: String| -> Error {
        FitError::BadRun {
            path: path.clone(),
            message,
        }
        .into()
    };
    if v["task"].as_str() != Some("retrieval") {
        return Err(bad(format!(
            "not a retrieval run (task {}): sherl-fit search needs a run of `sherl-fit run --task \
             retrieval`; label new inputs of a classifier with sherl-fit predict",
            v["task"].as_str().unwrap_or("classification")
        )));
    }
    let fit = FitConfig::from_stored(v["config"].clone())
        .map_err(|e| bad(format!("`config` is not a run's settings: {e}")))?;
    let retrieval: RetrievalConfig =
        serde_json::from_value(v["retrieval"].clone()).map_err(|e| {
            bad(format!(
                "`retrieval` is not a retrieval run's settings: {e}"
            ))
        })?;
    let cache = |key: &str| -> Result<(PathBuf, String)> {
        match (v[key]["path"].as_str(), v[key]["settings_hash"].as_str()) {
            (Some(p), Some(h)) => Ok((PathBuf::from(p), h.to_owned())),
            _ => Err(bad(format!("`{key}` records no path and settings_hash"))),
        }
    };
    Ok(RunRecord {
        run_id: v["run_id"].as_str().unwrap_or_default().to_owned(),
        fit,
        retrieval,
        image_cache: cache("image_cache")?,
        text_cache: cache("text_cache")?,
    })
}

/// Open the cache the run recorded and check it is the one it was trained on.
pub(crate) fn open_cache(
    kind: &str,
    (path, hash): &(PathBuf, String),
    run: &Path,
) -> Result<Arc<Cache>> {
    let cache = Cache::open(path).map_err(|e| FitError::BadRun {
        path: run.join(run_dir::CONFIG_FILE),
        message: format!(
            "the run's {kind} cache {} cannot be opened ({e}); search embeds its examples, so \
             it must stay where the run recorded it (a relative path is read from the \
             directory sherl-fit is started in)",
            path.display()
        ),
    })?;
    let got = &cache.manifest().settings_hash;
    if got != hash {
        return Err(FitError::BadRun {
            path: run.join(run_dir::CONFIG_FILE),
            message: format!(
                "{} is not the {kind} cache the run was trained on: its settings hash is {}, \
                 the run recorded {}",
                path.display(),
                crate::hash::abbrev(got),
                crate::hash::abbrev(hash)
            ),
        }
        .into());
    }
    Ok(Arc::new(cache))
}

/// A retrieval run opened for search: both towers with the run's weights
/// and the split's pairs.
pub struct Searcher {
    image: Tower,
    text: Tower,
    split: crate::fit::retrieval::join::SplitPairs,
    cfg: FitConfig,
    dev: Device,
}

impl Searcher {
    /// Check the run, its weights and caches and the backbones, build both
    /// towers and restore the run's weights.
    pub fn open(plan: &SearchPlan) -> Result<Searcher> {
        if plan.k == 0 {
            return Err(Error::setting("--k", "--k 0: must be at least 1"));
        }
        if let Query::Text(t) = &plan.query {
            if t.trim().is_empty() {
                return Err(Error::setting("--text", "the query text is empty"));
            }
        }
        let rec = read_run(&plan.run)?;
        let weights_path = checked_weights(&plan.run)?;
        let image_cache = open_cache("image", &rec.image_cache, &plan.run)?;
        let text_cache = open_cache("caption", &rec.text_cache, &plan.run)?;
        let joined = join_caches(&image_cache, &text_cache)?;
        let Some(split) = joined.split(&plan.split).cloned() else {
            let have: Vec<&str> = joined.splits.keys().map(String::as_str).collect();
            return Err(Error::setting(
                "--split",
                format!(
                    "--split {}: the run's caches have no pairs in it (they have {})",
                    plan.split,
                    have.join(", ")
                ),
            ));
        };
        let dev = Device::Cpu;
        let (cfg, rc) = (&rec.fit, &rec.retrieval);
        let text_seed = SplitMix64::new(cfg.seed).next_u64();
        let image = tower(
            Arc::clone(&image_cache),
            &plan.image_backbone,
            cfg,
            rc.image_method,
            rc.joint_dim,
            cfg.seed,
            &dev,
        )?;
        let text = tower(
            Arc::clone(&text_cache),
            &plan.text_backbone,
            cfg,
            rc.text_method,
            rc.joint_dim,
            text_seed,
            &dev,
        )?;
        let log_scale = Var::from_tensor(&Tensor::new(INIT_LOG_SCALE as f32, &dev)?)?;
        let weights: BTreeMap<String, Tensor> = Params::load_file(&weights_path, &dev)?;
        if !weights.contains_key("log_scale") {
            return Err(FitError::BadRun {
                path: weights_path,
                message: "not a retrieval run's weights (no log_scale)".into(),
            }
            .into());
        }
        restore(&image, &text, &log_scale, &weights, &weights_path)?;
        Ok(Searcher {
            image,
            text,
            split,
            cfg: cfg.clone(),
            dev,
        })
    }

    /// The tower a query of this kind goes through: its cache (whose
    /// backbone must run the query), model and hidden width.
    pub fn query_tower(&self, query: &Query) -> (&Cache, &Model, usize) {
        let t = match query {
            Query::Text(_) => &self.text,
            Query::Image(_) => &self.image,
        };
        (&t.cache, &t.model, t.hidden)
    }

    /// Rank the split's examples of the other kind against the query's
    /// tower output `z` (`[1, J]`, normalised here): the best `plan.k`.
    pub fn rank(&self, plan: &SearchPlan, z: &Tensor) -> Result<Vec<Hit>> {
        let query = l2_normalize(z)?;
        let (cfg, dev, split) = (&self.cfg, &self.dev, &self.split);
        let (image, text) = (&self.image, &self.text);
        let (image_cache, text_cache) = (&image.cache, &text.cache);

        let (query, gallery, ids): (Tensor, Tensor, Vec<String>) = match &plan.query {
            Query::Text(_) => {
                let g = embed(image, &split.images, cfg, dev, 1)?;
                (query, g, split.image_ids.clone())
            }
            Query::Image(_) => {
                let g = embed(text, &split.captions, cfg, dev, 1)?;
                let by_position: HashMap<u64, String> = entries(text_cache)?
                    .into_iter()
                    .map(|e| (e.position, e.id))
                    .collect();
                let ids = split
                    .captions
                    .iter()
                    .map(|p| by_position[p].clone())
                    .collect();
                (query, g, ids)
            }
        };
        let scores: Vec<f32> = gallery.matmul(&query.t()?)?.flatten_all()?.to_vec1()?;
        let mut order: Vec<usize> = (0..scores.len()).collect();
        // Highest first; a stable sort keeps cache order among equal scores.
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        order.truncate(plan.k);
        let hits = match &plan.query {
            Query::Text(_) => {
                let files = table_column(image_cache, "image");
                order
                    .iter()
                    .enumerate()
                    .map(|(r, &i)| Hit {
                        rank: r + 1,
                        id: ids[i].clone(),
                        score: f64::from(scores[i]),
                        image: Some(files.get(&ids[i]).cloned()),
                        pair: None,
                        caption: None,
                    })
                    .collect()
            }
            Query::Image(_) => {
                let captions = table_column(text_cache, "caption");
                order
                    .iter()
                    .enumerate()
                    .map(|(r, &i)| Hit {
                        rank: r + 1,
                        id: ids[i].clone(),
                        score: f64::from(scores[i]),
                        image: None,
                        pair: crate::data::paired::pair_of_caption(&ids[i]).map(str::to_owned),
                        caption: Some(captions.get(&ids[i]).cloned()),
                    })
                    .collect()
            }
        };
        Ok(hits)
    }
}

/// The JSONL line of a hit.
pub fn hit_line(h: &Hit) -> String {
    serde_json::to_string(h).expect("a hit serialises")
}

/// A JSON summary line of a search (to stderr's log).
pub fn summary(plan: &SearchPlan, hits: &[Hit]) -> serde_json::Value {
    json!({
        "run": plan.run,
        "split": plan.split,
        "query": match &plan.query {
            Query::Text(t) => json!({"text": t}),
            Query::Image(p) => json!({"image": p}),
        },
        "hits": hits.len(),
    })
}
