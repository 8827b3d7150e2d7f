//! # sherl
//!
//! Memory-efficient transfer learning (SHERL, ECCV 2024) as a two-phase
//! pipeline: `sherl-extract` runs a frozen backbone once through ONNX Runtime
//! and caches the hidden states the method needs; `sherl-fit` trains from that
//! cache, as many times as a sweep wants, without re-running the backbone.
//!
//! Brief overview of the library:
//! - [`data`]: labelled datasets (CSV/TSV/JSONL, compressed or not, folders),
//!   label maps and seeded splits.
//! - [`tokenize`]: the backbone's own `tokenizer.json` with padding off and
//!   our own truncation.
//! - [`backbone`]: BERT-family checkpoints (config + safetensors).
//! - [`hash`], [`le`], [`fsutil`]: hex and sha256, little-endian float
//!   decoding, atomic writes and file hashes (core helpers).
//! - [`batching`]: the one batching rule and padded batches, shared by
//!   extraction and training.
//! - [`onnx`]: a protobuf subset of ONNX, the exporter that turns a checkpoint
//!   into a graph exposing every `hidden_states.i`, and tools for user graphs.
//! - [`runtime`]: locating and loading the ONNX Runtime library, sessions on
//!   CPU or CUDA.
//! - [`assets`]: where fetched assets live.
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
