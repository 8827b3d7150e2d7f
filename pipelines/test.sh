#!/usr/bin/env bash
# The project's test command (README "Tests"; .ci/run calls exactly this).
# Fetches the assets the tests need, then checks formatting, lints and runs
# every test in release mode, and checks that each phase builds alone (candle and ONNX Runtime work is ~8x slower in
# the dev profile).
set -euo pipefail
cd "$(dirname "$0")/.."
# ort-gpu too: a test checks what ONNX Runtime's CUDA build does on a
# machine without CUDA (tests/runtime.rs).
pipelines/fetch-assets.sh all ort-gpu >/dev/null
cargo fmt --all --check
cargo clippy --release --all-targets -- -D warnings
# Each phase builds without the other's heavy dependencies (Cargo.toml
# [features]): extraction without candle, training without ONNX Runtime.
cargo clippy --release --no-default-features --features extract,cli --bin sherl-extract -- -D warnings
cargo clippy --release --no-default-features --features fit,cli --bin sherl-fit -- -D warnings
cargo clippy --release --no-default-features --features cli --bin sherl-cache -- -D warnings
# The `cuda` feature (candle's CUDA backend; its kernels compiled by nvcc
# from PyPI, pipelines/fetch-cuda-build.sh) still builds and lints. Nothing
# of it runs here: CI has no GPU (pipelines/gpu-check.sh is the GPU check).
CUDA_CARGO=clippy pipelines/build-cuda.sh --bins -- -D warnings
# The API docs build without a warning (Cargo.toml denies broken links).
RUSTDOCFLAGS="-D warnings" cargo doc --release --no-deps
cargo test --release
# The Python package (python/): its wheel built in this target directory
# against the library just built, then its pytest tests.
pipelines/python.sh
