//! The core layer: what both phases and the cache build on. Each module is
//! re-exported at the crate root (`sherl::data`, `sherl::error`, ...), which
//! is the path the rest of the crate and its users name; this folder only
//! makes the layer visible.
//!
//! - [`error`]: the one [`crate::Error`] and each area's typed errors;
//! - [`data`]: datasets (CSV/TSV/JSONL/Parquet/plain text/folders, labels,
//!   seeded splits; images and their preprocessing in [`data::image`]);
//! - [`backbone`]: BERT-family and ViT checkpoints;
//! - [`batching`]: the one batching rule and padded batches;
//! - [`rng`], [`hash`], [`le`] (little-endian reads), [`fsutil`] (bounded
//!   reads, atomic writes, locks), [`assets`] (the asset directory).

pub mod assets;
pub mod backbone;
pub mod batching;
pub mod data;
pub mod error;
pub mod fsutil;
pub mod hash;
pub mod le;
pub mod rng;
