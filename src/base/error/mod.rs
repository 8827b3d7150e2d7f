//! The library's error type.
//!
//! One [`Error`] for the whole crate, in the candle/tantivy style: variants
//! carry the path (and line, where there is one) they concern, and keep the
//! underlying error as their `source`; the binaries print the whole chain
//! on one line, each cause once (the binaries' `cli::error_chain`).

//!
//! Each area's own error enum is defined here too, one file each
//! ([`cache`], [`extract`], [`fit`], [`report`]), and re-exported by its
//! area under the old path (`crate::cache::CacheError`, ...): the error
//! module is core, the lowest layer, so it must not import from the layers
//! above it.

use std::path::PathBuf;

pub mod cache;
pub mod extract;
pub mod fit;
pub mod report;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in sherl's library code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A filesystem operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// File or directory concerned.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file could not be parsed.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// File concerned.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A dataset row could not be read.
    #[error("{}:{line}: {message}", path.display())]
    DatasetLine {
        /// Dataset file.
        path: PathBuf,
        /// 1-based line number where the row starts.
        line: u64,
        /// What is wrong with it.
        message: String,
    },
    /// A dataset as a whole is unusable (empty, unknown column, ...).
    #[error("{}: {message}", path.display())]
    Dataset {
        /// Dataset file or folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A safetensors checkpoint could not be read.
    #[error("{}: {message}", path.display())]
    Checkpoint {
        /// Checkpoint file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An ONNX model could not be read, written or used.
    #[error("{}: {message}", path.display())]
    Onnx {
        /// Model file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// ONNX Runtime could not be loaded or failed.
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
    /// Tokenizer failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A cache file is unusable.
    #[error("{}: {source}", path.display())]
    Cache {
        /// Shard, manifest or cache directory concerned.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: cache::CacheError,
    },
    /// Another process holds the lock of a run or cache directory.
    #[error("{}: {what} is in use by another process (it holds {}); wait for it to finish, or stop it", path.display(), lock.display())]
    Locked {
        /// Directory concerned.
        path: PathBuf,
        /// What the directory is (`run`, `cache`).
        what: &'static str,
        /// The lock file.
        lock: PathBuf,
    },
    /// Training stopped because the numbers diverged (NaN or infinite loss).
    #[error("{0}")]
    Diverged(String),
    /// The work needs more memory than the machine can give it.
    #[error("{0}")]
    TooLarge(String),
    /// candle failure.
    #[cfg(feature = "fit")]
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    // Each area's own errors (defined in this module's children).
    /// Training: a setting, the cache, the backbone, the device or a grid
    /// that cannot be used (see [`fit::FitError`]).
    #[error(transparent)]
    Fit(#[from] fit::FitError),
    /// The run report could not be made (see [`report::ReportError`]).
    #[error(transparent)]
    Report(#[from] report::ReportError),
    /// Extraction refused its settings or stopped.
    #[error(transparent)]
    Extract(#[from] extract::ExtractError),
    // Core errors: settings and backbones.
    /// A flag or setting (of the dataset, the tokenizer, a worker) with a
    /// value, or in a combination, that cannot be used.
    #[error("{message}")]
    Setting {
        /// The flag or setting concerned (`--split`, `--labels`, ...).
        setting: String,
        /// What is wrong, naming the flag.
        message: String,
    },
    /// A backbone that cannot be used: its directory, its `config.json`, or
    /// a file that is not the one a cache or run was made with.
    #[error("{}: {message}", path.display())]
    Backbone {
        /// The backbone directory or its `config.json`.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A backbone configuration the ONNX export cannot build (the message
    /// names the `config.json` setting).
    #[error("unsupported backbone: {0}")]
    UnsupportedBackbone(String),
}

impl Error {
    /// Wrap an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// [`Error::Setting`]: `message` about the flag or setting `setting`.
    pub fn setting(setting: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Setting {
            setting: setting.into(),
            message: message.into(),
        }
    }
}
