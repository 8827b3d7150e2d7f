//! What the CUDA provider needs, and hints when it does not start.

use std::path::{Path, PathBuf};

use crate::Error;

/// Shared libraries ONNX Runtime's CUDA provider (1.31, CUDA 13) needs when
/// it loads: the driver and the CUDA runtime, cuBLAS, cuBLASLt and cuRAND.
pub const CUDA_PROVIDER_LIBRARIES: [&str; 5] = [
    "libcuda.so.1",
    "libcudart.so.13",
    "libcublas.so.13",
    "libcublasLt.so.13",
    "libcurand.so.10",
];

/// Which of `names` the dynamic loader would not find: looked for in
/// `LD_LIBRARY_PATH`, `extra` folders, the loader's cache (`ldconfig -p`)
/// and the usual system folders. A diagnosis for error messages; the
/// loader itself has the last word.
pub fn missing_cuda_libraries<'a>(names: &[&'a str], extra: &[PathBuf]) -> Vec<&'a str> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    dirs.extend(extra.iter().cloned());
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/lib/x86_64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/cuda/lib64",
            "/usr/local/nvidia/lib64",
        ]
        .map(PathBuf::from),
    );
    let cache = ["ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"]
        .iter()
        .find_map(|c| std::process::Command::new(c).arg("-p").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    names
        .iter()
        .copied()
        .filter(|n| {
            !dirs.iter().any(|d| d.join(n).exists())
                && !cache
                    .lines()
                    .any(|l| l.trim_start().starts_with(&format!("{n} ")))
        })
        .collect()
}

/// What to say when the CUDA provider did not start with `library`.
fn cuda_hint(library: &Path, gpu: i32) -> String {
    let extra: Vec<PathBuf> = library
        .parent()
        .map(Path::to_path_buf)
        .into_iter()
        .collect();
    let missing = missing_cuda_libraries(&CUDA_PROVIDER_LIBRARIES, &extra);
    if missing.is_empty() {
        format!(
            "The CUDA libraries it needs were found; is there a GPU {gpu} (`nvidia-smi` lists them)?"
        )
    } else {
        format!(
            "Not on the loader path: {}. Put the folders holding them on LD_LIBRARY_PATH before \
             starting sherl: a CUDA 13 toolkit's lib64, or the folders of PyTorch's pip packages \
             (`eval \"$(pipelines/cuda-env.sh)\"` finds them; docs/gpu.md); libcuda.so.1 \
             comes with the NVIDIA driver",
            missing.join(", ")
        )
    }
}

/// `e` (the CUDA provider did not start) with [`cuda_hint`] appended.
pub(super) fn with_cuda_hint(e: Error, library: &Path, gpu: i32) -> Error {
    match e {
        Error::Runtime(m) => Error::Runtime(format!(
            "{}. {}",
            m.trim_end().trim_end_matches('.'),
            cuda_hint(library, gpu)
        )),
        other => other,
    }
}
