"""Exported sherl models against `sherl-fit predict` and against the backbone
alone, with ONNX Runtime (a benchmark, not a test; pipelines/bench-export.sh
runs it).

For every export directory given (`METHOD=DIR`, each from `sherl-fit
export`) and its predictions (`--preds METHOD=FILE`, `sherl-fit predict`'s
JSON Lines on the same texts):

- parity: the largest absolute difference between the export's
  probabilities (ONNX Runtime, the texts in padded batches of 32, tokenized
  by the export's own tokenizer.json) and predict's;
- latency at batch 1: the median over the timed texts, one text per call;
- throughput at batch 32: texts per second over the timed batches (each
  padded to its longest text, as a user's batch would be);
- the file size of model.onnx.

The backbone alone is the backbone's own ONNX graph (`sherl-extract
export-onnx`), asked for its last hidden state only. Every session has the
same options (intra-op threads `--threads`, one inter-op thread, ONNX
Runtime's default graph optimisations); the models are timed in turn within
each round, the order rotating from round to round, and the table gives the
median over rounds of each model's per-round figure.

Needs onnxruntime, tokenizers and numpy only.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def pad(rows):
    width = max(len(r) for r in rows)
    return np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64)


class Model:
    def __init__(self, name, path, tokenizer, output, threads):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.name = name
        self.path = path
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.tok = tokenizer
        self.output = output
        self.lat = []
        self.thr = []

    def feed(self, texts):
        encs = self.tok.encode_batch(texts)
        feed = {
            "input_ids": pad([e.ids for e in encs]),
            "attention_mask": pad([e.attention_mask for e in encs]),
        }
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = pad([e.type_ids for e in encs])
        return feed

    def run(self, feed):
        return self.session.run([self.output], feed)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone-onnx", required=True)
    ap.add_argument("--backbone-output", required=True, help="e.g. hidden_states.6")
    ap.add_argument("--texts", required=True, help="one text per line")
    ap.add_argument("--export", action="append", default=[], help="METHOD=DIR")
    ap.add_argument("--preds", action="append", default=[], help="METHOD=FILE")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--single", type=int, default=64, help="texts timed at batch 1 per round")
    ap.add_argument("--batches", type=int, default=4, help="batches of 32 timed per round")
    ap.add_argument("--json", help="write the results here as well")
    a = ap.parse_args()

    texts = [t for t in open(a.texts, encoding="utf-8").read().split("\n") if t]
    exports = dict(e.split("=", 1) for e in a.export)
    preds = dict(p.split("=", 1) for p in a.preds)
    first = next(iter(exports.values()))
    tok = Tokenizer.from_file(os.path.join(first, "tokenizer.json"))

    models = [Model("backbone alone", a.backbone_onnx, tok, a.backbone_output, a.threads)]
    rows = {}
    for method, d in exports.items():
        m = Model(method, os.path.join(d, "model.onnx"), tok, "probabilities", a.threads)
        models.append(m)
        labels = json.load(open(os.path.join(d, "labels.json")))
        got = np.concatenate([m.run(m.feed(texts[i : i + 32])) for i in range(0, len(texts), 32)])
        diff = None
        if method in preds:
            want = [json.loads(l) for l in open(preds[method]) if l.strip()]
            if len(want) != len(texts):
                sys.exit(f"{preds[method]}: {len(want)} predictions for {len(texts)} texts")
            want = np.array([[w["probabilities"][c] for c in labels] for w in want], dtype=np.float64)
            diff = float(np.abs(got.astype(np.float64) - want).max())
        rows[method] = {"max_diff": diff, "bytes": os.path.getsize(m.path)}

    # tokenized once, outside the timing; each model gets the inputs it takes
    single = [models[0].feed([t]) for t in texts[: a.single]]
    batches = [models[0].feed(texts[i * 32 : (i + 1) * 32]) for i in range(a.batches)]

    def fit(m, feed):
        return {k: v for k, v in feed.items() if k in m.inputs}

    for m in models:  # warm up: first runs allocate
        m.run(fit(m, single[0]))
        m.run(fit(m, batches[0]))
    for r in range(a.rounds):
        order = models[r % len(models) :] + models[: r % len(models)]
        for m in order:
            ts = []
            for f in single:
                f = fit(m, f)
                t0 = time.perf_counter()
                m.run(f)
                ts.append(time.perf_counter() - t0)
            m.lat.append(statistics.median(ts))
            t0 = time.perf_counter()
            for f in batches:
                m.run(fit(m, f))
            m.thr.append(32 * len(batches) / (time.perf_counter() - t0))

    base_lat = statistics.median(models[0].lat)
    base_thr = statistics.median(models[0].thr)
    out = []
    print("| model | max difference to predict | batch-1 latency (ms) | vs backbone | batch-32 throughput (texts/s) | vs backbone | model.onnx bytes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m in models:
        lat, thr = statistics.median(m.lat), statistics.median(m.thr)
        row = rows.get(m.name, {"max_diff": None, "bytes": os.path.getsize(m.path)})
        d = "" if row["max_diff"] is None else f"{row['max_diff']:.1e}"
        print(
            f"| {m.name} | {d} | {lat * 1e3:.2f} | {lat / base_lat:.2f}x | {thr:.0f} | "
            f"{thr / base_thr:.2f}x | {row['bytes']:,} |"
        )
        out.append({"model": m.name, "latency_ms": lat * 1e3, "throughput": thr, **row})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
