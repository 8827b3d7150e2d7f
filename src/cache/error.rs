//! Precise cache errors (safetensors style): tests match on these variants,
//! and each names what is wrong in terms a user can act on.

/// What is wrong with a cache's bytes or files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The file does not start with `SHRLCACH`.
    #[error("not a sherl cache shard (bad magic bytes)")]
    BadMagic,
    /// The format version is outside what this build reads.
    #[error(
        "cache format version {found} is not supported by this sherl (it reads versions {oldest} to {newest}); re-run sherl-extract"
    )]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Oldest readable.
        oldest: u32,
        /// Newest readable.
        newest: u32,
    },
    /// The file is shorter than a header.
    #[error("truncated shard: {len} bytes is shorter than the header")]
    TruncatedHeader {
        /// File length.
        len: u64,
    },
    /// A frame or the index points outside the file.
    #[error("frame {entry} at offset {offset} (+{len} bytes) lies outside the file ({file_len} bytes): truncated or corrupt shard")]
    IndexOutOfBounds {
        /// Index entry number (`usize::MAX` for the index itself).
        entry: usize,
        /// Offset claimed.
        offset: u64,
        /// Length claimed.
        len: u64,
        /// Actual file length.
        file_len: u64,
    },
    /// A size computation overflowed (hostile or corrupt numbers).
    #[error("size overflow while validating the shard")]
    Overflow,
    /// A checksum did not match.
    #[error("checksum mismatch in {what}: the shard is corrupt")]
    ChecksumMismatch {
        /// `header`, `index`, or `frame N (kind, layer L, chunk C)`.
        what: String,
    },
    /// A shard disagrees with the manifest.
    #[error("shard disagrees with manifest.json on {field}: manifest {manifest}, shard {shard}")]
    ManifestMismatch {
        /// Field name.
        field: String,
        /// Manifest value.
        manifest: String,
        /// Shard value.
        shard: String,
    },
    /// `manifest.json` is missing: the directory is not a complete cache.
    #[error("no manifest.json: not a complete sherl cache (an interrupted `sherl-extract run` can be finished with --resume)")]
    Incomplete,
    /// Any other structural problem.
    #[error("corrupt shard: {0}")]
    Corrupt(String),
}
