"""A benchmark, not a test: reading every example of a cache through
sherl.Cache against `sherl-cache export` followed by numpy.load of the
exported arrays (the issue's goal: sherl.Cache at least as fast, per
example). Usage: read_speed.py CACHE (SHERL_BIN_DIR: the release binaries).
Prints seconds and microseconds per example for each way, best of 3.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import sherl


def via_cache(path):
    c = sherl.Cache(path)
    n = 0
    for ex in c:
        n += sum(int(v[-1, -1] != 0) for v in ex.hidden_states.values()) >= 0
    return n


def via_export(path):
    out = Path(tempfile.mkdtemp(prefix="sherl-read-")) / "export"
    try:
        subprocess.run([Path(os.environ["SHERL_BIN_DIR"]) / "sherl-cache", "export", path, "--out", out, "--quiet"],
                       stdout=subprocess.DEVNULL,
                       check=True)
        off = np.load(out / "offsets.npy")
        layers = [np.load(p) for p in sorted(out.glob("hidden_states.*.npy"))]
        ids, types = np.load(out / "input_ids.npy"), np.load(out / "token_type_ids.npy")
        n = 0
        for k in range(len(off) - 1):
            rows = slice(off[k], off[k + 1])
            ex = [l[rows] for l in layers], ids[rows], types[rows]
            n += sum(int(v[-1, -1] != 0) for v in ex[0]) >= 0
        return n
    finally:
        shutil.rmtree(out.parent)


def best(f, path):
    times = []
    for _ in range(3):
        t = time.perf_counter()
        n = f(path)
        times.append(time.perf_counter() - t)
    return min(times), n


if __name__ == "__main__":
    path = sys.argv[1]
    for name, f in [("sherl.Cache", via_cache), ("sherl-cache export + numpy.load", via_export)]:
        s, n = best(f, path)
        print(f"{name}: {s:.3f} s for {n} examples, {1e6 * s / n:.1f} us per example")
