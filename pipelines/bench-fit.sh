#!/usr/bin/env bash
# Training benchmark (not a test): one epoch of SHERL on the Rotten Tomatoes
# cache, training tokens/s, the FLOPs of a training step counted from the
# model's shapes, the achieved GFLOP/s, and candle's own f32 matmul rate on
# this machine for comparison (benches/fit.rs), for 1 and 2 threads.
#
#   pipelines/bench-fit.sh [CACHE]     (default: the demo cache; built if missing)
#
# FLOPs per real token of a SHERL training step (MiniLM: D=384, d=96,
# FFN 1536, M=6 early layers, K=1 late layer, S = batch's padded length):
#   early projections  fwd 2*M*D*d, bwd (weights only: the inputs are cached) same
#   late BERT layer    fwd 2*(4*D^2 + 2*D*FFN) + 4*S*D, bwd (inputs only: weights frozen) same
#   restore            fwd 2*d*D, bwd 2x
# Padding tokens also cost work; the count uses real tokens, so the
# achieved rate is a lower bound on what the hardware did.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS="$(pipelines/fetch-assets.sh)"
cargo build --release --bins --quiet
cargo bench --bench fit --no-run --quiet 2>/dev/null || cargo bench --bench fit --no-run
BENCH_BIN=$(ls -t target/release/deps/fit-* | grep -v '\.d$' | head -1)
BIN=target/release
BACKBONE="$ASSETS/backbones/all-MiniLM-L6-v2"
CACHE="${1:-target/demo/rt-cache}"
if [ ! -f "$CACHE/manifest.json" ]; then
    [ -f "$BACKBONE/model.onnx" ] || "$BIN/sherl-extract" -q export-onnx --backbone "$BACKBONE" >/dev/null
    "$BIN/sherl-extract" -q run --backbone "$BACKBONE" --out "$CACHE" \
        --data "$ASSETS/data/rotten_tomatoes_corpus_full.csv.bz2" \
        --label-column category --labels fresh,rotten \
        --split train=0.8,valid=0.1,test=0.1 --group-column movie_name --layers all >/dev/null
fi
OUT=target/bench/fit
rm -rf "$OUT"; mkdir -p "$OUT"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
N="${BENCH_TRAIN_EXAMPLES:-3000}"
for t in 1 2; do
    RAYON_NUM_THREADS=$t "$BENCH_BIN" --bench > "$OUT/matmul-$t.json"
    "$BIN/sherl-fit" -q run --cache "$CACHE" --backbone "$BACKBONE" --out "$OUT/runs-$t" \
        --epochs 1 --threads "$t" --train-examples "$N" > "$OUT/sherl-$t.json"
done
# Peak memory against the number of training examples (1 thread).
for n in 1000 8000; do
    "$BIN/sherl-fit" -q run --cache "$CACHE" --backbone "$BACKBONE" --out "$OUT/runs-mem" \
        --epochs 1 --train-examples "$n" > "$OUT/mem-$n.json"
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
D, d, F, M = 384, 96, 1536, 6
S = 32  # typical padded length of a length-bucketed batch here
early = 2 * M * D * d
late = 2 * (4 * D * D + 2 * D * F) + 4 * S * D
restore = 2 * d * D
flop_per_token = 2 * early + 2 * late + 3 * restore
print(f"FLOPs per real token of a training step: {flop_per_token/1e6:.2f} M")
print(f"{'threads':>7} {'tokens/s':>10} {'step GFLOP/s':>13} {'candle matmul GFLOP/s':>22} {'ratio':>6}")
for t in (1, 2):
    m = json.load(open(f"{out}/matmul-{t}.json"))
    s = json.load(open(f"{out}/sherl-{t}.json"))
    tps = s["train_tokens_per_second"]
    g = tps * flop_per_token / 1e9
    print(f"{t:>7} {tps:>10.0f} {g:>13.2f} {m['gflops']:>22.1f} {g/m['gflops']:>6.3f}")
for n in (1000, 8000):
    s = json.load(open(f"{out}/mem-{n}.json"))
    print(f"peak RSS training on ~{n} examples: {s['peak_rss_bytes']/2**20:.0f} MiB")
PY
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
