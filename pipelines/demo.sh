#!/usr/bin/env bash
# The main job, at this stage of sherl: fetch the assets, export the default
# backbone (all-MiniLM-L6-v2) to ONNX with every hidden state as an output,
# run it over a sample of the Rotten Tomatoes review snippets (the `plot`
# rows dropped, split by movie) printing what it found, then extract the
# whole dataset into a feature cache, inspect it and verify it.
#
#   pipelines/demo.sh [--limit N]
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=256
if [ "${1:-}" = "--limit" ]; then LIMIT="$2"; fi
ASSETS="$(pipelines/fetch-assets.sh)"
cargo build --release --bins --quiet
BIN=target/release
BACKBONE="$ASSETS/backbones/all-MiniLM-L6-v2"
"$BIN/sherl-extract" export-onnx --backbone "$BACKBONE"
"$BIN/sherl-extract" sample --backbone "$BACKBONE" \
    --data "$ASSETS/data/rotten_tomatoes_corpus_full.csv.bz2" \
    --text-column text --label-column category --labels fresh,rotten \
    --split train=0.8,valid=0.1,test=0.1 --group-column movie_name --split-seed 0 \
    --limit "$LIMIT"

# The whole dataset into a feature cache (about 75 s on 2 CPU cores), then
# look at it and check every byte.
CACHE="${SHERL_DEMO_CACHE:-target/demo/rt-cache}"
rm -rf "$CACHE"
"$BIN/sherl-extract" run --backbone "$BACKBONE" --out "$CACHE" \
    --data "$ASSETS/data/rotten_tomatoes_corpus_full.csv.bz2" \
    --text-column text --label-column category --labels fresh,rotten \
    --split train=0.8,valid=0.1,test=0.1 --group-column movie_name --split-seed 0
"$BIN/sherl-cache" inspect "$CACHE"
"$BIN/sherl-cache" verify "$CACHE"
