//! `sherl-cache merge` (FORMAT.md §1.1): combine the parts that the workers
//! of `sherl-extract run --shard-of I/N` wrote into one cache.
//!
//! Everything is checked before anything is written: every part's
//! manifest (and its checksum), that the parts belong together and cover
//! every shard once, every shard path ([`super::checked_shard_path`]: a part
//! cannot make merge read or write outside its directories), and every shard
//! against the merged manifest, as `Cache::open` will check it. The cache is
//! then assembled in a temporary directory next to `--out`, opened as a
//! reader would open it, and renamed to `--out`. A merge that fails (or is
//! refused) leaves nothing behind, so it can simply be retried.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::error::CacheError;
use super::manifest::{Manifest, ShardInfo, MANIFEST, PART_MANIFEST};
use super::{checked_shard_path, shard_file_name, Cache, FORMAT_VERSION};
pub use crate::error::cache::MergeError;
use crate::hash::abbrev;
use crate::{Error, Result};

/// What a merge produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeSummary {
    /// The new cache directory.
    pub cache: PathBuf,
    /// Parts merged.
    pub parts: usize,
    /// Shards in the cache.
    pub shards: usize,
    /// Examples in the cache.
    pub examples: u64,
    /// Real tokens in the cache.
    pub tokens: u64,
}

/// Read the manifest of the worker part at `dir`, saying what the directory
/// is when it is not a part.
fn read_part(dir: &Path) -> Result<Manifest> {
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "worker part directory not found",
            ),
        ));
    }
    let path = dir.join(PART_MANIFEST);
    let not_a_part = |why: String| Error::Cache {
        path: dir.to_path_buf(),
        source: CacheError::NotAPart(why),
    };
    if !path.exists() {
        return Err(not_a_part(if dir.join(MANIFEST).exists() {
            format!(
                "this is a complete cache (it has {MANIFEST}), not a worker part: merge combines the directories `sherl-extract run --shard-of I/N` writes (each with {PART_MANIFEST}); a complete cache needs no merging"
            )
        } else {
            format!(
                "no {PART_MANIFEST}: not a finished worker part (finish an interrupted worker with `sherl-extract run --resume`)"
            )
        }));
    }
    let m = Manifest::read(&path)?;
    if m.worker.is_none() {
        return Err(not_a_part(format!(
            "{PART_MANIFEST} has no worker information"
        )));
    }
    Ok(m)
}

/// A merge refusal concerning `path`.
fn refused(path: &Path, e: MergeError) -> Error {
    Error::Cache {
        path: path.to_path_buf(),
        source: CacheError::Merge(e),
    }
}

/// Merge the worker parts `parts` into a new cache at `out` (absent, or an
/// empty directory). On error nothing is left on disk.
pub fn merge(parts: &[PathBuf], out: &Path) -> Result<MergeSummary> {
    let Some(first_dir) = parts.first() else {
        return Err(refused(out, MergeError::NoParts));
    };
    // --- Every part's manifest, and that they belong together --------------
    let mut manifests = Vec::with_capacity(parts.len());
    for p in parts {
        manifests.push(read_part(p)?);
    }
    let by_index = index_shards(parts, &manifests, out)?;
    let first = &manifests[0];
    check_coverage(first_dir, first, &by_index, out)?;

    // --- The merged manifest, checked against every shard -----------------
    let m = merged_manifest(first, &by_index);
    let sources: Vec<PathBuf> = by_index
        .values()
        .map(|(dir, s)| dir.join(shard_file_name(s.index)))
        .collect();
    Cache::assemble(out, &first_dir.join(PART_MANIFEST), m.clone(), |k, _| {
        Ok(sources[k].clone())
    })?;

    let (shards, examples, tokens) = write_out(out, &m, &sources)?;
    Ok(MergeSummary {
        cache: out.to_path_buf(),
        parts: parts.len(),
        shards,
        examples,
        tokens,
    })
}

/// Shard index -> (part directory, shard).
type ShardIndex<'a> = BTreeMap<u32, (&'a PathBuf, &'a ShardInfo)>;

/// Check that the parts (`manifests`, read from `parts`) belong together,
/// each worker once and each shard once in its own worker's part, and
/// index their shards.
fn index_shards<'a>(
    parts: &'a [PathBuf],
    manifests: &'a [Manifest],
    out: &Path,
) -> Result<ShardIndex<'a>> {
    let first_dir = &parts[0];
    let first = &manifests[0];
    let w0 = first.worker.expect("read_part checked it");
    if w0.count == 0 {
        return Err(part_error(first_dir, "its worker count is 0".into()));
    }
    let first_value = serde_json::to_value(first).expect("a manifest serializes");
    let mut seen_workers: BTreeMap<u32, &PathBuf> = BTreeMap::new();
    let mut by_index = ShardIndex::new();
    for (dir, m) in parts.iter().zip(manifests) {
        check_agrees(dir, m, first_dir, first, &first_value)?;
        let w = m.worker.expect("read_part checked it");
        if w.count != w0.count {
            return Err(refused(
                dir,
                MergeError::WorkerCount {
                    count: w.count,
                    first: first_dir.clone(),
                    first_count: w0.count,
                },
            ));
        }
        if w.index >= w.count {
            return Err(part_error(
                dir,
                format!("worker index {} of {} parts", w.index, w.count),
            ));
        }
        if let Some(other) = seen_workers.insert(w.index, dir) {
            return Err(refused(
                dir,
                MergeError::DuplicateWorker {
                    index: w.index,
                    other: other.clone(),
                },
            ));
        }
        for s in &m.shards {
            // The path a part lists must be its own shard file: refuse it
            // before anything is opened or written.
            checked_shard_path(dir, &dir.join(PART_MANIFEST), u64::from(s.index), &s.file)?;
            if s.index % w.count != w.index {
                return Err(part_error(
                    dir,
                    format!(
                        "it lists shard {}, which belongs to worker {} of {}",
                        s.index,
                        s.index % w.count,
                        w.count
                    ),
                ));
            }
            if let Some((other, _)) = by_index.insert(s.index, (dir, s)) {
                return Err(refused(
                    dir,
                    MergeError::DuplicateShard {
                        shard: s.index,
                        other: other.clone(),
                    },
                ));
            }
        }
    }
    if seen_workers.len() != w0.count as usize {
        let missing: Vec<String> = (0..w0.count)
            .filter(|i| !seen_workers.contains_key(i))
            .take(20)
            .map(|i| i.to_string())
            .collect();
        return Err(refused(
            out,
            MergeError::MissingWorkers {
                missing: missing.join(", "),
                count: w0.count,
            },
        ));
    }
    Ok(by_index)
}

/// Check that the part at `dir` has the first part's settings hash and the
/// same whole-cache fields (`first_value` is the first manifest as JSON).
fn check_agrees(
    dir: &Path,
    m: &Manifest,
    first_dir: &Path,
    first: &Manifest,
    first_value: &serde_json::Value,
) -> Result<()> {
    if m.settings_hash != first.settings_hash {
        return Err(refused(
            dir,
            MergeError::DifferentSettings {
                first: first_dir.to_path_buf(),
                hash: abbrev(&m.settings_hash).to_string(),
                first_hash: abbrev(&first.settings_hash).to_string(),
            },
        ));
    }
    // The fields that describe the whole cache must agree too.
    let v = serde_json::to_value(m).expect("a manifest serializes");
    for key in [
        "settings",
        "backbone",
        "dataset",
        "labels",
        "split_names",
        "splits",
    ] {
        if v.get(key) != first_value.get(key) {
            return Err(refused(
                dir,
                MergeError::Disagree {
                    first: first_dir.to_path_buf(),
                    key,
                },
            ));
        }
    }
    Ok(())
}

/// Check that the shards in `by_index` are exactly those of the whole cache
/// (its size from the split counts of `first`, the part at `first_dir`).
fn check_coverage(
    first_dir: &Path,
    first: &Manifest,
    by_index: &ShardIndex,
    out: &Path,
) -> Result<()> {
    // The whole cache's size, from the split counts every part carries
    // (each part's own `examples` covers only its shards).
    let total = first
        .splits
        .values()
        .try_fold(0u64, |a, &b| a.checked_add(b))
        .ok_or_else(|| part_error(first_dir, "its split counts overflow".into()))?;
    let per_shard = first.settings.examples_per_shard;
    if per_shard == 0 {
        return Err(part_error(
            first_dir,
            "settings.examples_per_shard is 0".into(),
        ));
    }
    let n_shards = total.div_ceil(per_shard);
    if let Some(k) =
        (0..n_shards).find(|&k| u32::try_from(k).map_or(true, |k| !by_index.contains_key(&k)))
    {
        return Err(refused(out, MergeError::MissingShard(k)));
    }
    if let Some(k) = by_index.keys().find(|&&k| u64::from(k) >= n_shards) {
        return Err(refused(
            out,
            MergeError::ShardBeyond {
                shard: *k,
                shards: n_shards,
            },
        ));
    }
    Ok(())
}

/// The whole cache's manifest: `first`'s, with every part's shards and
/// their totals, no worker and a new creation time.
fn merged_manifest(first: &Manifest, by_index: &ShardIndex) -> Manifest {
    let mut m = first.clone();
    m.format_version = FORMAT_VERSION;
    m.manifest_sha256 = None;
    m.worker = None;
    m.shards = by_index.values().map(|(_, s)| (*s).clone()).collect();
    m.examples = m
        .shards
        .iter()
        .fold(0u64, |a, s| a.saturating_add(s.examples));
    m.tokens = m
        .shards
        .iter()
        .fold(0u64, |a, s| a.saturating_add(s.tokens));
    m.created_at = super::manifest::now_rfc3339();
    m
}

/// Check `--out`, then build the cache in a temporary directory next to it
/// and rename it there ([`build`]); on error remove the temporary directory
/// and the parent directories made for it. A symbolic link `--out` is
/// followed ([`output_dir`]); temporaries of earlier merges whose process
/// is gone are removed first. Returns (shards, examples, tokens).
fn write_out(out: &Path, m: &Manifest, sources: &[PathBuf]) -> Result<(usize, u64, u64)> {
    let out = &output_dir(out)?;
    check_out(out)?;
    let name = out
        .file_name()
        .ok_or_else(|| refused(out, MergeError::OutNoName))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Parent directories merge creates are removed again if it fails.
    let created = first_missing_ancestor(&parent);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    // A merge killed before its rename leaves its temporary directory
    // (`.<out>.merge.<pid>.tmp`, as big as the cache when shards were
    // copied): remove those whose process is gone, saying so.
    for stale in crate::fsutil::remove_stale_temporaries(&parent, &name.to_string_lossy())? {
        tracing::warn!(
            "removed {}, left by an earlier merge that did not finish (its process is gone)",
            stale.display()
        );
    }
    let tmp = parent.join(format!(
        ".{}.merge.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = build(&tmp, out, m, sources);
    if result.is_err() {
        // Best effort: the error being returned is the one that matters.
        for dir in std::iter::once(&tmp).chain(created.as_ref()) {
            if dir.exists() {
                if let Err(e) = std::fs::remove_dir_all(dir) {
                    tracing::warn!("could not remove {}: {e}", dir.display());
                }
            }
        }
    }
    result
}

/// The directory `--out` names: `out` itself, or, when it is a symbolic
/// link, the directory it leads to. The cache is built next to that
/// directory and renamed onto it, so it lands where the link points (on
/// the link target's filesystem) and the link stays a link; renaming onto
/// the link itself would replace the link and leave its target empty.
/// A link leading nowhere is refused, naming its target.
pub(super) fn output_dir(out: &Path) -> Result<PathBuf> {
    let is_link = std::fs::symlink_metadata(out).is_ok_and(|m| m.file_type().is_symlink());
    if !is_link {
        return Ok(out.to_path_buf());
    }
    std::fs::canonicalize(out).map_err(|e| {
        let target = std::fs::read_link(out)
            .map(|t| t.display().to_string())
            .unwrap_or_else(|_| "?".to_owned());
        Error::io(
            out,
            std::io::Error::new(
                e.kind(),
                format!(
                    "a symbolic link to {target}, which cannot be followed ({e}); \
                     create the directory it names or give another --out"
                ),
            ),
        )
    })
}

/// A manifest error about the part at `dir`.
fn part_error(dir: &Path, why: String) -> Error {
    Error::Cache {
        path: dir.join(PART_MANIFEST),
        source: CacheError::BadManifest(why),
    }
}

/// `--out` (a symbolic link already followed by [`output_dir`]) must not
/// exist, or be an empty directory.
fn check_out(out: &Path) -> Result<()> {
    match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(out, e)),
        Ok(md) if md.is_dir() => {
            let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
            if entries.next().is_some() {
                Err(refused(out, MergeError::OutNotEmpty))
            } else {
                Ok(())
            }
        }
        Ok(_) => Err(refused(out, MergeError::OutNotADirectory)),
    }
}

/// The outermost directory of `dir`'s ancestry (itself included) that does
/// not exist yet, if any.
fn first_missing_ancestor(dir: &Path) -> Option<PathBuf> {
    let mut missing = None;
    for a in dir.ancestors() {
        if a.as_os_str().is_empty() || a.exists() {
            break;
        }
        missing = Some(a.to_path_buf());
    }
    missing
}

/// Write the cache into `tmp`, open it as a reader, and rename it to `out`.
/// Returns (shards, examples, tokens).
fn build(tmp: &Path, out: &Path, m: &Manifest, sources: &[PathBuf]) -> Result<(usize, u64, u64)> {
    let shards_dir = tmp.join("shards");
    std::fs::create_dir(tmp).map_err(|e| Error::io(tmp, e))?;
    std::fs::create_dir(&shards_dir).map_err(|e| Error::io(&shards_dir, e))?;
    for (s, src) in m.shards.iter().zip(sources) {
        let dst = tmp.join(shard_file_name(s.index));
        // Link the file itself, not a symlink to it.
        let real = std::fs::canonicalize(src).map_err(|e| Error::io(src, e))?;
        if std::fs::hard_link(&real, &dst).is_err() {
            std::fs::copy(&real, &dst).map_err(|e| Error::io(&dst, e))?;
            crate::fsutil::open_regular(&dst)?
                .sync_all()
                .map_err(|e| Error::io(&dst, e))?;
        }
    }
    crate::fsutil::sync_dir(&shards_dir)?;
    m.write(&tmp.join(MANIFEST))?;
    // Open it as a reader would, so a bad merge never looks like a cache.
    let cache = Cache::open(tmp)?;
    let summary = (
        cache.manifest().shards.len(),
        cache.manifest().examples,
        cache.manifest().tokens,
    );
    drop(cache);
    std::fs::rename(tmp, out).map_err(|e| Error::io(out, e))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        crate::fsutil::sync_dir(parent)?;
    }
    Ok(summary)
}
