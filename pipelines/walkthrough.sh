#!/usr/bin/env bash
# The README's "From a clone to predictions" walk-through, timed step by step:
# a fresh clone, an empty asset directory, `cargo install`, a cache of your
# own CSV, one SHERL run, and predictions. Each step prints its wall time.
#
#   pipelines/walkthrough.sh            # work in target/walkthrough (deleted first)
#   W=/tmp/walk pipelines/walkthrough.sh
#
# The example CSV ("your own data") is 3,000 Rotten Tomatoes reviews with
# columns review,sentiment, made from the demo data (fetched first, into the
# usual asset directory, not timed).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
W="${W:-$REPO/target/walkthrough}"
"$REPO/pipelines/fetch-assets.sh" rotten-tomatoes >/dev/null
RT="${SHERL_ASSETS:-$HOME/.cache/sherl}/data/rotten_tomatoes_corpus_full.csv.bz2"
rm -rf "$W"; mkdir -p "$W"; cd "$W"
export SHERL_ASSETS="$W/assets"
step() {
    local s ms; s=$(date +%s%N)
    "$@"
    ms=$(( ($(date +%s%N) - s) / 1000000 ))
    printf 'TIME %5d.%d s  %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*" | tee -a "$W/times.txt" >&2
}
step git clone -q "$REPO" sherl
cd sherl
step pipelines/fetch-assets.sh ort minilm
step cargo install --locked --quiet --path . --root "$W/inst"
export PATH="$W/inst/bin:$PATH"
B="$SHERL_ASSETS/backbones/all-MiniLM-L6-v2"
python3 - "$RT" "$W/reviews.csv" <<'PY'
import bz2, csv, sys
rows = [r for r in csv.DictReader(bz2.open(sys.argv[1], "rt")) if r["category"] in ("fresh", "rotten")]
with open(sys.argv[2], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["review", "sentiment"])
    for r in rows[:3000]:
        w.writerow([r["text"], r["category"]])
PY
printf 'A warm, funny and beautifully acted film.\nTwo hours of my life I will never get back.\n' > "$W/new.txt"
step sherl extract export-onnx --backbone "$B"
step sherl extract run --backbone "$B" --data "$W/reviews.csv" --text-column review --label-column sentiment \
    --split train=0.8,valid=0.1,test=0.1 --out "$W/my-cache"
step sherl fit run --cache "$W/my-cache" --backbone "$B" --out "$W/runs" | tee "$W/summary.json"
RUN=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["run_dir"])' "$W/summary.json")
step sherl fit predict --run "$RUN" --backbone "$B" --data "$W/new.txt"
step sherl fit predict --run "$RUN" --backbone "$B" --data "$W/reviews.csv" --out "$W/preds.jsonl"
du -sh "$SHERL_ASSETS" "$W/my-cache" "$W/inst" | tee -a "$W/times.txt"
