//! The settings of a retrieval run beyond [`FitConfig`]: each tower's
//! method, the joint width, the loss; and the `sherl-fit run` flags that
//! choose the task and name the two caches.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::loss::{Loss, DEFAULT_MARGIN};
use crate::fit::config::{FitConfig, MAX_SIDE_DIM};
use crate::fit::method::Method;

/// What `sherl-fit run` trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// One cache with labels: a classifier (`--cache`, `--backbone`).
    #[default]
    Classification,
    /// An image cache and a caption cache joined by id: two towers and a
    /// joint space (`--image-cache`, `--text-cache`, ...).
    Retrieval,
}

/// A retrieval run's own settings (`config.json`'s `retrieval`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrievalConfig {
    /// The image tower's method.
    pub image_method: Method,
    /// The caption tower's method.
    pub text_method: Method,
    /// Width of the joint space (each tower's head projects to it).
    pub joint_dim: usize,
    /// Contrastive loss.
    pub loss: Loss,
    /// Margin of the hinge (unused by InfoNCE).
    pub margin: f64,
}

impl Default for RetrievalConfig {
    fn default() -> Self {
        RetrievalConfig {
            image_method: Method::Sherl,
            text_method: Method::Sherl,
            joint_dim: 256,
            loss: Loss::Infonce,
            margin: DEFAULT_MARGIN,
        }
    }
}

impl RetrievalConfig {
    /// Check the ranges; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.joint_dim == 0 || self.joint_dim > MAX_SIDE_DIM {
            return Err(format!(
                "--joint-dim {}: must be between 1 and {MAX_SIDE_DIM}",
                self.joint_dim
            ));
        }
        if !(self.margin.is_finite() && self.margin >= 0.0) {
            return Err(format!(
                "--margin {}: must be a finite number >= 0",
                self.margin
            ));
        }
        Ok(())
    }

    /// The run id: `retrieval-<image method>-<text method>-<hash>`, the hash
    /// over these settings, `fit` (its `method` left out: each tower has its
    /// own) and both caches' settings hashes.
    pub fn run_id(&self, fit: &FitConfig, image_hash: &str, text_hash: &str) -> String {
        let mut config = fit_settings(fit);
        let lora = [self.image_method, self.text_method].contains(&Method::Lora);
        if lora && config.get("lora_dropout").is_none() {
            // as FitConfig::run_id: LoRA's default dropout changed (0.1 -> 0)
            config["lora_dropout"] = serde_json::json!(0.0);
        }
        let canon = serde_json::json!({
            "task": "retrieval",
            "config": config,
            "retrieval": self,
            "image_cache": image_hash,
            "text_cache": text_hash,
        });
        let h = Sha256::digest(canon.to_string().as_bytes());
        format!(
            "retrieval-{}-{}-{}",
            self.image_method.name(),
            self.text_method.name(),
            crate::hash::abbrev(&crate::hash::hex(&h))
        )
    }
}

/// `fit` as JSON without `method` (a retrieval run has one per tower), with
/// every key configs held before each method's settings were its own
/// (`FitConfig::legacy_json`: the run ids stay those of then).
pub fn fit_settings(fit: &FitConfig) -> serde_json::Value {
    let mut v = fit.legacy_json();
    if let Some(o) = v.as_object_mut() {
        o.remove("method");
    }
    v
}

/// `sherl-fit run` flags of `--task retrieval` (and `--task` itself).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RetrievalFlags {
    /// classification (--cache, --backbone) or retrieval (--image-cache,
    /// --text-cache, --image-backbone, --text-backbone).
    #[arg(long, value_enum, default_value_t = Task::Classification)]
    pub task: Task,
    /// Retrieval: the image cache (its ids are the pair ids).
    #[arg(long)]
    pub image_cache: Option<PathBuf>,
    /// Retrieval: the caption cache (ids `<pair id>#<k>`).
    #[arg(long)]
    pub text_cache: Option<PathBuf>,
    /// Retrieval: the image backbone the image cache was made from.
    #[arg(long)]
    pub image_backbone: Option<PathBuf>,
    /// Retrieval: the text backbone the caption cache was made from.
    #[arg(long)]
    pub text_backbone: Option<PathBuf>,
    /// Retrieval: the image tower's method, one of --method's [default: sherl].
    #[arg(long, value_enum, hide_possible_values = true)]
    pub image_method: Option<Method>,
    /// Retrieval: the caption tower's method, one of --method's [default: sherl].
    #[arg(long, value_enum, hide_possible_values = true)]
    pub text_method: Option<Method>,
    /// Retrieval: width of the joint space [default: 256].
    #[arg(long)]
    pub joint_dim: Option<usize>,
    /// Retrieval: infonce (CLIP, learnable temperature) or hinge (VSE++
    /// max violation) [default: infonce].
    #[arg(long, value_enum)]
    pub loss: Option<Loss>,
    /// Retrieval: the hinge's margin [default: 0.2].
    #[arg(long)]
    pub margin: Option<f64>,
}

impl RetrievalFlags {
    /// The retrieval settings these flags give (defaults for the others),
    /// validated.
    pub fn resolve(&self) -> crate::Result<RetrievalConfig> {
        let mut c = RetrievalConfig::default();
        if let Some(m) = self.image_method {
            c.image_method = m;
        }
        if let Some(m) = self.text_method {
            c.text_method = m;
        }
        if let Some(d) = self.joint_dim {
            c.joint_dim = d;
        }
        if let Some(l) = self.loss {
            c.loss = l;
        }
        if let Some(m) = self.margin {
            c.margin = m;
        }
        c.validate()
            .map_err(crate::fit::error::FitError::settings)?;
        Ok(c)
    }

    /// The retrieval-only flags given (to refuse them with `--task
    /// classification`).
    pub fn given(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut add = |set: bool, name| {
            if set {
                v.push(name);
            }
        };
        add(self.image_cache.is_some(), "--image-cache");
        add(self.text_cache.is_some(), "--text-cache");
        add(self.image_backbone.is_some(), "--image-backbone");
        add(self.text_backbone.is_some(), "--text-backbone");
        add(self.image_method.is_some(), "--image-method");
        add(self.text_method.is_some(), "--text-method");
        add(self.joint_dim.is_some(), "--joint-dim");
        add(self.loss.is_some(), "--loss");
        add(self.margin.is_some(), "--margin");
        v
    }
}
