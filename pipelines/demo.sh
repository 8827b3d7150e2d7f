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
# skipped. Measured wall time on a 2-core CPU machine: see docs/results.md.
set -euo pipefail
. "$(dirname "$0")/target-dir.sh"   # CARGO_TARGET_DIR, relative or absolute
cd "$(dirname "$0")/.."
WORK="${WORK:-target/demo}"
GRID="${GRID:-pipelines/demo-grid.json}"
JOBS="${JOBS:-2}"
start=$(date +%s)
# Only what the demo uses (not BBC News); checksummed, skipped when present.
ASSETS="$(pipelines/fetch-assets.sh ort minilm rotten-tomatoes)"
fetched=$(date +%s)
echo "demo: building sherl in release (first time about 8 minutes on 2 idle cores; then seconds)" >&2
cargo build --release --bins
built=$(date +%s)
BIN="$(sherl_release_dir)"
BACKBONE="$ASSETS/backbones/all-MiniLM-L6-v2"
DATA=(--data "$ASSETS/data/rotten_tomatoes_corpus_full.csv.bz2"
      --text-column text --label-column category --labels fresh,rotten
      --split train=0.8,valid=0.1,test=0.1 --group-column movie_name --split-seed 0)
mkdir -p "$WORK"
# The ONNX export lives next to the checkpoint (where predict looks for it);
# made once.
if [ ! -f "$BACKBONE/model.onnx" ]; then
    "$BIN/sherl-extract" export-onnx --backbone "$BACKBONE" >/dev/null
fi

CACHE="$WORK/rt-cache"
if [ ! -f "$CACHE/manifest.json" ]; then
    RESUME=()
    [ -d "$CACHE" ] && RESUME=(--resume)
    # every layer: SHERL reads 0..5, UniPT and the probe also read 6
    "$BIN/sherl-extract" run --backbone "$BACKBONE" --out "$CACHE" "${DATA[@]}" --layers all "${RESUME[@]}"
fi
"$BIN/sherl-cache" inspect "$CACHE" >&2
extracted=$(date +%s)

# Exit code 1 (some runs failed) still prints the table; keep going.
"$BIN/sherl-fit" sweep --cache "$CACHE" --backbone "$BACKBONE" --grid "$GRID" \
    --out "$WORK/runs" --jobs "$JOBS" > "$WORK/sweep.jsonl" || [ $? -eq 1 ]
"$BIN/sherl-fit" report "$WORK/runs"
end=$(date +%s)
echo
echo "demo: fetch $((fetched - start)) s, build $((built - fetched)) s, extraction $((extracted - built)) s, training $((end - extracted)) s, total $((end - start)) s"
echo "pictures and tables: $WORK/runs/report/"
# The run to use: the best valid accuracy among the SHERL runs.
BEST=$(python3 - "$WORK/runs" <<'PY'
import json, pathlib, sys
runs = []
for s in pathlib.Path(sys.argv[1]).glob("*/summary.json"):
    d = json.loads(s.read_text())
    if d.get("method") == "sherl":
        runs.append((d["valid_accuracy"], str(s.parent)))
print(max(runs)[1] if runs else "")
PY
)
if [ -n "$BEST" ]; then
    echo "best SHERL run (valid accuracy): $BEST"
    echo "label your own texts with it (one per line; a CSV/TSV/JSONL with a 'text' column works too):"
    echo "  echo 'A warm, funny and clever film.' | $BIN/sherl-fit predict --run $BEST --backbone $BACKBONE --data -"
    echo "  $BIN/sherl-fit predict --run $BEST --backbone $BACKBONE --data YOUR.txt --out predictions.jsonl"
fi
