#!/usr/bin/env bash
# The project's test command (README "Tests"; .ci/run calls exactly this).
# Fetches the assets the tests need, then checks formatting, lints and runs
# every test in release mode, and checks that each phase builds alone (candle and ONNX Runtime work is ~8x slower in
# the dev profile).
set -euo pipefail
cd "$(dirname "$0")/.."
pipelines/fetch-assets.sh >/dev/null
cargo fmt --all --check
cargo clippy --release --all-targets -- -D warnings
# Each phase builds without the other's heavy dependencies (Cargo.toml
# [features]): extraction without candle, training without ONNX Runtime.
cargo clippy --release --no-default-features --features extract,cli --bin sherl-extract -- -D warnings
cargo clippy --release --no-default-features --features fit,cli --bin sherl-fit -- -D warnings
cargo clippy --release --no-default-features --features cli --bin sherl-cache -- -D warnings
cargo test --release
