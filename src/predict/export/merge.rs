//! LoRA's trained updates merged into the frozen weights they adapt, for
//! the export: `W + (alpha / r) B A` per targeted projection of every layer.

use std::path::Path;

use crate::backbone::{BertConfig, Checkpoint, F32Tensors, LayerNames};
use crate::fit::nn::lora::LoraTarget;
use crate::{Error, Result};

/// The checkpoint name (without prefix) of `target`'s weight in a layer of
/// a backbone with `names`.
fn weight_name(names: &LayerNames, target: LoraTarget) -> &'static str {
    match target {
        LoraTarget::Q => names.query,
        LoraTarget::K => names.key,
        LoraTarget::V => names.value,
        LoraTarget::O => names.attn_out,
        LoraTarget::FfnIn => "intermediate.dense",
        LoraTarget::FfnOut => "output.dense",
    }
}

/// Take every `lora_a` / `lora_b` pair of `targets` out of `trained` and
/// return the merged weights of the projections they adapt (checkpoint
/// names), ready to override the backbone's.
pub(super) fn merge_lora(
    weights: &Path,
    trained: &mut F32Tensors,
    cfg: &BertConfig,
    ckpt: &Checkpoint,
    targets: &[LoraTarget],
    scale: f32,
) -> Result<F32Tensors> {
    let names = LayerNames::of(cfg.family());
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let mut merged = F32Tensors::new();
    for li in 0..cfg.num_hidden_layers {
        for &t in targets {
            let (d_in, d_out) = t.dims(d, f);
            let p = format!("encoder.layer.{li}.{}", t.path());
            let r = trained.get(&format!("{p}.lora_a")).map_or(0, |(s, _)| s[0]);
            let mut take = |name: String, shape: [usize; 2]| -> Result<Vec<f32>> {
                match trained.remove(&name) {
                    Some((s, v)) if s == shape => Ok(v),
                    got => Err(Error::Checkpoint {
                        path: weights.to_path_buf(),
                        message: format!(
                            "tensor '{name}' {}, the run's LoRA needs shape {shape:?}",
                            match got {
                                Some((s, _)) => format!("has shape {s:?}"),
                                None => "is missing".into(),
                            }
                        ),
                    }),
                }
            };
            let a = take(format!("{p}.lora_a"), [r, d_in])?; // [r, in]
            let b = take(format!("{p}.lora_b"), [d_out, r])?; // [out, r]
            let name = format!("encoder.layer.{li}.{}.weight", weight_name(&names, t));
            let mut w = ckpt.tensor_f32_shaped(&name, &[d_out, d_in])?;
            for o in 0..d_out {
                for i in 0..d_in {
                    let delta: f32 = (0..r).map(|k| b[o * r + k] * a[k * d_in + i]).sum();
                    w[o * d_in + i] += scale * delta;
                }
            }
            merged.insert(name, (vec![d_out, d_in], w));
        }
    }
    Ok(merged)
}
