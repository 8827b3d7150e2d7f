"""Exported image models against `sherl-fit predict` (a pipeline check;
pipelines/check-export-vit.sh runs it).

For every `METHOD=DIR` export and its predictions (`--preds
METHOD=FILE`, predict's JSON Lines on the same images): runs the Python
example of the export's own README.md (its numpy preprocessing and its
onnxruntime session, in the export directory) on every image predict
scored, and prints the largest absolute difference of the probabilities.
Exits 1 above `--tolerance`. With `--backbone-onnx` (the backbone's graph
cut to its last hidden state) it then times every model as
benches/export_inference.py does for text: latency at batch 1 (median
over the scored images, one per call) and throughput at batch 32, same
threads, models in turn over `--rounds` rounds with the order rotating,
median over rounds. Needs onnxruntime, numpy and Pillow.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


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
    ap.add_argument("--backbone-onnx")
    ap.add_argument("--backbone-output")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    preds = dict(p.split("=", 1) for p in a.preds)
    worst = 0.0
    timed = []
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
        timed.append((method, os.path.join(d, "model.onnx"), "probabilities"))
    if worst > a.tolerance:
        sys.exit(f"parity above {a.tolerance}: {worst:.2e}")
    if a.backbone_onnx:
        timed.insert(0, ("backbone alone", a.backbone_onnx, a.backbone_output))
        time_models(timed, batch, a.threads, a.rounds)


def time_models(models, images, threads, rounds):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sessions = []
    for m, p, o in models:
        s = ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"])
        sessions.append((m, s, s.get_inputs()[0].name, o))
    batch = np.concatenate([images] * (32 // len(images) + 1))[:32]
    lat = {m: [] for m, *_ in sessions}
    thr = {m: [] for m, *_ in sessions}
    for _, s, i, o in sessions:  # warm up
        s.run([o], {i: images[:1]})
        s.run([o], {i: batch})
    for r in range(rounds):
        order = sessions[r % len(sessions):] + sessions[: r % len(sessions)]
        for m, s, i, o in order:
            ts = []
            for k in range(len(images)):
                x = images[k : k + 1]
                t0 = time.perf_counter()
                s.run([o], {i: x})
                ts.append(time.perf_counter() - t0)
            lat[m].append(statistics.median(ts))
            t0 = time.perf_counter()
            s.run([o], {i: batch})
            thr[m].append(32 / (time.perf_counter() - t0))
    base = sessions[0][0]
    bl, bt = statistics.median(lat[base]), statistics.median(thr[base])
    print()
    print("| model | batch-1 latency (ms) | vs backbone | batch-32 throughput (images/s) | vs backbone |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for m, *_ in sessions:
        l, t = statistics.median(lat[m]), statistics.median(thr[m])
        print(f"| {m} | {l * 1e3:.1f} | {l / bl:.2f}x | {t:.1f} | {t / bt:.2f}x |")


if __name__ == "__main__":
    main()
