#!/usr/bin/env bash
# The methods side by side on one cache (issue 13's comparison; a benchmark,
# not a test): every method in METHODS trained with every seed in SEEDS on
# the same cache, the same splits and epochs, then one table (test accuracy
# and macro-F1 as mean +- sd over seeds, trainable parameters, the method's
# training memory from summary.json's `train_memory`, peak RSS, seconds per
# epoch of the fastest seed) and a picture of test accuracy against training memory, one point
# per method (accuracy-vs-memory.svg), the figure the paper argues with.
#
#   pipelines/bench-methods.sh [CACHE]     # default: the Rotten Tomatoes cache of bench-fit.sh
#   METHODS="full-ft lora adapter lst unipt sherl late-layer linear-probe"
#   SEEDS="0 1 2" EPOCHS=3 THREADS=2 TRAIN_EXAMPLES= (all) BACKBONE=DIR OUT=target/bench/methods
#   BIN=DIR (prebuilt sherl binaries; default: build them, in target/release or CARGO_TARGET_DIR)
#
# Runs already finished in OUT/runs are not re-run (sherl-fit skips them),
# so an interrupted comparison resumes where it stopped.
set -euo pipefail
. "$(dirname "$0")/target-dir.sh"   # CARGO_TARGET_DIR, relative or absolute
cd "$(dirname "$0")/.."
ASSETS="$(pipelines/fetch-assets.sh)"
[ -n "${BIN:-}" ] || cargo build --release --bins --quiet
BIN="${BIN:-$(sherl_release_dir)}"   # prebuilt binaries elsewhere (a build in progress must not swap them mid-run)
BACKBONE="${BACKBONE:-$ASSETS/backbones/all-MiniLM-L6-v2}"
CACHE="${1:-target/demo/rt-cache}"
METHODS="${METHODS:-full-ft lora adapter lst unipt sherl late-layer linear-probe}"
SEEDS="${SEEDS:-0 1 2}"
EPOCHS="${EPOCHS:-3}"
THREADS="${THREADS:-2}"
OUT="${OUT:-target/bench/methods}"
if [ ! -f "$CACHE/manifest.json" ]; then
    [ -f "$BACKBONE/model.onnx" ] || "$BIN/sherl-extract" -q export-onnx --backbone "$BACKBONE" >/dev/null
    "$BIN/sherl-extract" -q run --backbone "$BACKBONE" --out "$CACHE" \
        --data "$ASSETS/data/rotten_tomatoes_corpus_full.csv.bz2" \
        --label-column category --labels fresh,rotten \
        --split train=0.8,valid=0.1,test=0.1 --group-column movie_name --layers all >/dev/null
fi
mkdir -p "$OUT"
: > "$OUT/summaries.jsonl"
extra=()
[ -n "${TRAIN_EXAMPLES:-}" ] && extra=(--train-examples "$TRAIN_EXAMPLES")
echo "methods on $CACHE: $METHODS; seeds $SEEDS; $EPOCHS epochs; $THREADS threads; load $(cut -d' ' -f1-3 /proc/loadavg)"
for m in $METHODS; do
    for s in $SEEDS; do
        "$BIN/sherl-fit" -q run --cache "$CACHE" --backbone "$BACKBONE" --out "$OUT/runs" \
            --method "$m" --seed "$s" --epochs "$EPOCHS" --threads "$THREADS" "${extra[@]}" \
            | tail -1 >> "$OUT/summaries.jsonl"
        echo "  $m seed $s done (load $(cut -d' ' -f1 /proc/loadavg))"
    done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/summaries.jsonl") if l.strip()]
by = {}
for r in rows:
    by.setdefault(r["method"], []).append(r)
def ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)
mib = lambda b: b / 2**20
table = []
print("| method | test acc % | test macro-F1 % | trainable params | training memory MiB (step peak + state) | peak RSS MiB | s/epoch (fastest seed) | seeds |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for m, rs in by.items():
    acc, acc_sd = ms([r.get("test_accuracy") for r in rs])
    f1, f1_sd = ms([r.get("test_macro_f1") for r in rs])
    tm = [r["train_memory"]["total_bytes"] for r in rs if r.get("train_memory")]
    mem = max(tm) if tm else None
    rss = max(r["peak_rss_bytes"] for r in rs)
    # the least disturbed of the seeds' timings (a shared machine only
    # ever slows a run down), as the speed benchmarks take the best of runs
    spe = min(r["seconds_per_epoch"] for r in rs)
    pct = lambda x, sd: "n/a" if x is None else f"{100 * x:.2f} +- {100 * sd:.2f}"
    print(f"| {m} | {pct(acc, acc_sd)} | {pct(f1, f1_sd)} | {rs[0]['trainable_params']:,} | "
          f"{'n/a' if mem is None else f'{mib(mem):.1f}'} | {mib(rss):.0f} | {spe:.2f} | {len(rs)} |")
    if acc is not None and mem is not None:
        table.append((m, mib(mem), 100 * acc, 100 * acc_sd))
json.dump(table, open(f"{out}/points.json", "w"))
# Test accuracy against training memory (log x), one point per method, as SVG.
if table:
    import math
    W, H, L, R, T, B = 760, 480, 70, 30, 30, 60
    xs = [math.log10(max(p[1], 1e-3)) for p in table]
    ys = [p[2] for p in table]
    x0, x1 = math.floor(min(xs)), math.ceil(max(xs))
    if x0 == x1:
        x1 += 1
    y0 = math.floor(min(y - p[3] for y, p in zip(ys, table)) - 1)
    y1 = math.ceil(max(y + p[3] for y, p in zip(ys, table)) + 1)
    X = lambda v: L + (v - x0) / (x1 - x0) * (W - L - R)
    Y = lambda v: H - B - (v - y0) / (y1 - y0) * (H - T - B)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="13">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<line x1="{L}" y1="{H-B}" x2="{W-R}" y2="{H-B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H-B}" stroke="black"/>']
    for e in range(x0, x1 + 1):
        svg.append(f'<text x="{X(e):.1f}" y="{H-B+18}" text-anchor="middle">{10**e:g}</text>')
        svg.append(f'<line x1="{X(e):.1f}" y1="{H-B}" x2="{X(e):.1f}" y2="{H-B+5}" stroke="black"/>')
    step = max(1, round((y1 - y0) / 6))
    for v in range(y0, y1 + 1, step):
        svg.append(f'<text x="{L-8}" y="{Y(v)+4:.1f}" text-anchor="end">{v}</text>')
        svg.append(f'<line x1="{L}" y1="{Y(v):.1f}" x2="{W-R}" y2="{Y(v):.1f}" stroke="#ddd"/>')
    svg.append(f'<text x="{(L+W-R)/2}" y="{H-15}" text-anchor="middle">training memory (MiB, log scale): step peak + trainable state</text>')
    svg.append(f'<text x="18" y="{(T+H-B)/2}" text-anchor="middle" transform="rotate(-90 18 {(T+H-B)/2})">test accuracy % (mean +- sd over seeds)</text>')
    for (m, mem, acc, sd), x in zip(table, xs):
        cx, cy = X(x), Y(acc)
        svg.append(f'<line x1="{cx:.1f}" y1="{Y(acc-sd):.1f}" x2="{cx:.1f}" y2="{Y(acc+sd):.1f}" stroke="#555"/>')
        svg.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="#1f77b4"/>')
        svg.append(f'<text x="{cx+8:.1f}" y="{cy-6:.1f}">{m}</text>')
    svg.append('</svg>')
    open(f"{out}/accuracy-vs-memory.svg", "w").write("\n".join(svg) + "\n")
    print(f"\npicture: {out}/accuracy-vs-memory.svg")
PY
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
