//! # sherl
//!
//! Memory-efficient transfer learning (SHERL, ECCV 2024) as a two-phase
//! pipeline: `sherl-extract` runs a frozen backbone once through ONNX Runtime
//! and caches the hidden states the method needs; `sherl-fit` trains from that
//! cache, as many times as a sweep wants, without re-running the backbone.
//!
//! The library is layered, one folder a layer; a module imports only from
//! its own layer or the ones listed before it, never sideways into another
//! module of its layer, and no two files import each other (checked by
//! `tests/layers.rs`):
//! - core, [`base`]: [`error`] (one [`Error`], each area's typed errors),
//!   [`data`] (datasets: CSV/TSV/JSONL/Parquet/plain text/folders, labels,
//!   seeded splits; images in [`data::image`]), [`backbone`] (checkpoints),
//!   [`batching`] (the one batching rule, padded batches), [`rng`],
//!   [`hash`], [`le`], [`fsutil`], [`assets`]; re-exported at the root;
//! - [`cache`]: the on-disk feature cache, the contract between the phases
//!   (format, reader, writer, merge);
//! - phase one, feature `extract`: `extract` (the ONNX Runtime sessions,
//!   the ONNX exporter, the tokenizer, and the stages of an extraction);
//! - phase two, feature `fit`: `fit` (modules, models, the trainer, run
//!   directory, sweeps; image-text retrieval in `fit::retrieval`);
//! - above both: `predict` (a trained run on new inputs: `sherl-fit
//!   predict` and `search`; features `extract` and `fit`) and `report`
//!   (tables and pictures over runs; feature `fit`);
//! - feature `cli`: `cli`, what only the binaries need.
//!
//! `unsafe` is denied crate-wide; four places allow it and say why:
//! `cache::mmap` (the mapping of shard files), `fit::kernels::gemm` (matrix
//! products on strided views and the BLAS loader), two calls in
//! `fit::kernels::fused_layer` (into its AVX2 builds after the run-time CPU
//! check) and `fit::alloc_track` (the counting allocator).
//!
//! Layer indices follow Hugging Face's `hidden_states` convention everywhere:
//! 0 is the embedding output, `i` the output of transformer layer `i`.
#![deny(unsafe_code)]
#![warn(missing_docs)]
// Tests write fixtures with plain std::fs calls (clippy.toml forbids them in
// the library proper).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

#[cfg(target_endian = "big")]
compile_error!("sherl's on-disk formats are little-endian; big-endian targets are not supported");

pub mod base;
pub use base::{assets, backbone, batching, data, error, fsutil, hash, le, rng};
pub mod cache;
#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "extract")]
pub mod extract;
#[cfg(feature = "fit")]
pub mod fit;
#[cfg(all(feature = "extract", feature = "fit"))]
pub mod predict;
#[cfg(feature = "fit")]
pub mod report;

/// Exit code of a command refused because another process holds the lock
/// of the run or cache it would write (docs/usage.md, "Output conventions").
pub const EXIT_BUSY: u8 = 3;

pub use error::{Error, Result};
