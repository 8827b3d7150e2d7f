//! Memory before and during a run: a generous estimate of what a run needs,
//! checked against the machine's budget before anything is written, and
//! the process's measured peak.

use super::config::FitConfig;
use super::error::FitError;
use super::method::MethodSpec;
use super::model::ModelSpec;
use super::nn::adapter::AdapterSpec;
use crate::backbone::BertConfig;
use crate::{Error, Result};

/// Size bound of the few-kilobyte `/proc` files read here.
const PROC_LIMIT: u64 = 1 << 20;

/// Peak resident set size of this process (VmHWM), bytes; 0 if unknown.
pub fn peak_rss_bytes() -> u64 {
    let Ok(s) = crate::fsutil::read_text(std::path::Path::new("/proc/self/status"), PROC_LIMIT)
    else {
        return 0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A rough upper estimate of the memory one training run needs, so that an
/// absurd setting is refused with numbers instead of being killed by the
/// kernel. See [`memory_estimate`].
#[derive(Debug, Clone, Copy)]
pub struct MemoryEstimate {
    /// Parameters, their gradients and AdamW's two moments (4 bytes each;
    /// frozen parameters count once).
    pub params_bytes: f64,
    /// Activations of the largest batch, forward and backward.
    pub activation_bytes: f64,
    /// Tokens in that batch (padded).
    pub batch_tokens: f64,
}

impl MemoryEstimate {
    /// Everything, plus a fixed allowance for the runtime and the cache
    /// decoder's look-ahead.
    pub fn total(&self) -> f64 {
        self.params_bytes + self.activation_bytes + 256.0 * MIB
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// Estimate a run's memory from its shapes. Deliberately generous: it
/// counts every intermediate of the forward pass at the longest sequence
/// and doubles it for the backward pass (the demo's full fine-tuning,
/// measured at 3.1 GiB peak, is estimated at about 4 GiB).
pub fn memory_estimate(
    spec: &ModelSpec,
    bert: &BertConfig,
    cfg: &FitConfig,
    max_len: usize,
    cached: &[usize],
) -> MemoryEstimate {
    let f = |x: usize| x as f64;
    let (dm, d, inter, n) = (
        f(bert.hidden_size),
        f(spec.method.side_dim().unwrap_or(0)),
        f(bert.intermediate_size),
        f(bert.num_hidden_layers),
    );
    let (heads, classes, s) = (
        f(bert.num_attention_heads),
        f(spec.classes),
        f(max_len.max(1)),
    );
    let layer = 4.0 * dm * dm + 2.0 * dm * inter + 9.0 * dm + inter;
    let proj = |m: f64| m * (dm * d + 3.0 * d);
    // Floats per token kept by one transformer layer that is trained
    // through: residual stream, q/k/v, norms, FFN, attention rows.
    let layer_act = 16.0 * dm + 4.0 * inter + 4.0 * heads * s;
    let (trainable, frozen, per_token, backward) = match &spec.method {
        MethodSpec::Sherl {
            late_layers,
            late_trainable,
            early_layers,
            ..
        } => {
            let (m, k) = (f(early_layers.len().max(1)), f(*late_layers));
            let new = proj(m) + d + 1.0 + d * dm + 3.0 * dm + 1.0 + dm * classes + classes;
            let late = k * layer;
            let (t, fz) = if *late_trainable {
                (new + late, 0.0)
            } else {
                (new, late)
            };
            (
                t,
                fz,
                2.0 * m * dm + 8.0 * m * d + 6.0 * dm + k * layer_act,
                2.0,
            )
        }
        MethodSpec::LateLayer { late_layers } => {
            let k = f(*late_layers);
            (k * layer + dm * classes, 0.0, 2.0 * dm + k * layer_act, 2.0)
        }
        MethodSpec::LinearProbe { probe_layer } => {
            // Frozen layers run from the deepest cached layer up to the probe.
            let from = cached.iter().copied().filter(|&i| i <= *probe_layer).max();
            let steps = f(probe_layer.saturating_sub(from.unwrap_or(0)));
            let act = 2.0 * dm + if steps > 0.0 { layer_act } else { 0.0 };
            (dm * classes + classes, steps * layer, act, 1.0)
        }
        MethodSpec::Unipt { .. } => {
            let new = proj(n + 1.0) + d * d + 5.0 * d + 1.0 + d * classes + classes;
            (new, 0.0, 2.0 * (n + 1.0) * dm + 8.0 * (n + 2.0) * d, 2.0)
        }
        MethodSpec::FullFt => {
            let emb =
                (f(bert.vocab_size) + f(bert.max_position_embeddings) + f(bert.type_vocab_size))
                    * dm;
            (emb + n * layer + dm * classes, 0.0, n * layer_act, 2.0)
        }
        // The frozen backbone counts once; every layer's activations are
        // kept (the backward pass runs through all of them), plus each
        // update's dropped-out input, low-rank product and output.
        MethodSpec::Lora { rank, targets, .. } => {
            let emb =
                (f(bert.vocab_size) + f(bert.max_position_embeddings) + f(bert.type_vocab_size))
                    * dm;
            let r = f(*rank);
            let (mut upd, mut upd_act) = (0.0, 0.0);
            for t in targets {
                let (i, o) = t.dims(bert.hidden_size, bert.intermediate_size);
                upd += r * f(i + o);
                upd_act += f(i) + r + f(o);
            }
            (
                n * upd + dm * classes + classes,
                emb + 5.0 * dm + n * layer,
                n * (layer_act + upd_act),
                2.0,
            )
        }
        // Adapters of width d: down, activation, up and the sum per adapter.
        MethodSpec::Adapter {
            placement,
            activation,
            ..
        } => {
            let emb =
                (f(bert.vocab_size) + f(bert.max_position_embeddings) + f(bert.type_vocab_size))
                    * dm;
            let spec = AdapterSpec {
                placement: *placement,
                activation: *activation,
            };
            let a = f(spec.per_layer());
            (
                n * a * (2.0 * dm * d + d + dm) + dm * classes + classes,
                emb + 5.0 * dm + n * layer,
                n * (layer_act + a * (2.0 * d + 2.0 * dm)),
                2.0,
            )
        }
        // N + 1 down projections, N gates, N side layers of width d, the
        // up projection; the cached inputs and their projections, and each
        // side layer's activations.
        MethodSpec::Lst { side_dim, .. } => {
            let side = super::nn::lst::side_config(bert, *side_dim);
            let fs = f(side.intermediate_size);
            let side_layer = 4.0 * d * d + 2.0 * d * fs + 9.0 * d + fs;
            let side_act = 16.0 * d + 4.0 * fs + 4.0 * f(side.num_attention_heads) * s;
            (
                (n + 1.0) * (dm * d + d)
                    + n
                    + n * side_layer
                    + d * dm
                    + dm
                    + dm * classes
                    + classes,
                0.0,
                2.0 * (n + 1.0) * dm + 3.0 * (n + 1.0) * d + n * side_act + 2.0 * dm,
                2.0,
            )
        }
    };
    let train_tokens = f(cfg.max_tokens_per_batch).min(f(cfg.batch_size) * s);
    let eval_tokens = f(cfg.max_tokens_per_batch).min(f(cfg.batch_size.max(64)) * s);
    let activation_bytes =
        (4.0 * per_token * backward * train_tokens).max(4.0 * per_token * eval_tokens);
    MemoryEstimate {
        params_bytes: 4.0 * (4.0 * trainable + frozen),
        activation_bytes,
        batch_tokens: train_tokens.max(eval_tokens),
    }
}

/// Memory a run may use: `SHERL_MEMORY_LIMIT` (bytes, or with a K/M/G
/// suffix, as the dataset flags' sizes) when set, else the kernel's `MemAvailable`; `None` when neither
/// is known (then nothing is refused).
pub fn memory_budget() -> Result<Option<(f64, &'static str)>> {
    if let Ok(v) = std::env::var("SHERL_MEMORY_LIMIT") {
        return match crate::data::args::parse_size(&v) {
            Ok(bytes) if bytes > 0 => Ok(Some((bytes as f64, "SHERL_MEMORY_LIMIT"))),
            _ => Err(FitError::Env {
                var: "SHERL_MEMORY_LIMIT",
                value: v,
                expected:
                    "expected a size in bytes, optionally with K, M or G (KiB, MiB, GiB), e.g. 8G",
            }
            .into()),
        };
    }
    let Ok(info) = crate::fsutil::read_text(std::path::Path::new("/proc/meminfo"), PROC_LIMIT)
    else {
        return Ok(None);
    };
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| (kb * 1024.0, "MemAvailable")))
}

/// Refuse a run whose estimate exceeds the memory budget.
pub fn check_memory(est: &MemoryEstimate) -> Result<()> {
    let Some((budget, source)) = memory_budget()? else {
        return Ok(());
    };
    let gib = |b: f64| b / (1024.0 * MIB);
    if est.total() > budget {
        return Err(Error::TooLarge(format!(
            "this run would need about {:.1} GiB ({:.1} GiB of parameters, gradients and optimizer state; {:.1} GiB of activations for a batch of {:.0} tokens), but {:.1} GiB is available ({source}); lower --side-dim, --batch-size or --max-tokens-per-batch (or set SHERL_MEMORY_LIMIT if the estimate is wrong for this machine)",
            gib(est.total()),
            gib(est.params_bytes),
            gib(est.activation_bytes),
            est.batch_tokens,
            gib(budget)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::method::{Method, MethodConfig, ResolveOn};
    use crate::fit::model::Pool;
    use serde_json::json;

    fn minilm() -> BertConfig {
        serde_json::from_value(json!({
            "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
            "num_attention_heads": 12, "intermediate_size": 1536,
            "max_position_embeddings": 512, "type_vocab_size": 2
        }))
        .unwrap()
    }

    fn spec(method: Method, side_dim: usize) -> ModelSpec {
        let on = ResolveOn {
            layers: 6,
            hidden: 384,
            cached: &[0, 1, 2, 3, 4, 5, 6],
        };
        let mut m = serde_json::to_value(method.defaults()).unwrap();
        if method.keys().contains(&"side_dim") {
            m["side_dim"] = side_dim.into();
        }
        let c: MethodConfig = serde_json::from_value(m).unwrap();
        ModelSpec {
            method: c.resolve(&on).unwrap(),
            pool: Pool::Mean,
            classes: 2,
        }
    }

    /// The estimate bounds the peaks measured in docs/results.md's demo table
    /// (MiniLM, batch 32, max_len 128: full-ft 3,178 MiB, sherl 980 MiB,
    /// linear probe 224 MiB) without being absurdly above them.
    #[test]
    fn memory_estimate_bounds_the_measured_peaks() {
        let cfg = FitConfig::default();
        let all: Vec<usize> = (0..=6).collect();
        let mib =
            |m: Method| memory_estimate(&spec(m, 96), &minilm(), &cfg, 128, &all).total() / MIB;
        for (m, measured) in [
            (Method::FullFt, 3178.0),
            (Method::Sherl, 980.0),
            (Method::LinearProbe, 224.0),
        ] {
            let est = mib(m);
            assert!(est >= measured && est < 4.0 * measured, "{m:?}: {est} MiB");
        }
        // LoRA and adapters keep every layer's activations (at least as
        // many as full fine-tuning) but train few weights; LST keeps only
        // the narrow side network's and the cached inputs
        let est = |m: Method| memory_estimate(&spec(m, 96), &minilm(), &cfg, 128, &all);
        let full = est(Method::FullFt);
        for m in [Method::Lora, Method::Adapter] {
            let e = est(m);
            assert!(e.params_bytes < full.params_bytes / 3.0, "{m:?}");
            assert!(e.activation_bytes >= full.activation_bytes, "{m:?}");
        }
        let lst = est(Method::Lst);
        assert!(lst.total() < est(Method::Lora).total(), "{}", lst.total());
        assert!(lst.activation_bytes < full.activation_bytes);
        // the absurd side width of the attack: terabytes, refused
        let huge = memory_estimate(
            &spec(Method::Sherl, 100_000_000),
            &minilm(),
            &cfg,
            128,
            &all,
        );
        assert!(huge.total() > 1e12, "{}", huge.total());
    }
}
