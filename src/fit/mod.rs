//! Phase two: training from the feature cache with candle.
//!
//! - [`config`]: `FitConfig`, its precedence (defaults, file, flags), run
//!   ids, learning-rate schedule.
//! - [`error`]: [`error::FitError`], the errors of this phase.
//! - [`batcher`]: batches streamed from the mapped cache.
//! - [`nn`]: the modules (BERT layer, embeddings, SHERL's consolidation and
//!   restore gate, UniPT, head), each `load` + `forward` as in candle.
//! - [`model`]: the model of each `--method`, composed from [`nn`].
//! - [`train`]: the training loop; [`checks`] and [`memory`]: what is
//!   refused before a run starts; [`eval`]: evaluation on one split.
//! - [`run_dir`]: the run directory's files (config.json, metrics.jsonl,
//!   summary.json, error.json), one type each.
//! - [`params`], [`metrics`]: the parameter store and the metrics (random
//!   numbers come from [`crate::rng`]).

pub mod batcher;
pub mod checks;
pub mod config;
pub mod error;
pub mod eval;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod params;
#[cfg(feature = "extract")]
pub mod predict;
pub mod run_dir;
pub mod sweep;
pub mod train;

use candle_core::Device;

use crate::Result;
use error::FitError;

/// Parse `cpu`, `cuda` or `cuda:N` into a candle device.
pub fn device(spec: &str) -> Result<Device> {
    let refuse = |message: String| FitError::Device {
        spec: spec.to_owned(),
        message,
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = s
                .strip_prefix("cuda:")
                .map(|n| n.parse().map_err(|_| refuse(format!("bad device '{s}'"))))
                .transpose()?
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                return Err(refuse(format!(
                    "--device {s}: this sherl-fit has no CUDA support (sherl does not offer a CUDA build of its training code yet); train on the CPU with --device cpu"
                ))
                .into());
            }
            Device::new_cuda(ordinal).map_err(|e| refuse(format!("--device {s}: {e}")).into())
        }
        other => Err(refuse(format!(
            "unknown device '{other}' (expected cpu, cuda or cuda:N)"
        ))
        .into()),
    }
}
