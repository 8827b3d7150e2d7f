//! `FitConfig`: every setting of one training run, with defaults. The run
//! id is a hash of this (canonical JSON) and the cache's settings hash, so
//! the same settings on the same cache always land in the same run
//! directory.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::FitError;
use super::model::{Method, Pool};
use super::nn::adapter::{AdapterActivation, AdapterSpec, Placement};
use super::nn::lora::{LoraSpec, LoraTarget, DEFAULT_TARGETS};
use super::nn::lst::LstInit;
use crate::Result;

/// Largest `--side-dim` accepted: far wider than any backbone in use
/// (BERT-large is 1,024 wide); a typo such as `--side-dim 100000000` is
/// refused here instead of by the kernel's out-of-memory killer.
pub const MAX_SIDE_DIM: usize = 16_384;
/// Largest `--batch-size` accepted.
pub const MAX_BATCH_SIZE: usize = 1 << 20;
/// Largest `--max-tokens-per-batch` accepted.
pub const MAX_TOKENS_PER_BATCH: usize = 1 << 24;

/// One training run's settings (`config.json` in the run directory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FitConfig {
    /// Model to train.
    pub method: Method,
    /// K: how many of the backbone's last layers form the late route.
    pub late_layers: usize,
    /// Train the late layers' pre-trained weights too (sherl).
    pub late_trainable: bool,
    /// Reduction factor r: side width d = D / r (ignored if side_dim is set).
    pub reduction: usize,
    /// Side width d (overrides reduction).
    pub side_dim: Option<usize>,
    /// Early-route layers (hidden_states indices; default 0..=N-K).
    pub early_layers: Option<Vec<usize>>,
    /// Linear-probe layer (default N, the last).
    pub probe_layer: Option<usize>,
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
    /// Dropout of the restore block.
    pub dropout: f32,
    /// Shuffle buffer, in cache chunks.
    pub shuffle_chunks: usize,
    /// Train on a seeded subset of about this many training examples
    /// (whole cache chunks, the same subset every epoch); `None` = all.
    pub train_examples: Option<usize>,
    // The settings of lora and adapter are left out of the JSON while not
    // set, so the run ids of every other run stay as they were.
    /// LoRA rank r (`None`: 8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_rank: Option<usize>,
    /// LoRA alpha; the update is scaled by alpha / r (`None`: 16).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA update's input (`None`: 0, as PEFT; 0.1 before
    /// 2026-12-05, see [`FitConfig::run_id`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<f32>,
    /// Projections LoRA adapts (`None`: q and v). In JSON a list or one
    /// comma-separated string (`"q,v"`, what a sweep grid axis holds).
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lora_targets_de"
    )]
    pub lora_targets: Option<Vec<LoraTarget>>,
    /// Adapter placement (`None`: houlsby).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_placement: Option<Placement>,
    /// Adapter non-linearity (`None`: gelu).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_activation: Option<AdapterActivation>,
    /// How LST's side layers start (`None`: random).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lst_init: Option<LstInit>,
}

/// `lora_targets` from a list of names or one comma-separated string.
fn lora_targets_de<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Vec<LoraTarget>>, D::Error> {
    use serde::de::Error as _;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        One(String),
        Many(Vec<String>),
    }
    let names: Vec<String> = match Option::<Form>::deserialize(d)? {
        None => return Ok(None),
        Some(Form::One(s)) => s.split(',').map(str::to_owned).collect(),
        Some(Form::Many(v)) => v,
    };
    names
        .iter()
        .map(|n| LoraTarget::parse(n).map_err(D::Error::custom))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Some)
}

impl Default for FitConfig {
    fn default() -> Self {
        FitConfig {
            method: Method::Sherl,
            late_layers: 1,
            late_trainable: false,
            reduction: 4,
            side_dim: None,
            early_layers: None,
            probe_layer: None,
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
            dropout: 0.1,
            shuffle_chunks: 8,
            train_examples: None,
            lora_rank: None,
            lora_alpha: None,
            lora_dropout: None,
            lora_targets: None,
            adapter_placement: None,
            adapter_activation: None,
            lst_init: None,
        }
    }
}

impl FitConfig {
    /// Short id: sha256 over the canonical config JSON and the cache's
    /// settings hash, first 12 hex digits, prefixed by the method.
    pub fn run_id(&self, cache_settings_hash: &str) -> String {
        let mut config = serde_json::to_value(self).expect("config serializes");
        if self.method == Method::Lora && self.lora_dropout.is_none() {
            // LoRA's default dropout was 0.1 before 2026-12-05 and is 0 now:
            // hashing the value keeps a run made under the old default from
            // passing for one under the new (every other id is unchanged)
            config["lora_dropout"] = serde_json::json!(0.0);
        }
        let canon = serde_json::json!({ "config": config, "cache": cache_settings_hash });
        let h = Sha256::digest(canon.to_string().as_bytes());
        format!(
            "{}-{}",
            self.method.name(),
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
            ("--dropout", f64::from(self.dropout)),
        ];
        if let Some((name, v)) = finite.iter().find(|(_, v)| !v.is_finite()) {
            return Err(format!("{name} {v}: must be a finite number"));
        }
        if self.lr <= 0.0 {
            return Err(format!("--lr {}: must be positive", self.lr));
        }
        if self.lr_pretrained < 0.0 {
            return Err(format!(
                "--lr-pretrained {}: must be >= 0",
                self.lr_pretrained
            ));
        }
        if !(0.0..1.0).contains(&self.warmup) {
            return Err(format!(
                "--warmup {}: a fraction of the steps in [0, 1)",
                self.warmup
            ));
        }
        if self.weight_decay < 0.0 {
            return Err(format!(
                "--weight-decay {}: must be >= 0",
                self.weight_decay
            ));
        }
        // AdamW's decoupled decay multiplies every weight by (1 - lr * wd)
        // each step: at lr * wd >= 1 the weights flip sign or vanish and the
        // loss diverges whatever the data.
        for (lr_name, lr) in [("--lr", self.lr), ("--lr-pretrained", self.lr_pretrained)] {
            if lr * self.weight_decay >= 1.0 {
                return Err(format!(
                    "--weight-decay {} with {lr_name} {lr}: AdamW scales the weights by 1 - lr x weight decay = {} every step, so training cannot converge; lower --weight-decay (typically 0 to 0.1)",
                    self.weight_decay,
                    1.0 - lr * self.weight_decay
                ));
            }
        }
        if self.grad_clip < 0.0 {
            return Err(format!(
                "--grad-clip {}: must be >= 0 (0 = off)",
                self.grad_clip
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("--dropout {}: must be in [0, 1)", self.dropout));
        }
        if self.reduction == 0 || self.side_dim == Some(0) {
            return Err("--reduction and --side-dim must be positive".into());
        }
        if let Some(d) = self.side_dim.filter(|&d| d > MAX_SIDE_DIM) {
            return Err(format!(
                "--side-dim {d}: at most {MAX_SIDE_DIM} (a side network is narrower than its backbone)"
            ));
        }
        if self.shuffle_chunks == 0 {
            return Err("shuffle_chunks must be at least 1".into());
        }
        let lora = self.lora_spec();
        if lora.rank == 0 || lora.rank > MAX_SIDE_DIM {
            return Err(format!(
                "--lora-rank {}: must be between 1 and {MAX_SIDE_DIM}",
                lora.rank
            ));
        }
        if !lora.alpha.is_finite() || lora.alpha <= 0.0 {
            return Err(format!(
                "--lora-alpha {}: must be a positive finite number",
                lora.alpha
            ));
        }
        if !(0.0..1.0).contains(&lora.dropout) {
            return Err(format!(
                "--lora-dropout {}: must be in [0, 1)",
                lora.dropout
            ));
        }
        if lora.targets.is_empty() {
            return Err(
                "--lora-targets is empty; name at least one of q, k, v, o, ffn-in, ffn-out".into(),
            );
        }
        if self.train_examples == Some(0) {
            return Err(
                "--train-examples 0 would train on nothing; give a positive count or leave it out for all training examples"
                    .into(),
            );
        }
        Ok(())
    }

    /// The LoRA settings, defaults filled in (targets sorted, without
    /// repeats).
    pub fn lora_spec(&self) -> LoraSpec {
        let mut targets = self
            .lora_targets
            .clone()
            .unwrap_or_else(|| DEFAULT_TARGETS.to_vec());
        targets.sort();
        targets.dedup();
        LoraSpec {
            rank: self.lora_rank.unwrap_or(8),
            alpha: self.lora_alpha.unwrap_or(16.0),
            dropout: self.lora_dropout.unwrap_or(0.0),
            targets,
        }
    }

    /// The adapter settings, defaults filled in.
    pub fn adapter_spec(&self) -> AdapterSpec {
        AdapterSpec {
            placement: self.adapter_placement.unwrap_or(Placement::Houlsby),
            activation: self.adapter_activation.unwrap_or(AdapterActivation::Gelu),
        }
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
}

/// The settings given as `sherl-fit run` flags (`None`, or `false` for a
/// switch: not given). Precedence: [`FitConfig::default`], then the
/// `--config` file, then these flags ([`FitConfig::resolve`]).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SettingFlags {
    /// Model to train.
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    /// K: the backbone's last K layers form the late route.
    #[arg(long)]
    pub late_layers: Option<usize>,
    /// Train the late layers' pre-trained weights too.
    #[arg(long)]
    pub late_trainable: bool,
    /// Reduction r: side width d = D / r.
    #[arg(long)]
    pub reduction: Option<usize>,
    /// Side width d (overrides --reduction).
    #[arg(long)]
    pub side_dim: Option<usize>,
    /// Early-route layers, e.g. 0,2,4,5 (must end with N-K).
    #[arg(long, value_delimiter = ',')]
    pub early_layers: Option<Vec<usize>>,
    /// Linear-probe layer (default: the last).
    #[arg(long)]
    pub probe_layer: Option<usize>,
    /// Pooling before the head.
    #[arg(long, value_enum)]
    pub pool: Option<Pool>,
    /// Epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Peak learning rate of the new modules.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Peak learning rate of trained pre-trained weights.
    #[arg(long)]
    pub lr_pretrained: Option<f64>,
    /// AdamW weight decay.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Warm-up fraction of all steps (then linear decay).
    #[arg(long)]
    pub warmup: Option<f64>,
    /// Examples per batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Padded tokens per batch at most.
    #[arg(long)]
    pub max_tokens_per_batch: Option<usize>,
    /// Global gradient-norm clip (0 = off).
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// Seed of init, dropout and data order.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Dropout of the restore block.
    #[arg(long)]
    pub dropout: Option<f32>,
    /// Train on a seeded subset of about N training examples (whole chunks).
    #[arg(long)]
    pub train_examples: Option<usize>,
    /// LoRA rank r (--method lora; default 8).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha: the update is scaled by alpha / r (--method lora; default 16).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA update's input (--method lora; default 0, as
    /// Hugging Face PEFT: the updates then merge into the fused layer op).
    #[arg(long)]
    pub lora_dropout: Option<f32>,
    /// Projections LoRA adapts, e.g. q,k,v,o,ffn-in,ffn-out (--method lora; default q,v).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub lora_targets: Option<Vec<LoraTarget>>,
    /// Adapter placement: houlsby (after attention and FFN) or pfeiffer
    /// (after FFN) (--method adapter; default houlsby). Width: --reduction / --side-dim.
    #[arg(long, value_enum)]
    pub adapter_placement: Option<Placement>,
    /// Adapter non-linearity (--method adapter; default gelu).
    #[arg(long, value_enum)]
    pub adapter_activation: Option<AdapterActivation>,
    /// LST side layers: random, or the backbone's layers pruned by weight
    /// magnitude (--method lst, text caches; default random).
    #[arg(long, value_enum)]
    pub lst_init: Option<LstInit>,
}

impl FitConfig {
    /// The settings of one run: the defaults, overridden by the JSON file
    /// `file` (FitConfig fields; unknown fields are refused), overridden by
    /// the `flags` that were given; then validated.
    pub fn resolve(file: Option<&Path>, flags: &SettingFlags) -> Result<FitConfig> {
        let mut c = match file {
            Some(p) => {
                let bytes = std::fs::read(p).map_err(|source| FitError::SettingsUnreadable {
                    path: p.to_path_buf(),
                    source,
                })?;
                serde_json::from_slice::<FitConfig>(&bytes).map_err(|source| {
                    FitError::SettingsInvalid {
                        path: p.to_path_buf(),
                        source,
                    }
                })?
            }
            None => FitConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = flags.$f.clone() { c.$f = v; } )* };
        }
        set!(
            method,
            late_layers,
            reduction,
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
            dropout
        );
        if flags.side_dim.is_some() {
            c.side_dim = flags.side_dim;
        }
        if flags.early_layers.is_some() {
            c.early_layers = flags.early_layers.clone();
        }
        if flags.train_examples.is_some() {
            c.train_examples = flags.train_examples;
        }
        if flags.probe_layer.is_some() {
            c.probe_layer = flags.probe_layer;
        }
        if flags.late_trainable {
            c.late_trainable = true;
        }
        macro_rules! set_opt {
            ($($f:ident),*) => { $( if flags.$f.is_some() { c.$f = flags.$f.clone(); } )* };
        }
        set_opt!(
            lora_rank,
            lora_alpha,
            lora_dropout,
            lora_targets,
            adapter_placement,
            adapter_activation,
            lst_init
        );
        // A method's own flag given to another method would change the run
        // id and nothing else: refused (a config file or sweep grid may
        // carry them for every run; they are ignored where unused).
        let given = |method: Method, names: &[(&str, bool)]| -> Result<()> {
            match names.iter().find(|(_, set)| *set) {
                Some((name, _)) if c.method != method => Err(FitError::settings(format!(
                    "{name} applies to --method {} only, not {}",
                    method.name(),
                    c.method.name()
                ))),
                _ => Ok(()),
            }
        };
        given(
            Method::Lora,
            &[
                ("--lora-rank", flags.lora_rank.is_some()),
                ("--lora-alpha", flags.lora_alpha.is_some()),
                ("--lora-dropout", flags.lora_dropout.is_some()),
                ("--lora-targets", flags.lora_targets.is_some()),
            ],
        )?;
        given(
            Method::Adapter,
            &[
                ("--adapter-placement", flags.adapter_placement.is_some()),
                ("--adapter-activation", flags.adapter_activation.is_some()),
            ],
        )?;
        given(Method::Lst, &[("--lst-init", flags.lst_init.is_some())])?;
        c.validate().map_err(FitError::Settings)?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_id_depends_on_config_and_cache() {
        let a = FitConfig::default();
        let mut b = a.clone();
        b.seed = 1;
        assert_ne!(a.run_id("x"), b.run_id("x"));
        assert_ne!(a.run_id("x"), a.run_id("y"));
        assert_eq!(a.run_id("x"), a.clone().run_id("x"));
        assert!(a.run_id("x").starts_with("sherl-"));
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let c = FitConfig {
            warmup: 0.1,
            ..Default::default()
        };
        assert!((c.schedule(0, 100) - 0.1).abs() < 1e-12);
        assert!((c.schedule(9, 100) - 1.0).abs() < 1e-12);
        assert!((c.schedule(10, 100) - 1.0).abs() < 1e-12);
        assert!(c.schedule(99, 100) < 0.02);
        assert!(c.schedule(55, 100) < c.schedule(20, 100));
    }

    /// The LoRA and adapter settings are left out of the JSON while unset
    /// (every earlier run keeps its id); `lora_targets` reads a list or one
    /// comma-separated string (a sweep grid's axis value), sorted and
    /// without repeats in the spec; a bad name is refused, naming it.
    #[test]
    fn peft_settings_keep_run_ids_and_parse_targets() {
        let json = serde_json::to_value(FitConfig::default()).unwrap();
        for k in [
            "lora_rank",
            "lora_alpha",
            "lora_dropout",
            "lora_targets",
            "adapter_placement",
            "adapter_activation",
            "lst_init",
        ] {
            assert!(json.get(k).is_none(), "{k}");
        }
        let spec = FitConfig::default().lora_spec();
        assert_eq!((spec.rank, spec.alpha, spec.dropout), (8, 16.0, 0.0));
        // a default LoRA run's id is not the one the 0.1 default gave
        let lora = FitConfig {
            method: Method::Lora,
            ..FitConfig::default()
        };
        let old = serde_json::json!({ "config": lora, "cache": "x" });
        let old_hex = crate::hash::hex(&Sha256::digest(old.to_string().as_bytes()));
        let old = crate::hash::abbrev(&old_hex);
        assert_ne!(lora.run_id("x"), format!("lora-{old}"));
        // any other run keeps the id of the plain hash
        let plain = FitConfig::default();
        let hex = crate::hash::hex(&Sha256::digest(
            serde_json::json!({ "config": plain, "cache": "x" })
                .to_string()
                .as_bytes(),
        ));
        assert_eq!(
            plain.run_id("x"),
            format!("sherl-{}", crate::hash::abbrev(&hex))
        );
        assert_eq!(
            lora.run_id("x"),
            FitConfig {
                lora_dropout: Some(0.0),
                ..lora.clone()
            }
            .run_id("x")
        );
        assert_eq!(spec.targets, vec![LoraTarget::Q, LoraTarget::V]);
        let a: FitConfig =
            serde_json::from_str(r#"{"method": "lora", "lora_targets": "v,q,ffn-in,q"}"#).unwrap();
        let b: FitConfig =
            serde_json::from_str(r#"{"method": "lora", "lora_targets": ["ffn-in", "v", "q"]}"#)
                .unwrap();
        assert_eq!(
            a.lora_spec().targets,
            vec![LoraTarget::Q, LoraTarget::V, LoraTarget::FfnIn]
        );
        assert_eq!(a.lora_spec(), b.lora_spec());
        let e = serde_json::from_str::<FitConfig>(r#"{"lora_targets": "q,query"}"#).unwrap_err();
        assert!(e.to_string().contains("\"query\""), "{e}");
        // set, they are recorded and change the id
        let c = FitConfig {
            lora_rank: Some(4),
            ..FitConfig::default()
        };
        assert_ne!(c.run_id("x"), FitConfig::default().run_id("x"));
        let back: FitConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(
            FitConfig::default().adapter_spec(),
            AdapterSpec {
                placement: Placement::Houlsby,
                activation: AdapterActivation::Gelu
            }
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e =
            serde_json::from_str::<FitConfig>(r#"{"lr": 0.1, "learning_rate": 2}"#).unwrap_err();
        assert!(e.to_string().contains("learning_rate"));
        let c: FitConfig =
            serde_json::from_str(r#"{"lr": 0.1, "method": "linear-probe"}"#).unwrap();
        assert_eq!(c.method, Method::LinearProbe);
        assert_eq!(c.epochs, 5);
    }
}
