#!/usr/bin/env bash
# Create (once) the Python environment of the PyTorch peer of sherl-fit
# (benches/fit_torch.py): a venv under target/bench/venv with CPU-usable
# PyTorch, numpy and safetensors from PyPI. Prints the venv's python.
# Never run by the tests or CI; pipelines/bench-fit.sh calls it.
#
#   benches/torch-venv.sh            # TORCH_SPEC=torch (default) to pin, e.g. TORCH_SPEC=torch==2.9.1
#
# Plain PyPI `torch` is used, not the CPU-only index: that index is a
# second host, and only PyPI is reachable from this project's machines.
# PyPI's Linux x86_64 wheel is built with CUDA and pulls the nvidia-* runtime
# wheels (a few GB once); it runs on CPU-only machines all the same.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TORCH_VENV:-target/bench/venv}"
PY="$VENV/bin/python"
if [ -x "$PY" ] && "$PY" -c 'import torch, numpy, safetensors' 2>/dev/null; then
    echo "$PY"
    exit 0
fi
mkdir -p "$(dirname "$VENV")"
python3 -m venv "$VENV" >&2
"$PY" -m pip install --quiet --upgrade pip >&2
start=$(date +%s)
"$PY" -m pip install --quiet "${TORCH_SPEC:-torch}" numpy safetensors >&2
end=$(date +%s)
size=$(du -sm "$VENV" | cut -f1)
echo "torch-venv: installed $("$PY" -c 'import torch; print(torch.__version__)') in $((end - start)) s; venv $size MiB" >&2
echo "$PY"
