#!/usr/bin/env python3
"""Plain ONNX Runtime peer of `sherl-extract run` on an image backbone, for
speed comparisons (the image twin of extract_ort.py).

Reads IDX images (plain or .gz), preprocesses them with the recipe of the
backbone's backbone.json the way sherl does (src/data/image/preprocess.rs:
gray expanded to 3 channels, the longest side resized to `size` with the
same per-axis area/bilinear weights, centred zero padding, (v/255 - mean) /
std, CHW), cuts them into batches under sherl's rule (at most --max-batch
images and --max-tokens-per-batch tokens, every image `tokens` tokens), runs
the ONNX model whose hidden_states.i outputs were exposed (by
`sherl-extract expose-layers`) with --threads intra-op threads, and appends
each layer's batch to one raw float16 file per layer (no compression, no
checksums): the least an extraction has to do. Prints one JSON line:
examples, tokens, seconds in the batch loop, whole-process seconds (imports
and session creation included), bytes written.

Needs onnxruntime and numpy (pipelines/bench-extract-peer.sh vit installs
them into a venv; nothing in the tests or CI runs this).
"""
import argparse
import gzip
import json
import math
import os
import struct
import time

START = time.perf_counter()

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402


def read_idx_images(path):
    raw = (gzip.open if path.endswith(".gz") else open)(path, "rb").read()
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    if magic != 0x00000803:
        raise SystemExit(f"{path}: not an IDX image file (magic {magic:#x})")
    return np.frombuffer(raw, dtype=np.uint8, count=n * rows * cols, offset=16).reshape(n, rows, cols)


def axis_weights(src, dst, interpolation, shrink):
    """The [dst, src] matrix of sherl's per-axis taps (preprocess.rs)."""
    w = np.zeros((dst, src), dtype=np.float32)
    scale = src / dst

    def two(d, sx, fx):
        if sx < 0:
            sx, fx = 0, 0.0
        elif int(sx) >= src - 1:
            sx, fx = src - 1, 0.0
        else:
            sx = int(sx)
        if fx == 0.0:
            w[d, sx] += 1.0
        else:
            w[d, sx] += np.float32(1.0 - fx)
            w[d, sx + 1] += np.float32(fx)

    for d in range(dst):
        if interpolation == "area" and shrink:
            lo, hi = d * scale, (d + 1) * scale
            s = math.floor(lo)
            while s < hi and s < src:
                cover = max(min(hi, s + 1.0) - max(lo, float(s)), 0.0)
                if cover > 0.0:
                    w[d, s] = np.float32(cover / scale)
                s += 1
        elif interpolation == "area":
            inv = dst / src
            sx = math.floor(d * scale)
            fx = (d + 1.0) - (sx + 1.0) * inv
            fx = 0.0 if fx <= 0.0 else fx - math.floor(fx)
            two(d, sx, fx)
        else:
            f = (d + 0.5) * scale - 0.5
            sx = math.floor(f)
            two(d, sx, f - sx)
    return w


def preprocess(images, recipe):
    """[n, rows, cols] uint8 gray -> [n, 3, size, size] float32 (longest-side-pad)."""
    if recipe["resize"] != "longest-side-pad" or recipe["channels"] != 3:
        raise SystemExit("this peer implements the longest-side-pad, 3-channel recipe only")
    n, h, w = images.shape
    size = recipe["size"]
    longest = max(w, h)
    rw = max(round(w * size / longest), 1)
    rh = max(round(h * size / longest), 1)
    shrink = rw <= w and rh <= h
    wx = axis_weights(w, rw, recipe["interpolation"], shrink)
    wy = axis_weights(h, rh, recipe["interpolation"], shrink)
    resized = wy @ images.astype(np.float32) @ wx.T  # [n, rh, rw], 0..255
    mean = np.asarray(recipe["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(recipe["std"], dtype=np.float32).reshape(1, 3, 1, 1)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    out[:] = (np.float32(recipe["pad_value"]) - mean) / std
    left, top = (size - rw) // 2, (size - rh) // 2
    out[:, :, top:top + rh, left:left + rw] = (resized[:, None] / np.float32(255.0) - mean) / std
    return out


def batches(n, tokens, max_tokens, max_batch):
    """sherl's batch_ranges for n examples of `tokens` tokens each."""
    out, start = [], 0
    while start < n:
        end = start
        while end < n and end - start < max(max_batch, 1):
            if end > start and tokens * (end - start + 1) > max_tokens:
                break
            end += 1
        out.append((start, end))
        start = end
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="ONNX model with hidden_states.i outputs")
    p.add_argument("--backbone-json", required=True)
    p.add_argument("--images", required=True, help="IDX image file (plain or .gz)")
    p.add_argument("--out", required=True)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--max-tokens-per-batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    desc = json.load(open(a.backbone_json))
    images = read_idx_images(a.images)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    outputs = sorted(
        (o.name for o in sess.get_outputs() if o.name.startswith("hidden_states.")),
        key=lambda n: int(n.split(".")[1]),
    )
    os.makedirs(a.out, exist_ok=True)
    files = [open(os.path.join(a.out, f"{name}.f16"), "wb") for name in outputs]

    t0 = time.perf_counter()
    tokens = desc["tokens"]
    for s, e in batches(len(images), tokens, a.max_tokens_per_batch, a.max_batch):
        x = preprocess(images[s:e], desc["preprocess"])
        outs = sess.run(outputs, {desc["input"]: x})
        for f, o in zip(files, outs):
            f.write(o.astype(np.float16).tobytes())
    written = sum(f.tell() for f in files)
    for f in files:
        f.close()
    t1 = time.perf_counter()
    print(json.dumps({
        "examples": len(images),
        "tokens": len(images) * tokens,
        "layers": len(outputs),
        "loop_seconds": round(t1 - t0, 3),
        "process_seconds": round(t1 - START, 3),
        "bytes_written": written,
        "onnxruntime": ort.__version__,
    }))


if __name__ == "__main__":
    main()
