#!/usr/bin/env bash
# A check, not a test: sherl.torch.CacheDataset in a plain PyTorch training
# loop (python/checks/torch_head.py: a linear head on a MiniLM cache made by
# sherl-extract; the loss must fall by half). PyTorch is a few GB, so it is
# not in CI's venv: this uses the benchmarks' PyTorch venv
# (benches/torch-venv.sh; TORCH_VENV to use another), with the wheel
# pipelines/python.sh builds unpacked on PYTHONPATH (the venv is not changed).
. "$(dirname "$0")/target-dir.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
pipelines/python.sh --no-test
TORCH_PY="$(benches/torch-venv.sh)"
BIN="$(sherl_release_dir)"
PKG="$(dirname "$BIN")/python-torch-check"
rm -rf "$PKG"
"$TORCH_PY" -m zipfile -e "$(dirname "$BIN")"/wheels/sherl-*.whl "$PKG"
SHERL_BIN_DIR="$BIN" PYTHONPATH="$PKG" PYTHONDONTWRITEBYTECODE=1 \
    "$TORCH_PY" python/checks/torch_head.py
