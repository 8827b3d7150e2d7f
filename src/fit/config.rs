//! `FitConfig`: every setting of one training run, with defaults: the
//! method with its own settings ([`MethodConfig`]) and the settings every
//! method shares. The run id is a hash of this (canonical JSON) and the
//! cache's settings hash, so the same settings on the same cache always
//! land in the same run directory.
//!
//! JSON (a `--config` file, a grid's runs, `config.json`'s `config`): one
//! flat object, `method` naming the method and its settings' keys beside
//! the shared ones. A key of another method's settings is refused, naming
//! the method(s) it belongs to ([`FitConfig::from_json`]).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::error::FitError;
use super::method::{field_names, Method, MethodConfig};
use super::nn::head::Pool;
use crate::Result;

pub use super::method::MAX_SIDE_DIM;
/// Largest `--batch-size` accepted.
pub const MAX_BATCH_SIZE: usize = 1 << 20;
/// Largest `--max-tokens-per-batch` accepted.
pub const MAX_TOKENS_PER_BATCH: usize = 1 << 24;

/// One training run's settings (`config.json` in the run directory).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FitConfig {
    /// Model to train, with its own settings.
    #[serde(flatten)]
    pub method: MethodConfig,
    /// Pooling before the head.
    pub pool: Pool,
    /// Epochs.
    pub epochs: usize,
    /// Peak learning rate of the new modules.
    pub lr: f64,
    /// Peak learning rate of trained pre-trained weights.
    pub lr_pretrained: f64,
    /// AdamW weight decay (both groups).
    pub weight_decay: f64,
    /// Linear warm-up as a fraction of all steps, then linear decay to 0.
    pub warmup: f64,
    /// Examples per training batch.
    pub batch_size: usize,
    /// Padded tokens per batch at most (batch size x longest example).
    pub max_tokens_per_batch: usize,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f64,
    /// Seed of every random choice (init, dropout, order).
    pub seed: u64,
    /// Shuffle buffer, in cache chunks.
    pub shuffle_chunks: usize,
    /// Train on a seeded subset of about this many training examples
    /// (whole cache chunks, the same subset every epoch); `None` = all.
    pub train_examples: Option<usize>,
}

/// The settings every method shares, as read from JSON (the fields of
/// [`FitConfig`] but `method`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Shared {
    pool: Pool,
    epochs: usize,
    lr: f64,
    lr_pretrained: f64,
    weight_decay: f64,
    warmup: f64,
    batch_size: usize,
    max_tokens_per_batch: usize,
    grad_clip: f64,
    seed: u64,
    shuffle_chunks: usize,
    train_examples: Option<usize>,
}

impl Default for Shared {
    fn default() -> Self {
        let FitConfig {
            method: _,
            pool,
            epochs,
            lr,
            lr_pretrained,
            weight_decay,
            warmup,
            batch_size,
            max_tokens_per_batch,
            grad_clip,
            seed,
            shuffle_chunks,
            train_examples,
        } = FitConfig::default();
        Shared {
            pool,
            epochs,
            lr,
            lr_pretrained,
            weight_decay,
            warmup,
            batch_size,
            max_tokens_per_batch,
            grad_clip,
            seed,
            shuffle_chunks,
            train_examples,
        }
    }
}

impl Shared {
    fn with(self, method: MethodConfig) -> FitConfig {
        let Shared {
            pool,
            epochs,
            lr,
            lr_pretrained,
            weight_decay,
            warmup,
            batch_size,
            max_tokens_per_batch,
            grad_clip,
            seed,
            shuffle_chunks,
            train_examples,
        } = self;
        FitConfig {
            method,
            pool,
            epochs,
            lr,
            lr_pretrained,
            weight_decay,
            warmup,
            batch_size,
            max_tokens_per_batch,
            grad_clip,
            seed,
            shuffle_chunks,
            train_examples,
        }
    }
}

impl Default for FitConfig {
    fn default() -> Self {
        FitConfig {
            method: MethodConfig::default(),
            pool: Pool::Mean,
            epochs: 5,
            lr: 1e-3,
            lr_pretrained: 5e-5,
            weight_decay: 0.01,
            warmup: 0.06,
            batch_size: 32,
            max_tokens_per_batch: 8192,
            grad_clip: 1.0,
            seed: 0,
            shuffle_chunks: 8,
            train_examples: None,
        }
    }
}

/// Where settings come from, for [`FitConfig::from_json`]: what a key of
/// another method means there, and how a key is named in a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `sherl-fit run` flags: a flag of another method is refused, named
    /// as a flag (`--lora-rank`).
    Flags,
    /// A settings file or a grid: a key of another method is refused,
    /// except one of the keys every `config.json` held before the methods'
    /// settings were their own, at the value it held when not set (an old
    /// run's settings used as a `--config` file still read).
    File,
    /// A run's stored `config.json`: keys of another method (written by
    /// earlier versions, which recorded every method's) are dropped.
    Stored,
}

/// The keys every run's `config.json` held before each method's settings
/// were its own, with the values they held when not set. The run id is
/// hashed over the settings with these filled in, so a run keeps the id
/// it had then ([`FitConfig::run_id`]).
fn legacy_keys() -> Map<String, Value> {
    let v = serde_json::json!({
        "late_layers": 1,
        "late_trainable": false,
        "reduction": 4,
        "side_dim": null,
        "early_layers": null,
        "probe_layer": null,
        "dropout": 0.1f32,
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("an object literal"),
    }
}

/// `a` and `b` are the same setting value (numbers compared in single
/// precision: `dropout` is stored widened).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x as f32 == y as f32,
        _ => a == b,
    }
}

/// The methods whose settings have `key`.
fn owners(key: &str) -> Vec<Method> {
    Method::all()
        .iter()
        .copied()
        .filter(|m| m.keys().contains(&key))
        .collect()
}

/// "a", "a or b", "a, b or c".
fn either(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => (*one).to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

impl<'de> Deserialize<'de> for FitConfig {
    /// As [`FitConfig::from_json`] from a settings file ([`Source::File`]).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        FitConfig::from_json(v, Source::File).map_err(serde::de::Error::custom)
    }
}

impl FitConfig {
    /// The method.
    pub fn kind(&self) -> Method {
        self.method.kind()
    }

    /// Settings from a JSON object: `method` (default sherl), its settings'
    /// keys and the shared ones, each at its default where not given. A
    /// key that is no setting is refused, naming it; a key of another
    /// method's settings as `source` says.
    pub fn from_json(v: Value, source: Source) -> Result<FitConfig, String> {
        let Value::Object(mut obj) = v else {
            return Err(format!("settings must be a JSON object, not {v}"));
        };
        let method = match obj.remove("method") {
            None => Method::Sherl,
            Some(m) => serde_json::from_value(m).map_err(|e| format!("method: {e}"))?,
        };
        let name = |key: &str| match source {
            Source::Flags => format!("--{}", key.replace('_', "-")),
            Source::File | Source::Stored => format!("\"{key}\""),
        };
        let shared_keys = field_names::<Shared>();
        let legacy = legacy_keys();
        let (mut shared, mut own) = (Map::new(), Map::new());
        for (key, value) in obj {
            if shared_keys.contains(&key.as_str()) {
                shared.insert(key, value);
            } else if method.keys().contains(&key.as_str()) {
                own.insert(key, value);
            } else {
                let of = owners(&key);
                if of.is_empty() {
                    return Err(format!(
                        "unknown setting {} (settings are `sherl-fit run` flags, with underscores in JSON)",
                        name(&key)
                    ));
                }
                let old_default = legacy.get(&key).is_some_and(|d| same_value(d, &value));
                let dropped = source == Source::Stored || (source == Source::File && old_default);
                if !dropped {
                    let names: Vec<&str> = of.iter().map(|m| m.name()).collect();
                    let flag = if source == Source::Flags { "--" } else { "" };
                    return Err(format!(
                        "{} applies to {flag}method {} only, not {}",
                        name(&key),
                        either(&names),
                        method.name()
                    ));
                }
            }
        }
        let shared: Shared =
            serde_json::from_value(Value::Object(shared)).map_err(|e| e.to_string())?;
        own.insert("method".into(), method.name().into());
        let method: MethodConfig =
            serde_json::from_value(Value::Object(own)).map_err(|e| e.to_string())?;
        Ok(shared.with(method))
    }

    /// A run's stored settings (`config.json`'s `config`), also as written
    /// by earlier versions ([`Source::Stored`]).
    pub fn from_stored(v: Value) -> Result<FitConfig, String> {
        FitConfig::from_json(v, Source::Stored)
    }

    /// For `#[serde(deserialize_with)]`: [`FitConfig::from_stored`].
    pub fn deserialize_stored<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<FitConfig, D::Error> {
        FitConfig::from_stored(Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }

    /// These settings for another method: the settings `kind` shares with
    /// this config's method carried over (a retrieval tower's settings from
    /// the run's), its others at their defaults.
    pub fn for_method(&self, kind: Method) -> FitConfig {
        let mut v = self.legacy_json();
        v["method"] = kind.name().into();
        FitConfig::from_stored(v).expect("a config's own JSON reads back")
    }

    /// The JSON the run id is hashed over: these settings with the keys
    /// every config held before each method's settings were its own
    /// (`late_layers`, `reduction`, `probe_layer`, ...) filled in at the
    /// values they held when not set, which is exactly the JSON of this
    /// run's settings then; so a run keeps its id.
    pub fn legacy_json(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("config serializes");
        if let Some(o) = v.as_object_mut() {
            for (key, default) in legacy_keys() {
                o.entry(key).or_insert(default);
            }
        }
        v
    }

    /// Short id: sha256 over the canonical config JSON
    /// ([`FitConfig::legacy_json`]) and the cache's settings hash, first 12
    /// hex digits, prefixed by the method.
    pub fn run_id(&self, cache_settings_hash: &str) -> String {
        let mut config = self.legacy_json();
        if self.kind() == Method::Lora && config.get("lora_dropout").is_none() {
            // LoRA's default dropout was 0.1 before 2026-12-05 and is 0 now:
            // hashing the value keeps a run made under the old default from
            // passing for one under the new (every other id is unchanged)
            config["lora_dropout"] = serde_json::json!(0.0);
        }
        let canon = serde_json::json!({ "config": config, "cache": cache_settings_hash });
        let h = Sha256::digest(canon.to_string().as_bytes());
        format!(
            "{}-{}",
            self.kind().name(),
            crate::hash::abbrev(&crate::hash::hex(&h))
        )
    }

    /// Check every setting's range before anything is written; returns a
    /// message naming the bad setting. Floats must be finite: JSON has no
    /// NaN or infinity, so such a value would be recorded as `null` and
    /// break every later reader of the run's config.
    pub fn validate(&self) -> Result<(), String> {
        if self.epochs == 0 {
            return Err("--epochs must be at least 1".into());
        }
        if self.batch_size == 0 || self.max_tokens_per_batch == 0 {
            return Err("--batch-size and --max-tokens-per-batch must be positive".into());
        }
        if self.batch_size > MAX_BATCH_SIZE || self.max_tokens_per_batch > MAX_TOKENS_PER_BATCH {
            return Err(format!(
                "--batch-size {} / --max-tokens-per-batch {}: at most {MAX_BATCH_SIZE} examples and {MAX_TOKENS_PER_BATCH} tokens per batch",
                self.batch_size, self.max_tokens_per_batch
            ));
        }
        let finite = [
            ("--lr", self.lr),
            ("--lr-pretrained", self.lr_pretrained),
            ("--weight-decay", self.weight_decay),
            ("--warmup", self.warmup),
            ("--grad-clip", self.grad_clip),
        ];
        if let Some((name, v)) = finite.iter().find(|(_, v)| !v.is_finite()) {
            return Err(format!("{name} {}: must be a finite number", num(*v)));
        }
        if self.lr <= 0.0 {
            return Err(format!("--lr {}: must be positive", num(self.lr)));
        }
        if self.lr_pretrained < 0.0 {
            return Err(format!(
                "--lr-pretrained {}: must be >= 0",
                num(self.lr_pretrained)
            ));
        }
        if !(0.0..1.0).contains(&self.warmup) {
            return Err(format!(
                "--warmup {}: a fraction of the steps in [0, 1)",
                num(self.warmup)
            ));
        }
        if self.weight_decay < 0.0 {
            return Err(format!(
                "--weight-decay {}: must be >= 0",
                num(self.weight_decay)
            ));
        }
        // AdamW's decoupled decay multiplies every weight by (1 - lr * wd)
        // each step: at lr * wd >= 1 the weights flip sign or vanish and the
        // loss diverges whatever the data.
        for (lr_name, lr) in [("--lr", self.lr), ("--lr-pretrained", self.lr_pretrained)] {
            if lr * self.weight_decay >= 1.0 {
                return Err(format!(
                    "--weight-decay {} with {lr_name} {}: AdamW scales the weights by 1 - lr x weight decay = {} every step, so training cannot converge; lower --weight-decay (typically 0 to 0.1)",
                    num(self.weight_decay),
                    num(lr),
                    num(1.0 - lr * self.weight_decay)
                ));
            }
        }
        if self.grad_clip < 0.0 {
            return Err(format!(
                "--grad-clip {}: must be >= 0 (0 = off)",
                num(self.grad_clip)
            ));
        }
        self.method.validate()?;
        if self.shuffle_chunks == 0 {
            return Err("shuffle_chunks must be at least 1".into());
        }
        if self.train_examples == Some(0) {
            return Err(
                "--train-examples 0 would train on nothing; give a positive count or leave it out for all training examples"
                    .into(),
            );
        }
        Ok(())
    }

    /// Learning-rate multiplier at `step` of `total`: linear warm-up, then
    /// linear decay to 0.
    pub fn schedule(&self, step: usize, total: usize) -> f64 {
        let warm = ((self.warmup * total as f64).round() as usize).max(1);
        if step < warm {
            (step + 1) as f64 / warm as f64
        } else {
            let rest = total.saturating_sub(warm).max(1);
            (1.0 - (step - warm) as f64 / rest as f64).max(0.0)
        }
    }

    /// The settings of one run: the defaults, overridden by the JSON file
    /// `file` ([`Source::File`]), overridden by the flags that were given
    /// (`flags`: flag names with underscores -> values, [`Source::Flags`]:
    /// a flag of another method than the one chosen is refused); then
    /// validated.
    pub fn resolve(file: Option<&Path>, flags: &Map<String, Value>) -> Result<FitConfig> {
        let mut merged = match file {
            Some(p) => {
                // A regular file of bounded size (a device, a FIFO or a
                // directory is refused, naming it).
                let bytes = crate::fsutil::read_bounded(p, crate::fsutil::SMALL_FILE_LIMIT)
                    .map_err(|e| match e {
                        crate::Error::Io { source, .. } => FitError::SettingsUnreadable {
                            path: p.to_path_buf(),
                            source,
                        }
                        .into(),
                        other => other,
                    })?;
                let invalid = |source| FitError::SettingsInvalid {
                    path: p.to_path_buf(),
                    source,
                };
                // The file alone must read (its errors name the file) ...
                let c: FitConfig = serde_json::from_slice(&bytes).map_err(invalid)?;
                let mut v: Value = serde_json::from_slice(&bytes).map_err(invalid)?;
                v["method"] = c.kind().name().into();
                v
            }
            None => Value::Object(Map::new()),
        };
        // ... and the flags given must all belong to the method chosen.
        let mut given = flags.clone();
        if let (None, Some(m)) = (flags.get("method"), merged.get("method")) {
            given.insert("method".into(), m.clone());
        }
        FitConfig::from_json(Value::Object(given.clone()), Source::Flags)
            .map_err(FitError::settings)?;
        if let Some(o) = merged.as_object_mut() {
            o.extend(given);
        }
        let c = FitConfig::from_json(merged, Source::File).map_err(|m| match file {
            Some(p) => FitError::settings(format!("{}: {m}", p.display())),
            None => FitError::settings(m),
        })?;
        c.validate().map_err(FitError::Settings)?;
        Ok(c)
    }
}

/// The flags given on a command line as settings JSON: `flags` serialized,
/// without the ones not given (`null`, or `false` for a switch). A float
/// flag given a value JSON cannot hold (NaN, infinity) would read as not
/// given: it is refused, named with its value as `Debug` shows it.
pub fn given_flags<T: Serialize + std::fmt::Debug>(flags: &T) -> Result<Map<String, Value>> {
    let Ok(Value::Object(m)) = serde_json::to_value(flags) else {
        return Ok(Map::new());
    };
    let shown = format!("{flags:?}");
    let mut given = Map::new();
    for (key, value) in m {
        if value.is_null() {
            let at = format!(" {key}: Some(");
            if let Some(i) = shown.find(&at) {
                let rest = &shown[i + at.len()..];
                let v = &rest[..rest.find(')').unwrap_or(rest.len())];
                return Err(FitError::settings(format!(
                    "--{} {v}: must be a finite number",
                    key.replace('_', "-")
                )));
            }
        } else if value != Value::Bool(false) {
            given.insert(key, value);
        }
    }
    Ok(given)
}

/// A number in a message as the user would write it: `0.01`, `2000`,
/// `1e308` (`f64`'s `Display` never uses an exponent, so `1e308` would be
/// 309 digits), `NaN`, `inf`.
fn num(x: f64) -> String {
    let a = x.abs();
    if a.is_finite() && a != 0.0 && !(1e-5..1e16).contains(&a) {
        format!("{x:e}")
    } else {
        x.to_string()
    }
}

#[cfg(test)]
mod tests;
