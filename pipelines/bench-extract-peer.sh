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
# The peer's Python packages (onnxruntime 1.32.0, tokenizers, numpy) go into
# a venv under target/bench/venv-ort, made here from PyPI on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-2}" REPEATS="${REPEATS:-3}" ROWS="${ROWS:-4000}"
ASSETS="$(pipelines/fetch-assets.sh ort minilm rotten-tomatoes)"
cargo build --release --quiet --bin sherl-extract
OUT=target/bench/extract-peer
VENV=target/bench/venv-ort
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet onnxruntime==1.32.0 tokenizers numpy
fi
rm -rf "$OUT"; mkdir -p "$OUT"
B="$OUT/minilm"
cp -r "$ASSETS/backbones/all-MiniLM-L6-v2" "$B"
target/release/sherl-extract -q export-onnx --backbone "$B" >/dev/null
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
wall() { local s e; s=$(date +%s%N); "$@" > "$OUT/last.json"; e=$(date +%s%N); echo $(( (e - s) / 1000000 )); }
for i in $(seq "$REPEATS"); do
    rm -rf "$OUT/cache" "$OUT/peer"
    ms=$(wall target/release/sherl-extract -q run --backbone "$B" --data "$OUT/reviews.csv" \
        --text-column review --label-column sentiment --split train=0.8,valid=0.1,test=0.1 \
        --layers all --threads "$THREADS" --out "$OUT/cache")
    echo "sherl $ms" >> "$OUT/times"; cp "$OUT/last.json" "$OUT/sherl-$i.json"
    ms=$(wall "$VENV/bin/python" benches/extract_ort.py --model "$B/model.onnx" --tokenizer "$B/tokenizer.json" \
        --data "$OUT/reviews.csv" --text-column review --threads "$THREADS" --out "$OUT/peer")
    echo "peer $ms" >> "$OUT/times"; cp "$OUT/last.json" "$OUT/peer-$i.json"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
t = {"sherl": [], "peer": []}
for line in open(f"{out}/times"):
    k, ms = line.split()
    t[k].append(int(ms) / 1000)
s = json.load(open(f"{out}/sherl-1.json"))
p = json.load(open(f"{out}/peer-1.json"))
print(f"{s['examples']} examples, {s['tokens']} real tokens, {len(s['layers'])} layers")
for k, name in (("sherl", f"sherl-extract (cache {s['bytes_on_disk'] / 1e6:.0f} MB)"),
                ("peer", f"ONNX Runtime {p['onnxruntime']} script (raw f16 {p['bytes_written'] / 1e6:.0f} MB)")):
    v = t[k]
    print(f"{name:<48} best {min(v):6.2f} s  median {statistics.median(v):6.2f} s  runs {v}")
print(f"ratio peer/sherl: best {min(t['peer']) / min(t['sherl']):.2f}, median {statistics.median(t['peer']) / statistics.median(t['sherl']):.2f}")
PY
