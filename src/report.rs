//! The report over a directory of runs: runs grouped by their settings,
//! mean and spread over seeds ([`runs`]), tables in Markdown, CSV and JSON,
//! and pictures (learning curves, SHERL layer weights).

pub mod runs;
pub use runs::{report, setting_text, GroupRow, Report, ReportOptions, RetrievalGroupRow, Stat};
