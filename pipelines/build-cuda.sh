#!/usr/bin/env bash
# Build sherl with the `cuda` feature (training and predict on NVIDIA GPUs
# through candle) on any x86-64 Linux machine, GPU or not: nvcc and the CUDA
# headers come from PyPI through pipelines/fetch-cuda-build.sh.
#
#   pipelines/build-cuda.sh [extra cargo args]     # e.g. --bin sherl-fit
#   CUDA_CARGO=clippy pipelines/build-cuda.sh --bins -- -D warnings
#                                                  # lint instead (what CI runs)
#
# Binaries land in target/cuda/release/ (a separate target folder, so the
# CPU build in target/release is left alone). CUDA_COMPUTE_CAP picks the GPU
# generation the kernels are compiled for (default 90: H100/H200; 80 for
# A100, 89 for L4/L40/RTX 40xx, 86 for RTX 30xx); the PTX also runs, compiled
# at start by the driver, on newer GPUs.
#
# The binaries need, at start, the NVIDIA driver (libcuda.so.1) and the CUDA
# 13 libraries libcudart.so.13, libcublas.so.13, libcublasLt.so.13,
# libcurand.so.10 and libnvrtc.so.13 on the loader path (a CUDA 13 toolkit's
# lib64, or PyTorch's pip packages: see docs/gpu.md).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
CUDA="$("$HERE/fetch-cuda-build.sh")"
export CUDA_HOME="$CUDA" CUDA_PATH="$CUDA"
export PATH="$CUDA/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH="$CUDA/lib:$CUDA/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HERE/../target/cuda}"
cd "$HERE/.."
echo "build-cuda: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute capability $CUDA_COMPUTE_CAP, target $CARGO_TARGET_DIR" >&2
exec cargo "${CUDA_CARGO:-build}" --release --features cuda "$@"
