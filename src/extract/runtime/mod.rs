//! ONNX Runtime: finding the shared library, loading it once per process,
//! and opening backbone sessions on CPU or CUDA.
//!
//! The library is looked up in this order: an explicit path (`--ort-lib`),
//! the `ORT_DYLIB_PATH` environment variable, then the asset directory:
//! `$SHERL_ASSETS/onnxruntime/<version>/libonnxruntime.so*` (the CPU build,
//! `fetch-assets.sh ort`) and `$SHERL_ASSETS/onnxruntime-gpu/<version>/`
//! (the CUDA build, `fetch-assets.sh ort-gpu`), the GPU one first when the
//! device asked for is `cuda` or `auto`. A path that does not exist is an
//! error before `ort` is touched: an unresolvable library has been reported
//! to hang the first ort call instead of failing. A relative path is taken
//! against the working directory (the loader would search the system's
//! library path for a bare name), and the file is checked before it is
//! loaded ([`check_library`]): a truncated library would otherwise kill the
//! process with SIGBUS inside the loader, printing nothing; the libraries
//! `fetch-assets.sh` installs are also checked against their checksums. When
//! the loader refuses a file, its own reason is printed.
//!
//! The CUDA provider needs the CUDA 13 libraries on the loader path when the
//! process starts; when it fails to start, [`missing_cuda_libraries`] names
//! the ones the loader cannot find.

mod config;
mod cuda;
mod elf;
mod library;
mod session;

pub use config::{Device, OptLevel, SessionConfig};
pub use cuda::{missing_cuda_libraries, CUDA_PROVIDER_LIBRARIES};
pub use library::{
    asset_library_dirs, check_library, init, init_for, locate_library, locate_library_for,
    nvidia_gpu_present, Runtime, ORT_ENV,
};
pub use session::{BackboneSession, DeviceChoice, F32Session, HiddenStates};

#[cfg(test)]
mod tests;
