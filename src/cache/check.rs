//! FORMAT.md §8.1, §8.2: the checks of a manifest against itself and of
//! each shard's header against the manifest, run by [`super::Cache::open`]
//! and by `merge` before anything is written.

use super::error::CacheError;
use super::{format, manifest, Manifest};

/// FORMAT.md §8.1: the manifest's own consistency, before any shard is
/// opened: every count sums without overflow and agrees, split names are
/// distinct and name every split counted, stored layers are distinct hidden
/// states of the backbone.
pub(super) fn check_manifest(m: &Manifest) -> std::result::Result<(), CacheError> {
    let bad = |what: String| Err(CacheError::BadManifest(what));
    let s = &m.settings;
    if s.chunk_size == 0 || s.examples_per_shard == 0 || s.max_len == 0 || m.backbone.hidden == 0 {
        return bad(
            "settings.chunk_size, settings.examples_per_shard, settings.max_len and backbone.hidden must be positive".into(),
        );
    }
    if s.layers.is_empty() {
        return bad("settings.layers is empty".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for &l in &s.layers {
        if l > m.backbone.num_layers {
            return bad(format!(
                "settings.layers holds {l}, but the backbone has hidden_states.0..={}",
                m.backbone.num_layers
            ));
        }
        if !seen.insert(l) {
            return bad(format!("settings.layers holds {l} twice"));
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for n in &m.split_names {
        if !names.insert(n) {
            return bad(format!("split_names holds {n:?} twice"));
        }
    }
    if let Some(n) = m.splits.keys().find(|n| !names.contains(n)) {
        return bad(format!("splits counts {n:?}, which is not in split_names"));
    }
    fn sum(mut it: impl Iterator<Item = u64>, what: &str) -> std::result::Result<u64, CacheError> {
        it.try_fold(0u64, |a, b| a.checked_add(b))
            .ok_or_else(|| CacheError::BadManifest(format!("{what} overflow when summed")))
    }
    let split_total = sum(m.splits.values().copied(), "splits")?;
    let examples = sum(m.shards.iter().map(|x| x.examples), "shards[].examples")?;
    let tokens = sum(m.shards.iter().map(|x| x.tokens), "shards[].tokens")?;
    let mismatch = |field: &str, manifest: u64, shards: String| {
        Err(CacheError::ManifestMismatch {
            field: field.into(),
            manifest: manifest.to_string(),
            shard: shards,
        })
    };
    if examples != m.examples {
        return mismatch(
            "examples",
            m.examples,
            format!("{examples} (sum over shards)"),
        );
    }
    if split_total != m.examples {
        return mismatch(
            "examples",
            m.examples,
            format!("{split_total} (sum over splits)"),
        );
    }
    if tokens != m.tokens {
        return mismatch("tokens", m.tokens, format!("{tokens} (sum over shards)"));
    }
    Ok(())
}

pub(super) fn check_shard_against_manifest(
    m: &Manifest,
    info: &manifest::ShardInfo,
    h: &format::Header,
    position: usize,
    expect_first: u64,
) -> std::result::Result<(), CacheError> {
    if h.format_version > m.format_version {
        return Err(CacheError::ManifestMismatch {
            field: "format_version".into(),
            manifest: m.format_version.to_string(),
            shard: format!(
                "{} (a shard is never newer than its manifest)",
                h.format_version
            ),
        });
    }
    let image_shard = h.format_version == format::IMAGE_SHARD_FORMAT_VERSION;
    if image_shard != m.image.is_some() {
        return Err(CacheError::ManifestMismatch {
            field: "image".into(),
            manifest: if m.image.is_some() {
                "an image cache"
            } else {
                "a text cache"
            }
            .into(),
            shard: format!(
                "a {} shard (header version {})",
                if image_shard { "image" } else { "text" },
                h.format_version
            ),
        });
    }
    let checks: [(&str, String, String); 11] = [
        (
            "shard index",
            position.to_string(),
            h.shard_index.to_string(),
        ),
        (
            "settings_hash",
            format!("{:016x}", m.header_settings_hash()),
            format!("{:016x}", h.settings_hash),
        ),
        (
            "dtype",
            m.settings.dtype.name().into(),
            h.dtype.name().into(),
        ),
        (
            "layers",
            m.settings.layers.len().to_string(),
            h.n_layers.to_string(),
        ),
        (
            "hidden",
            m.backbone.hidden.to_string(),
            h.hidden.to_string(),
        ),
        (
            "first_example",
            expect_first.to_string(),
            h.first_example.to_string(),
        ),
        (
            "examples",
            info.examples.to_string(),
            h.n_examples.to_string(),
        ),
        ("tokens", info.tokens.to_string(), h.n_tokens.to_string()),
        (
            "shuffle",
            m.settings.shuffle.to_string(),
            h.shuffle.to_string(),
        ),
        (
            "max_len",
            m.settings.max_len.to_string(),
            h.max_len.to_string(),
        ),
        (
            "chunk_size",
            m.settings.chunk_size.to_string(),
            h.chunk_size.to_string(),
        ),
    ];
    for (field, manifest, shard) in checks {
        if manifest != shard {
            return Err(CacheError::ManifestMismatch {
                field: field.into(),
                manifest,
                shard,
            });
        }
    }
    if info.first_example != expect_first {
        return Err(CacheError::ManifestMismatch {
            field: "first_example (manifest order)".into(),
            manifest: info.first_example.to_string(),
            shard: expect_first.to_string(),
        });
    }
    Ok(())
}
