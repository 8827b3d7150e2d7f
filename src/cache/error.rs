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
    Merge(#[from] super::merge::MergeError),
    // --- Writing a cache directory (cache::writer) ---------------------------
    /// The output directory already holds a complete cache.
    #[error("already a complete cache (manifest.json exists); choose another --out or delete it")]
    AlreadyComplete,
    /// The output directory holds something and `--resume` was not given.
    #[error("directory is not empty; pass --resume to continue an interrupted extraction, or choose another --out")]
    NotEmpty,
    /// `--resume` into a directory holding shards but no pending manifest.
    #[error("cannot resume: it holds shards but no {} recording their settings; start in an empty --out", super::manifest::PENDING)]
    NoPendingManifest,
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
