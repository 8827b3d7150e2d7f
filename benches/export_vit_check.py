"""Exported image models against `sherl-fit predict` (a pipeline check;
pipelines/check-export-vit.sh runs it).

For every `METHOD=DIR` export and its predictions (`--preds
METHOD=FILE`, predict's JSON Lines on the same images): runs the Python
example of the export's own README.md (its numpy preprocessing and its
onnxruntime session, in the export directory) on every image predict
scored, and prints the largest absolute difference of the probabilities.
Exits 1 above `--tolerance`. Needs onnxruntime, numpy and Pillow.
"""

import argparse
import json
import os
import re
import sys

import numpy as np


def readme_namespace(export_dir):
    text = open(os.path.join(export_dir, "README.md"), encoding="utf-8").read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code = "\n".join(l for l in code.splitlines() if not l.startswith("print("))
    here = os.getcwd()
    os.chdir(export_dir)
    try:
        ns = {}
        exec(compile(code, os.path.join(export_dir, "README.md"), "exec"), ns)
    finally:
        os.chdir(here)
    return ns


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", action="append", default=[], help="METHOD=DIR")
    ap.add_argument("--preds", action="append", default=[], help="METHOD=FILE")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    a = ap.parse_args()
    preds = dict(p.split("=", 1) for p in a.preds)
    worst = 0.0
    print("| method | images | max difference to predict | `model.onnx` bytes |")
    print("| --- | ---: | ---: | ---: |")
    for method, d in (e.split("=", 1) for e in a.export):
        ns = readme_namespace(d)
        rows = [json.loads(l) for l in open(preds[method]) if l.strip()]
        labels = ns["labels"]
        batch = np.stack([ns["preprocess"](os.path.abspath(r["image"])) for r in rows])
        name = ns["session"].get_inputs()[0].name
        got = ns["session"].run(["probabilities"], {name: batch})[0].astype(np.float64)
        want = np.array([[r["probabilities"][c] for c in labels] for r in rows])
        diff = float(np.abs(got - want).max())
        worst = max(worst, diff)
        size = os.path.getsize(os.path.join(d, "model.onnx"))
        print(f"| {method} | {len(rows)} | {diff:.1e} | {size:,} |")
    if worst > a.tolerance:
        sys.exit(f"parity above {a.tolerance}: {worst:.2e}")


if __name__ == "__main__":
    main()
