#!/usr/bin/env bash
# Exported models on the real MiniLM (a benchmark and a pipeline check, not
# a test): one run of each method in METHODS (one epoch on TRAIN_EXAMPLES
# training examples of the cache: parity and inference cost are measured,
# not accuracy), each exported with `sherl-fit export`, then
# benches/export_inference.py: ONNX Runtime on the export against
# `sherl-fit predict` on the same real reviews (largest difference of the
# probabilities; the check fails above 1e-4), and latency at batch 1 and
# throughput at batch 32 against the backbone alone, same threads, models
# alternated. The backbone alone is its graph cut to the last hidden state.
# Prints one markdown table (docs/results.md, "Exported models").
#
#   pipelines/bench-export.sh [CACHE]   # default: the Rotten Tomatoes cache of bench-methods.sh
#   METHODS="linear-probe late-layer sherl unipt lora adapter lst full-ft"
#   TRAIN_EXAMPLES=64 TEXTS=512 THREADS=2 ROUNDS=5 OUT=target/bench/export BACKBONE=DIR BIN=DIR
set -euo pipefail
. "$(dirname "$0")/target-dir.sh"
cd "$(dirname "$0")/.."
ASSETS="$(pipelines/fetch-assets.sh)"
[ -n "${BIN:-}" ] || cargo build --release --bins --quiet
BIN="${BIN:-$(sherl_release_dir)}"
BACKBONE="${BACKBONE:-$ASSETS/backbones/all-MiniLM-L6-v2}"
CACHE="${1:-target/demo/rt-cache}"
METHODS="${METHODS:-linear-probe late-layer sherl unipt lora adapter lst full-ft}"
TRAIN_EXAMPLES="${TRAIN_EXAMPLES:-64}"
TEXTS="${TEXTS:-512}"
THREADS="${THREADS:-2}"
ROUNDS="${ROUNDS:-5}"
OUT="${OUT:-target/bench/export}"
VENV=target/bench/venv-ort
if ! "$VENV/bin/python" -c 'import onnxruntime, tokenizers, numpy' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet onnxruntime==1.32.0 tokenizers numpy
fi
[ -f "$BACKBONE/model.onnx" ] || "$BIN/sherl-extract" -q export-onnx --backbone "$BACKBONE" >/dev/null
if [ ! -f "$CACHE/manifest.json" ]; then
    "$BIN/sherl-extract" -q run --backbone "$BACKBONE" --out "$CACHE" \
        --data "$ASSETS/data/rotten_tomatoes_corpus_full.csv.bz2" \
        --label-column category --labels fresh,rotten \
        --split train=0.8,valid=0.1,test=0.1 --group-column movie_name --layers all >/dev/null
fi
mkdir -p "$OUT"
# real reviews, one per line: every 50th review of the corpus
python3 - "$ASSETS/data/rotten_tomatoes_corpus_full.csv.bz2" "$TEXTS" > "$OUT/texts.txt" <<'PY'
import bz2, csv, io, sys
rows = csv.DictReader(io.TextIOWrapper(bz2.open(sys.argv[1]), encoding="utf-8"))
reviews = [r["text"].replace("\n", " ").strip() for r in rows if r["category"] in ("fresh", "rotten")]
for t in [t for t in reviews[::50] if t][: int(sys.argv[2])]:
    print(t)
PY
args=()
for m in $METHODS; do
    run=$("$BIN/sherl-fit" -q run --cache "$CACHE" --backbone "$BACKBONE" --out "$OUT/runs" \
        --method "$m" --epochs 1 --train-examples "$TRAIN_EXAMPLES" --seed 0 --threads "$THREADS" \
        | tail -1 | python3 -c 'import json, sys; print(json.load(sys.stdin)["run_dir"])')
    rm -rf "$OUT/export-$m"
    "$BIN/sherl-fit" -q export --run "$run" --backbone "$BACKBONE" --out "$OUT/export-$m" >/dev/null
    "$BIN/sherl-fit" -q predict --run "$run" --backbone "$BACKBONE" --data "$OUT/texts.txt" \
        --threads "$THREADS" --out "$OUT/pred-$m.jsonl" >/dev/null
    args+=(--export "$m=$OUT/export-$m" --preds "$m=$OUT/pred-$m.jsonl")
done
LAYERS=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["num_hidden_layers"])' "$BACKBONE/config.json")
# the backbone alone: its graph cut to the last hidden state (with every
# hidden state an output, ONNX Runtime could not fuse across the layers)
"$BIN/sherl-extract" -q expose-layers --tensors "hidden_states.$LAYERS" --first-index "$LAYERS" \
    --only-exposed --out "$OUT/backbone-last.onnx" "$BACKBONE/model.onnx" >/dev/null
echo "exports of $METHODS on $(basename "$BACKBONE"), $TEXTS reviews, $THREADS threads, $ROUNDS rounds; load $(cut -d' ' -f1-3 /proc/loadavg)"
"$VENV/bin/python" benches/export_inference.py --backbone-onnx "$OUT/backbone-last.onnx" \
    --backbone-output "hidden_states.$LAYERS" --texts "$OUT/texts.txt" --threads "$THREADS" \
    --rounds "$ROUNDS" --json "$OUT/results.json" "${args[@]}"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
"$VENV/bin/python" - "$OUT/results.json" <<'PY'
import json, sys
bad = [r for r in json.load(open(sys.argv[1])) if r.get("max_diff") is not None and r["max_diff"] > 1e-4]
if bad:
    sys.exit(f"parity above 1e-4: {[(r['model'], r['max_diff']) for r in bad]}")
PY
