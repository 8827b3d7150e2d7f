//! `manifest.json` (FORMAT.md §5): what a cache holds and where it came
//! from. Written last and atomically; its presence means the cache is
//! complete. Unknown fields are rejected, so a newer format is refused
//! rather than half-understood. From format version 2 on, the manifest
//! carries `manifest_sha256`, the sha256 of its own canonical JSON (without
//! that field), and [`Manifest::read`] refuses a manifest whose content no
//! longer matches it (an edited `splits`, `split_names`, `settings.layers`...).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::CacheError;
use super::format::{Dtype, FORMAT_VERSION, OLDEST_READABLE_VERSION};
use crate::{Error, Result};

/// File name of a complete cache's manifest.
pub const MANIFEST: &str = "manifest.json";
/// File name of one worker's partial manifest (`--shard-of I/N`, FORMAT.md §5.3).
pub const PART_MANIFEST: &str = "manifest.part.json";
/// File name of the settings written when extraction starts (resume check).
pub const PENDING: &str = "extract.pending.json";
/// Name of the manifest's checksum field (FORMAT.md §5.4, format version 2).
pub const CHECKSUM_FIELD: &str = "manifest_sha256";

/// A file the cache was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileInfo {
    /// Path as given when extracting (informational).
    pub path: String,
    /// sha256 of the file's bytes (for a folder dataset: of its sorted
    /// `sha256  relative-path` lines).
    pub sha256: String,
}

/// The backbone the cache was computed with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneInfo {
    /// The ONNX model run.
    pub onnx: FileInfo,
    /// The checkpoint (`model.safetensors`), if the backbone directory has one.
    pub safetensors: Option<FileInfo>,
    /// `tokenizer.json`; `null` for an image backbone (version 3 on).
    pub tokenizer: Option<FileInfo>,
    /// Checkpoint name prefix (`""`, `"bert."`), if a checkpoint exists.
    pub checkpoint_prefix: Option<String>,
    /// `config.json` as read (if present).
    pub config: Option<serde_json::Value>,
    /// Transformer layers N of the backbone (hidden states 0..=N).
    pub num_layers: usize,
    /// Hidden width D.
    pub hidden: usize,
}

/// Extraction settings that determine the cache's bytes (all hashed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtractSettings {
    /// `hidden_states` indices stored, in storage order.
    pub layers: Vec<usize>,
    /// Late layers K the default layer choice was made for.
    pub late_layers: usize,
    /// Value encoding.
    pub dtype: Dtype,
    /// Byte-plane shuffle before compression.
    pub shuffle: bool,
    /// zstd level.
    pub zstd_level: i32,
    /// Examples per chunk (one frame per layer per chunk).
    pub chunk_size: u32,
    /// Examples per shard file.
    pub examples_per_shard: u64,
    /// Truncation length (special tokens included).
    pub max_len: usize,
    /// Padded-token budget of one ONNX Runtime batch.
    pub max_tokens_per_batch: usize,
    /// Upper bound on examples per batch.
    pub max_batch: usize,
}

/// Where the examples came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetInfo {
    /// Input files with their split (or `None` when split by `--split`).
    pub files: Vec<FileInfo>,
    /// The dataset options as resolved (columns, labels, split rule...).
    pub options: serde_json::Value,
    /// Rows read.
    pub rows_read: u64,
    /// Malformed rows skipped (`--skip-bad-rows`).
    pub skipped_bad_rows: u64,
    /// Rows dropped because their label is not in `--labels`, per label.
    pub dropped_labels: BTreeMap<String, u64>,
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    /// Path relative to the cache directory.
    pub file: String,
    /// Shard number.
    pub index: u32,
    /// Position of its first example.
    pub first_example: u64,
    /// Examples.
    pub examples: u64,
    /// Real tokens.
    pub tokens: u64,
    /// File size in bytes.
    pub bytes: u64,
}

/// Which worker wrote a partial cache (`--shard-of I/N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerInfo {
    /// This worker (0-based).
    pub index: u32,
    /// Number of workers.
    pub count: u32,
}

impl WorkerInfo {
    /// Parse `I/N` (worker I of N, `0 <= I < N`) as given to `flag`
    /// (`--shard-of`, `--worker`): the one parser of both phases' flags.
    pub fn parse(flag: &str, s: &str) -> Result<Self> {
        let bad = || {
            Error::setting(
                flag,
                format!("{flag} {s}: expected I/N with 0 <= I < N, e.g. 0/4"),
            )
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (u32, u32) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(WorkerInfo { index, count })
    }
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version (FORMAT.md §6).
    pub format_version: u32,
    /// sherl version that wrote it.
    pub sherl_version: String,
    /// UTC time the cache was sealed (RFC 3339).
    pub created_at: String,
    /// sha256 (hex) of the canonical JSON of `backbone` (hashes and config),
    /// `dataset` (hashes and options) and `settings`.
    pub settings_hash: String,
    /// sha256 (hex) of the canonical JSON of this manifest without this field
    /// (FORMAT.md §5.4). Required from format version 2 on, absent in
    /// version 1 (not written when `None`, so a version 1 manifest
    /// re-serializes to the same fields).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_sha256: Option<String>,
    /// Extraction settings.
    pub settings: ExtractSettings,
    /// Backbone provenance.
    pub backbone: BackboneInfo,
    /// Dataset provenance.
    pub dataset: DatasetInfo,
    /// Class names; metadata labels index this list.
    pub labels: Vec<String>,
    /// Split names; metadata split ids index this list.
    pub split_names: Vec<String>,
    /// Examples per split.
    pub splits: BTreeMap<String, u64>,
    /// Total examples.
    pub examples: u64,
    /// Total real tokens.
    pub tokens: u64,
    /// Set in a partial manifest written by one worker of `--shard-of`.
    pub worker: Option<WorkerInfo>,
    /// Shards, in order.
    pub shards: Vec<ShardInfo>,
    /// Set in an image cache (version 3 on, FORMAT.md §5): the backbone
    /// description, the preprocessing recipe and the token layout. Not
    /// written when `None`, so a text cache's manifest has the fields of
    /// version 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInfo>,
}

/// What an image cache records about its images (FORMAT.md §5, version 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInfo {
    /// The backbone description (`backbone.json`).
    pub description: FileInfo,
    /// The ONNX input the preprocessed images were fed to.
    pub input: String,
    /// The preprocessing recipe as applied (`Preprocess` as JSON).
    pub preprocess: serde_json::Value,
    /// sha256 of the recipe's canonical JSON (`Preprocess::digest`).
    pub preprocess_sha256: String,
    /// Tokens per image the backbone produces (CLS first, then patches in
    /// row-major order).
    pub backbone_tokens: usize,
    /// Whether token 0 is a CLS token.
    pub cls_token: bool,
    /// Side of the square of patch tokens averaged into one before caching
    /// (`1`: none; `2`: 2x2, `--patch-pool 2`). The CLS token is kept.
    pub patch_pool: u32,
    /// Tokens stored per image (after pooling).
    pub tokens: usize,
}

impl Manifest {
    /// Read and version-check a manifest file.
    pub fn read(path: &Path) -> Result<Self> {
        // A regular file of at most METADATA_LIMIT bytes (a FIFO or a
        // device in its place is refused, never read).
        let bytes = match crate::fsutil::read_bounded(path, crate::fsutil::METADATA_LIMIT) {
            Ok(b) => b,
            // Only a missing `manifest.json` means "not a complete cache";
            // a missing part or pending manifest is reported as itself.
            Err(Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound
                    && path.file_name().is_some_and(|n| n == MANIFEST) =>
            {
                return Err(Error::Cache {
                    path: path.parent().unwrap_or(path).to_path_buf(),
                    source: CacheError::Incomplete,
                })
            }
            Err(e) => return Err(e),
        };
        // Check the version before the strict parse, so a newer cache gets
        // the version message rather than an unknown-field one.
        let loose: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        let version = loose
            .get("format_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as u32;
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(Error::Cache {
                path: path.to_path_buf(),
                source: CacheError::UnsupportedVersion {
                    found: version,
                    oldest: OLDEST_READABLE_VERSION,
                    newest: FORMAT_VERSION,
                },
            });
        }
        let m: Manifest = serde_json::from_value(loose).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        m.check_checksum().map_err(|source| Error::Cache {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(m)
    }

    /// FORMAT.md §5.4: a version 2 (or later) manifest carries a
    /// `manifest_sha256` equal to [`Manifest::content_sha256`]; a version 1
    /// manifest carries none.
    pub fn check_checksum(&self) -> std::result::Result<(), CacheError> {
        match (&self.manifest_sha256, self.format_version >= 2) {
            (None, false) => Ok(()),
            (Some(_), false) => Err(CacheError::Corrupt(format!(
                "a format version 1 manifest has no {CHECKSUM_FIELD} (it was added in version 2)"
            ))),
            (None, true) => Err(CacheError::Corrupt(format!(
                "format version {} requires {CHECKSUM_FIELD}, and it is missing",
                self.format_version
            ))),
            (Some(stored), true) => {
                let computed = self.content_sha256();
                if *stored == computed {
                    Ok(())
                } else {
                    Err(CacheError::ManifestChecksum {
                        stored: stored.clone(),
                        computed,
                    })
                }
            }
        }
    }

    /// sha256 (lowercase hex) of the canonical JSON (FORMAT.md §5.4) of this
    /// manifest without its `manifest_sha256`.
    pub fn content_sha256(&self) -> String {
        let mut v = serde_json::to_value(self).expect("a manifest serializes");
        if let Some(o) = v.as_object_mut() {
            o.remove(CHECKSUM_FIELD);
        }
        let mut text = String::new();
        canonical_json(&v, &mut text);
        crate::hash::sha256_hex(text.as_bytes())
    }

    /// The manifest as written: `manifest_sha256` set from the content when
    /// `format_version` is 2 or later, removed for version 1.
    pub fn sealed(&self) -> Manifest {
        let mut m = self.clone();
        m.manifest_sha256 = None;
        if m.format_version >= 2 {
            m.manifest_sha256 = Some(m.content_sha256());
        }
        m
    }

    /// Write the manifest (sealed, [`Manifest::sealed`]) atomically to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.sealed()).expect("a manifest serializes");
        crate::fsutil::write_atomic(path, &bytes)
    }

    /// What the stored layers of every token would take as raw f32:
    /// tokens x layers x hidden x 4 bytes (saturating).
    pub fn raw_f32_bytes(&self) -> u64 {
        self.tokens
            .saturating_mul(self.settings.layers.len() as u64)
            .saturating_mul(self.backbone.hidden as u64)
            .saturating_mul(4)
    }

    /// First 8 bytes of `settings_hash` as stored in shard headers.
    pub fn header_settings_hash(&self) -> u64 {
        header_settings_hash(&self.settings_hash)
    }
}

/// FORMAT.md §5.4: compact JSON (no whitespace) with every object's keys
/// sorted bytewise, strings and numbers as `serde_json` prints them.
pub fn canonical_json(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(x, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(&map[k], out);
            }
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The first 8 bytes (16 hex digits) of a hex settings hash as a u64: the
/// form shard headers carry it in (FORMAT.md §2).
pub fn header_settings_hash(hex: &str) -> u64 {
    u64::from_str_radix(hex.get(..16).unwrap_or("0"), 16).unwrap_or(0)
}

/// Current UTC time as RFC 3339 (seconds precision).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_shape() {
        let s = now_rfc3339();
        assert_eq!(s.len(), 20);
        assert!(s.starts_with("20") && s.ends_with('Z'));
    }

    #[test]
    fn short_hash_reads_prefix() {
        assert_eq!(header_settings_hash("00000000000000ff0123"), 255);
    }
}
