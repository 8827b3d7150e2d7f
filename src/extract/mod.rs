//! Phase one: running the frozen backbone over a dataset and writing the
//! feature cache, as stages that can be called one by one (the benchmark
//! does):
//!
//! - [`plan`]: the settings and their defaults, and the checks that need no
//!   backbone;
//! - [`order`]: tokenizing into cache order;
//! - [`provenance`]: what the manifest records about the inputs, and the
//!   settings hash;
//! - [`pipeline`]: one shard, from examples through the backbone to a sealed
//!   file;
//! - [`mod@run`]: the stages composed, with the cache directory protocol of
//!   [`crate::cache::writer::CacheWriter`];
//! - [`sample`]: a quick look at what the backbone produces;
//! - [`image`]: the same stages for an image backbone (`backbone.json`):
//!   images decoded and preprocessed per batch, the ViT run with its
//!   per-layer tensors exposed, every token cached.
//!
//! Padded inputs and per-example rows at real tokens come from
//! [`crate::batching`], shared with training. Errors of this phase are
//! [`ExtractError`]s.

pub mod error;
pub mod image;
pub mod order;
pub mod pipeline;
pub mod plan;
pub mod provenance;
pub mod run;
pub mod sample;

pub use error::ExtractError;
pub use plan::{ExtractPlan, LayerChoice};
pub use run::{run, ExtractReporter, ExtractSummary, Silent};
