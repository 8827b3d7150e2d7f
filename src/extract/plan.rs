//! Stage one of `sherl-extract run`: what to do. [`ExtractPlan`] (the
//! settings, with their defaults in one place: [`ExtractSettings`]'s
//! `Default`, which the binary's flags read), [`LayerChoice`], and the
//! checks that need no backbone ([`validate`]) or only its size
//! ([`check_max_len`], [`resolve_layers`]).

use std::path::PathBuf;

use super::error::ExtractError;
use crate::cache::manifest::{ExtractSettings, WorkerInfo};
use crate::cache::Dtype;
use crate::data::image::ImageOptions;
use crate::data::DatasetPlan;
use crate::extract::runtime::SessionConfig;
use crate::Result;

/// Compression threads when not told otherwise (compression runs while the
/// backbone runs).
pub const DEFAULT_COMPRESS_THREADS: usize = 1;

/// `sherl-extract run`'s defaults: the values its flags show and use.
impl Default for ExtractSettings {
    fn default() -> Self {
        ExtractSettings {
            layers: Vec::new(),
            late_layers: 1,
            dtype: Dtype::F16,
            shuffle: true,
            zstd_level: 1,
            chunk_size: 32,
            examples_per_shard: 2048,
            max_len: crate::extract::tokenize::DEFAULT_MAX_LEN,
            max_tokens_per_batch: 4096,
            max_batch: 256,
        }
    }
}

/// Which stored layers to keep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LayerChoice {
    /// What SHERL needs for `late_layers` K: `hidden_states.0 ..= N-K`.
    #[default]
    Default,
    /// Every hidden state `0..=N`.
    All,
    /// An explicit list.
    List(Vec<usize>),
}

impl std::fmt::Display for LayerChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerChoice::Default => f.write_str("default"),
            LayerChoice::All => f.write_str("all"),
            LayerChoice::List(v) => {
                let parts: Vec<String> = v.iter().map(usize::to_string).collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

impl std::str::FromStr for LayerChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "default" | "sherl" => Ok(LayerChoice::Default),
            "all" => Ok(LayerChoice::All),
            _ => {
                let mut v = Vec::new();
                for part in s.split(',') {
                    if let Some((a, b)) = part.split_once('-') {
                        let (a, b): (usize, usize) = (
                            a.trim()
                                .parse()
                                .map_err(|_| format!("bad layer range '{part}'"))?,
                            b.trim()
                                .parse()
                                .map_err(|_| format!("bad layer range '{part}'"))?,
                        );
                        if a > b {
                            return Err(format!("bad layer range '{part}'"));
                        }
                        v.extend(a..=b);
                    } else {
                        v.push(part.trim().parse().map_err(|_| {
                            format!(
                                "bad layer '{part}' (expected all, default, or a list like 0-5,6)"
                            )
                        })?);
                    }
                }
                v.sort_unstable();
                v.dedup();
                Ok(LayerChoice::List(v))
            }
        }
    }
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct ExtractPlan {
    /// Backbone directory (tokenizer.json, config.json, model.safetensors).
    pub backbone: PathBuf,
    /// ONNX model (default `BACKBONE/model.onnx`).
    pub model: PathBuf,
    /// Output cache directory.
    pub out: PathBuf,
    /// Dataset to read.
    pub dataset: DatasetPlan,
    /// Layer choice.
    pub layers: LayerChoice,
    /// Settings (its `layers` field is filled in by `run`).
    pub settings: ExtractSettings,
    /// Continue an interrupted extraction.
    pub resume: bool,
    /// `--shard-of I/N`.
    pub worker: Option<WorkerInfo>,
    /// Compression threads.
    pub compress_threads: usize,
    /// ONNX Runtime session settings.
    pub session: SessionConfig,
    /// How an image dataset is read and preprocessed (used when the
    /// backbone is an image backbone).
    pub image: ImagePlan,
}

/// The checks that need nothing but the settings.
pub fn validate(s: &ExtractSettings) -> Result<()> {
    if s.chunk_size == 0
        || s.examples_per_shard == 0
        || s.max_tokens_per_batch == 0
        || s.max_batch == 0
    {
        return Err(ExtractError::NotPositive {
            settings: "--chunk-size, --examples-per-shard, --max-tokens-per-batch and --max-batch",
        }
        .into());
    }
    if !(-7..=22).contains(&s.zstd_level) {
        return Err(ExtractError::ZstdLevel(s.zstd_level).into());
    }
    Ok(())
}

/// `--max-len` against the longest sequence the backbone's position
/// embeddings cover ([`crate::backbone::BertConfig::max_tokens`]).
pub fn check_max_len(s: &ExtractSettings, max_tokens: usize) -> Result<()> {
    if s.max_len > max_tokens {
        return Err(ExtractError::MaxLen {
            max_len: s.max_len,
            limit: max_tokens,
        }
        .into());
    }
    Ok(())
}

/// The hidden states to store, for a backbone of `n_layers` layers.
pub fn resolve_layers(
    choice: &LayerChoice,
    late_layers: usize,
    n_layers: usize,
) -> Result<Vec<usize>> {
    if late_layers == 0 || late_layers > n_layers {
        return Err(ExtractError::LateLayers {
            late_layers,
            n_layers,
        }
        .into());
    }
    let layers: Vec<usize> = match choice {
        LayerChoice::Default => (0..=n_layers - late_layers).collect(),
        LayerChoice::All => (0..=n_layers).collect(),
        LayerChoice::List(v) => v.clone(),
    };
    if let Some(&layer) = layers.iter().find(|&&l| l > n_layers) {
        return Err(ExtractError::NoSuchLayer { layer, n_layers }.into());
    }
    if layers.is_empty() {
        return Err(ExtractError::NoLayers.into());
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_choice_round_trips() {
        for s in ["default", "all", "0,1,2,5"] {
            assert_eq!(s.parse::<LayerChoice>().unwrap().to_string(), s);
        }
        assert_eq!(
            "0-2,5".parse::<LayerChoice>().unwrap(),
            LayerChoice::List(vec![0, 1, 2, 5])
        );
    }

    #[test]
    fn default_layers_are_what_sherl_needs() {
        assert_eq!(
            resolve_layers(&LayerChoice::Default, 2, 6).unwrap(),
            vec![0, 1, 2, 3, 4]
        );
        assert!(resolve_layers(&LayerChoice::List(vec![7]), 1, 6).is_err());
        assert!(resolve_layers(&LayerChoice::Default, 0, 6).is_err());
    }
}

/// How an image dataset is read, preprocessed and cached.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePlan {
    /// Reading options (image column, background, limits, IDX class names).
    pub options: ImageOptions,
    /// A preprocessing recipe (JSON) to use instead of the backbone's.
    pub preprocess: Option<PathBuf>,
    /// Average-pool the patch tokens `p x p` before caching (1: none).
    pub patch_pool: u32,
    /// Examples per chunk for an image cache; `None`:
    /// [`IMAGE_CHUNK_SIZE`] (the plan's `settings.chunk_size` is text's).
    pub chunk_size: Option<u32>,
}

/// Images per chunk when not told otherwise. An image is a few hundred
/// tokens (257 for a ViT-S/14 at 224 px), so text's 32 examples would make
/// chunks of 8,224 tokens, 164 MB of f32 per chunk for 13 layers; chunks
/// that large were allocated fresh from the kernel every time (4-6 s of
/// system time for 200 images, against 0.5 s with 8 per chunk; 200 images,
/// `sherl-extract run`: 15-16 s at 32, 15 s at 16, 12.1-12.3 s at 8,
/// 12.4 s at 4). 8 images are 2,056 tokens, about what 32 reviews are.
pub const IMAGE_CHUNK_SIZE: u32 = 8;

impl Default for ImagePlan {
    fn default() -> Self {
        ImagePlan {
            options: ImageOptions::default(),
            preprocess: None,
            patch_pool: 1,
            chunk_size: None,
        }
    }
}
