//! `sherl-fit`'s command line: its commands and flags, `run`'s help with
//! its headings and the code's defaults, and the checks of which flags go
//! together (once, for `run` and `sweep`). Each method's own flags are its
//! group in [`crate::fit::method::MethodFlags`].
// The argument structs' doc comments are `--help` text read in a terminal,
// where `RUNS/<run id>` is plain text, not an HTML tag.
#![allow(rustdoc::invalid_html_tags)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use serde::Serialize;

use super::OutputArgs;
use crate::fit::config::{given_flags, FitConfig};
use crate::fit::error::FitError;
use crate::fit::method::{Method, MethodFlags};
use crate::fit::model::Pool;
use crate::fit::retrieval::config::{RetrievalFlags, Task};
use crate::fit::sweep::SweepInputs;
use crate::Result;

/// Phase two of sherl: train from a feature cache.
#[derive(Debug, Parser)]
#[command(name = "sherl-fit", version, about, long_about = None)]
pub struct Args {
    /// Logging and progress.
    #[command(flatten)]
    pub output: OutputArgs,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
    /// Where the command's `--blas` value came from (set by [`parse`]), so
    /// that a message about it names the `SHERL_BLAS` environment variable
    /// when it came from there, not a flag the user never typed.
    #[arg(skip)]
    pub blas_source: BlasSource,
}

/// Where a `--blas` value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlasSource {
    /// The flag, or its default.
    #[default]
    Flag,
    /// The `SHERL_BLAS` environment variable.
    Env,
}

impl BlasSource {
    /// How messages name the setting of `value`: `--blas VALUE` or
    /// `SHERL_BLAS=VALUE (environment variable)`.
    pub fn describe(self, value: &str) -> String {
        match self {
            BlasSource::Flag => format!("--blas {value}"),
            BlasSource::Env => format!("SHERL_BLAS={value} (environment variable)"),
        }
    }
}

/// `sherl-fit`'s commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train one model; writes RUNS/<run id>/ and prints a JSON summary.
    Run(Box<RunArgs>),
    /// Train every setting of a grid file on one cache (separate processes,
    /// --jobs at a time); finished runs are skipped, so a killed sweep resumes.
    Sweep(Box<SweepArgs>),
    /// Compare finished runs: a Markdown table on stdout (best first by
    /// valid accuracy), CSV/JSON/Markdown files and learning-curve and
    /// layer-weight pictures (PNG, SVG) in --out.
    Report {
        /// Directory holding run directories.
        runs: PathBuf,
        /// Where to write the files (default RUNS/report).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The setting the "selected on valid" table has one row per value
        /// of: each value's group with the best mean valid accuracy, its
        /// test numbers and how many settings and runs it had.
        #[arg(long, default_value = "method", value_name = "SETTING")]
        select_by: String,
    },
    /// Label new texts with a trained run (runs the backbone through ONNX
    /// Runtime, then the trained modules); writes JSONL.
    #[cfg(feature = "extract")]
    Predict(Box<PredictArgs>),
    /// Query a trained retrieval run: the top K images of a split for
    /// --text, or the top K captions for --image; one JSON line per hit
    /// (rank, id, score, image file or caption).
    #[cfg(feature = "extract")]
    Search(Box<SearchArgs>),
    /// Write a trained text or image classification run of any method as
    /// one standalone ONNX model (backbone layers, trained modules, head;
    /// outputs logits and probabilities) with its tokenizer (text) or
    /// preprocessing recipe (images), labels.json and a README with a
    /// Python example; a retrieval run as two encoders, text.onnx and
    /// image.onnx (output: L2-normalised joint-space embeddings), with the
    /// tokenizer, the recipe, retrieval.json and a README.
    #[cfg(feature = "extract")]
    Export {
        /// Run directory (RUNS/<run id>).
        #[arg(long)]
        run: PathBuf,
        /// Backbone directory the run's cache was made from [default: the one
        /// the run recorded, when its ONNX model is still there unchanged].
        /// Classification runs.
        #[arg(long)]
        backbone: Option<PathBuf>,
        /// Retrieval runs: the image backbone the image cache was made from
        /// [default: the one the cache recorded, as for --backbone].
        #[arg(long)]
        image_backbone: Option<PathBuf>,
        /// Retrieval runs: the text backbone the caption cache was made
        /// from [default: the one the cache recorded].
        #[arg(long)]
        text_backbone: Option<PathBuf>,
        /// Output directory (created when missing; its files are replaced).
        #[arg(long)]
        out: PathBuf,
    },
}

/// `search`'s flags.
#[cfg(feature = "extract")]
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("query").required(true).args(["text", "image"])))]
pub struct SearchArgs {
    /// Retrieval run directory (RUNS/<run id>); its caches must be where
    /// the run recorded them.
    #[arg(long)]
    pub run: PathBuf,
    /// A text query: the hits are the split's images.
    #[arg(long)]
    pub text: Option<String>,
    /// An image file as the query: the hits are the split's captions.
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// Hits to return.
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    /// The split whose cached examples are searched.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Image backbone directory the run's image cache was made from.
    #[arg(long)]
    pub image_backbone: PathBuf,
    /// Text backbone directory the run's caption cache was made from.
    #[arg(long)]
    pub text_backbone: PathBuf,
    /// Write the hits (JSONL) here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Matrix kernel of the fused CPU ops (as for `run`).
    #[arg(long, env = "SHERL_BLAS", default_value = "auto")]
    pub blas: String,
    /// ONNX Runtime.
    #[command(flatten)]
    pub runtime: super::RuntimeArgs,
}

/// What every run trains on: `--task` and its caches and backbones.
#[derive(Debug, Clone, clap::Args)]
pub struct SweepInputArgs {
    /// Feature cache (classification).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Backbone directory the cache was made from (classification).
    #[arg(long)]
    pub backbone: Option<PathBuf>,
    /// classification (--cache, --backbone) or retrieval (--image-cache,
    /// --text-cache, --image-backbone, --text-backbone; the grid may also
    /// set image_method, text_method, joint_dim, loss, margin).
    #[arg(long, value_enum, default_value_t = Task::Classification)]
    pub task: Task,
    /// Retrieval: the image cache.
    #[arg(long)]
    pub image_cache: Option<PathBuf>,
    /// Retrieval: the caption cache.
    #[arg(long)]
    pub text_cache: Option<PathBuf>,
    /// Retrieval: the image backbone the image cache was made from.
    #[arg(long)]
    pub image_backbone: Option<PathBuf>,
    /// Retrieval: the text backbone the caption cache was made from.
    #[arg(long)]
    pub text_backbone: Option<PathBuf>,
}

/// `sweep`'s flags.
#[derive(Debug, clap::Args)]
pub struct SweepArgs {
    /// The task and its inputs.
    #[command(flatten)]
    pub inputs: SweepInputArgs,
    /// Grid file (JSON): option names -> lists of values, or {"runs": [...]}.
    #[arg(long)]
    pub grid: PathBuf,
    /// Directory for run directories (shared by all workers).
    #[arg(long)]
    pub out: PathBuf,
    /// Runs at once; the cores are divided among them.
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// Take only part I of M of the grid (e.g. a Slurm array task).
    #[arg(long, value_name = "I/M")]
    pub worker: Option<String>,
    /// Re-run runs that stopped with an error (error.json) instead of skipping them.
    #[arg(long)]
    pub retry_failed: bool,
    /// Print the expanded runs and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Refuse a grid of more runs than this (counted before it is
    /// expanded; the whole grid, whatever --worker takes). Each run is a
    /// training process: past 10,000 a grid is more often a mistake than
    /// a plan.
    #[arg(long, value_name = "N", default_value_t = crate::fit::sweep::DEFAULT_MAX_RUNS)]
    pub max_runs: usize,
    /// cpu, cuda, cuda:N or auto (GPU 0 if this build has CUDA and a GPU
    /// answers, else CPU, saying why). Default: auto in a build with the
    /// `cuda` feature, cpu otherwise.
    #[arg(long, default_value = crate::fit::DEFAULT_DEVICE)]
    pub device: String,
    /// Matrix kernel of the fused CPU ops: auto (OpenBLAS when
    /// `fetch-assets.sh openblas` fetched it, else the built-in gemm), off
    /// (the built-in gemm), or the path of an OpenBLAS library. The two
    /// round differently: a run records its kernel in summary.json.
    #[arg(long, env = "SHERL_BLAS", default_value = "auto")]
    pub blas: String,
}

/// `predict`'s flags.
#[cfg(feature = "extract")]
#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    /// Run directory (RUNS/<run id>); a directory of runs lists them.
    #[arg(long)]
    pub run: PathBuf,
    /// With --run naming a directory of runs: take the run with the best
    /// valid accuracy.
    #[arg(long)]
    pub best: bool,
    /// Backbone directory the run's cache was made from [default: the one
    /// the run recorded, when its ONNX model is still there unchanged].
    #[arg(long)]
    pub backbone: Option<PathBuf>,
    /// ONNX model (default: BACKBONE/model.onnx).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The inputs to label.
    #[command(flatten)]
    pub data: crate::data::args::PredictDataArgs,
    /// Write predictions (JSONL) here instead of stdout; the summary line then goes to stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Repeat the first N characters of each text in its output line (… marks
    /// a cut); 0 leaves the text out.
    #[arg(long, value_name = "N", default_value_t = 80)]
    pub text_chars: usize,
    /// Examples per batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Matrix kernel of the fused CPU ops: auto (OpenBLAS when
    /// `fetch-assets.sh openblas` fetched it, else the built-in gemm), off
    /// (the built-in gemm), or the path of an OpenBLAS library. The two
    /// round differently: a run records its kernel in summary.json.
    #[arg(long, env = "SHERL_BLAS", default_value = "auto")]
    pub blas: String,
    /// ONNX Runtime.
    #[command(flatten)]
    pub runtime: super::RuntimeArgs,
}

/// `run`'s flags. Settings: built-in defaults, then --config FILE (a JSON
/// object with these names, snake_case), then flags.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Feature cache written by sherl-extract run (classification).
    #[arg(long, help_heading = "Data and cache")]
    pub cache: Option<PathBuf>,
    /// Backbone directory the cache was made from (config.json, model.safetensors).
    #[arg(long, help_heading = "Data and cache")]
    pub backbone: Option<PathBuf>,
    /// Directory for run directories.
    #[arg(long, help_heading = "Data and cache")]
    pub out: PathBuf,
    /// JSON file of settings (the flags' names, snake_case); flags override it.
    #[arg(long, help_heading = "Data and cache")]
    pub config: Option<PathBuf>,
    /// The training settings.
    #[command(flatten)]
    pub settings: SettingFlags,
    /// Retrieval's flags.
    #[command(flatten, next_help_heading = "Retrieval (--task retrieval)")]
    pub retrieval: RetrievalFlags,
    /// cpu, cuda, cuda:N or auto (GPU 0 if this build has CUDA and a GPU
    /// answers, else CPU, saying why). Default: auto in a build with the
    /// `cuda` feature, cpu otherwise.
    #[arg(long, default_value = crate::fit::DEFAULT_DEVICE, help_heading = "Runtime and logging")]
    pub device: String,
    /// Cache decoder threads.
    #[arg(long, default_value_t = 1, help_heading = "Runtime and logging")]
    pub decode_threads: usize,
    /// candle compute threads (default: all cores, or RAYON_NUM_THREADS). On
    /// a busy machine fewer threads can be faster: candle's parallel ops
    /// spin at barriers when cores are taken (README, "Design notes").
    #[arg(long, help_heading = "Runtime and logging")]
    pub threads: Option<usize>,
    /// Matrix kernel of the fused CPU ops: auto (OpenBLAS when
    /// `fetch-assets.sh openblas` fetched it, else the built-in gemm), off
    /// (the built-in gemm), or the path of an OpenBLAS library. The two
    /// round differently: a run records its kernel in summary.json.
    #[arg(
        long,
        env = "SHERL_BLAS",
        default_value = "auto",
        help_heading = "Runtime and logging"
    )]
    pub blas: String,
}

/// The settings given as `sherl-fit run` flags (`None`, or `false` for a
/// switch: not given); they override the `--config` file, which overrides
/// the defaults (`FitConfig::resolve`).
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct SettingFlags {
    /// Model to train.
    #[arg(long, value_enum, help_heading = "Method")]
    pub method: Option<Method>,
    /// Pooling before the head.
    #[arg(long, value_enum, help_heading = "Method")]
    pub pool: Option<Pool>,
    /// Each method's own settings.
    #[command(flatten)]
    #[serde(flatten)]
    pub per_method: MethodFlags,
    /// Epochs.
    #[arg(long, help_heading = "Training")]
    pub epochs: Option<usize>,
    /// Peak learning rate of the new modules.
    #[arg(long, help_heading = "Training")]
    pub lr: Option<f64>,
    /// Peak learning rate of trained pre-trained weights.
    #[arg(long, help_heading = "Training")]
    pub lr_pretrained: Option<f64>,
    /// AdamW weight decay.
    #[arg(long, help_heading = "Training")]
    pub weight_decay: Option<f64>,
    /// Warm-up fraction of all steps (then linear decay).
    #[arg(long, help_heading = "Training")]
    pub warmup: Option<f64>,
    /// Examples per batch.
    #[arg(long, help_heading = "Training")]
    pub batch_size: Option<usize>,
    /// Padded tokens per batch at most.
    #[arg(long, help_heading = "Training")]
    pub max_tokens_per_batch: Option<usize>,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, help_heading = "Training")]
    pub grad_clip: Option<f64>,
    /// Seed of init, dropout and data order.
    #[arg(long, help_heading = "Training")]
    pub seed: Option<u64>,
    /// Train on a seeded subset of about N training examples (whole chunks).
    #[arg(long, help_heading = "Training")]
    pub train_examples: Option<usize>,
}

impl SettingFlags {
    /// The run's settings: defaults, the `--config` file, these flags;
    /// validated (a flag of another method than the one chosen refused).
    pub fn resolve(&self, file: Option<&std::path::Path>) -> Result<FitConfig> {
        FitConfig::resolve(file, &given_flags(self)?)
    }
}

const BOTH: &str =
    "--task retrieval needs --image-cache, --text-cache, --image-backbone and --text-backbone";

impl SweepInputArgs {
    /// The inputs of the task, refusing the other task's flags.
    pub fn inputs(&self, command: &str) -> Result<SweepInputs> {
        let refuse = |m: String| Err(FitError::settings(m));
        let retrieval = [
            &self.image_cache,
            &self.text_cache,
            &self.image_backbone,
            &self.text_backbone,
        ];
        match self.task {
            Task::Classification => {
                if retrieval.iter().any(|p| p.is_some()) {
                    return refuse("--image-cache, --text-cache, --image-backbone and --text-backbone belong to --task retrieval".into());
                }
                let (Some(cache), Some(backbone)) = (self.cache.clone(), self.backbone.clone())
                else {
                    return refuse(format!("sherl-fit {command} needs --cache and --backbone (or --task retrieval with --image-cache, --text-cache, --image-backbone and --text-backbone)"));
                };
                Ok(SweepInputs::Classification { cache, backbone })
            }
            Task::Retrieval => {
                if self.cache.is_some() || self.backbone.is_some() {
                    return refuse("--task retrieval reads --image-cache and --text-cache (with --image-backbone and --text-backbone), not --cache and --backbone".into());
                }
                let [Some(image_cache), Some(text_cache), Some(image_backbone), Some(text_backbone)] =
                    retrieval.map(Clone::clone)
                else {
                    return refuse(BOTH.into());
                };
                Ok(SweepInputs::Retrieval {
                    image_cache,
                    text_cache,
                    image_backbone,
                    text_backbone,
                })
            }
        }
    }
}

impl RunArgs {
    /// The run's inputs, refusing the other task's flags (and `--method`
    /// with retrieval, whose towers have their own).
    pub fn inputs(&self) -> Result<SweepInputs> {
        let f = &self.retrieval;
        let given = f.given();
        if f.task == Task::Classification && !given.is_empty() {
            return Err(FitError::settings(format!(
                "{} belong to --task retrieval; this run is --task classification",
                given.join(", ")
            )));
        }
        let inputs = SweepInputArgs {
            cache: self.cache.clone(),
            backbone: self.backbone.clone(),
            task: f.task,
            image_cache: f.image_cache.clone(),
            text_cache: f.text_cache.clone(),
            image_backbone: f.image_backbone.clone(),
            text_backbone: f.text_backbone.clone(),
        }
        .inputs("run")?;
        if f.task == Task::Retrieval && self.settings.method.is_some() {
            return Err(FitError::settings(
                "--task retrieval takes --image-method and --text-method, not --method",
            ));
        }
        Ok(inputs)
    }
}

/// The command line, with `run`'s help showing each setting's default
/// taken from `FitConfig::default()` (the flags are `Option`s so that
/// `--config` can sit between the defaults and the flags; clap alone would
/// show no default for them).
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    let defaults = FitConfig::default().legacy_json();
    let defaults = defaults.as_object().cloned().unwrap_or_default();
    Args::command().mut_subcommand("run", |run| {
        // (in place: `mut_arg` would move the flag, and its heading, last)
        run.mut_args(|a| {
            let value = defaults.get(a.get_id().as_str());
            // Flags without a default (null) or switches (bool) show none.
            match value.filter(|v| !v.is_null() && !v.is_boolean()) {
                Some(value) => {
                    let shown = crate::report::setting_text(value);
                    let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                    a.help(format!("{help} [default: {shown}]"))
                }
                None => a,
            }
        })
    })
}

/// Parse the command line (exits on a usage error or `--help`).
pub fn parse() -> Args {
    try_parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
}

/// Parse `argv` (the program name first) as the binary does, returning
/// clap's error (a usage error, or the `--help` text) instead of exiting.
pub fn try_parse_from<I, T>(argv: I) -> std::result::Result<Args, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::FromArgMatches;
    let matches = command().try_get_matches_from(argv)?;
    let mut args = Args::from_arg_matches(&matches)?;
    let from_env = matches.subcommand().is_some_and(|(_, m)| {
        m.ids().any(|id| id == "blas")
            && m.value_source("blas") == Some(clap::parser::ValueSource::EnvVariable)
    });
    if from_env {
        args.blas_source = BlasSource::Env;
    }
    Ok(args)
}
