#!/usr/bin/env bash
# Print an `export LD_LIBRARY_PATH=...` line that puts the CUDA 13 libraries
# sherl's GPU paths load (cudart, cuBLAS, cuBLASLt, cuRAND, NVRTC, cuDNN) on
# the loader path, found where they usually are:
#   - $CUDA_HOME/lib64 (or /usr/local/cuda/lib64): a CUDA toolkit;
#   - the `nvidia` pip packages of a Python environment (PyTorch installs
#     them: nvidia/cu13/lib, nvidia/cudnn/lib, ...), of `python3` on PATH or
#     of $PYTHON.
# Use it before starting sherl:   eval "$(pipelines/cuda-env.sh)"
# The loader reads LD_LIBRARY_PATH when a process starts, so it cannot be
# set from inside sherl. libcuda.so.1 comes with the NVIDIA driver.
# It says on stderr which of the libraries it could not find.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
dirs=()
if [ -n "${CUDA_HOME:-}" ]; then
    for d in "$CUDA_HOME/lib64" "$CUDA_HOME/lib"; do [ -d "$d" ] && dirs+=("$d"); done
fi
[ -d /usr/local/cuda/lib64 ] && dirs+=(/usr/local/cuda/lib64)
if command -v "$PYTHON" >/dev/null 2>&1; then
    while IFS= read -r d; do
        [ -n "$d" ] && dirs+=("$d")
    done < <("$PYTHON" - <<'PY' 2>/dev/null || true
import glob, os, site, sys
roots = list(getattr(site, "getsitepackages", lambda: [])()) + [site.getusersitepackages()] + sys.path
seen = set()
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        d = os.path.realpath(d)
        if d not in seen:
            seen.add(d)
            print(d)
PY
)
fi
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    found=0
    for d in "${dirs[@]}"; do [ -e "$d/$lib" ] && found=1 && break; done
    [ $found = 1 ] || echo "cuda-env: $lib not found (looked in: ${dirs[*]:-nothing})" >&2
done
joined="$(IFS=:; echo "${dirs[*]:-}")"
if [ -n "$joined" ]; then
    echo "export LD_LIBRARY_PATH=\"$joined\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
else
    echo "export LD_LIBRARY_PATH=\"\${LD_LIBRARY_PATH:-}\""
fi
