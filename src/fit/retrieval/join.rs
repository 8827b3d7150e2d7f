//! The join of an image cache and a caption cache by id, at training time.
//!
//! Image examples are pairs (their id is the pair id); caption examples
//! have ids `<pair id>#<k>` ([`crate::data::paired::caption_id`]). The join
//! refuses, naming the first mismatch in cache order: an image id twice, a
//! caption id twice or not of that form, a caption whose pair the image
//! cache does not hold, a caption in another split than its image, and an
//! image without a caption (the counts then cannot match).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::cache::Cache;
use crate::data::paired::pair_of_caption;
use crate::fit::error::FitError;
use crate::Result;

/// One example of a cache, as the join sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in its cache.
    pub position: u64,
    /// Id.
    pub id: String,
    /// Split name.
    pub split: String,
}

/// The pairs of one split.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitPairs {
    /// Image cache positions, in cache order.
    pub images: Vec<u64>,
    /// Image (pair) ids, as `images`.
    pub image_ids: Vec<String>,
    /// Caption cache positions, in cache order.
    pub captions: Vec<u64>,
    /// For each caption, its image's index in `images`.
    pub owner: Vec<usize>,
    /// For each image, its captions' indices in `captions`.
    pub captions_of: Vec<Vec<usize>>,
}

/// The joined caches: the pairs of each split.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Joined {
    /// Split name -> its pairs.
    pub splits: BTreeMap<String, SplitPairs>,
}

impl Joined {
    /// The pairs of split `name`, if it has any.
    pub fn split(&self, name: &str) -> Option<&SplitPairs> {
        self.splits.get(name).filter(|s| !s.images.is_empty())
    }
}

/// Join `images` (from `image_cache`) and `captions` (from `text_cache`),
/// both in cache order; the paths only name the caches in messages.
pub fn join(
    images: &[Entry],
    captions: &[Entry],
    image_cache: &Path,
    text_cache: &Path,
) -> Result<Joined> {
    let refuse = |m: String| Err(FitError::cache_lacks(format!("retrieval join: {m}")));
    let (ic, tc) = (image_cache.display(), text_cache.display());
    let mut joined = Joined::default();
    // pair id -> (split name, index within the split)
    let mut index: HashMap<&str, (&str, usize, u64)> = HashMap::new();
    for e in images {
        if let Some((_, _, first)) = index.get(e.id.as_str()) {
            return refuse(format!(
                "image id {} appears twice in the image cache {ic} (positions {first} and {})",
                e.id, e.position
            ));
        }
        let s = joined.splits.entry(e.split.clone()).or_default();
        index.insert(&e.id, (&e.split, s.images.len(), e.position));
        s.images.push(e.position);
        s.image_ids.push(e.id.clone());
        s.captions_of.push(Vec::new());
    }
    let mut seen: HashMap<&str, u64> = HashMap::new();
    for c in captions {
        if let Some(first) = seen.insert(&c.id, c.position) {
            return refuse(format!(
                "caption id {} appears twice in the text cache {tc} (positions {first} and {})",
                c.id, c.position
            ));
        }
        let Some(pair) = pair_of_caption(&c.id) else {
            return refuse(format!(
                "caption id {} (position {} of the text cache {tc}) is not <pair id>#<k>; \
                 write the caption table with `sherl-extract pairs` or give captions such ids",
                c.id, c.position
            ));
        };
        let Some(&(split, i, ipos)) = index.get(pair) else {
            return refuse(format!(
                "caption {} (position {} of the text cache {tc}) belongs to pair {pair}, \
                 which the image cache {ic} does not hold",
                c.id, c.position
            ));
        };
        if split != c.split {
            return refuse(format!(
                "caption {} is in split {} of the text cache {tc}, but its image {pair} \
                 (position {ipos}) is in split {split} of the image cache {ic}; extract both \
                 from the per-split tables `sherl-extract pairs` writes",
                c.id, c.split
            ));
        }
        let s = joined
            .splits
            .get_mut(split)
            .expect("the image's split exists");
        s.captions_of[i].push(s.captions.len());
        s.owner.push(i);
        s.captions.push(c.position);
    }
    for e in images {
        let s = &joined.splits[&e.split];
        let (_, i, _) = index[e.id.as_str()];
        if s.captions_of[i].is_empty() {
            return refuse(format!(
                "image {} (split {}, position {} of the image cache {ic}) has no caption in \
                 the text cache {tc}",
                e.id, e.split, e.position
            ));
        }
    }
    Ok(joined)
}

/// Every example of `cache` (ids and splits; no layer is decoded).
pub fn entries(cache: &Cache) -> Result<Vec<Entry>> {
    let names = &cache.manifest().split_names;
    let mut out = Vec::with_capacity(cache.manifest().examples as usize);
    for id in 0..cache.chunks().len() {
        for m in cache.read_chunk(id, &[])?.meta {
            let split = names.get(m.split as usize).cloned().ok_or_else(|| {
                FitError::cache_lacks(format!(
                    "{}: example {} has split id {} beyond the manifest's {} names",
                    cache.dir().display(),
                    m.id,
                    m.split,
                    names.len()
                ))
            })?;
            out.push(Entry {
                position: m.position,
                id: m.id,
                split,
            });
        }
    }
    Ok(out)
}

/// Join two opened caches: `image` must hold images and `text` text.
pub fn join_caches(image: &Cache, text: &Cache) -> Result<Joined> {
    if image.manifest().image.is_none() {
        return Err(FitError::cache_lacks(format!(
            "--image-cache {} holds text, not images",
            image.dir().display()
        )));
    }
    if text.manifest().image.is_some() {
        return Err(FitError::cache_lacks(format!(
            "--text-cache {} holds images, not text",
            text.dir().display()
        )));
    }
    join(&entries(image)?, &entries(text)?, image.dir(), text.dir())
}
