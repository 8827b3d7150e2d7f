//! Each method's graph between the frozen backbone and the head, written
//! against [`Body`] so it serves text and image backbones alike. A method
//! returns the sequence the head pools (`[batch, seq, width]`) and its
//! width.
//!
//! The backbone's own layers with trained weights in place (late-layer,
//! full-ft, LoRA merged, `--late-trainable`) need no nodes of their own:
//! those weights replace the checkpoint's before the graph is built.

mod adapter;
mod lst;

use std::path::Path;

use super::body::Body;
use crate::extract::onnx::builder::Tensors;
use crate::fit::error::FitError;
use crate::fit::method::MethodSpec;
use crate::Result;

/// Build `method`'s graph on `body`, reading its trained tensors from
/// `trained`; returns the sequence the head pools and its width.
pub fn build(
    body: &mut dyn Body,
    method: &MethodSpec,
    trained: &Tensors,
    run: &Path,
) -> Result<(String, usize)> {
    let _ = trained;
    let (n, d) = (body.layers(), body.width());
    match method {
        MethodSpec::LinearProbe { probe_layer } => {
            if *probe_layer > n {
                return Err(FitError::BadRun {
                    path: run.to_path_buf(),
                    message: format!(
                        "the run reads hidden_states.{probe_layer}, the backbone has {n} layers"
                    ),
                }
                .into());
            }
            Ok((body.hidden(*probe_layer)?, d))
        }
        MethodSpec::LateLayer { .. } | MethodSpec::FullFt | MethodSpec::Lora { .. } => {
            Ok((body.hidden(n)?, d))
        }
        MethodSpec::Adapter {
            side_dim,
            placement,
            activation,
        } => adapter::build(body, trained, *side_dim, *placement, *activation),
        MethodSpec::Lst { side_dim, .. } => lst::build(body, trained, *side_dim),
        MethodSpec::Sherl { .. } | MethodSpec::Unipt { .. } => Err(FitError::BadRun {
            path: run.to_path_buf(),
            message: format!(
                "export of a {} run is not implemented yet (exported: linear-probe, late-layer, \
                 full-ft, lora, adapter, lst)",
                method.kind().name()
            ),
        }
        .into()),
    }
}
