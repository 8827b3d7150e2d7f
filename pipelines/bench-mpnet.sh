#!/usr/bin/env bash
# The methods side by side on the base-size backbone (issue 13's claim):
# all-mpnet-base-v2 (fetched on request, 405 MB) on a subset of Rotten
# Tomatoes small enough that each memory-hungry method (full-ft, LoRA,
# adapters: backward through all 12 layers of 768) trains its seeds in
# about an hour on 2 cores. A benchmark, not a test.
#
#   pipelines/bench-mpnet.sh                 # ROWS=2000 SPLIT=train=0.5,valid=0.1,test=0.4
#   METHODS=... SEEDS="0 1 2" EPOCHS=2 THREADS=2 BIN=DIR OUT=target/bench/methods-mpnet
#
# The first ROWS fresh/rotten reviews of the corpus (as bench-fit.sh takes
# its 4,000), every layer cached (f16), then pipelines/bench-methods.sh
# with BACKBONE=all-mpnet-base-v2: the table and accuracy-vs-memory.svg
# land in OUT. Finished runs are kept, so an interrupted run resumes.
set -euo pipefail
. "$(dirname "$0")/target-dir.sh"   # CARGO_TARGET_DIR, relative or absolute
cd "$(dirname "$0")/.."
ASSETS="$(pipelines/fetch-assets.sh all mpnet)"
export BACKBONE="$ASSETS/backbones/all-mpnet-base-v2"
[ -n "${BIN:-}" ] || { cargo build --release --bins --quiet; BIN="$(sherl_release_dir)"; }
ROWS="${ROWS:-2000}"
SPLIT="${SPLIT:-train=0.5,valid=0.1,test=0.4}"
S=target/bench/mpnet
mkdir -p "$S"
CACHE="$S/cache-$ROWS"
if [ ! -f "$CACHE/manifest.json" ]; then
    python3 benches/rt_reviews.py "$ASSETS/data/rotten_tomatoes_corpus_full.csv.bz2" "$S/reviews-$ROWS.csv" "$ROWS"
    # exports BACKBONE/model.onnx on first use
    "$BIN/sherl-extract" run --backbone "$BACKBONE" --data "$S/reviews-$ROWS.csv" \
        --text-column review --label-column sentiment --split "$SPLIT" \
        --max-len 128 --layers all --threads "${THREADS:-2}" --out "$CACHE" --no-progress
fi
OUT="${OUT:-target/bench/methods-mpnet}" BIN="$BIN" pipelines/bench-methods.sh "$CACHE"
