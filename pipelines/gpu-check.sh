#!/usr/bin/env bash
# The GPU route, checked end to end on a machine with an NVIDIA GPU:
#   1. extraction through ONNX Runtime's CUDA provider, compared value by
#      value with a CPU extraction of the same reviews (`sherl-cache
#      compare`: every value within 2 f16 steps + 1e-4);
#   2. SHERL trained with candle on the GPU from the CPU cache, compared
#      with the same run on the CPU (same seed, data and order): each
#      epoch's train loss within 2 % relative, final valid and test accuracy
#      within 1.5 points;
#   3. throughputs: extraction real tokens/s on GPU vs CPU (whole processes)
#      and vs PyTorch + transformers on the same GPU (benches/extract_torch.py,
#      if python3 has torch and transformers); training tokens/s GPU vs CPU.
# Prints a Markdown table and writes it with every log and JSON line to
# $OUT_DIR (default: target/gpu-check). Exit 0 when every check holds.
#
#   pipelines/gpu-check.sh [--bundle DIR] [--rows N] [--epochs E] [--out DIR]
#
# What it needs, on a GPU machine with Rust and the network:
#   pipelines/build-cuda.sh                 # sherl with candle CUDA
#   pipelines/fetch-assets.sh ort-gpu minilm rotten-tomatoes
#   pipelines/gpu-check.sh
# and the CUDA 13 libraries where pipelines/cuda-env.sh finds them (a CUDA
# toolkit, or PyTorch's pip packages). On a GPU machine without Rust or a
# network, `pipelines/gpu-bundle.sh` (run where both are) packs the
# binaries and those assets into parts under 60 MiB; copy the parts into one
# folder there and give it as --bundle: they are joined, unpacked and
# checked against their sha256 list before anything runs.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
BUNDLE="" ROWS=4000 EPOCHS=3 OUT_DIR="${OUT_DIR:-$REPO/target/gpu-check}"
# GPU_DEVICE=cpu runs every step of the script on the CPU (a dry run of the
# script itself on a machine without a GPU; the device checks then fail).
GPU="${GPU_DEVICE:-cuda}"
while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) BUNDLE="$2"; shift 2 ;;
        --rows) ROWS="$2"; shift 2 ;;
        --epochs) EPOCHS="$2"; shift 2 ;;
        --out) OUT_DIR="$2"; shift 2 ;;
        *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT_DIR"
W="$(mktemp -d "${TMPDIR:-/tmp}/sherl-gpu-check.XXXXXX")"
LOG="$OUT_DIR/gpu-check.log"
: > "$LOG"
say() { echo "gpu-check: $*" | tee -a "$LOG" >&2; }
FAILED=()
fail() { say "FAILED: $*"; FAILED+=("$*"); }

# --- inputs --------------------------------------------------------------
if [ -n "$BUNDLE" ]; then
    say "unpacking the bundle from $BUNDLE"
    mkdir -p "$W/bundle"
    parts=("$BUNDLE"/sherl-gpu.tar.xz.part-*)
    [ -e "${parts[0]}" ] || { say "no sherl-gpu.tar.xz.part-* in $BUNDLE"; exit 2; }
    if command -v xz >/dev/null; then
        cat "${parts[@]}" | xz -d | tar -x -i -C "$W/bundle" || { say "cannot unpack the bundle"; exit 2; }
    else
        cat "${parts[@]}" | python3 -c 'import lzma,sys,shutil; shutil.copyfileobj(lzma.LZMAFile(sys.stdin.buffer), sys.stdout.buffer)' \
            | tar -x -i -C "$W/bundle" || { say "cannot unpack the bundle"; exit 2; }
    fi
    (cd "$W/bundle" && sha256sum --quiet -c SHA256SUMS) || { say "bundle files do not match SHA256SUMS"; exit 2; }
    say "bundle ok: $(wc -l < "$W/bundle/SHA256SUMS") files match their sha256"
    export SHERL_ASSETS="$W/bundle/assets"
    BIN="$W/bundle/bin"
else
    BIN="${SHERL_BIN:-$REPO/target/cuda/release}"
fi
ASSETS="${SHERL_ASSETS:-$HOME/.cache/sherl}"
E="$BIN/sherl-extract" F="$BIN/sherl-fit" C="$BIN/sherl-cache"
for b in "$E" "$F" "$C"; do [ -x "$b" ] || { say "missing $b (pipelines/build-cuda.sh builds it)"; exit 2; }; done
eval "$("$REPO/pipelines/cuda-env.sh" 2>>"$LOG")"
say "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG" >&2 || true
THREADS="$(nproc)"
say "$THREADS CPU threads for the CPU runs; $ROWS reviews; $EPOCHS epochs"

B="$W/minilm"
cp -r "$ASSETS/backbones/all-MiniLM-L6-v2" "$B" || { say "MiniLM missing: pipelines/fetch-assets.sh minilm"; exit 2; }
RT="$ASSETS/data/rotten_tomatoes_corpus_full.csv.bz2"
python3 - "$RT" "$W/reviews.csv" "$ROWS" <<'PY' || { say "cannot make the review set from $RT"; exit 2; }
import bz2, csv, sys
rows = [r for r in csv.DictReader(bz2.open(sys.argv[1], "rt")) if r["category"] in ("fresh", "rotten")]
n = int(sys.argv[3])
if len(rows) < n:
    sys.exit(f"only {len(rows)} reviews")
with open(sys.argv[2], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["review", "sentiment"])
    for r in rows[:n]:
        w.writerow([r["text"], r["category"]])
PY

# run NAME CMD...: time a whole process; its stdout's last line (JSON) goes
# to $OUT_DIR/NAME.json, its stderr to $OUT_DIR/NAME.log.
run() {
    local name="$1"; shift
    local s e
    s=$(date +%s.%N)
    timeout 300 "$@" > "$OUT_DIR/$name.out" 2> "$OUT_DIR/$name.log"
    local rc=$?
    e=$(date +%s.%N)
    tail -n 1 "$OUT_DIR/$name.out" > "$OUT_DIR/$name.json"
    python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.2f}')" "$s" "$e" > "$OUT_DIR/$name.wall"
    say "$name: exit $rc, $(cat "$OUT_DIR/$name.wall") s ($*)"
    [ $rc = 0 ] || { tail -n 5 "$OUT_DIR/$name.log" | tee -a "$LOG" >&2; fail "$name exited $rc"; }
    return $rc
}

# --- 1. extraction: CPU, then CUDA ----------------------------------------
run export "$E" export-onnx --backbone "$B" || { say "no ONNX model: stopping"; exit 1; }
X=(run --backbone "$B" --data "$W/reviews.csv" --text-column review --label-column sentiment
   --split train=0.8,valid=0.1,test=0.1 --max-len 128 --layers all)
run extract-cpu "$E" "${X[@]}" --device cpu --threads "$THREADS" --out "$W/cache-cpu"
run extract-gpu "$E" "${X[@]}" --device "$GPU" --out "$W/cache-gpu"
if grep -q '"device":"cuda:0"' "$OUT_DIR/extract-gpu.json"; then :; else fail "extract-gpu did not run on cuda:0"; fi
run compare "$C" compare "$W/cache-cpu" "$W/cache-gpu"
if command -v python3 >/dev/null && python3 -c 'import torch, transformers' 2>/dev/null; then
    run torch-gpu python3 "$REPO/benches/extract_torch.py" --backbone "$B" --data "$W/reviews.csv" \
        --text-column review --device "$GPU" --max-len 128
else
    say "python3 has no torch/transformers: the PyTorch peer is left out"
fi

# --- 2. training: CPU, then CUDA, from the CPU cache ----------------------
T=(run --cache "$W/cache-cpu" --backbone "$B" --method sherl --epochs "$EPOCHS" --seed 0)
run fit-cpu "$F" "${T[@]}" --device cpu --threads "$THREADS" --out "$W/runs-cpu"
run fit-gpu "$F" "${T[@]}" --device "$GPU" --out "$W/runs-gpu"

# The other methods, one epoch each on the GPU (every op they use must run
# there), and predict with backbone and trained layers on the GPU.
for m in linear-probe late-layer unipt full-ft; do
    run "fit-gpu-$m" "$F" run --cache "$W/cache-cpu" --backbone "$B" --method "$m" --epochs 1 --seed 0 \
        --device "$GPU" --out "$W/runs-methods"
done
RUN_DIR="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["run_dir"])' "$OUT_DIR/fit-gpu.json" 2>/dev/null)"
if [ -n "$RUN_DIR" ]; then
    printf 'A warm, funny and beautifully acted film.\nTwo hours of my life I will never get back.\n' > "$W/new.txt"
    run predict-gpu "$F" predict --run "$RUN_DIR" --backbone "$B" --data "$W/reviews.csv" \
        --device "$GPU" --out "$W/preds.jsonl"
    grep -q 'trained layers on the CPU' "$OUT_DIR/predict-gpu.log" && fail "predict ran its trained layers on the CPU"
fi

# --- 3. the table ---------------------------------------------------------
python3 - "$OUT_DIR" "$W" <<'PY' | tee "$OUT_DIR/gpu-check.md"
import json, os, sys
out, w = sys.argv[1:3]
def j(name):
    try:
        return json.loads(open(f"{out}/{name}.json").read())
    except Exception:
        return None
def wall(name):
    try:
        return float(open(f"{out}/{name}.wall").read())
    except Exception:
        return None
bad = []
rows = []
ec, eg, cmp_, tg = j("extract-cpu"), j("extract-gpu"), j("compare"), j("torch-gpu")
if ec and eg:
    for label, name in (("sherl-extract, CPU", "extract-cpu"), ("sherl-extract, GPU", "extract-gpu")):
        r, t = j(name), wall(name)
        rows.append(f"| {label} ({r['device']}) | {r['tokens']} | {t:.2f} | {r['tokens'] / t:.0f} | {r['seconds']:.2f} s in the run loop |")
if tg:
    rows.append(f"| PyTorch {tg['torch']} + transformers, GPU | {tg['tokens']} | {tg['process_seconds']:.2f} | {tg['tokens'] / tg['process_seconds']:.0f} | forward loop alone: {tg['loop_seconds']:.2f} s, {tg['tokens_per_second']:.0f} tokens/s |")
print("| extraction | real tokens | process s | tokens/s (process) | note |")
print("|---|---:|---:|---:|---|")
print("\n".join(rows))
print()
if cmp_:
    print(f"cache GPU vs CPU: {cmp_['values']} values in {cmp_['examples']} examples, layers {cmp_['layers']}: "
          f"{100 * cmp_['equal'] / cmp_['values']:.2f} % equal, {100 * cmp_['within_one_step'] / cmp_['values']:.4f} % within one {cmp_['step_dtype']} step, "
          f"{cmp_['outside']} outside {cmp_['steps']} steps + {cmp_['atol']}; max |diff| {cmp_['max_abs_diff']:.3g}, mean {cmp_['mean_abs_diff']:.3g}")
    if cmp_["outside"]:
        bad.append("cache values differ beyond f16 rounding")
else:
    bad.append("no cache comparison")
print()
def metrics(runs):
    for root, _, files in os.walk(runs):
        if "metrics.jsonl" in files:
            return [json.loads(l) for l in open(os.path.join(root, "metrics.jsonl")) if l.strip()]
    return None
fc, fg = j("fit-cpu"), j("fit-gpu")
mc, mg = metrics(f"{w}/runs-cpu"), metrics(f"{w}/runs-gpu")
if fc and fg and mc and mg:
    print("| training (SHERL, MiniLM) | device | s/epoch | train tokens/s | valid acc | test acc |")
    print("|---|---|---:|---:|---:|---:|")
    for name, r in (("sherl-fit, CPU", fc), ("sherl-fit, GPU", fg)):
        print(f"| {name} | {r.get('device')} | {r['seconds_per_epoch']:.2f} | {r['train_tokens_per_second']:.0f} | {100 * r['valid_accuracy']:.2f} | {100 * (r['test_accuracy'] or 0):.2f} |")
    print()
    print("| epoch | train loss CPU | train loss GPU | rel. diff | valid acc CPU | valid acc GPU |")
    print("|---:|---:|---:|---:|---:|---:|")
    for a, b in zip(mc, mg):
        rel = abs(a["train_loss"] - b["train_loss"]) / max(abs(a["train_loss"]), 1e-12)
        print(f"| {a['epoch']} | {a['train_loss']:.6f} | {b['train_loss']:.6f} | {rel:.2e} | {100 * a['valid_accuracy']:.2f} | {100 * b['valid_accuracy']:.2f} |")
        if rel > 0.02:
            bad.append(f"epoch {a['epoch']} train loss differs by {rel:.2%}")
    if fg.get("device", "").split(":")[0] != "cuda":
        bad.append(f"sherl-fit GPU run trained on {fg.get('device')}")
    for k in ("valid_accuracy", "test_accuracy"):
        d = abs((fc[k] or 0) - (fg[k] or 0)) * 100
        if d > 1.5:
            bad.append(f"{k} differs by {d:.2f} points")
    print()
    print(f"training GPU/CPU speed: {fg['train_tokens_per_second'] / fc['train_tokens_per_second']:.2f}x")
else:
    bad.append("a training run is missing")
if ec and eg:
    print(f"extraction GPU/CPU speed (whole processes): {wall('extract-cpu') / wall('extract-gpu'):.2f}x")
if tg and eg:
    print(f"extraction sherl GPU vs PyTorch GPU (whole processes): {tg['process_seconds'] / wall('extract-gpu'):.2f}x")
extra = []
for m in ("linear-probe", "late-layer", "unipt", "full-ft"):
    r = j(f"fit-gpu-{m}")
    if r and "seconds_per_epoch" in r:
        extra.append(f"| {m} | {r.get('device')} | {r['seconds_per_epoch']:.2f} | {r['train_tokens_per_second']:.0f} | {100 * r['valid_accuracy']:.2f} |")
    else:
        bad.append(f"{m} did not train on the GPU")
if extra:
    print()
    print("| method, 1 epoch on the GPU | device | s/epoch | train tokens/s | valid acc |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(extra))
p = j("predict-gpu")
if p:
    print()
    print(f"predict on the GPU: {json.dumps(p)} ({wall('predict-gpu'):.2f} s whole process)")
print()
print("checks: " + ("all hold" if not bad else "; ".join(bad)))
open(f"{out}/checks.txt", "w").write("\n".join(bad))
PY
[ -s "$OUT_DIR/checks.txt" ] && fail "$(cat "$OUT_DIR/checks.txt")"
rm -rf "$W"
if [ ${#FAILED[@]} -gt 0 ]; then
    say "${#FAILED[@]} problem(s): ${FAILED[*]}"
    exit 1
fi
say "all checks hold; table in $OUT_DIR/gpu-check.md"
