//! `sherl-extract`'s command line: its commands and flags.
// The argument structs' doc comments are `--help` text read in a terminal,
// where `<split>` is plain text, not an HTML tag.
#![allow(rustdoc::invalid_html_tags)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use super::{OutputArgs, RuntimeArgs};
use crate::cache::manifest::ExtractSettings;
use crate::cache::Dtype;
use crate::data::args::DatasetArgs;
use crate::extract::plan::DEFAULT_COMPRESS_THREADS;
use crate::extract::sample::{DEFAULT_BATCH_SIZE, DEFAULT_LIMIT};
use crate::extract::tokenize::DEFAULT_MAX_LEN;
use crate::extract::LayerChoice;

/// Phase one of sherl: run a frozen backbone once and keep what SHERL needs.
#[derive(Debug, Parser)]
#[command(name = "sherl-extract", version, about, long_about = None)]
pub struct Args {
    /// Logging and progress.
    #[command(flatten)]
    pub output: OutputArgs,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// `sherl-extract`'s command line (for its help, and [`super::command_line`]).
pub fn command() -> clap::Command {
    <Args as clap::CommandFactory>::command()
}

/// Parse `argv` (the program name first) as the binary does, returning
/// clap's error (a usage error, or the `--help` text) instead of exiting.
pub fn try_parse_from<I, T>(argv: I) -> std::result::Result<Args, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Args::try_parse_from(argv)
}

/// `sherl-extract`'s commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Export a Hugging Face BERT-family checkpoint (config.json +
    /// model.safetensors) to ONNX with outputs hidden_states.0..N.
    ExportOnnx {
        /// Backbone directory holding config.json and model.safetensors.
        #[arg(long)]
        backbone: PathBuf,
        /// Output file (default: BACKBONE/model.onnx).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List an ONNX model's inputs, outputs and candidate per-layer tensors.
    InspectOnnx {
        /// The ONNX model.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make intermediate tensors outputs named hidden_states.i (i counts from
    /// --first-index in the order given).
    ExposeLayers {
        /// The ONNX model to rewrite (left untouched).
        file: PathBuf,
        /// Comma-separated tensor names, embedding output first.
        #[arg(long, value_delimiter = ',', required = true)]
        tensors: Vec<String>,
        /// Index of the first tensor.
        #[arg(long, default_value_t = 0)]
        first_index: usize,
        /// Keep only the exposed outputs: drop the model's own outputs and
        /// every node and weight only they need (what `run` does with an
        /// image backbone's task head).
        #[arg(long)]
        only_exposed: bool,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the backbone over a dataset and write the feature cache.
    Run(Box<RunArgs>),
    /// Run the backbone over the first examples of a dataset and print what
    /// it found (counts, token lengths, per-layer statistics).
    Sample(Box<SampleArgs>),
    /// Prepare data: write paired image/caption tables for --task retrieval from the
    /// emoji package (fetch-assets.sh emoji): images-<split>.csv and
    /// captions-<split>.csv per split, split by emoji; prints one JSON line.
    Pairs {
        /// The emoji package directory (emoji.json, img/google/64/).
        #[arg(long)]
        emoji: PathBuf,
        /// Where to write the tables.
        #[arg(long)]
        out: PathBuf,
        /// Split fractions, by group (one emoji = one group).
        #[arg(long, default_value = "train=0.8,valid=0.1,test=0.1")]
        split: String,
        /// Seed of the split.
        #[arg(long, default_value_t = 0)]
        split_seed: u64,
        /// Keep a seeded subset of N pairs (before splitting).
        #[arg(long)]
        limit: Option<usize>,
        /// Cross-style test: the test split's images are these OpenMoji
        /// drawings (fetch-assets.sh openmoji), rasterised to
        /// OUT/openmoji-64/; train and valid keep Google's.
        #[arg(long, value_name = "DIR")]
        openmoji: Option<PathBuf>,
    },
}

/// `sample`'s flags.
#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    /// Backbone directory (tokenizer.json, and model.onnx unless --model).
    #[arg(long)]
    pub backbone: PathBuf,
    /// ONNX model (default: BACKBONE/model.onnx).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The dataset.
    #[command(flatten)]
    pub data: DatasetArgs,
    /// Truncate to this many tokens, special tokens included.
    #[arg(long, default_value_t = DEFAULT_MAX_LEN)]
    pub max_len: usize,
    /// How many examples to run.
    #[arg(long, default_value_t = DEFAULT_LIMIT)]
    pub limit: usize,
    /// Examples per ONNX Runtime call.
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// ONNX Runtime.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// `run`'s flags.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Backbone directory (tokenizer.json, config.json, model.safetensors).
    #[arg(long)]
    pub backbone: PathBuf,
    /// ONNX model (default: BACKBONE/model.onnx).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output cache directory (must not exist or be empty, unless --resume).
    #[arg(long)]
    pub out: PathBuf,
    /// The dataset.
    #[command(flatten)]
    pub data: DatasetArgs,
    /// Late layers K that sherl-fit will run (default layers: hidden_states.0..=N-K).
    #[arg(long, default_value_t = ExtractSettings::default().late_layers)]
    pub late_layers: usize,
    /// Layers to store: default (what SHERL needs), all, or a list like 0-5,6.
    #[arg(long, default_value_t = LayerChoice::default())]
    pub layers: LayerChoice,
    /// Value encoding on disk.
    #[arg(long, value_enum, default_value_t = ExtractSettings::default().dtype)]
    pub dtype: Dtype,
    /// Do not split values into byte planes before compression.
    #[arg(long)]
    pub no_shuffle: bool,
    /// zstd compression level.
    #[arg(long, default_value_t = ExtractSettings::default().zstd_level)]
    pub zstd_level: i32,
    /// Examples per chunk (one compressed frame per layer per chunk;
    /// default: 32 for text, 8 for images, which are hundreds of tokens each).
    #[arg(long)]
    pub chunk_size: Option<u32>,
    /// Examples per shard file (the unit of --resume and --shard-of).
    #[arg(long, default_value_t = ExtractSettings::default().examples_per_shard)]
    pub examples_per_shard: u64,
    /// Truncate to this many tokens, special tokens included.
    #[arg(long, default_value_t = ExtractSettings::default().max_len)]
    pub max_len: usize,
    /// Padded-token budget of one ONNX Runtime batch.
    #[arg(long, default_value_t = ExtractSettings::default().max_tokens_per_batch)]
    pub max_tokens_per_batch: usize,
    /// Most examples in one batch.
    #[arg(long, default_value_t = ExtractSettings::default().max_batch)]
    pub max_batch: usize,
    /// Compression threads (default: 1; compression runs while the backbone runs).
    #[arg(long, default_value_t = DEFAULT_COMPRESS_THREADS)]
    pub compress_threads: usize,
    /// Continue an interrupted extraction into --out (settings must match).
    #[arg(long)]
    pub resume: bool,
    /// Be worker I of N (0-based): write only shards k with k % N == I and a
    /// partial manifest; combine parts with `sherl-cache merge`.
    #[arg(long, value_name = "I/N")]
    pub shard_of: Option<String>,
    /// ONNX Runtime.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Image backbones: a preprocessing recipe (JSON) instead of the one in
    /// backbone.json.
    #[arg(long, value_name = "FILE.json")]
    pub preprocess: Option<PathBuf>,
    /// Image backbones: average-pool the patch tokens p x p before caching
    /// (1: none; the CLS token is kept).
    #[arg(long, default_value_t = 1, value_name = "P")]
    pub patch_pool: u32,
    /// Image tables: the column holding each image's path.
    #[arg(long, default_value = "image")]
    pub image_column: String,
    /// IDX images: class names by class number, one per line (e.g.
    /// fashion-mnist/classes.txt); default: the numbers.
    #[arg(long, value_name = "FILE")]
    pub class_names: Option<PathBuf>,
}
