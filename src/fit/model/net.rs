//! The modules of each method ([`Net`], one variant per method): how they
//! are built from a [`MethodSpec`], and their forward pass up to the head.

use candle_core::Tensor;

use super::{load_layers, run_layers, Arch, Layer};
use crate::fit::batcher::Batch;
use crate::fit::error::FitError;
use crate::fit::method::MethodSpec;
use crate::fit::nn::adapter::{AdapterConfig, AdapterLayer, AdapterSpec};
use crate::fit::nn::bert_layer::{attention_bias, BertLayer};
use crate::fit::nn::consolidation::Consolidation;
use crate::fit::nn::embeddings::Embeddings;
use crate::fit::nn::layer_extras::LayerExtras;
use crate::fit::nn::lora::{LoraConfig, LoraLayer, LoraSpec};
use crate::fit::nn::lst::{Lst, LstConfig, LstInit};
use crate::fit::nn::relative::RelativeBias;
use crate::fit::nn::restore_gate::{RestoreGate, RestoreGateConfig};
use crate::fit::nn::unipt::Unipt;
use crate::fit::nn::{Builder, Detach, Mode, SideConfig};
use crate::fit::params::Group;
use crate::Result;

/// The modules of one method (each method has exactly its own).
#[derive(Debug, Clone)]
pub(super) enum Net {
    /// Early route, restore and gate, then the late layers (with gradients).
    Sherl {
        consolidation: Consolidation,
        restore: RestoreGate,
        late: Vec<Layer>,
    },
    /// The late layers (with gradients) on hidden_states.N-K.
    LateLayer { late: Vec<Layer> },
    /// Frozen layers run without gradients up to the probed layer.
    LinearProbe { frozen: Vec<Layer> },
    /// The UniPT side network.
    Unipt(Unipt),
    /// Embeddings and every layer, all trained; without embeddings (an
    /// image cache) the layers start from the cached hidden_states.0.
    FullFt {
        embeddings: Option<Embeddings>,
        layers: Vec<Layer>,
    },
    /// Frozen embeddings and layers with trained modules inside every
    /// layer (LoRA updates or adapters).
    Tuned {
        embeddings: Embeddings,
        layers: Vec<BertLayer>,
        extras: Vec<Extras>,
    },
    /// The LST side network.
    Lst(Lst),
}

/// The trained modules inside one frozen layer.
#[derive(Debug, Clone)]
pub(super) enum Extras {
    Lora(LoraLayer),
    Adapter(AdapterLayer),
}

impl Extras {
    fn get(&self) -> &dyn LayerExtras {
        match self {
            Extras::Lora(l) => l,
            Extras::Adapter(a) => a,
        }
    }
}

impl Detach for Extras {
    fn detached(&self) -> Self {
        match self {
            Extras::Lora(l) => Extras::Lora(l.detached()),
            Extras::Adapter(a) => Extras::Adapter(a.detached()),
        }
    }
}

/// A method's modules as built: the net, the hidden-state indices it reads
/// from the cache (in order) and the width its head pools.
pub(super) struct Built {
    pub(super) net: Net,
    pub(super) inputs: Vec<usize>,
    pub(super) head_dim: usize,
}

/// The first late layer N-K, K checked against N.
fn late_start(k: usize, n: usize) -> Result<usize> {
    if k == 0 || k > n {
        return Err(FitError::settings(format!(
            "--late-layers {k} must be between 1 and {n}"
        )));
    }
    Ok(n - k)
}

/// Build the modules of `spec` on a cache holding `cached`, fresh weights
/// drawn from `vb` in module order.
pub(super) fn build(
    spec: &MethodSpec,
    vb: &mut Builder,
    arch: &Arch,
    cached: &[usize],
) -> Result<Built> {
    let n = arch.num_layers();
    let d_model = arch.hidden();
    let need = |i: usize| -> Result<()> {
        if cached.contains(&i) {
            Ok(())
        } else {
            Err(FitError::cache_lacks(format!(
                "method {} needs hidden_states.{i}, which the cache does not hold (it has {:?}); re-extract with --layers including {i} or --late-layers {}",
                spec.kind().name(),
                cached,
                n - i.min(n)
            )))
        }
    };
    let all = |need: &dyn Fn(usize) -> Result<()>| -> Result<Vec<usize>> {
        (0..=n).map(|i| need(i).map(|()| i)).collect()
    };
    let pretrained = Some(Group::Pretrained);
    let (net, inputs, head_dim) = match spec {
        MethodSpec::Sherl {
            late_layers,
            late_trainable,
            side_dim,
            early_layers,
            dropout,
        } => {
            let last = late_start(*late_layers, n)?;
            if early_layers.last() != Some(&last) {
                return Err(FitError::settings(format!(
                    "the early route must end with hidden_states.{last} (N - K); got {early_layers:?}"
                )));
            }
            for &i in early_layers {
                need(i)?;
            }
            let m = early_layers.len();
            let side = SideConfig {
                layers: m,
                d_model,
                d: *side_dim,
            };
            let consolidation = Consolidation::load(vb.pp("early"), &side)?;
            let gate = RestoreGateConfig {
                d: *side_dim,
                d_model,
                dropout: *dropout,
            };
            let restore = RestoreGate::load(vb.pp("late"), &gate)?;
            let group = late_trainable.then_some(Group::Pretrained);
            let late = load_layers(vb, arch, last..n, group)?;
            let net = Net::Sherl {
                consolidation,
                restore,
                late,
            };
            (net, early_layers.clone(), d_model)
        }
        MethodSpec::LateLayer { late_layers } => {
            let last = late_start(*late_layers, n)?;
            need(last)?;
            let late = load_layers(vb, arch, last..n, pretrained)?;
            (Net::LateLayer { late }, vec![last], d_model)
        }
        MethodSpec::LinearProbe { probe_layer } => {
            let (frozen, from) = probe(vb, arch, cached, *probe_layer)?;
            (Net::LinearProbe { frozen }, vec![from], d_model)
        }
        MethodSpec::Unipt { side_dim } => {
            let inputs = all(&need)?;
            let side = SideConfig {
                layers: n + 1,
                d_model,
                d: *side_dim,
            };
            let unipt = Unipt::load(vb.pp("unipt"), &side)?;
            (Net::Unipt(unipt), inputs, *side_dim)
        }
        MethodSpec::FullFt => {
            let (net, inputs) = full_ft(vb, arch, cached)?;
            (net, inputs, d_model)
        }
        MethodSpec::Lora {
            rank,
            alpha,
            dropout,
            targets,
        } => {
            let lora = LoraSpec {
                rank: *rank,
                alpha: *alpha,
                dropout: *dropout,
                targets: targets.clone(),
            };
            (
                tuned(vb, arch, spec, Tune::Lora(&lora))?,
                Vec::new(),
                d_model,
            )
        }
        MethodSpec::Adapter {
            side_dim,
            placement,
            activation,
        } => {
            let adapter = AdapterSpec {
                placement: *placement,
                activation: *activation,
            };
            let net = tuned(vb, arch, spec, Tune::Adapter(&adapter, *side_dim))?;
            (net, Vec::new(), d_model)
        }
        MethodSpec::Lst { side_dim, init } => {
            let inputs = all(&need)?;
            if *init == LstInit::Prune && matches!(arch, Arch::Vit { .. }) {
                return Err(FitError::settings(
                    "--lst-init prune prunes BERT layers and is not implemented for an \
                     image cache; use --lst-init random",
                ));
            }
            let lst_cfg = LstConfig {
                backbone: arch.sizes(),
                d: *side_dim,
                init: *init,
            };
            let lst = Lst::load(vb.pp("lst"), &lst_cfg)?;
            (Net::Lst(lst), inputs, d_model)
        }
    };
    Ok(Built {
        net,
        inputs,
        head_dim,
    })
}

/// The linear probe's frozen layers from the deepest cached layer at or
/// below `p` up to `p`, and that layer.
fn probe(vb: &mut Builder, arch: &Arch, cached: &[usize], p: usize) -> Result<(Vec<Layer>, usize)> {
    let n = arch.num_layers();
    if p > n {
        return Err(FitError::settings(format!(
            "--probe-layer {p} does not exist (0..={n})"
        )));
    }
    let from = cached
        .iter()
        .copied()
        .filter(|&i| i <= p)
        .max()
        .ok_or_else(|| {
            FitError::cache_lacks(format!(
                "the cache holds no layer at or below {p} for the linear probe"
            ))
        })?;
    Ok((load_layers(vb, arch, from..p, None)?, from))
}

/// Full fine-tuning: embeddings (text) and every layer, trained.
fn full_ft(vb: &mut Builder, arch: &Arch, cached: &[usize]) -> Result<(Net, Vec<usize>)> {
    let pretrained = Some(Group::Pretrained);
    let (embeddings, inputs) = match arch {
        Arch::Bert(cfg) => {
            let b = vb.pp("embeddings").pretrained_group(pretrained);
            (Some(Embeddings::load(b, cfg)?), Vec::new())
        }
        // Images: the patch embedding's output is cached.
        Arch::Vit { .. } => {
            if !cached.contains(&0) {
                return Err(FitError::cache_lacks(format!(
                    "method full-ft on images starts from hidden_states.0 (the \
                     patch embedding's output), which the cache does not hold (it \
                     has {cached:?}); re-extract with --layers all (or a list \
                     including 0)"
                )));
            }
            (None, vec![0])
        }
    };
    let layers = load_layers(vb, arch, 0..arch.num_layers(), pretrained)?;
    Ok((Net::FullFt { embeddings, layers }, inputs))
}

/// The trained modules [`tuned`] puts in every frozen layer.
enum Tune<'a> {
    Lora(&'a LoraSpec),
    /// Adapters of this width.
    Adapter(&'a AdapterSpec, usize),
}

/// The frozen backbone from the token ids with trained modules inside
/// every layer (BERT only).
fn tuned(vb: &mut Builder, arch: &Arch, spec: &MethodSpec, tune: Tune) -> Result<Net> {
    let Arch::Bert(cfg) = arch else {
        return Err(FitError::settings(format!(
            "method {} runs BERT layers from token ids and is not implemented for \
             an image cache; use lst, full-ft or another method there",
            spec.kind().name()
        )));
    };
    let d_model = cfg.hidden_size;
    let embeddings = Embeddings::load(vb.pp("embeddings"), cfg)?;
    let n = cfg.num_hidden_layers;
    let mut layers = Vec::with_capacity(n);
    let mut extras = Vec::with_capacity(n);
    for li in 0..n {
        let mut b = vb.pp(&format!("encoder.layer.{li}"));
        layers.push(BertLayer::load(b.reborrow(), cfg)?.without_packed_copy());
        extras.push(match &tune {
            Tune::Lora(lora) => Extras::Lora(LoraLayer::load(
                b,
                &LoraConfig {
                    spec: (*lora).clone(),
                    d: d_model,
                    f: cfg.intermediate_size,
                },
            )?),
            Tune::Adapter(adapter, width) => Extras::Adapter(AdapterLayer::load(
                b,
                &AdapterConfig {
                    spec: **adapter,
                    d: d_model,
                    m: *width,
                },
            )?),
        });
    }
    Ok(Net::Tuned {
        embeddings,
        layers,
        extras,
    })
}

impl Net {
    /// Current gate value (sherl).
    pub(super) fn gate(&self) -> Result<Option<f32>> {
        match self {
            Net::Sherl { restore, .. } => restore.gate().map(Some),
            Net::LateLayer { .. }
            | Net::LinearProbe { .. }
            | Net::Unipt(_)
            | Net::FullFt { .. }
            | Net::Tuned { .. }
            | Net::Lst(_) => Ok(None),
        }
    }

    /// Whether the net runs backbone layers (which get MPNet's relative
    /// position bias); side networks do not.
    fn runs_backbone_layers(&self) -> bool {
        match self {
            Net::Sherl { .. }
            | Net::LateLayer { .. }
            | Net::LinearProbe { .. }
            | Net::FullFt { .. }
            | Net::Tuned { .. } => true,
            Net::Unipt(_) | Net::Lst(_) => false,
        }
    }
}

impl Detach for Net {
    fn detached(&self) -> Self {
        match self {
            Net::Sherl {
                consolidation,
                restore,
                late,
            } => Net::Sherl {
                consolidation: consolidation.detached(),
                restore: restore.detached(),
                late: late.detached(),
            },
            Net::LateLayer { late } => Net::LateLayer {
                late: late.detached(),
            },
            Net::LinearProbe { frozen } => Net::LinearProbe {
                frozen: frozen.detached(),
            },
            Net::Unipt(u) => Net::Unipt(u.detached()),
            Net::FullFt { embeddings, layers } => Net::FullFt {
                embeddings: embeddings.as_ref().map(Detach::detached),
                layers: layers.detached(),
            },
            Net::Tuned {
                embeddings,
                layers,
                extras,
            } => Net::Tuned {
                embeddings: embeddings.detached(),
                layers: layers.detached(),
                extras: extras.detached(),
            },
            Net::Lst(l) => Net::Lst(l.detached()),
        }
    }
}

/// The final sequence `[B, S, d]` before the head, and SHERL's layer
/// weights when the method has them. The backbone's layers get MPNet's
/// relative-position bias when `rel` holds it; LST's side layers only the
/// key mask (their heads need not be the backbone's, and the cached states
/// they read already carry positions).
pub(super) fn sequence(
    net: &Net,
    rel: Option<&RelativeBias>,
    batch: &Batch,
    mode: &mut Mode<'_>,
) -> Result<(Tensor, Option<Tensor>)> {
    let keys = attention_bias(&batch.mask)?;
    let bias = match rel {
        Some(r) if net.runs_backbone_layers() => r.add_to(&keys)?,
        _ => keys.clone(),
    };
    let mut alpha = None;
    let y = match net {
        Net::Sherl {
            consolidation,
            restore,
            late,
        } => {
            let c = consolidation.forward(&batch.layers, &batch.mask)?;
            alpha = Some(c.alpha);
            let last = batch.layers.last().expect("sherl reads at least 2 layers");
            let h = restore.forward(&c.g, last, mode)?;
            run_layers(late, h, &bias, mode)?
        }
        Net::LateLayer { late } => run_layers(late, batch.layers[0].clone(), &bias, mode)?,
        Net::LinearProbe { frozen } => {
            run_layers(frozen, batch.layers[0].clone(), &bias, &mut Mode::Eval)?.detach()
        }
        Net::Unipt(unipt) => unipt.forward(&batch.layers, &batch.mask)?,
        Net::FullFt { embeddings, layers } => {
            let h = match embeddings {
                Some(e) => e.forward(&batch.token_ids, &batch.type_ids, mode)?,
                None => batch.layers[0].clone(),
            };
            run_layers(layers, h, &bias, mode)?
        }
        Net::Tuned {
            embeddings,
            layers,
            extras,
        } => {
            let mut h = embeddings.forward(&batch.token_ids, &batch.type_ids, mode)?;
            for (l, e) in layers.iter().zip(extras) {
                // LoRA without dropout merges into the weights and runs
                // as a trained layer (the fused op on the CPU)
                let merged = match e {
                    Extras::Lora(lora) => lora.merged_deltas()?,
                    Extras::Adapter(_) => None,
                };
                h = match merged {
                    Some(deltas) => l.merged(&deltas)?.forward(&h, &bias, mode)?,
                    None => l.forward_with(&h, &bias, mode, Some(e.get()))?,
                };
            }
            h
        }
        Net::Lst(lst) => lst.forward(&batch.layers, &keys, mode)?,
    };
    Ok((y, alpha))
}
