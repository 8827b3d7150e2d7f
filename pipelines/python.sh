#!/usr/bin/env bash
# The Python package (python/: PyO3 bindings, maturin): makes a virtual
# environment in the target directory (python-venv/, ignored by git), installs
# maturin, numpy and pytest there from PyPI, builds the wheel in the same
# target directory and release profile as `cargo build --release` (the
# library and its dependencies are not compiled a second time), installs it
# and runs python/tests with pytest against the release binaries, which the
# tests use to make their fixtures. pipelines/test.sh runs it last.
#
#   pipelines/python.sh            build, install, test
#   pipelines/python.sh --no-test  build and install only
#
# Needs CPython 3.11 or later as python3 (PYTHON=... to pick another) and
# the MiniLM backbone of pipelines/fetch-assets.sh for the tests.
. "$(dirname "$0")/target-dir.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "pipelines/python.sh: needs CPython 3.11 or later ($PY is $("$PY" --version 2>&1))" >&2
    exit 1
}
BIN="$(sherl_release_dir)"
TARGET="$(dirname "$BIN")"
VENV="$TARGET/python-venv"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    'maturin>=1.7,<2' 'numpy>=1.24' 'pytest>=7'
cargo build --release --bins
# The environment maturin gives pyo3's build script (maturin 1.x), so that
# the lint and the wheel do not rebuild each other's pyo3 on every run.
PYO3_PYTHON="$VENV/bin/python" PYO3_BUILD_EXTENSION_MODULE=1 \
    PYO3_ENVIRONMENT_SIGNATURE="$("$VENV/bin/python" -c \
        'import sys; print(f"{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}-64bit")')" \
    cargo clippy --release -p sherl-python -- -D warnings
WHEELS="$TARGET/wheels"
rm -f "$WHEELS"/sherl-*.whl
# --compatibility linux: a wheel for this machine (no manylinux audit; it
# is installed here, not published).
"$VENV/bin/maturin" build --release --quiet --compatibility linux \
    --manifest-path python/Cargo.toml --out "$WHEELS" \
    --interpreter "$VENV/bin/python"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    --no-deps --force-reinstall "$WHEELS"/sherl-*.whl
if [ "${1:-}" != "--no-test" ]; then
    # Nothing written into the source tree (no .pytest_cache, no __pycache__).
    SHERL_BIN_DIR="$BIN" PYTHONDONTWRITEBYTECODE=1 \
        "$VENV/bin/python" -m pytest -q -p no:cacheprovider python/tests
fi
