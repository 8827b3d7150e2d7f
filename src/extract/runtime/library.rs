//! Finding the ONNX Runtime library and loading it once per process.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::ep::ExecutionProvider;

use crate::{Error, Result};

use super::config::Device;

/// Environment variable naming the ONNX Runtime library.
pub const ORT_ENV: &str = "ORT_DYLIB_PATH";

/// The loaded runtime (one per process).
pub struct Runtime {
    pub(super) env: ort::environment::Environment,
    pub(super) library: PathBuf,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("library", &self.library)
            .finish()
    }
}

static RUNTIME: OnceLock<std::result::Result<Runtime, String>> = OnceLock::new();

fn not_found_message(tried: &[String]) -> String {
    format!(
        "ONNX Runtime library not found (tried: {}). Get it with `pipelines/fetch-assets.sh ort` \
         (PyPI onnxruntime==1.32.0), or point --ort-lib / {ORT_ENV} at a libonnxruntime.so",
        tried.join("; ")
    )
}

/// Resolve a user-given path: a file, or a directory holding one library.
fn library_in(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        return Some(path.to_path_buf());
    }
    if path.is_dir() {
        let mut libs: Vec<PathBuf> = std::fs::read_dir(path)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with("libonnxruntime.so")
                        || n == "libonnxruntime.dylib"
                        || n == "onnxruntime.dll"
                })
            })
            .collect();
        libs.sort();
        return libs.pop();
    }
    None
}

/// Find the ONNX Runtime library for the CPU: `explicit`, then
/// `ORT_DYLIB_PATH`, then the asset directory (the CPU build first).
pub fn locate_library(explicit: Option<&Path>) -> Result<PathBuf> {
    locate_library_for(explicit, Device::Cpu)
}

/// Whether this machine shows an NVIDIA GPU to processes (the driver's
/// device files), without loading anything.
pub fn nvidia_gpu_present() -> bool {
    Path::new("/dev/nvidia0").exists() || Path::new("/proc/driver/nvidia/version").exists()
}

/// Asset sub-folders holding ONNX Runtime builds, in the order tried for
/// `device`: the CUDA build first for `cuda`, and for `auto` when the
/// machine shows an NVIDIA GPU (elsewhere `auto` would only ever run the
/// CUDA build's CPU provider, a different version from the CPU build).
pub fn asset_library_dirs(device: Device, gpu_present: bool) -> [&'static str; 2] {
    match device {
        Device::Cuda(_) => ["onnxruntime-gpu", "onnxruntime"],
        Device::Auto if gpu_present => ["onnxruntime-gpu", "onnxruntime"],
        Device::Cpu | Device::Auto => ["onnxruntime", "onnxruntime-gpu"],
    }
}

/// Highest-version `<base>/<version>/` folder that holds a library.
pub(super) fn newest_library_in(base: &Path) -> Option<PathBuf> {
    let rd = std::fs::read_dir(base).ok()?;
    let mut dirs: Vec<(Vec<u64>, PathBuf)> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .map(|p| {
            let v = p
                .file_name()
                .and_then(|n| n.to_str())
                .map(|n| n.split('.').map(|x| x.parse().unwrap_or(0)).collect())
                .unwrap_or_default();
            (v, p)
        })
        .collect();
    dirs.sort();
    dirs.iter().rev().find_map(|(_, d)| library_in(d))
}

/// Find the ONNX Runtime library for `device`: `explicit`, then
/// `ORT_DYLIB_PATH`, then the asset directory (see the module docs).
pub fn locate_library_for(explicit: Option<&Path>, device: Device) -> Result<PathBuf> {
    let mut tried = Vec::new();
    if let Some(p) = explicit {
        return library_in(p).ok_or_else(|| {
            Error::Runtime(format!(
                "--ort-lib {}: no such file (or no libonnxruntime in that directory). {}",
                p.display(),
                not_found_message(&[])
            ))
        });
    }
    if let Some(p) = std::env::var_os(ORT_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return library_in(&p).ok_or_else(|| {
            Error::Runtime(format!(
                "{ORT_ENV}={}: no such file. {}",
                p.display(),
                not_found_message(&[])
            ))
        });
    }
    tried.push(format!("--ort-lib not given, {ORT_ENV} not set"));
    let assets = crate::assets::assets_dir();
    for sub in asset_library_dirs(device, nvidia_gpu_present()) {
        let base = assets.join(sub);
        if let Some(lib) = newest_library_in(&base) {
            return Ok(lib);
        }
        tried.push(format!("{}/<version>/libonnxruntime.so*", base.display()));
    }
    Err(Error::Runtime(not_found_message(&tried)))
}

/// Load ONNX Runtime once for this process, the CPU build preferred. Later
/// calls return the same runtime (or the same error); the library cannot be
/// swapped in-process.
pub fn init(explicit: Option<&Path>) -> Result<&'static Runtime> {
    init_for(explicit, Device::Cpu)
}

/// Load ONNX Runtime once for this process, choosing the library for
/// `device` (see [`locate_library_for`]); later calls return the first.
pub fn init_for(explicit: Option<&Path>, device: Device) -> Result<&'static Runtime> {
    let r = RUNTIME.get_or_init(|| {
        let library = locate_library_for(explicit, device).map_err(|e| e.to_string())?;
        let builder = ort::init_from(&library)
            .map_err(|e| format!("cannot load {}: {e}", library.display()))?;
        let env = builder
            .with_name("sherl")
            .with_telemetry(false)
            .build()
            .map_err(|e| format!("cannot create the environment: {e}"))?;
        tracing::debug!("ONNX Runtime loaded from {}", library.display());
        Ok(Runtime { env, library })
    });
    match r {
        Ok(rt) => Ok(rt),
        Err(msg) => Err(Error::Runtime(
            msg.trim_start_matches("ONNX Runtime: ").to_string(),
        )),
    }
}

impl Runtime {
    /// Path of the loaded library.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// Whether the loaded library was built with the CUDA provider.
    pub fn has_cuda(&self) -> bool {
        <ort::ep::CUDA as ExecutionProvider>::is_available().unwrap_or(false)
    }
}
