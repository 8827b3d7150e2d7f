//! The errors of training ([`FitError`]), each saying which setting, file
//! or input it concerns; wrapped by [`crate::Error::Fit`].

use std::path::PathBuf;

/// What can refuse or stop a training run, a sweep or a prediction's model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FitError {
    /// A setting is out of range, or does not fit the backbone or the
    /// cache (`--lr`, `--late-layers`, `--probe-layer`, the early route).
    #[error("{0}")]
    Settings(String),
    /// The `--config` file cannot be read.
    #[error("{}: cannot read: {source}", path.display())]
    SettingsUnreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The `--config` file is not a valid set of settings.
    #[error("{}: invalid settings: {source}", path.display())]
    SettingsInvalid {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The cache lacks what the run needs (a layer, a split, labels).
    #[error("{0}")]
    CacheLacks(String),
    /// The backbone is not the one the cache was made with, or cannot be
    /// built in candle.
    #[error("{0}")]
    Backbone(String),
    /// A `--device` that cannot be used.
    #[error("{message}")]
    Device {
        /// The `--device` value.
        spec: String,
        /// Why.
        message: String,
    },
    /// An environment variable with a value that cannot be used.
    #[error("{var}={value}: {expected}")]
    Env {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What it should be.
        expected: &'static str,
    },
    /// A sweep's grid that cannot be expanded.
    #[error("grid: {0}")]
    Grid(String),
    /// The grid file of a sweep, and what is wrong with it.
    #[error("{}: {source}", path.display())]
    GridFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: Box<FitError>,
    },
    /// A run directory (or one of its files) that cannot be used: not
    /// finished, or inconsistent with itself.
    #[error("{}: {message}", path.display())]
    BadRun {
        /// The run directory or file concerned.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A module was given other inputs than it was built for, or a
    /// parameter name was used twice: a bug in the model's composition.
    #[error("{0}")]
    Model(String),
}

/// Constructors of the crate's error for the message-carrying kinds, so a
/// call site reads `Err(FitError::settings(..))` like any other error.
impl FitError {
    /// [`FitError::Settings`].
    pub fn settings(message: impl Into<String>) -> crate::Error {
        FitError::Settings(message.into()).into()
    }
    /// [`FitError::CacheLacks`].
    pub fn cache_lacks(message: impl Into<String>) -> crate::Error {
        FitError::CacheLacks(message.into()).into()
    }
    /// [`FitError::Backbone`].
    pub fn backbone(message: impl Into<String>) -> crate::Error {
        FitError::Backbone(message.into()).into()
    }
    /// [`FitError::Grid`] (the message without the `grid: ` prefix).
    pub fn grid(message: impl Into<String>) -> crate::Error {
        FitError::Grid(message.into()).into()
    }
    /// [`FitError::Model`].
    pub fn model(message: impl Into<String>) -> crate::Error {
        FitError::Model(message.into()).into()
    }
}
