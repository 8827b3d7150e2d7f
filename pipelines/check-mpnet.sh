#!/usr/bin/env bash
# The real all-mpnet-base-v2 through sherl (a check, not part of the test
# suite: it needs the 405 MB MPNet download, and PyTorch and transformers
# from PyPI for the reference):
#
#  1. `fetch-assets.sh all mpnet`, then the ignored test
#     mpnet::real_mpnet_in_candle_matches_onnx_runtime: candle's layer 12
#     and full fine-tuning at step 0 (embeddings and all 12 layers from
#     the token ids) against ONNX Runtime's hidden states, within 1e-4;
#  2. sherl's tokenisation and every hidden state of its ONNX export
#     (an f32 cache of six reviews, one cut at 128 tokens, exported to .npy)
#     against transformers' own MPNetModel and tokenizer
#     (benches/mpnet_transformers.py): ids exactly, states within
#     1e-4 + 1e-4 x |reference|.
#
#   pipelines/check-mpnet.sh
#
# The Python packages go into the PyTorch peer's venv (benches/torch-venv.sh,
# target/bench/venv) plus transformers, pinned.
set -euo pipefail
. "$(dirname "$0")/target-dir.sh"   # CARGO_TARGET_DIR, relative or absolute
cd "$(dirname "$0")/.."
ASSETS="$(pipelines/fetch-assets.sh all mpnet)"
DIR="$ASSETS/backbones/all-mpnet-base-v2"
cargo build --release --bins --quiet
BIN="$(sherl_release_dir)"
cargo test --release --test it -- --ignored mpnet::real_mpnet_in_candle_matches_onnx_runtime

PY="$(benches/torch-venv.sh)"
"$PY" -c 'import transformers' 2>/dev/null || "$PY" -m pip install --quiet "transformers==4.57.6"
OUT=target/bench/check-mpnet
rm -rf "$OUT"; mkdir -p "$OUT"
python3 - "$OUT/reviews.csv" <<'PY'
import csv, sys
texts = [
    "a gripping, beautifully shot film",
    "dull.",
    "the plot wanders, but the performances are worth the ticket price and then some",
    "neither funny nor moving, it just sits there for two hours",
    "an instant classic",
    "the harbour at dawn, the fishermen mending their nets, and two brothers who talk at last; " * 8,
]
with open(sys.argv[1], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["text", "label"])
    for i, t in enumerate(texts):
        w.writerow([t, i % 2])
PY
"$BIN"/sherl-extract -q run --backbone "$DIR" --data "$OUT/reviews.csv" \
    --layers all --dtype f32 --device cpu --out "$OUT/cache"
"$BIN"/sherl-cache -q export "$OUT/cache" --out "$OUT/npy"
"$PY" benches/mpnet_transformers.py "$DIR" "$OUT/npy" "$OUT/reviews.csv"
