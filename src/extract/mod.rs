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
//! - [`mod@run`]: the one composer: a text or an image extraction, each
//!   the stages composed ([`text`], [`image`]) with the cache directory
//!   protocol of [`crate::cache::writer::CacheWriter`]; what they share is
//!   in [`common`] (progress, summary, resume scan, stage times);
//! - [`sample`]: a quick look at what the backbone produces;
//! - [`image`]: the stages for an image backbone (`backbone.json`):
//!   images decoded and preprocessed per batch, the ViT run with its
//!   per-layer tensors exposed, every token cached;
//! - [`runtime`] (ONNX Runtime sessions), [`mod@onnx`] (the ONNX exporter and
//!   graph edits) and [`tokenize`]: the backbone's machinery.
//!
//! Padded inputs and per-example rows at real tokens come from
//! [`crate::batching`], shared with training. Errors of this phase are
//! [`ExtractError`]s.

pub mod common;
pub mod error;
pub mod image;
pub mod onnx;
pub mod order;
pub mod pipeline;
pub mod plan;
pub mod provenance;
pub mod run;
pub mod runtime;
pub mod sample;
pub mod text;
pub mod tokenize;

pub use common::{ExtractReporter, ExtractSummary, Silent};
pub use error::ExtractError;
pub use plan::{ExtractPlan, ImagePlan, LayerChoice};
pub use run::run;
