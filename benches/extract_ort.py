#!/usr/bin/env python3
"""Plain ONNX Runtime peer of `sherl-extract run`, for speed comparisons.

Reads a CSV column, tokenizes with the backbone's tokenizer.json
(truncation to --max-len, no padding), sorts the examples by length, cuts
them into batches under the same rule as sherl (at most --max-batch examples
and --max-tokens-per-batch padded tokens), runs the ONNX model (every
`hidden_states.i` output) with --threads intra-op threads, and writes the
real tokens of each layer as one raw float16 array per layer (`.npy`, no
compression, no checksums): the least an extraction has to do. Prints one
JSON line: examples, real tokens, seconds in the batch loop, whole-process
seconds (imports and session creation included), bytes written.

Needs onnxruntime, tokenizers and numpy (pipelines/bench-extract-peer.sh
installs them into a venv; nothing in the tests or CI runs this).
"""
import argparse
import csv
import json
import os
import time

START = time.perf_counter()

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402


def batches(lengths, max_tokens, max_batch):
    out, start = [], 0
    while start < len(lengths):
        end, longest = start, 0
        while end < len(lengths) and end - start < max(max_batch, 1):
            l = max(longest, lengths[end])
            if end > start and l * (end - start + 1) > max_tokens:
                break
            longest = l
            end += 1
        out.append((start, end))
        start = end
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--text-column", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--max-tokens-per-batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    with open(a.data, newline="") as f:
        texts = [r[a.text_column] for r in csv.DictReader(f)]
    tok = Tokenizer.from_file(a.tokenizer)
    tok.no_padding()
    tok.enable_truncation(a.max_len)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    outputs = sorted(
        (o.name for o in sess.get_outputs() if o.name.startswith("hidden_states.")),
        key=lambda n: int(n.split(".")[1]),
    )
    inputs = {i.name for i in sess.get_inputs()}

    t0 = time.perf_counter()
    encs = tok.encode_batch(texts)
    order = sorted(range(len(encs)), key=lambda i: len(encs[i].ids))
    lengths = [len(encs[i].ids) for i in order]
    per_layer = [[] for _ in outputs]
    for s, e in batches(lengths, a.max_tokens_per_batch, a.max_batch):
        idx = order[s:e]
        n = max(lengths[s:e])
        ids = np.zeros((len(idx), n), dtype=np.int64)
        mask = np.zeros((len(idx), n), dtype=np.int64)
        types = np.zeros((len(idx), n), dtype=np.int64)
        for r, i in enumerate(idx):
            k = len(encs[i].ids)
            ids[r, :k] = encs[i].ids
            mask[r, :k] = 1
            types[r, :k] = encs[i].type_ids
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in inputs:
            feed["token_type_ids"] = types
        outs = sess.run(outputs, feed)
        real = mask.astype(bool)
        for j, h in enumerate(outs):
            per_layer[j].append(h[real].astype(np.float16))
    os.makedirs(a.out, exist_ok=True)
    written = 0
    for name, parts in zip(outputs, per_layer):
        arr = np.concatenate(parts)
        path = os.path.join(a.out, f"{name}.npy")
        np.save(path, arr)
        written += os.path.getsize(path)
    loop = time.perf_counter() - t0
    tokens = sum(lengths)
    print(json.dumps({
        "peer": "onnxruntime",
        "onnxruntime": ort.__version__,
        "examples": len(texts),
        "tokens": tokens,
        "layers": len(outputs),
        "loop_seconds": loop,
        "process_seconds": time.perf_counter() - START,
        "bytes_written": written,
    }))


if __name__ == "__main__":
    main()
