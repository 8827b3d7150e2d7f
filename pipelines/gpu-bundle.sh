#!/usr/bin/env bash
# Pack what pipelines/gpu-check.sh needs into parts small enough for a
# transfer that takes at most 64 MiB at a time (a remote GPU machine with no
# Rust and no network): the CUDA build of sherl-extract, sherl-fit and
# sherl-cache (debug info stripped), ONNX Runtime's CUDA build, MiniLM and
# the Rotten Tomatoes reviews, with a SHA256SUMS list, xz-compressed and
# split into parts of at most PART_MIB (default 60) MiB.
#
#   pipelines/gpu-bundle.sh [OUT_DIR]       # default target/gpu-bundle
#
# On the GPU machine: copy the parts into one folder (in any number of
# transfers), then `pipelines/gpu-check.sh --bundle FOLDER` joins them,
# unpacks, checks every file against SHA256SUMS and runs the check.
# Users whose GPU machine has a network need none of this: there,
# `pipelines/fetch-assets.sh ort-gpu minilm rotten-tomatoes` and
# `pipelines/build-cuda.sh` fetch and build the same things in place.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$REPO/target/gpu-bundle}"
PART_MIB="${PART_MIB:-60}"
ASSETS="${SHERL_ASSETS:-$HOME/.cache/sherl}"
die() { echo "gpu-bundle: error: $*" >&2; exit 1; }

"$REPO/pipelines/fetch-assets.sh" ort-gpu minilm rotten-tomatoes >/dev/null
"$REPO/pipelines/build-cuda.sh" --bin sherl-extract --bin sherl-fit --bin sherl-cache
BIN="${CARGO_TARGET_DIR:-$REPO/target/cuda}/release"

# Two xz streams, one after the other (xz and tar -i read them as one): the
# assets, packed once and kept in $CACHE (they never change), then the
# binaries, packed each time. A rebuild then costs a minute, not ten.
CACHE="$REPO/target/gpu-bundle-assets"
STAGE="$OUT/stage"
rm -rf "$OUT"; mkdir -p "$STAGE/bin" "$CACHE"
for b in sherl-extract sherl-fit sherl-cache; do
    [ -x "$BIN/$b" ] || die "$BIN/$b was not built"
    objcopy --strip-debug "$BIN/$b" "$STAGE/bin/$b"
done
A="$CACHE/stage"
if [ ! -f "$CACHE/assets.tar.xz" ] || [ ! -f "$CACHE/assets.sums" ]; then
    rm -rf "$A"; mkdir -p "$A/assets/onnxruntime-gpu" "$A/assets/backbones" "$A/assets/data"
    cp -r "$ASSETS/onnxruntime-gpu/1.31.1" "$A/assets/onnxruntime-gpu/"
    cp -r "$ASSETS/backbones/all-MiniLM-L6-v2" "$A/assets/backbones/"
    cp "$ASSETS/data/rotten_tomatoes_corpus_full.csv.bz2" "$A/assets/data/"
    (cd "$A" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum > ../assets.sums.tmp)
    echo "gpu-bundle: packing the assets, $(du -sh "$A" | cut -f1), with xz -9 (minutes, once)" >&2
    tar -c -C "$A" . | xz -9 -T"$(nproc)" > "$CACHE/assets.tar.xz.tmp"
    mv "$CACHE/assets.tar.xz.tmp" "$CACHE/assets.tar.xz"; mv "$CACHE/assets.sums.tmp" "$CACHE/assets.sums"
    rm -rf "$A"
fi
(cd "$STAGE" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | cat "$CACHE/assets.sums" - > "$OUT/SHA256SUMS"
mv "$OUT/SHA256SUMS" "$STAGE/SHA256SUMS"
tar -c -C "$STAGE" . | xz -9 -T"$(nproc)" > "$OUT/bin.tar.xz"
cat "$CACHE/assets.tar.xz" "$OUT/bin.tar.xz" > "$OUT/sherl-gpu.tar.xz"
split -b "${PART_MIB}M" -d -a 2 "$OUT/sherl-gpu.tar.xz" "$OUT/sherl-gpu.tar.xz.part-"
rm -rf "$STAGE" "$OUT/sherl-gpu.tar.xz" "$OUT/bin.tar.xz"
(cd "$OUT" && sha256sum sherl-gpu.tar.xz.part-* > PARTS.sha256)
ls -l "$OUT" >&2
echo "$OUT"
