//! The method table: the models `sherl-fit` trains ([`Method`]), each
//! method's own settings ([`MethodConfig`], stored in the run's
//! `config.json`: flat keys beside the shared ones, tagged by `method`),
//! its flags ([`MethodFlags`], a group and a `--help` heading each), and
//! its settings resolved on a cache ([`MethodSpec`], what the model is
//! built from and predict reads back).
//!
//! A new method adds here its variants and flag group; the compiler then
//! points at every `match` to extend: here, in `model/net.rs` and in
//! `memory.rs`. Parsing, the misplaced-key check and the run id read the
//! keys a method owns from its settings struct.

use serde::{Deserialize, Serialize};

use super::nn::adapter::{AdapterActivation, Placement};
use super::nn::lora::{LoraSpec, LoraTarget, DEFAULT_TARGETS};
use super::nn::lst::LstInit;
use crate::Result;
use rules::{check_lora, check_width, late_k, lora_targets_de, side_width, LateFlags, WidthFlags};

mod rules;

pub use rules::{field_names, ResolveOn, MAX_SIDE_DIM};

/// Which model to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// SHERL (early-route consolidation + late layer(s)).
    Sherl,
    /// Pooled last layer -> linear head.
    LinearProbe,
    /// Late layer(s) fine-tuned on hidden_states.N-K, no early route.
    LateLayer,
    /// UniPT side network over all cached layers.
    Unipt,
    /// Full fine-tuning of the whole backbone from token ids.
    FullFt,
    /// LoRA on the frozen backbone, from token ids.
    Lora,
    /// Bottleneck adapters in the frozen backbone, from token ids.
    Adapter,
    /// Ladder Side Tuning over all cached layers.
    Lst,
}

impl Method {
    /// Name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Method::Sherl => "sherl",
            Method::LinearProbe => "linear-probe",
            Method::LateLayer => "late-layer",
            Method::Unipt => "unipt",
            Method::FullFt => "full-ft",
            Method::Lora => "lora",
            Method::Adapter => "adapter",
            Method::Lst => "lst",
        }
    }

    /// Every method, in declaration order.
    pub fn all() -> &'static [Method] {
        <Method as clap::ValueEnum>::value_variants()
    }

    /// The JSON keys of this method's own settings.
    pub fn keys(self) -> &'static [&'static str] {
        use rules::field_names as f;
        match self {
            Method::Sherl => f::<SherlSettings>(),
            Method::LinearProbe => f::<ProbeSettings>(),
            Method::LateLayer => f::<LateLayerSettings>(),
            Method::Unipt => f::<WidthSettings>(),
            Method::FullFt => &[],
            Method::Lora => f::<LoraSettings>(),
            Method::Adapter => f::<AdapterSettings>(),
            Method::Lst => f::<LstSettings>(),
        }
    }

    /// Its settings at their defaults.
    pub fn defaults(self) -> MethodConfig {
        match self {
            Method::Sherl => MethodConfig::Sherl(Default::default()),
            Method::LinearProbe => MethodConfig::LinearProbe(Default::default()),
            Method::LateLayer => MethodConfig::LateLayer(Default::default()),
            Method::Unipt => MethodConfig::Unipt(Default::default()),
            Method::FullFt => MethodConfig::FullFt,
            Method::Lora => MethodConfig::Lora(Default::default()),
            Method::Adapter => MethodConfig::Adapter(Default::default()),
            Method::Lst => MethodConfig::Lst(Default::default()),
        }
    }
}

/// `sherl`'s settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SherlSettings {
    /// K: how many of the backbone's last layers form the late route.
    pub late_layers: usize,
    /// Train the late layers' pre-trained weights too.
    pub late_trainable: bool,
    /// Reduction factor r: side width d = D / r (ignored if side_dim is set).
    pub reduction: usize,
    /// Side width d (overrides reduction).
    pub side_dim: Option<usize>,
    /// Early-route layers (hidden_states indices; default 0..=N-K).
    pub early_layers: Option<Vec<usize>>,
    /// Dropout of the restore block.
    pub dropout: f32,
}

impl Default for SherlSettings {
    fn default() -> Self {
        SherlSettings {
            late_layers: 1,
            late_trainable: false,
            reduction: 4,
            side_dim: None,
            early_layers: None,
            dropout: 0.1,
        }
    }
}

/// `linear-probe`'s settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeSettings {
    /// The probed layer P (default N, the last).
    pub probe_layer: Option<usize>,
}

/// `late-layer`'s settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LateLayerSettings {
    /// K: the backbone's last K layers are trained.
    pub late_layers: usize,
}

impl Default for LateLayerSettings {
    fn default() -> Self {
        LateLayerSettings { late_layers: 1 }
    }
}

/// The side width of a side network (`unipt`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WidthSettings {
    /// Reduction factor r: side width d = D / r (ignored if side_dim is set).
    pub reduction: usize,
    /// Side width d (overrides reduction).
    pub side_dim: Option<usize>,
}

impl Default for WidthSettings {
    fn default() -> Self {
        WidthSettings {
            reduction: 4,
            side_dim: None,
        }
    }
}

/// `lora`'s settings (left out of the JSON while not set).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSettings {
    /// Rank r (`None`: 8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_rank: Option<usize>,
    /// Alpha; the update is scaled by alpha / r (`None`: 16).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    /// Dropout on the update's input (`None`: 0, as PEFT; 0.1 before
    /// 2026-12-05, see `FitConfig::run_id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<f32>,
    /// Projections adapted (`None`: q and v). In JSON a list or one
    /// comma-separated string (`"q,v"`, what a sweep grid axis holds).
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lora_targets_de"
    )]
    pub lora_targets: Option<Vec<LoraTarget>>,
}

/// `adapter`'s settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterSettings {
    /// Reduction factor r: bottleneck width d = D / r.
    pub reduction: usize,
    /// Bottleneck width d (overrides reduction).
    pub side_dim: Option<usize>,
    /// Placement (`None`: houlsby).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_placement: Option<Placement>,
    /// Non-linearity (`None`: gelu).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_activation: Option<AdapterActivation>,
}

impl Default for AdapterSettings {
    fn default() -> Self {
        let w = WidthSettings::default();
        AdapterSettings {
            reduction: w.reduction,
            side_dim: w.side_dim,
            adapter_placement: None,
            adapter_activation: None,
        }
    }
}

/// `lst`'s settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LstSettings {
    /// Reduction factor r: side width d = D / r.
    pub reduction: usize,
    /// Side width d (overrides reduction).
    pub side_dim: Option<usize>,
    /// How the side layers start (`None`: random).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lst_init: Option<LstInit>,
}

impl Default for LstSettings {
    fn default() -> Self {
        let w = WidthSettings::default();
        LstSettings {
            reduction: w.reduction,
            side_dim: w.side_dim,
            lst_init: None,
        }
    }
}

/// A method and its own settings (in JSON: `method` and the settings'
/// keys, flat).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum MethodConfig {
    /// SHERL.
    Sherl(SherlSettings),
    /// Linear probe.
    LinearProbe(ProbeSettings),
    /// Late layers only.
    LateLayer(LateLayerSettings),
    /// UniPT.
    Unipt(WidthSettings),
    /// Full fine-tuning (no settings of its own).
    FullFt,
    /// LoRA.
    Lora(LoraSettings),
    /// Adapters.
    Adapter(AdapterSettings),
    /// LST.
    Lst(LstSettings),
}

impl Default for MethodConfig {
    fn default() -> Self {
        MethodConfig::Sherl(SherlSettings::default())
    }
}

impl MethodConfig {
    /// Which method.
    pub fn kind(&self) -> Method {
        match self {
            MethodConfig::Sherl(_) => Method::Sherl,
            MethodConfig::LinearProbe(_) => Method::LinearProbe,
            MethodConfig::LateLayer(_) => Method::LateLayer,
            MethodConfig::Unipt(_) => Method::Unipt,
            MethodConfig::FullFt => Method::FullFt,
            MethodConfig::Lora(_) => Method::Lora,
            MethodConfig::Adapter(_) => Method::Adapter,
            MethodConfig::Lst(_) => Method::Lst,
        }
    }

    /// Check the ranges; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            MethodConfig::Sherl(s) => {
                if !s.dropout.is_finite() {
                    return Err(format!("--dropout {}: must be a finite number", s.dropout));
                }
                if !(0.0..1.0).contains(&s.dropout) {
                    return Err(format!("--dropout {}: must be in [0, 1)", s.dropout));
                }
                check_width(s.reduction, s.side_dim)
            }
            MethodConfig::Unipt(w) => check_width(w.reduction, w.side_dim),
            MethodConfig::Adapter(a) => check_width(a.reduction, a.side_dim),
            MethodConfig::Lst(l) => check_width(l.reduction, l.side_dim),
            MethodConfig::Lora(l) => check_lora(&l.spec()),
            MethodConfig::LinearProbe(_) | MethodConfig::LateLayer(_) | MethodConfig::FullFt => {
                Ok(())
            }
        }
    }

    /// The settings resolved on a cache: defaults that depend on the
    /// backbone or the cache filled in, K checked.
    pub fn resolve(&self, on: &ResolveOn) -> Result<MethodSpec> {
        let n = on.layers;
        Ok(match self {
            MethodConfig::Sherl(s) => {
                let k = late_k(s.late_layers, n)?;
                let early = match &s.early_layers {
                    Some(v) => v.clone(),
                    None => on.cached.iter().copied().filter(|&i| i <= n - k).collect(),
                };
                MethodSpec::Sherl {
                    late_layers: k,
                    late_trainable: s.late_trainable,
                    side_dim: side_width(s.reduction, s.side_dim, on)?,
                    early_layers: early,
                    dropout: s.dropout,
                }
            }
            MethodConfig::LinearProbe(p) => MethodSpec::LinearProbe {
                probe_layer: p.probe_layer.unwrap_or(n),
            },
            MethodConfig::LateLayer(l) => MethodSpec::LateLayer {
                late_layers: late_k(l.late_layers, n)?,
            },
            MethodConfig::Unipt(w) => MethodSpec::Unipt {
                side_dim: side_width(w.reduction, w.side_dim, on)?,
            },
            MethodConfig::FullFt => MethodSpec::FullFt,
            MethodConfig::Lora(l) => {
                let LoraSpec {
                    rank,
                    alpha,
                    dropout,
                    targets,
                } = l.spec();
                MethodSpec::Lora {
                    rank,
                    alpha,
                    dropout,
                    targets,
                }
            }
            MethodConfig::Adapter(a) => MethodSpec::Adapter {
                side_dim: side_width(a.reduction, a.side_dim, on)?,
                placement: a.adapter_placement.unwrap_or(Placement::Houlsby),
                activation: a.adapter_activation.unwrap_or(AdapterActivation::Gelu),
            },
            MethodConfig::Lst(l) => MethodSpec::Lst {
                side_dim: side_width(l.reduction, l.side_dim, on)?,
                init: l.lst_init.unwrap_or_default(),
            },
        })
    }
}

impl LoraSettings {
    /// The LoRA settings, defaults filled in (targets sorted, without
    /// repeats).
    pub fn spec(&self) -> LoraSpec {
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
}

/// A method's settings resolved on a cache: what its model is built from.
/// Stored in the run's `config.json` (`spec`) and read back by predict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum MethodSpec {
    /// SHERL.
    Sherl {
        /// K.
        late_layers: usize,
        /// The late layers' pre-trained weights are trained.
        late_trainable: bool,
        /// Side width d.
        side_dim: usize,
        /// Early-route hidden-state indices, last = N-K.
        early_layers: Vec<usize>,
        /// Dropout of the restore block.
        dropout: f32,
    },
    /// Linear probe.
    LinearProbe {
        /// The probed layer P.
        probe_layer: usize,
    },
    /// Late layers only.
    LateLayer {
        /// K.
        late_layers: usize,
    },
    /// UniPT.
    Unipt {
        /// Side width d.
        side_dim: usize,
    },
    /// Full fine-tuning.
    FullFt,
    /// LoRA.
    Lora {
        /// Rank r.
        rank: usize,
        /// alpha (the update is scaled by alpha / r).
        alpha: f64,
        /// Dropout on the update's input.
        dropout: f32,
        /// Targeted projections, sorted, without repeats.
        targets: Vec<LoraTarget>,
    },
    /// Adapters of width `side_dim`.
    Adapter {
        /// Bottleneck width d.
        side_dim: usize,
        /// Placement.
        placement: Placement,
        /// Non-linearity.
        activation: AdapterActivation,
    },
    /// LST.
    Lst {
        /// Side width d.
        side_dim: usize,
        /// How the side layers start.
        init: LstInit,
    },
}

impl MethodSpec {
    /// Which method.
    pub fn kind(&self) -> Method {
        match self {
            MethodSpec::Sherl { .. } => Method::Sherl,
            MethodSpec::LinearProbe { .. } => Method::LinearProbe,
            MethodSpec::LateLayer { .. } => Method::LateLayer,
            MethodSpec::Unipt { .. } => Method::Unipt,
            MethodSpec::FullFt => Method::FullFt,
            MethodSpec::Lora { .. } => Method::Lora,
            MethodSpec::Adapter { .. } => Method::Adapter,
            MethodSpec::Lst { .. } => Method::Lst,
        }
    }

    /// SHERL's early-route layers.
    pub fn early_layers(&self) -> Option<&[usize]> {
        match self {
            MethodSpec::Sherl { early_layers, .. } => Some(early_layers),
            MethodSpec::LinearProbe { .. }
            | MethodSpec::LateLayer { .. }
            | MethodSpec::Unipt { .. }
            | MethodSpec::FullFt
            | MethodSpec::Lora { .. }
            | MethodSpec::Adapter { .. }
            | MethodSpec::Lst { .. } => None,
        }
    }

    /// The linear probe's layer.
    pub fn probe_layer(&self) -> Option<usize> {
        match self {
            MethodSpec::LinearProbe { probe_layer } => Some(*probe_layer),
            MethodSpec::Sherl { .. }
            | MethodSpec::LateLayer { .. }
            | MethodSpec::Unipt { .. }
            | MethodSpec::FullFt
            | MethodSpec::Lora { .. }
            | MethodSpec::Adapter { .. }
            | MethodSpec::Lst { .. } => None,
        }
    }

    /// The side width d of a method with a side network or adapters.
    pub fn side_dim(&self) -> Option<usize> {
        match self {
            MethodSpec::Sherl { side_dim, .. }
            | MethodSpec::Unipt { side_dim }
            | MethodSpec::Adapter { side_dim, .. }
            | MethodSpec::Lst { side_dim, .. } => Some(*side_dim),
            MethodSpec::LinearProbe { .. }
            | MethodSpec::LateLayer { .. }
            | MethodSpec::FullFt
            | MethodSpec::Lora { .. } => None,
        }
    }
}

/// `sherl-fit run`'s per-method flags: a group and a `--help` heading per
/// method (and for the late layers and side width several share). Given,
/// each is a key of its method's JSON, refused with another method.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct MethodFlags {
    #[command(flatten)]
    #[serde(flatten)]
    late: LateFlags,
    #[command(flatten)]
    #[serde(flatten)]
    sherl: SherlFlags,
    #[command(flatten)]
    #[serde(flatten)]
    width: WidthFlags,
    #[command(flatten)]
    #[serde(flatten)]
    probe: ProbeFlags,
    #[command(flatten)]
    #[serde(flatten)]
    lora: LoraFlags,
    #[command(flatten)]
    #[serde(flatten)]
    adapter: AdapterFlags,
    #[command(flatten)]
    #[serde(flatten)]
    lst: LstFlags,
}

/// `--method sherl`.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
#[command(next_help_heading = "sherl")]
struct SherlFlags {
    /// Train the late layers' pre-trained weights too.
    #[arg(long)]
    late_trainable: bool,
    /// Early-route layers, e.g. 0,2,4,5 (must end with N-K).
    #[arg(long, value_delimiter = ',')]
    early_layers: Option<Vec<usize>>,
    /// Dropout of the restore block.
    #[arg(long)]
    dropout: Option<f32>,
}

/// `--method linear-probe`.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
#[command(next_help_heading = "linear-probe")]
struct ProbeFlags {
    /// Linear-probe layer (default: the last).
    #[arg(long)]
    probe_layer: Option<usize>,
}

/// `--method lora`.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
#[command(next_help_heading = "lora")]
struct LoraFlags {
    /// LoRA rank r (default 8).
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA alpha: the update is scaled by alpha / r (default 16).
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Dropout on the LoRA update's input (default 0, as Hugging Face
    /// PEFT: the updates then merge into the fused layer op).
    #[arg(long)]
    lora_dropout: Option<f32>,
    /// Projections LoRA adapts, e.g. q,k,v,o,ffn-in,ffn-out (default q,v).
    #[arg(long, value_enum, value_delimiter = ',')]
    lora_targets: Option<Vec<LoraTarget>>,
}

/// `--method adapter`.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
#[command(next_help_heading = "adapter")]
struct AdapterFlags {
    /// Adapter placement: houlsby (after attention and FFN) or pfeiffer
    /// (after FFN) (default houlsby). Width: --reduction / --side-dim.
    #[arg(long, value_enum)]
    adapter_placement: Option<Placement>,
    /// Adapter non-linearity (default gelu).
    #[arg(long, value_enum)]
    adapter_activation: Option<AdapterActivation>,
}

/// `--method lst`.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
#[command(next_help_heading = "lst")]
struct LstFlags {
    /// LST side layers: random, or the backbone's layers pruned by weight
    /// magnitude (text caches; default random).
    #[arg(long, value_enum, hide_possible_values = true)]
    lst_init: Option<LstInit>,
}
