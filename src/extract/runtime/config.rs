//! Where and how a session runs: device, threads, graph optimisation.

use std::str::FromStr;

use ort::session::builder::GraphOptimizationLevel;

/// Where to run a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// CPU execution provider.
    Cpu,
    /// CUDA execution provider on GPU `n`; failing to start it is an error.
    Cuda(i32),
    /// CUDA on GPU 0 when the library has it and a GPU answers, else CPU.
    Auto,
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(Device::Auto),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<i32>().ok().filter(|n| *n >= 0))
                .map(Device::Cuda)
                .ok_or_else(|| {
                    format!("unknown device '{s}' (expected cpu, cuda, cuda:N or auto)")
                }),
        }
    }
}

/// Graph optimisation level, as ONNX Runtime names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OptLevel {
    /// No graph rewrites.
    Disable,
    /// Constant folding and redundant-node removal.
    Basic,
    /// Node fusions (attention, LayerNorm, GELU...).
    Extended,
    /// Everything, including layout changes.
    All,
}

impl OptLevel {
    pub(super) fn to_ort(self) -> GraphOptimizationLevel {
        match self {
            OptLevel::Disable => GraphOptimizationLevel::Disable,
            OptLevel::Basic => GraphOptimizationLevel::Level1,
            OptLevel::Extended => GraphOptimizationLevel::Level2,
            OptLevel::All => GraphOptimizationLevel::All,
        }
    }
}

/// Session settings.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Where to run.
    pub device: Device,
    /// Intra-op threads; `None` lets ONNX Runtime decide (one per core).
    pub threads: Option<usize>,
    /// Graph optimisation level.
    pub opt_level: OptLevel,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            device: Device::Auto,
            threads: None,
            opt_level: OptLevel::All,
        }
    }
}
