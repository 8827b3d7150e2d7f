//! What can stop an extraction, per operation, naming the setting or example
//! concerned (wrapped by [`crate::Error::Extract`]). Problems of the cache
//! directory itself are [`crate::cache::CacheError`]s, of the backbone
//! [`crate::Error::Onnx`]/[`crate::Error::Runtime`].

/// Why `sherl-extract run` refused or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExtractError {
    /// A size setting is zero.
    #[error("{settings} must be positive")]
    NotPositive {
        /// The flags concerned.
        settings: &'static str,
    },
    /// `--zstd-level` outside what zstd accepts.
    #[error("--zstd-level {0} is outside -7..=22")]
    ZstdLevel(i32),
    /// `--max-len` beyond the backbone's position embeddings.
    #[error("--max-len {max_len} exceeds the {limit} tokens the backbone's position table covers (max_position_embeddings less MPNet's padding offset)")]
    MaxLen {
        /// `--max-len`.
        max_len: usize,
        /// The longest sequence the backbone's position table covers.
        limit: usize,
    },
    /// `--late-layers` is 0 or more than the backbone has.
    #[error("--late-layers {late_layers} must be between 1 and the backbone's {n_layers} layers")]
    LateLayers {
        /// `--late-layers`.
        late_layers: usize,
        /// The backbone's layers.
        n_layers: usize,
    },
    /// `--layers` names a hidden state the backbone does not have.
    #[error("layer {layer} does not exist (the backbone has hidden_states.0..={n_layers})")]
    NoSuchLayer {
        /// The layer asked for.
        layer: usize,
        /// The backbone's layers.
        n_layers: usize,
    },
    /// `--layers` selects nothing.
    #[error("no layers to store")]
    NoLayers,
    /// An example has no tokens at all.
    #[error("example {id} tokenized to nothing")]
    EmptyExample {
        /// The example's id.
        id: String,
    },
    /// The compression threads of a shard stopped before taking every chunk.
    #[error("{}: compression threads stopped", shard.display())]
    CompressionStopped {
        /// The shard being written.
        shard: std::path::PathBuf,
    },
    /// The thread appending chunks to a shard panicked.
    #[error("{}: shard writer thread panicked", shard.display())]
    WriterPanicked {
        /// The shard being written.
        shard: std::path::PathBuf,
    },
    /// `sample`'s `--batch-size` or `--limit` is zero.
    #[error("--batch-size and --limit must be positive")]
    SampleSize,
}
