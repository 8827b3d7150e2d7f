//! Each method's graph between the frozen backbone and the head, written
//! against [`Body`] so it serves text and image backbones alike. A method
//! returns the sequence the head pools (`[batch, seq, width]`) and its
//! width.
//!
//! Every method has its graph: `sherl` (early route, restore, gate, then
//! the backbone's last layers), `unipt` and `lst` (side networks on every
//! hidden state), `adapter` (hooks inside the backbone's layers); the
//! others are the backbone itself read at one hidden state.
//!
//! The backbone's own layers with trained weights in place (late-layer,
//! full-ft, LoRA merged, `--late-trainable`) need no nodes of their own:
//! those weights replace the checkpoint's before the graph is built.

mod adapter;
mod lst;
mod sherl;
mod unipt;

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
        MethodSpec::Sherl {
            late_layers,
            side_dim,
            early_layers,
            ..
        } => sherl::build(body, trained, early_layers, *late_layers, *side_dim, run),
        MethodSpec::Unipt { side_dim } => unipt::build(body, trained, *side_dim),
        MethodSpec::Adapter {
            side_dim,
            placement,
            activation,
        } => adapter::build(body, trained, *side_dim, *placement, *activation),
        MethodSpec::Lst { side_dim, .. } => lst::build(body, trained, *side_dim),
    }
}
