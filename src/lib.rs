//! # sherl
//!
//! Memory-efficient transfer learning (SHERL, ECCV 2024) as a two-phase
//! pipeline: `sherl-extract` runs a frozen backbone once through ONNX Runtime
//! and caches the hidden states the method needs; `sherl-fit` trains from that
//! cache, as many times as a sweep wants, without re-running the backbone.
//!
//! The library is layered; a module imports only from its own layer or
//! the ones listed before it (checked by `tests/layers.rs`):
//! - core: [`error`] (one [`Error`], each area's typed errors), [`data`]
//!   (datasets: CSV/TSV/JSONL/Parquet/plain text/folders, labels, seeded
//!   splits; image datasets and preprocessing in [`data::image`]),
//!   [`backbone`] (BERT-family checkpoints), [`batching`] (the one batching
//!   rule, padded batches), [`rng`], [`hash`], [`le`], [`fsutil`],
//!   [`assets`], and `tokenize` (feature `extract`);
//! - [`cache`]: the on-disk feature cache, the contract between the phases
//!   (format, reader, writer, merge; `unsafe` in `mmap`, one of four
//!   modules allowed it: also `fit::kernels::gemm`, the matrix products on
//!   strided views and the BLAS loader, `fit::alloc_track`, the counting
//!   allocator, and two calls in `fit::kernels::fused_layer`, into its
//!   AVX2 builds after the run-time CPU check);
//! - phase one, feature `extract`: `onnx`, `runtime` (ONNX Runtime) and
//!   `extract` (plan, stages, sample);
//! - phase two, feature `fit`: `fit` (modules, models, training, run
//!   directory, sweeps; `fit::retrieval`: image-text retrieval from an
//!   image cache and a caption cache; `fit::predict` when `extract` is on
//!   too) and
//!   `report` (tables and pictures over runs);
//! - feature `cli`: `cli`, what only the binaries need.
//!
//! Layer indices follow Hugging Face's `hidden_states` convention everywhere:
//! 0 is the embedding output, `i` the output of transformer layer `i`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[cfg(target_endian = "big")]
compile_error!("sherl's on-disk formats are little-endian; big-endian targets are not supported");

pub mod assets;
pub mod backbone;
pub mod batching;
pub mod cache;
#[cfg(feature = "cli")]
pub mod cli;
pub mod data;
pub mod error;
#[cfg(feature = "extract")]
pub mod extract;
#[cfg(feature = "fit")]
pub mod fit;
pub mod fsutil;
pub mod hash;
pub mod le;
#[cfg(feature = "extract")]
pub mod onnx;
#[cfg(feature = "fit")]
pub mod report;
pub mod rng;
#[cfg(feature = "extract")]
pub mod runtime;
#[cfg(feature = "extract")]
pub mod tokenize;

/// Exit code of a command refused because another process holds the lock
/// of the run or cache it would write (README, "Exit codes").
pub const EXIT_BUSY: u8 = 3;

pub use error::{Error, Result};
