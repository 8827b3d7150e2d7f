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
#
# Then, side by side with the PyTorch peer (benches/fit_torch.py, in a venv
# that benches/torch-venv.sh makes from PyPI once): 4,000 Rotten Tomatoes
# reviews split 80/10/10 and extracted with --layers all (as
# pipelines/gpu-check.sh does), exported once with `sherl-cache export`; then
# for each method sherl-fit and the peer train on the same examples with the
# same settings (defaults of `sherl-fit run`, --epochs EPOCHS, THREADS
# threads), alternating sherl, torch, sherl, torch, ... REPEATS times, and
# the best and median seconds per epoch of each are printed with their
# ratio (torch / sherl: >= 1 means sherl is at least as fast), the
# accuracies, the whole processes' seconds (sherl-fit from its start, the
# peer from the interpreter's start and by its own clock after importing
# torch), and the load average before and after. Last, the peer
# evaluates each method's sherl-fit weights (the same function check: the
# same valid loss and accuracy up to float rounding).
#
#   pipelines/bench-fit.sh --side-by-side      # only the side-by-side part
#   REPEATS=3 EPOCHS=5 THREADS=2 METHODS="sherl late-layer unipt" ROWS=4000 (defaults)
#   TORCH_ATTENTION=sdpa                       # the peer with F.scaled_dot_product_attention
#
# full-ft is left out of the default METHODS (the peer supports it; one run
# of it costs several times a SHERL run on 2 cores).
set -euo pipefail
. "$(dirname "$0")/target-dir.sh"   # CARGO_TARGET_DIR, relative or absolute
cd "$(dirname "$0")/.."
SIDE_ONLY=0
if [ "${1:-}" = "--side-by-side" ]; then SIDE_ONLY=1; shift; fi
ASSETS="$(pipelines/fetch-assets.sh)"
cargo build --release --bins --quiet
BIN="$(sherl_release_dir)"
BACKBONE="$ASSETS/backbones/all-MiniLM-L6-v2"
if [ "$SIDE_ONLY" = 0 ]; then
cargo bench --bench fit --no-run --quiet 2>/dev/null || cargo bench --bench fit --no-run
BENCH_BIN=$(ls -t "$BIN"/deps/fit-* | grep -v '\.d$' | head -1)
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
fi

# --- side by side with the PyTorch peer ---------------------------------------
REPEATS="${REPEATS:-3}" EPOCHS="${EPOCHS:-5}" THREADS="${THREADS:-2}" ROWS="${ROWS:-4000}"
METHODS="${METHODS:-sherl late-layer unipt}"
PY="$(benches/torch-venv.sh)"
S=target/bench/side
mkdir -p "$S"
if [ ! -f "$S/minilm/model.onnx" ]; then
    rm -rf "$S/minilm"
    cp -r "$BACKBONE" "$S/minilm"
    "$BIN/sherl-extract" -q export-onnx --backbone "$S/minilm" >/dev/null
fi
if [ ! -f "$S/cache-$ROWS/manifest.json" ]; then
    python3 benches/rt_reviews.py "$ASSETS/data/rotten_tomatoes_corpus_full.csv.bz2" "$S/reviews-$ROWS.csv" "$ROWS"
    "$BIN/sherl-extract" -q run --backbone "$S/minilm" --data "$S/reviews-$ROWS.csv" \
        --text-column review --label-column sentiment --split train=0.8,valid=0.1,test=0.1 \
        --max-len 128 --layers all --threads "$THREADS" --out "$S/cache-$ROWS" >/dev/null
fi
[ -f "$S/export-$ROWS/meta.json" ] || "$BIN/sherl-cache" -q export "$S/cache-$ROWS" --out "$S/export-$ROWS" >/dev/null
R="$S/results"
rm -rf "$R" "$S/runs"; mkdir -p "$R"
# Share of the CPUs busy over 5 s, whoever is using them (a neighbour in
# another container counts too, and load average alone does not say how busy).
cpu_busy() {
    python3 -c 'import time
def t():
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(v), v[3] + v[4]
a = t(); time.sleep(5); b = t()
print(f"{100 * (1 - (b[1] - a[1]) / max(b[0] - a[0], 1)):.0f} % CPU busy")'
}
echo "side by side: $ROWS reviews, methods $METHODS, $EPOCHS epochs, $THREADS threads, $REPEATS repeats"
echo "$(cut -d' ' -f1-3 /proc/loadavg), $(cpu_busy)" > "$R/load-before"
echo "load average before: $(cat "$R/load-before")"
for m in $METHODS; do
    for r in $(seq 1 "$REPEATS"); do
        t0=$(date +%s.%N)
        "$BIN/sherl-fit" -q run --cache "$S/cache-$ROWS" --backbone "$S/minilm" --out "$S/runs/$m-$r" \
            --method "$m" --epochs "$EPOCHS" --threads "$THREADS" > "$R/sherl-$m-$r.json"
        t1=$(date +%s.%N)
        "$PY" benches/fit_torch.py --export "$S/export-$ROWS" --backbone "$S/minilm" --method "$m" \
            --epochs "$EPOCHS" --threads "$THREADS" --attention "${TORCH_ATTENTION:-eager}" \
            > "$R/torch-$m-$r.json" 2> "$R/torch-$m-$r.log"
        t2=$(date +%s.%N)
        echo "$t0 $t1 $t2" > "$R/wall-$m-$r"
        echo "  $m, repeat $r: sherl $(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["seconds_per_epoch"], 2))' "$R/sherl-$m-$r.json") s/epoch, torch $(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["seconds_per_epoch"], 2))' "$R/torch-$m-$r.json") s/epoch (load $(cut -d' ' -f1 /proc/loadavg))"
    done
    # The same function: the peer evaluates sherl-fit's best weights.
    run_dir="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["run_dir"])' "$R/sherl-$m-$REPEATS.json")"
    "$PY" benches/fit_torch.py --export "$S/export-$ROWS" --backbone "$S/minilm" --method "$m" \
        --threads "$THREADS" --eval-weights "$run_dir/weights.safetensors" > "$R/check-$m.json"
    cp "$run_dir/metrics.jsonl" "$R/metrics-$m.jsonl"
done
echo "$(cut -d' ' -f1-3 /proc/loadavg), $(cpu_busy)" > "$R/load-after"
python3 - "$R" "$REPEATS" $METHODS <<'PY'
import json, statistics, sys
r, repeats, methods = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
j = lambda name: json.load(open(f"{r}/{name}.json"))
print(f"| method | sherl s/epoch best | median | torch s/epoch best | median | torch/sherl (best) | (median) | sherl tokens/s (best) | torch tokens/s (best) | valid acc sherl / torch | test acc sherl / torch |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
for m in methods:
    s = [j(f"sherl-{m}-{k}") for k in range(1, repeats + 1)]
    t = [j(f"torch-{m}-{k}") for k in range(1, repeats + 1)]
    ss, ts = [x["seconds_per_epoch"] for x in s], [x["seconds_per_epoch"] for x in t]
    acc = lambda xs, k: "/".join(f"{100 * x[k]:.2f}" for x in xs)
    print(f"| {m} | {min(ss):.2f} | {statistics.median(ss):.2f} | {min(ts):.2f} | {statistics.median(ts):.2f} | "
          f"{min(ts) / min(ss):.2f} | {statistics.median(ts) / statistics.median(ss):.2f} | "
          f"{max(x['train_tokens_per_second'] for x in s):.0f} | {max(x['train_tokens_per_second'] for x in t):.0f} | "
          f"{acc(s, 'valid_accuracy')} vs {acc(t, 'valid_accuracy')} | {acc(s, 'test_accuracy')} vs {acc(t, 'test_accuracy')} |")
print()
# Each run's epochs, and the ratio over the epochs after the first: sherl-fit's
# first epoch is the one that touches its memory for the first time (the peer
# touches its memory while loading its arrays, before its clock starts).
print("| method | run | sherl-fit s per epoch | PyTorch s per epoch | torch/sherl, epochs after the first |")
print("|---|---:|---|---|---:|")
for m in methods:
    for k in range(1, repeats + 1):
        run_dir = j(f"sherl-{m}-{k}")["run_dir"]
        se = [json.loads(l)["seconds"] for l in open(f"{run_dir}/metrics.jsonl") if l.strip()]
        te = j(f"torch-{m}-{k}")["epoch_seconds"]
        later = f"{sum(te[1:]) / sum(se[1:]):.2f}" if len(se) > 1 and len(te) > 1 else "-"
        print(f"| {m} | {k} | {', '.join(f'{x:.2f}' for x in se)} | {', '.join(f'{x:.2f}' for x in te)} | {later} |")
print()
# Whole processes, as a user waits for them: sherl-fit from its start (reading
# the cache, every epoch with its evaluation, the test split, writing the run);
# the peer from the interpreter's start (importing torch, loading the exported
# arrays, the same epochs and evaluations), and by its own clock, which starts
# after the imports.
print("| method | sherl-fit process s (best, median) | PyTorch process s, wall (best, median) | ratio (best, median) | PyTorch after its imports s (best, median) |")
print("|---|---:|---:|---:|---:|")
for m in methods:
    w = [[float(x) for x in open(f"{r}/wall-{m}-{k}").read().split()] for k in range(1, repeats + 1)]
    sw, tw = [b - a for a, b, _ in w], [c - b for _, b, c in w]
    to = [j(f"torch-{m}-{k}")["process_seconds"] for k in range(1, repeats + 1)]
    print(f"| {m} | {min(sw):.2f}, {statistics.median(sw):.2f} | {min(tw):.2f}, {statistics.median(tw):.2f} | "
          f"{min(tw) / min(sw):.2f}, {statistics.median(tw) / statistics.median(sw):.2f} | {min(to):.2f}, {statistics.median(to):.2f} |")
print()
print(f"PyTorch {t[0]['torch']} ({t[0]['attention']} attention), {t[0]['threads']} threads; accuracies per repeat.")
for m in methods:
    c = j(f"check-{m}")
    best = j(f"sherl-{m}-{repeats}")["best_epoch"]
    line = [json.loads(l) for l in open(f"{r}/metrics-{m}.jsonl") if l.strip()][best - 1]
    print(f"same function, {m}: sherl-fit's best weights give valid loss {line['valid_loss']:.7f} acc {100 * line['valid_accuracy']:.2f} in sherl-fit, "
          f"{c['valid_loss']:.7f} acc {100 * c['valid_accuracy']:.2f} in the peer")
print(f"load average before: {open(f'{r}/load-before').read().strip()}, after: {open(f'{r}/load-after').read().strip()}")
PY
