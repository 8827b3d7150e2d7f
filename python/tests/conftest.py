"""Fixtures: small caches made with the repository's own CLI
(`sherl-extract run` on the MiniLM backbone of pipelines/fetch-assets.sh),
in the release binaries' folder SHERL_BIN_DIR (pipelines/python.sh sets it).
"""

import os
import random
import subprocess
from pathlib import Path

import pytest


def bin_path(name: str) -> str:
    d = os.environ.get("SHERL_BIN_DIR")
    if not d:
        pytest.fail("SHERL_BIN_DIR is not set: run the tests through pipelines/python.sh")
    p = Path(d) / name
    if not p.exists():
        pytest.fail(f"{p} does not exist: `cargo build --release --bins` first (pipelines/python.sh does)")
    return str(p)


def run(name: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([bin_path(name), *map(str, args)], capture_output=True, text=True)
    if check and r.returncode != 0:
        pytest.fail(f"{name} {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stderr}")
    return r


def minilm() -> Path:
    root = os.environ.get("SHERL_ASSETS") or str(Path.home() / ".cache" / "sherl")
    p = Path(root) / "backbones" / "all-MiniLM-L6-v2"
    if not (p / "model.onnx").exists():
        pytest.fail(f"missing asset {p} (run pipelines/fetch-assets.sh; pipelines/test.sh does)")
    return p


WORDS = "the a movie film plot actor scene good bad great awful long short story ending music".split()


def write_dataset(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    lines = ["text,label"]
    for _ in range(rows):
        n = rng.randint(1, 12)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(n)) + "," + rng.choice(["neg", "neu", "pos"]))
    path.write_text("\n".join(lines) + "\n")


def extract(root: Path, name: str, dtype: str) -> Path:
    data = root / "data.csv"
    if not data.exists():
        write_dataset(data, 60, 7)
    out = root / name
    run(
        "sherl-extract", "run", "--backbone", minilm(), "--data", data,
        "--split", "train=0.6,valid=0.2,test=0.2", "--max-len", "16", "--chunk-size", "8",
        "--dtype", dtype, "--layers", "all", "--device", "cpu", "--threads", "1", "--quiet", "--out", out,
    )
    return out


@pytest.fixture(scope="session")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sherl")


@pytest.fixture(scope="session")
def f16_cache(root) -> Path:
    return extract(root, "cache-f16", "f16")


@pytest.fixture(scope="session")
def int8_cache(root) -> Path:
    return extract(root, "cache-int8", "int8")
