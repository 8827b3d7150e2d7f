#!/usr/bin/env bash
# The project's test command (README "Tests"; .ci/run calls exactly this).
# Fetches the assets the tests need, then checks formatting, lints and runs
# every test in release mode (candle and ONNX Runtime work is ~8x slower in
# the dev profile).
set -euo pipefail
cd "$(dirname "$0")/.."
pipelines/fetch-assets.sh >/dev/null
cargo fmt --all --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release
