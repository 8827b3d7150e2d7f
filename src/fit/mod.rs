//! Phase two: training from the feature cache with candle.
//!
//! - [`config`]: `FitConfig`, its precedence (defaults, file, flags), run
//!   ids, learning-rate schedule.
//! - [`error`]: [`error::FitError`], the errors of this phase.
//! - [`batcher`]: batches streamed from the mapped cache.
//! - [`nn`]: the modules (BERT layer, embeddings, SHERL's consolidation and
//!   restore gate, UniPT, head), each `load` + `forward` as in candle.
//! - [`kernels`]: the hand-written CPU ops under [`nn`] (fused layers,
//!   matrix products), exempt from the file and function size limits.
//! - [`method`]: the method table: each method's settings, flags and
//!   resolved spec.
//! - [`model`]: the model of each `--method`, composed from [`nn`].
//! - [`trainer`]: the training loop both tasks share (epochs, optimisers,
//!   schedule, clipping, best checkpoint, metrics, memory); [`train`]:
//!   classification as its task ([`retrieval`] is the other); [`checks`]
//!   and [`memory`]: what is refused before a run starts; [`eval`]:
//!   evaluation on one split.
//! - [`run_dir`]: the run directory's files (config.json, metrics.jsonl,
//!   summary.json, error.json), one type each.
//! - [`params`], [`metrics`]: the parameter store and the metrics (random
//!   numbers come from [`crate::rng`]).

pub mod alloc_track;
pub mod batcher;
pub mod checkpoint;
pub mod checks;
pub mod config;
pub mod error;
pub mod eval;
pub mod kernels;
pub mod memory;
pub mod method;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod optim;
pub mod params;
pub mod resume;
pub mod retrieval;
pub mod run_dir;
pub mod sweep;
pub mod train;
pub mod trainer;
pub mod worker;

use candle_core::Device;

use crate::Result;
use error::FitError;

/// What `sherl-fit --device` means when not given: `auto` in a build with
/// the `cuda` feature (a GPU when one answers), `cpu` otherwise, where `auto`
/// could only ever mean the CPU.
pub const DEFAULT_DEVICE: &str = if cfg!(feature = "cuda") {
    "auto"
} else {
    "cpu"
};

/// Why this build cannot use a GPU, or `None` when it can try.
fn no_cuda_build() -> Option<&'static str> {
    (!candle_core::utils::cuda_is_available()).then_some(
        "this sherl-fit was built without the `cuda` feature; build it with \
         `pipelines/build-cuda.sh` (docs/gpu.md)",
    )
}

/// Parse `cpu`, `cuda`, `cuda:N` or `auto` into a candle device. `auto` is
/// GPU 0 when this build has CUDA and a GPU answers, else the CPU; the
/// second value then says why the GPU was not used (to print as one line).
pub fn device(spec: &str) -> Result<(Device, Option<String>)> {
    let refuse = |message: String| FitError::Device {
        spec: spec.to_owned(),
        message,
    };
    match spec {
        "cpu" => Ok((Device::Cpu, None)),
        "auto" => {
            if let Some(why) = no_cuda_build() {
                return Ok((Device::Cpu, Some(why.to_string())));
            }
            match Device::new_cuda(0) {
                Ok(d) => Ok((d, None)),
                Err(e) => Ok((Device::Cpu, Some(format!("no usable GPU 0: {e}")))),
            }
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = s
                .strip_prefix("cuda:")
                .map(|n| n.parse().map_err(|_| refuse(format!("bad device '{s}'"))))
                .transpose()?
                .unwrap_or(0);
            if let Some(why) = no_cuda_build() {
                return Err(refuse(format!(
                    "--device {s}: {why}; or train on the CPU with --device cpu"
                ))
                .into());
            }
            let d = Device::new_cuda(ordinal).map_err(|e| {
                refuse(format!(
                    "--device {s}: GPU {ordinal} did not start: {e} (is the NVIDIA driver \
                     loaded and is there a GPU {ordinal}? `nvidia-smi` lists them)"
                ))
            })?;
            Ok((d, None))
        }
        other => Err(refuse(format!(
            "unknown device '{other}' (expected cpu, cuda, cuda:N or auto)"
        ))
        .into()),
    }
}

/// The name a run records for its device: `cpu` or `cuda:N`.
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}
