//! Precise cache errors (safetensors style): tests match on these variants,
//! and each names what is wrong in terms a user can act on. [`CacheError`]
//! is wrapped by [`crate::Error::Cache`] with the path concerned; it is
//! re-exported as `crate::cache::CacheError`, [`MergeError`] as
//! `crate::cache::merge::MergeError`. Defined here, in the core error
//! module, so that `crate::Error` does not import from the cache layer.

use std::path::PathBuf;

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
    /// The index, which ends the file, lies (partly) beyond the file's end:
    /// the shard was cut short (or its header lies about the index).
    #[error("the index at offset {offset} (+{len} bytes) ends beyond the end of the file ({file_len} bytes): the shard is truncated")]
    TruncatedIndex {
        /// Index offset claimed by the header.
        offset: u64,
        /// Index length claimed by the header.
        len: u64,
        /// Actual file length.
        file_len: u64,
    },
    /// A frame points outside the file.
    #[error("frame {entry} at offset {offset} (+{len} bytes) lies outside the file ({file_len} bytes): truncated or corrupt shard")]
    IndexOutOfBounds {
        /// Index entry number (position of the frame in the index).
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
    /// The manifest's content does not match its `manifest_sha256`
    /// (format version 2 and later): it was edited after it was written.
    #[error("manifest_sha256 does not match the manifest's content (stored {stored}, content hashes to {computed}): the manifest was edited after it was written; restore it or re-run sherl-extract")]
    ManifestChecksum {
        /// The checksum the manifest carries.
        stored: String,
        /// The sha256 of its content.
        computed: String,
    },
    /// A path read from a manifest is not the file the format allows there
    /// (absolute, with `..`, outside `shards/`, another name, or a symlink
    /// leading out of the cache directory). Nothing is opened or written.
    #[error("manifest names {file:?} for shard {shard}: {reason}; shard {shard} must be the file {expected:?} inside the cache directory")]
    UnsafePath {
        /// The path as the manifest gives it.
        file: String,
        /// Shard number.
        shard: u64,
        /// The only path allowed for it.
        expected: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The manifest contradicts itself (its counts, split names, layers...).
    #[error("inconsistent manifest: {0}")]
    BadManifest(String),
    /// A directory given as a worker part is not one.
    #[error("{0}")]
    NotAPart(String),
    /// `manifest.json` is missing: the directory is not a complete cache.
    #[error("no manifest.json: not a complete sherl cache (an interrupted `sherl-extract run` can be finished with --resume)")]
    Incomplete,
    /// Any other structural problem.
    #[error("corrupt shard: {0}")]
    Corrupt(String),
    // --- Reading a cache (cache::reader) -------------------------------------
    /// A chunk number beyond the cache's chunks.
    #[error("chunk {id} does not exist ({chunks} chunks)")]
    NoSuchChunk {
        /// The chunk asked for.
        id: usize,
        /// Chunks in the cache.
        chunks: usize,
    },
    /// An example position beyond the cache's examples.
    #[error("example {position} does not exist ({examples} examples)")]
    NoSuchExample {
        /// The position asked for.
        position: u64,
        /// Examples in the cache.
        examples: u64,
    },
    /// The background decoder threads of a chunk stream died.
    #[error("chunk decoder threads stopped unexpectedly")]
    DecoderStopped,
    /// Combining worker parts was refused (cache::merge).
    #[error(transparent)]
    Merge(#[from] MergeError),
    // --- Writing a cache directory (cache::writer) ---------------------------
    /// The output directory already holds a complete cache.
    #[error("already a complete cache (manifest.json exists); choose another --out or delete it")]
    AlreadyComplete,
    /// The output directory holds something and `--resume` was not given.
    #[error("directory is not empty; pass --resume to continue an interrupted extraction, or choose another --out")]
    NotEmpty,
    /// `--resume` into a directory holding shards but no pending manifest.
    #[error("cannot resume: it holds shards but no {pending} recording their settings; start in an empty --out")]
    NoPendingManifest {
        /// The pending manifest's file name (`cache::manifest::PENDING`).
        pending: &'static str,
    },
    /// The pending manifest of the interrupted extraction is unusable.
    #[error("cannot resume: {reason}")]
    CannotResume {
        /// Why it cannot be read.
        reason: String,
    },
    /// `--resume` with settings other than the interrupted extraction's.
    #[error("cannot resume with different settings (differs: {differs}); use the original flags or another --out")]
    ResumeMismatch {
        /// The manifest fields that differ, comma-separated.
        differs: String,
    },
    /// A sealed shard found while resuming belongs to other settings.
    #[error("sealed with different settings; refusing to mix it into this cache")]
    SealedWithOtherSettings,
    /// A hidden state the backbone returned is NaN or infinite.
    #[error("non-finite hidden state ({value}) at stored layer position {layer}: the backbone produced it")]
    NonFinite {
        /// The value.
        value: f32,
        /// Position of the layer among the stored layers.
        layer: usize,
    },
    /// A hidden state does not fit in f16.
    #[error("a hidden-state value ({value}) at stored layer position {layer} exceeds the f16 range (65504); extract with --dtype bf16 or f32")]
    F16Overflow {
        /// The value.
        value: f32,
        /// Position of the layer among the stored layers.
        layer: usize,
    },
    /// zstd could not compress a frame.
    #[error("zstd compression (level {level}): {message}")]
    Compress {
        /// The zstd level.
        level: i32,
        /// zstd's message.
        message: String,
    },
}

/// Why worker parts cannot be merged into `--out`; wrapped in
/// [`CacheError::Merge`] with the part (or `--out`) concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MergeError {
    /// No part was given.
    #[error("merge needs at least one worker part")]
    NoParts,
    /// A part's settings hash differs from the first part's.
    #[error("extracted with different settings than {} (settings_hash {hash} vs {first_hash}); refusing to merge", first.display())]
    DifferentSettings {
        /// The first part.
        first: PathBuf,
        /// This part's settings hash (abbreviated).
        hash: String,
        /// The first part's (abbreviated).
        first_hash: String,
    },
    /// A whole-cache field differs although the settings hash agrees.
    #[error("this part and {} disagree on `{key}` although their settings_hash is the same; refusing to merge", first.display())]
    Disagree {
        /// The first part.
        first: PathBuf,
        /// The manifest field.
        key: &'static str,
    },
    /// The parts were written for different numbers of workers.
    #[error("worker of {count} parts, {} of {first_count}", first.display())]
    WorkerCount {
        /// This part's worker count.
        count: u32,
        /// The first part.
        first: PathBuf,
        /// The first part's worker count.
        first_count: u32,
    },
    /// Two parts claim the same worker index.
    #[error("this part and {} are both worker {index}", other.display())]
    DuplicateWorker {
        /// The worker index.
        index: u32,
        /// The other part.
        other: PathBuf,
    },
    /// Two parts hold the same shard.
    #[error("shard {shard} appears in more than one part (this one and {})", other.display())]
    DuplicateShard {
        /// The shard number.
        shard: u32,
        /// The other part.
        other: PathBuf,
    },
    /// Worker parts are missing.
    #[error("missing worker part(s) {missing} of {count}")]
    MissingWorkers {
        /// The missing worker indices (at most 20), comma-separated.
        missing: String,
        /// Workers in all.
        count: u32,
    },
    /// A shard the split counts imply is in no part.
    #[error("shard {0} is missing from the parts")]
    MissingShard(u64),
    /// A part holds a shard beyond those the split counts imply.
    #[error("shard {shard} is beyond the {shards} shards the split counts imply")]
    ShardBeyond {
        /// The shard number.
        shard: u32,
        /// Shards the split counts imply.
        shards: u64,
    },
    /// `--out` exists and holds something.
    #[error("--out must not exist or be empty")]
    OutNotEmpty,
    /// `--out` exists and is a file.
    #[error("--out exists and is not a directory")]
    OutNotADirectory,
    /// `--out` has no final component.
    #[error("--out must name a directory")]
    OutNoName,
}
