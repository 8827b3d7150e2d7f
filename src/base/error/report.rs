//! The errors of `sherl-fit report` ([`ReportError`]), wrapped by
//! [`crate::Error::Report`]; re-exported as `crate::report::runs::ReportError`.

use std::path::PathBuf;

/// Why no report could be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// The runs directory holds no complete run.
    #[error("{}: no complete runs (no run directory with a summary.json; {skipped} skipped{first})", runs.display())]
    NoCompleteRuns {
        /// The runs directory.
        runs: PathBuf,
        /// Directories skipped.
        skipped: usize,
        /// `: DIR: REASON` of the first skipped directory, or empty.
        first: String,
    },
    /// `--select-by` names a setting no run has.
    #[error("--select-by {key}: no run has a setting '{key}' (settings: {known})")]
    UnknownSetting {
        /// The setting asked for.
        key: String,
        /// The settings the runs have, comma-separated.
        known: String,
    },
    /// The font embedded in the binary cannot be loaded.
    #[error("the embedded font {0} is not a valid font")]
    Font(&'static str),
}
