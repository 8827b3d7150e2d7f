#!/usr/bin/env bash
# The main job: fetch the assets, export the default backbone
# (all-MiniLM-L6-v2) to ONNX, run it ONCE over the Rotten Tomatoes review
# snippets (the `plot` rows dropped, split 80/10/10 by movie) into a feature
# cache, then train every method of pipelines/demo-grid.json (SHERL and the
# baselines, 3 seeds each) from that cache, two runs at a time, and print the
# comparison table. Pictures and CSV/JSON land in $WORK/runs/report/.
#
#   pipelines/demo.sh            (WORK defaults to target/demo)
#
# Re-running resumes: the cache is reused if complete, finished runs are
# skipped. Measured wall time on a 2-core CPU machine: see README.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${WORK:-target/demo}"
GRID="${GRID:-pipelines/demo-grid.json}"
JOBS="${JOBS:-2}"
start=$(date +%s)
ASSETS="$(pipelines/fetch-assets.sh)"
cargo build --release --bins --quiet
BIN=target/release
BACKBONE="$ASSETS/backbones/all-MiniLM-L6-v2"
DATA=(--data "$ASSETS/data/rotten_tomatoes_corpus_full.csv.bz2"
      --text-column text --label-column category --labels fresh,rotten
      --split train=0.8,valid=0.1,test=0.1 --group-column movie_name --split-seed 0)
mkdir -p "$WORK"
"$BIN/sherl-extract" export-onnx --backbone "$BACKBONE" >/dev/null
"$BIN/sherl-extract" sample --backbone "$BACKBONE" "${DATA[@]}" --limit 64 >/dev/null

CACHE="$WORK/rt-cache"
if [ ! -f "$CACHE/manifest.json" ]; then
    RESUME=()
    [ -d "$CACHE" ] && RESUME=(--resume)
    # every layer: SHERL reads 0..5, UniPT and the probe also read 6
    "$BIN/sherl-extract" run --backbone "$BACKBONE" --out "$CACHE" "${DATA[@]}" --layers all "${RESUME[@]}"
fi
"$BIN/sherl-cache" inspect "$CACHE"
extracted=$(date +%s)

# Exit code 1 (some runs failed) still prints the table; keep going.
"$BIN/sherl-fit" sweep --cache "$CACHE" --backbone "$BACKBONE" --grid "$GRID" \
    --out "$WORK/runs" --jobs "$JOBS" > "$WORK/sweep.jsonl" || [ $? -eq 1 ]
"$BIN/sherl-fit" report "$WORK/runs"
end=$(date +%s)
echo
echo "demo: extraction $((extracted - start)) s, training $((end - extracted)) s, total $((end - start)) s"
echo "pictures and tables: $WORK/runs/report/"
