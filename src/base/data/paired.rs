//! Paired image-caption data for image-text retrieval: [`Pair`]s (pair id,
//! image file, one or more captions, group), read from the emoji package
//! ([`emoji_pairs`]), split by group ([`split_pairs`]: no group in two
//! splits) and written as two tables per split ([`write_tables`]) that
//! `sherl-extract run` reads as any other dataset: images through an image
//! backbone, captions through a text backbone, into two caches that
//! `sherl-fit run --task retrieval` joins by id.
//!
//! The join key is in the ids: an image row's id is the pair id, and a
//! caption row's id is `<pair id>#<k>` (`k` = 0, 1, ... the caption's
//! number within its pair), see [`caption_id`] and [`pair_of_caption`].
//! The splits are decided here, once, and written as separate files
//! (`images-<split>.csv`, `captions-<split>.csv`) for `--train`/`--valid`/
//! `--test`: `--split` on two tables with different row counts per group
//! could cut them differently.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use super::split::{assign, SplitSpec};
use crate::rng::SplitMix64;
use crate::{Error, Result};

/// One image with its captions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// Pair id (the image row's id; no `#`-free rule, any text).
    pub id: String,
    /// The image file.
    pub image: PathBuf,
    /// One or more captions, distinct.
    pub captions: Vec<String>,
    /// The unit of the split: pairs of one group land in one split.
    pub group: String,
}

/// The id of caption `k` of pair `pair`: `<pair>#<k>`.
pub fn caption_id(pair: &str, k: usize) -> String {
    format!("{pair}#{k}")
}

/// The pair id of a caption id `<pair>#<k>`, or `None` when the id does not
/// end with `#` and a number.
pub fn pair_of_caption(id: &str) -> Option<&str> {
    let (pair, k) = id.rsplit_once('#')?;
    (!k.is_empty() && k.bytes().all(|b| b.is_ascii_digit())).then_some(pair)
}

#[derive(serde::Deserialize)]
struct EmojiEntry {
    #[serde(default)]
    name: Option<String>,
    unified: String,
    image: String,
    #[serde(default)]
    short_names: Vec<String>,
    #[serde(default)]
    has_img_google: bool,
}

/// The emoji package's pairs (`pipelines/fetch-assets.sh emoji`, the
/// directory holding `emoji.json` and `img/google/64/`): one pair per emoji
/// with a Google image, in the file's order; id and group the code points
/// (`unified`, e.g. `1F41E`); captions the lower-cased name ("lady
/// beetle") and each short name with `_` read as a space ("ladybug", "lady
/// beetle" once), duplicates dropped. An emoji whose image is missing, or
/// that has no caption, is an error naming it.
pub fn emoji_pairs(dir: &Path) -> Result<Vec<Pair>> {
    let path = dir.join("emoji.json");
    // emoji.json is about 1 MB (the package's whole list).
    let entries: Vec<EmojiEntry> = crate::fsutil::read_json(&path)?;
    let mut seen = HashSet::new();
    let mut pairs = Vec::new();
    for (n, e) in entries.into_iter().enumerate() {
        if !e.has_img_google {
            continue;
        }
        let bad = |message: String| Error::Dataset {
            path: path.clone(),
            message: format!("entry {n} ({}): {message}", e.unified),
        };
        if !seen.insert(e.unified.clone()) {
            return Err(bad("the code points appear twice".into()));
        }
        let image = dir.join("img/google/64").join(&e.image);
        if !image.is_file() {
            return Err(bad(format!("its image {} is missing", image.display())));
        }
        let mut captions: Vec<String> = Vec::new();
        let candidates = e
            .name
            .iter()
            .map(|s| s.to_lowercase())
            .chain(e.short_names.iter().map(|s| s.replace('_', " ")));
        for c in candidates {
            let c = c.trim().to_string();
            if !c.is_empty() && !captions.contains(&c) {
                captions.push(c);
            }
        }
        if captions.is_empty() {
            return Err(bad("no name and no short name".into()));
        }
        pairs.push(Pair {
            id: e.unified.clone(),
            image,
            captions,
            group: e.unified,
        });
    }
    Ok(pairs)
}

/// A seeded subset of `n` pairs (all if there are fewer), in their order.
pub fn subset(pairs: Vec<Pair>, n: usize, seed: u64) -> Vec<Pair> {
    if n >= pairs.len() {
        return pairs;
    }
    let mut idx: Vec<usize> = (0..pairs.len()).collect();
    SplitMix64::new(seed).shuffle_unbiased(&mut idx);
    let mut keep: Vec<usize> = idx[..n].to_vec();
    keep.sort_unstable();
    let mut slots: Vec<Option<Pair>> = pairs.into_iter().map(Some).collect();
    keep.into_iter().filter_map(|i| slots[i].take()).collect()
}

/// The split name of each pair: the groups are the units of
/// [`SplitSpec`]'s seeded cut (the same rule as `--split --group-column`),
/// sized by their pairs.
pub fn split_pairs(pairs: &[Pair], spec: &SplitSpec) -> Result<Vec<String>> {
    let groups: Vec<&str> = pairs.iter().map(|p| p.group.as_str()).collect();
    let idx = assign(spec, Some(&groups), pairs.len()).map_err(|m| Error::setting("--split", m))?;
    Ok(idx
        .into_iter()
        .map(|s| spec.fractions[s].0.clone())
        .collect())
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// What [`write_tables`] wrote for one split.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SplitTables {
    /// Split name.
    pub split: String,
    /// `images-<split>.csv`: `id,image,group`.
    pub images: PathBuf,
    /// `captions-<split>.csv`: `id,caption,pair,group`.
    pub captions: PathBuf,
    /// Pairs (images) in the split.
    pub pairs: usize,
    /// Captions in the split.
    pub caption_rows: usize,
}

/// Write `images-<split>.csv` (`id,image,group`; absolute image paths) and
/// `captions-<split>.csv` (`id,caption,pair,group`; ids [`caption_id`])
/// into `out` for each split of `splits` (one name per pair), splits in
/// `order`. Refuses a pair id that repeats or holds a line break.
pub fn write_tables(
    pairs: &[Pair],
    splits: &[String],
    order: &[String],
    out: &Path,
) -> Result<Vec<SplitTables>> {
    let mut ids = HashSet::new();
    for p in pairs {
        if !ids.insert(p.id.as_str()) {
            return Err(Error::setting(
                "pairs",
                format!("pair id {} appears twice", p.id),
            ));
        }
        if p.id.contains(['\n', '\r']) || p.id.is_empty() {
            return Err(Error::setting(
                "pairs",
                format!("pair id {:?} is empty or holds a line break", p.id),
            ));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut by_split: BTreeMap<&str, Vec<&Pair>> = BTreeMap::new();
    for (p, s) in pairs.iter().zip(splits) {
        by_split.entry(s.as_str()).or_default().push(p);
    }
    let mut written = Vec::new();
    for name in order {
        let members = by_split.get(name.as_str()).cloned().unwrap_or_default();
        let images = out.join(format!("images-{name}.csv"));
        let captions = out.join(format!("captions-{name}.csv"));
        let mut img = String::from("id,image,group\n");
        let mut cap = String::from("id,caption,pair,group\n");
        let mut rows = 0;
        for p in &members {
            let path = std::path::absolute(&p.image).map_err(|e| Error::io(&p.image, e))?;
            img.push_str(&format!(
                "{},{},{}\n",
                csv_field(&p.id),
                csv_field(&path.to_string_lossy()),
                csv_field(&p.group)
            ));
            for (k, c) in p.captions.iter().enumerate() {
                cap.push_str(&format!(
                    "{},{},{},{}\n",
                    csv_field(&caption_id(&p.id, k)),
                    csv_field(c),
                    csv_field(&p.id),
                    csv_field(&p.group)
                ));
                rows += 1;
            }
        }
        for (path, text) in [(&images, &img), (&captions, &cap)] {
            crate::fsutil::write_atomic(path, text.as_bytes())?;
        }
        written.push(SplitTables {
            split: name.clone(),
            images,
            captions,
            pairs: members.len(),
            caption_rows: rows,
        });
    }
    Ok(written)
}

/// Code points in a form both emoji packages share: upper case, without the
/// variation selector `FE0F` (Google's `unified` keeps it in places where
/// OpenMoji's `hexcode` does not, and the reverse).
pub fn code_key(code: &str) -> String {
    code.to_uppercase()
        .split('-')
        .filter(|p| *p != "FE0F")
        .collect::<Vec<_>>()
        .join("-")
}

/// The colour SVGs of a fetched OpenMoji folder (`fetch-assets.sh
/// openmoji`: `color/svg/<HEXCODE>.svg`) by [`code_key`].
pub fn openmoji_svgs(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let svg_dir = dir.join("color/svg");
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(&svg_dir).map_err(|e| Error::io(&svg_dir, e))? {
        let path = e.map_err(|e| Error::io(&svg_dir, e))?.path();
        if path.extension().and_then(|x| x.to_str()) != Some("svg") {
            continue;
        }
        if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
            out.insert(code_key(stem), path.clone());
        }
    }
    Ok(out)
}

/// Rasterise the SVG `svg` to a `size` x `size` RGBA PNG at `out`: its view
/// box scaled to fit and centred, on a transparent background (the image
/// reader composites alpha as for any PNG). A file that is not a usable SVG
/// is an error naming it.
#[cfg(feature = "svg")]
pub fn rasterise_svg(svg: &Path, size: u32, out: &Path) -> Result<()> {
    use resvg::{tiny_skia, usvg};
    let bad = |path: &Path, message: String| Error::Dataset {
        path: path.to_path_buf(),
        message,
    };
    let data = crate::fsutil::read_bounded(svg, crate::fsutil::SMALL_FILE_LIMIT)?;
    let tree = usvg::Tree::from_data(&data, &usvg::Options::default())
        .map_err(|e| bad(svg, format!("not a usable SVG: {e}")))?;
    let mut pixmap = tiny_skia::Pixmap::new(size, size)
        .ok_or_else(|| bad(out, format!("cannot make a {size}x{size} picture")))?;
    let s = tree.size();
    let scale = size as f32 / s.width().max(s.height());
    let (tx, ty) = (
        (size as f32 - s.width() * scale) / 2.0,
        (size as f32 - s.height() * scale) / 2.0,
    );
    resvg::render(
        &tree,
        tiny_skia::Transform::from_row(scale, 0.0, 0.0, scale, tx, ty),
        &mut pixmap.as_mut(),
    );
    let mut rgba = Vec::with_capacity((size * size * 4) as usize);
    for p in pixmap.pixels() {
        let c = p.demultiply();
        rgba.extend([c.red(), c.green(), c.blue(), c.alpha()]);
    }
    let img = image::RgbaImage::from_raw(size, size, rgba)
        .ok_or_else(|| bad(out, "picture size mismatch".into()))?;
    img.save(out)
        .map_err(|e| bad(out, format!("cannot write the PNG: {e}")))
}

/// The cross-style test: every pair of split `test` gets its image from
/// OpenMoji (`openmoji`, matched by [`code_key`] of the pair id) instead,
/// rasterised to `out/openmoji-<size>/<id>.png`; a pair of that split
/// without an OpenMoji drawing is dropped (with its split entry). The
/// other splits keep their images, so the model is tested on emoji it never
/// saw, drawn in a style it never saw. Returns (replaced, dropped).
#[cfg(feature = "svg")]
pub fn cross_style(
    pairs: &mut Vec<Pair>,
    splits: &mut Vec<String>,
    test: &str,
    openmoji: &Path,
    out: &Path,
    size: u32,
) -> Result<(usize, usize)> {
    let svgs = openmoji_svgs(openmoji)?;
    let png_dir = out.join(format!("openmoji-{size}"));
    std::fs::create_dir_all(&png_dir).map_err(|e| Error::io(&png_dir, e))?;
    let (mut replaced, mut dropped) = (0, 0);
    let mut kept_pairs = Vec::with_capacity(pairs.len());
    let mut kept_splits = Vec::with_capacity(splits.len());
    for (mut p, s) in std::mem::take(pairs)
        .into_iter()
        .zip(std::mem::take(splits))
    {
        if s == test {
            let Some(svg) = svgs.get(&code_key(&p.id)) else {
                dropped += 1;
                continue;
            };
            let png = png_dir.join(format!("{}.png", code_key(&p.id)));
            rasterise_svg(svg, size, &png)?;
            p.image = png;
            replaced += 1;
        }
        kept_pairs.push(p);
        kept_splits.push(s);
    }
    *pairs = kept_pairs;
    *splits = kept_splits;
    Ok((replaced, dropped))
}
/// `sherl-extract pairs`: the paired image/caption tables of the emoji
/// package in `emoji` written to `out` (`images-<split>.csv` and
/// `captions-<split>.csv` per split, split by emoji with `split` and
/// `seed`), optionally a seeded subset of `limit` emoji, and with
/// `openmoji` the test split's images replaced by OpenMoji's drawings
/// (rasterised to `out/openmoji-64/`). Returns the one-line JSON summary.
#[cfg(feature = "svg")]
pub fn prepare_emoji_tables(
    emoji: &Path,
    out: &Path,
    split: &str,
    seed: u64,
    limit: Option<usize>,
    openmoji: Option<&Path>,
) -> Result<serde_json::Value> {
    let spec = crate::data::SplitSpec::parse(split, seed)?;
    let mut all = emoji_pairs(emoji)?;
    let total = all.len();
    if let Some(n) = limit {
        all = subset(all, n, seed);
    }
    let mut splits = split_pairs(&all, &spec)?;
    let order: Vec<String> = spec.fractions.iter().map(|(n, _)| n.clone()).collect();
    let cross = match openmoji {
        Some(dir) => {
            let test = order.last().cloned().unwrap_or_default();
            let (replaced, dropped) = cross_style(&mut all, &mut splits, &test, dir, out, 64)?;
            Some(
                serde_json::json!({"split": test, "openmoji_images": replaced, "dropped": dropped}),
            )
        }
        None => None,
    };
    let written = write_tables(&all, &splits, &order, out)?;
    let line = serde_json::json!({
        "cross_style": cross,
        "emoji": emoji,
        "pairs": all.len(),
        "of": total,
        "captions": all.iter().map(|p| p.captions.len()).sum::<usize>(),
        "splits": written,
    });
    Ok(line)
}
