//! The feature cache: the contract between `sherl-extract` and `sherl-fit`.
//!
//! A cache is a directory (normative spec: `cache_schema/FORMAT.md`):
//!
//! ```text
//! CACHE/
//!   manifest.json            written last, atomically: present = complete
//!   shards/shard-00000.shrd  write-once shards (header, zstd frames, index)
//!   extract.pending.json     settings of an extraction in progress (resume)
//!   .lock                    the writer's OS lock file (ignored by readers)
//! ```
//!
//! Each shard holds consecutive examples in chunks; each chunk has a
//! metadata frame (ids, split, label, token ids) and one frame per stored
//! layer with the hidden states of the chunk's real tokens only (no
//! padding). Every frame carries a CRC-32 in the index and a zstd content
//! checksum; the index is checksummed from the header, and the header
//! checksums itself. [`Cache`] ([`reader`]) maps shards read-only ([`mmap`],
//! the crate's only `unsafe`), validates them against the manifest, and
//! decodes chunks, on background threads when asked ([`Cache::stream`]).
//! [`CacheWriter`] ([`writer`]) is the other side: the directory protocol
//! every writer follows (lock, pending manifest, resume, manifest last).
//! The byte layout is [`mod@format`]'s, one shard's reading and writing
//! [`shard`]'s.
//!
//! Every path and size read from a file is checked before it is used: shard
//! paths through [`checked_shard_path`] (the reader and
//! [`merge::merge`] share it), shard size claims against the file and the
//! manifest before anything is allocated for them (FORMAT.md §8).
//!
//! Layer numbering follows `hidden_states.i` (0 = embedding output).

mod check;
pub mod compare;
pub mod error;
pub mod export;
pub mod format;
pub mod manifest;
pub mod merge;
pub mod mmap;
pub mod reader;
pub mod shard;
pub mod writer;

use std::path::{Component, Path, PathBuf};

pub use error::CacheError;
pub use format::values::LayerValues;
pub use format::{Dtype, FORMAT_VERSION, OLDEST_READABLE_VERSION};
pub use manifest::Manifest;
pub use reader::{open_shard, open_shard_checked, Cache, ChunkRef, ChunkStream, DecodedChunk};
pub use shard::{ExampleMeta, ImageMeta, MetaBounds, ShardReader};
pub use writer::CacheWriter;

use crate::{Error, Result};

/// Name of the shard file with number `i`.
pub fn shard_file_name(i: u32) -> String {
    shard_file_name_u64(u64::from(i))
}

fn shard_file_name_u64(i: u64) -> String {
    format!("shards/shard-{i:05}.shrd")
}

/// FORMAT.md §1, §8.1: the path to open for shard `k` of the cache (or
/// worker part) at `dir`, given the `file` its manifest (`manifest_path`,
/// named in errors) lists. The only accepted `file` is
/// `shards/shard-NNNNN.shrd` for that `k`, so an absolute path, a `..`, a
/// path outside `shards/` or another shard's name is refused
/// ([`CacheError::UnsafePath`]) before anything is opened or written; and when
/// the file exists, it must resolve (through any symlink) to a file inside
/// `dir`.
pub fn checked_shard_path(dir: &Path, manifest_path: &Path, k: u64, file: &str) -> Result<PathBuf> {
    let expected = shard_file_name_u64(k);
    let refuse = |reason: &str| Error::Cache {
        path: manifest_path.to_path_buf(),
        source: CacheError::UnsafePath {
            file: file.to_string(),
            shard: k,
            expected: expected.clone(),
            reason: reason.to_string(),
        },
    };
    let p = Path::new(file);
    if p.is_absolute() || p.has_root() || file.starts_with(['/', '\\']) {
        return Err(refuse("an absolute path"));
    }
    if p.components().any(|c| c == Component::ParentDir)
        || file.split(['/', '\\']).any(|c| c == "..")
    {
        return Err(refuse("a path that climbs out with `..`"));
    }
    if !file.starts_with("shards/") {
        return Err(refuse("not a file under shards/"));
    }
    if file != expected {
        return Err(refuse("not the name of this shard"));
    }
    let path = dir.join(&expected);
    // A symlink (the file's or the shards directory's) must not lead out of
    // the cache directory.
    if std::fs::symlink_metadata(&path).is_ok() {
        let root = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
        let real = std::fs::canonicalize(&path).map_err(|e| Error::io(&path, e))?;
        if !real.starts_with(&root) {
            return Err(refuse(&format!(
                "it resolves (through a symlink) to {}, outside the cache directory",
                real.display()
            )));
        }
    }
    Ok(path)
}
