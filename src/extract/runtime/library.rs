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

/// How to get a library, for the messages that found none.
const GET_ONE: &str = "Get it with `pipelines/fetch-assets.sh ort` (PyPI onnxruntime==1.32.0), \
     or point --ort-lib / ORT_DYLIB_PATH at a libonnxruntime.so file or a directory holding one";

fn not_found_message(tried: &[String]) -> String {
    format!(
        "ONNX Runtime library not found (tried: {}). {GET_ONE}",
        tried.join("; ")
    )
}

/// The libraries `pipelines/fetch-assets.sh` installs (path under the
/// asset directory, sha256 it checks them against, the script's argument
/// that fetches them). A library loaded from one of these paths is checked
/// against its checksum: hashing it costs about as much as reading it
/// (tens of milliseconds), once per process, and catches a file damaged in
/// place that its headers alone would not show.
pub(super) const FETCHED_LIBRARIES: &[(&str, &str, &str)] = &[
    (
        "onnxruntime/1.32.0/libonnxruntime.so.1.32.0",
        "6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f",
        "ort",
    ),
    (
        "onnxruntime-gpu/1.31.1/libonnxruntime.so.1.31.1",
        "5104254339ecadae808da771bd0b63b240f0dbd466514234905e54372435c303",
        "ort-gpu",
    ),
];

/// Whether `name` is a file name ONNX Runtime's library has.
fn is_library_name(name: &str) -> bool {
    name.starts_with("libonnxruntime.so")
        || name == "libonnxruntime.dylib"
        || name == "onnxruntime.dll"
}

/// Resolve a user-given path: a file (checked later, when loaded), or a
/// directory holding one library; `Err` says what the path is instead.
fn library_in(path: &Path) -> std::result::Result<PathBuf, String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err("no such file or directory".to_owned())
        }
        Err(e) => return Err(e.to_string()),
    };
    if !meta.is_dir() {
        return Ok(path.to_path_buf());
    }
    let entries = std::fs::read_dir(path).map_err(|e| e.to_string())?;
    let mut libs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_library_name)
        })
        .collect();
    libs.sort();
    libs.pop().ok_or_else(|| {
        "a directory with no libonnxruntime.so* (nor libonnxruntime.dylib, onnxruntime.dll) in it"
            .to_owned()
    })
}

/// A user-given library path (`--ort-lib`, `ORT_DYLIB_PATH`) made absolute
/// against the working directory: the loader, given a bare name, would
/// search the system's library path instead of the working directory.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `what` (`--ort-lib P`, `ORT_DYLIB_PATH=P`), followed by the absolute
/// path it resolves to when that differs.
fn given(what: String, path: &Path, resolved: &Path) -> String {
    if path == resolved {
        what
    } else {
        format!("{what} ({})", resolved.display())
    }
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
    dirs.iter().rev().find_map(|(_, d)| library_in(d).ok())
}

/// Find the ONNX Runtime library for `device`: `explicit`, then
/// `ORT_DYLIB_PATH`, then the asset directory (see the module docs).
pub fn locate_library_for(explicit: Option<&Path>, device: Device) -> Result<PathBuf> {
    let mut tried = Vec::new();
    if let Some(p) = explicit {
        let resolved = absolute(p);
        return library_in(&resolved).map_err(|why| {
            let what = given(format!("--ort-lib {}", p.display()), p, &resolved);
            Error::Runtime(format!("{what}: {why}. {GET_ONE}"))
        });
    }
    if let Some(p) = std::env::var_os(ORT_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        let resolved = absolute(&p);
        return library_in(&resolved).map_err(|why| {
            let what = given(format!("{ORT_ENV}={}", p.display()), &p, &resolved);
            Error::Runtime(format!("{what}: {why}. {GET_ONE}"))
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
        check_library(&library).map_err(|e| e.to_string())?;
        let builder = ort::init_from(&library).map_err(|e| load_error(&library, &e))?;
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

/// The fetched library (see [`FETCHED_LIBRARIES`]) that `library` is, if
/// it is one: its sha256 and the `fetch-assets.sh` argument that fetches it.
fn fetched(library: &Path) -> Option<(&'static str, &'static str)> {
    let assets = crate::assets::assets_dir();
    let real = std::fs::canonicalize(library).ok()?;
    FETCHED_LIBRARIES.iter().find_map(|(rel, sha, arg)| {
        let p = assets.join(rel);
        (p == library || std::fs::canonicalize(&p).is_ok_and(|p| p == real)).then_some((*sha, *arg))
    })
}

/// Check the library file before the loader maps it: a regular file, its
/// ELF headers no longer than the file (a truncated library, left by an
/// interrupted copy, would make the process die of SIGBUS inside the
/// loader, printing nothing), and for a library `pipelines/fetch-assets.sh`
/// installed, the checksum it was fetched with.
pub fn check_library(library: &Path) -> Result<()> {
    let fetched = fetched(library);
    let again = match fetched {
        Some((_, arg)) => format!("delete it and run `pipelines/fetch-assets.sh {arg}` again"),
        None => "copy it again, or fetch it with `pipelines/fetch-assets.sh ort`".to_owned(),
    };
    match super::elf::truncation(library) {
        Err(e) => return Err(Error::Runtime(format!("cannot load {e}"))),
        Ok(Some(why)) => {
            return Err(Error::Runtime(format!(
                "{}: truncated or damaged shared library ({why}; an interrupted copy leaves such a file); {again}",
                library.display()
            )))
        }
        Ok(None) => {}
    }
    if let Some((sha, _)) = fetched {
        let got = crate::fsutil::sha256_file(library)?;
        if got != sha {
            return Err(Error::Runtime(format!(
                "{}: sha256 {got}, not the {sha} that pipelines/fetch-assets.sh fetched: the file was damaged or replaced; {again}",
                library.display()
            )));
        }
    }
    Ok(())
}

/// Why ONNX Runtime could not be loaded from `library`, with the loader's
/// own reason (`dlerror()`), which `ort` keeps as the error's source.
fn load_error(library: &Path, e: &ort::LoadDynamicError) -> String {
    let mut msg = format!("cannot load {}: ", library.display());
    let top: &dyn std::error::Error = match e {
        ort::LoadDynamicError::Dlopen { error, .. } => error,
        other => other,
    };
    msg.push_str(&top.to_string());
    let mut source = top.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = cause.source();
    }
    msg
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
