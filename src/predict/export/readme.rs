//! The `README.md` written next to an exported model.

use crate::backbone::Family;
use crate::fit::run_dir::RunConfig;

/// The README for run `rc` (method `method`, backbone `family`, texts
/// truncated at `max_len` tokens): what the files are and a runnable
/// Python example (onnxruntime, tokenizers, numpy).
pub(super) fn readme(rc: &RunConfig, method: &str, family: Family, max_len: usize) -> String {
    let (types_feed, types_note) = match family {
        Family::Bert => (
            "\n    feed[\"token_type_ids\"] = pad([e.type_ids for e in encs])",
            "`input_ids`, `attention_mask` and `token_type_ids`",
        ),
        Family::Mpnet => ("", "`input_ids` and `attention_mask`"),
    };
    format!(
        r#"# sherl run {run_id} ({method}), exported

`model.onnx` is the whole classifier: the backbone layers the run reads, the
trained modules and the head, exported by `sherl-fit export`. It takes
{types_note} (int64, `[batch, seq]`, padded on the right with
`attention_mask` 0) and returns `logits` and `probabilities`
(float32, `[batch, classes]`); `labels.json` names the classes in order.
`tokenizer.json` truncates at {max_len} tokens, as the run was trained, and
does not pad.

```python
import json

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

tok = Tokenizer.from_file("tokenizer.json")
labels = json.load(open("labels.json"))
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])


def pad(rows):
    width = max(len(r) for r in rows)
    return np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64)


def classify(texts):
    encs = tok.encode_batch(texts)
    feed = {{"input_ids": pad([e.ids for e in encs]),
            "attention_mask": pad([e.attention_mask for e in encs])}}{types_feed}
    probs = session.run(["probabilities"], feed)[0]
    return [(labels[p.argmax()], float(p.max())) for p in probs]


print(classify(["a first text", "and another one"]))
```

Sentence-pair runs: pass `tok.encode_batch(list(zip(first, second)))`.
"#,
        run_id = rc.run_id,
    )
}

/// The README for image run `rc` (method `method`): what the files are,
/// the input the model takes (`input` `[batch, channels, size, size]`),
/// and a runnable Python example (onnxruntime, numpy, and Pillow to decode
/// the images) applying `preprocess.json` as sherl does.
pub(super) fn image_readme(
    rc: &RunConfig,
    method: &str,
    input: &str,
    channels: u8,
    size: u32,
    patch_pool: u32,
) -> String {
    let pool_note = if patch_pool > 1 {
        format!(
            " The run's cache averaged the patch tokens {patch_pool}x{patch_pool} \
             (`--patch-pool {patch_pool}`); the model does the same inside."
        )
    } else {
        String::new()
    };
    format!(
        r#"# sherl run {run_id} ({method}), exported

`model.onnx` is the whole image classifier: the backbone's own graph (its
patch embedding and the frozen layers the run reads), the layers and
modules the run trained and the head, exported by `sherl-fit export`.{pool_note}
It takes `{input}`, the preprocessed images (float32,
`[batch, {channels}, {size}, {size}]`), and returns `logits` and
`probabilities` (float32, `[batch, classes]`); `labels.json` names the
classes in order.

{recipe_note}
```python
import json

import numpy as np
import onnxruntime as ort
from PIL import Image

recipe = json.load(open("preprocess.json"))
labels = json.load(open("labels.json"))
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])


{preprocess_py}

def classify(paths):
    batch = np.stack([preprocess(p) for p in paths])
    probs = session.run(["probabilities"], {{"{input}": batch}})[0]
    return [(labels[p.argmax()], float(p.max())) for p in probs]


print(classify(["first.png", "second.jpg"]))
```
"#,
        run_id = rc.run_id,
        recipe_note = recipe_note(size),
        preprocess_py = PREPROCESS_PY,
    )
}

/// What `preprocess.json` is and how the Python example applies it.
fn recipe_note(size: u32) -> String {
    format!(
        r#"`preprocess.json` is the recipe the run's cache was extracted with, which
`sherl-fit predict` applies again: bring the image to {size}x{size}
(`resize`: `longest-side-pad` scales the longest side to `size` and pads
the rest with `pad_value`, the image centred; `shorter-side-center-crop`
scales the shorter side to `size` and cuts the centre), resampled as
OpenCV's `INTER_AREA` (`area`) or `INTER_LINEAR` (`bilinear`) without
rounding to 8 bits, then `(v / 255 - mean[c]) / std[c]` per channel, in
CHW order. The example below does this with numpy; Pillow only decodes
the files. Images with transparency are composited on white first, as
sherl does by default.
"#
    )
}

/// The Python functions that apply `preprocess.json` (`preprocess(path)`:
/// one image as a float32 `[channels, size, size]` array), as sherl does.
const PREPROCESS_PY: &str = r#"def scaled(side, size, ref):
    return max(int(np.floor(side * size / ref + 0.5)), 1)


def weights(src, dst, interpolation, shrink):
    """[dst, src] resampling matrix along one axis."""
    w = np.zeros((dst, src))
    scale = src / dst

    def two(d, sx, fx):
        if sx < 0:
            sx, fx = 0, 0.0
        elif sx >= src - 1:
            sx, fx = src - 1, 0.0
        w[d, int(sx)] += 1.0 - fx
        if fx:
            w[d, int(sx) + 1] += fx

    for d in range(dst):
        if interpolation == "area" and shrink:  # average by covered area
            lo, hi = d * scale, (d + 1) * scale
            s = int(np.floor(lo))
            while s < hi and s < src:
                w[d, s] = max(min(hi, s + 1) - max(lo, s), 0.0) / scale
                s += 1
        elif interpolation == "area":  # OpenCV's INTER_AREA when enlarging
            sx = np.floor(d * scale)
            fx = (d + 1) - (sx + 1) * dst / src
            two(d, sx, 0.0 if fx <= 0 else fx - np.floor(fx))
        else:  # bilinear, pixel centres at +0.5
            f = (d + 0.5) * scale - 0.5
            two(d, np.floor(f), f - np.floor(f))
    return w.astype(np.float32)


def preprocess(path):
    img = Image.open(path)
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    px = np.asarray(img.convert("RGB"), dtype=np.float32)
    if recipe["channels"] == 1:
        planes = [px @ np.array([0.299, 0.587, 0.114], dtype=np.float32)]
    else:
        planes = [px[:, :, c] for c in range(3)]
    h, w = px.shape[:2]
    size = recipe["size"]
    if recipe["resize"] == "longest-side-pad":
        rw, rh = scaled(w, size, max(w, h)), scaled(h, size, max(w, h))
    else:
        rw = max(scaled(w, size, min(w, h)), size)
        rh = max(scaled(h, size, min(w, h)), size)
    shrink = rw <= w and rh <= h
    wx = weights(w, rw, recipe["interpolation"], shrink)
    wy = weights(h, rh, recipe["interpolation"], shrink)
    out = []
    for c, plane in enumerate(planes):
        mean, std = recipe["mean"][c], recipe["std"][c]
        r = (wy @ (plane @ wx.T) / 255 - mean) / std
        if recipe["resize"] == "longest-side-pad":
            full = np.full((size, size), (recipe["pad_value"] - mean) / std, np.float32)
            top, left = (size - rh) // 2, (size - rw) // 2
            full[top:top + rh, left:left + rw] = r
        else:
            top, left = (rh - size) // 2, (rw - size) // 2
            full = r[top:top + size, left:left + size]
        out.append(full)
    return np.stack(out).astype(np.float32)
"#;

/// The README of an exported retrieval run (`run_id`, methods
/// `image_method` and `text_method`, joint width `joint`): the two
/// encoders, their inputs (`bert`: the text model takes `token_type_ids`
/// too; texts truncated at `max_len`; images `input`
/// `[batch, channels, size, size]`) and a runnable Python example
/// (onnxruntime, tokenizers, numpy, Pillow to decode the images) that
/// embeds both and ranks by cosine similarity.
#[allow(clippy::too_many_arguments)]
pub(super) fn retrieval_readme(
    run_id: &str,
    image_method: &str,
    text_method: &str,
    joint: usize,
    bert: bool,
    max_len: usize,
    input: &str,
    (channels, size): (u8, u32),
) -> String {
    let (types_feed, types_note) = if bert {
        (
            "\n    feed[\"token_type_ids\"] = pad([e.type_ids for e in encs])",
            "`input_ids`, `attention_mask` and `token_type_ids`",
        )
    } else {
        ("", "`input_ids` and `attention_mask`")
    };
    format!(
        r#"# sherl retrieval run {run_id} ({image_method}+{text_method}), exported

Two encoders into one {joint}-dimensional joint space, exported by
`sherl-fit export`; each is the backbone layers its tower reads, the
modules it trained and its projection, with the output divided by its L2
norm, exactly as `sherl-fit search` embeds queries and galleries.

- `text.onnx` takes {types_note} (int64, `[batch, seq]`, padded on the
  right with `attention_mask` 0) and returns `embeddings` (float32,
  `[batch, {joint}]`). `tokenizer.json` truncates at {max_len} tokens, as
  the run's caption cache was extracted, and does not pad.
- `image.onnx` takes `{input}`, the preprocessed images (float32,
  `[batch, {channels}, {size}, {size}]`), and returns `embeddings`
  (float32, `[batch, {joint}]`).
- `retrieval.json`: the run, the methods, the joint width, each model's
  inputs and output.

Both outputs have unit length, so the cosine similarity of a caption and
an image is the dot product of their embeddings (the run's learned
temperature only scaled the training loss; it does not change rankings).

{recipe_note}
```python
import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer
import json

recipe = json.load(open("preprocess.json"))
tok = Tokenizer.from_file("tokenizer.json")
text_session = ort.InferenceSession("text.onnx", providers=["CPUExecutionProvider"])
image_session = ort.InferenceSession("image.onnx", providers=["CPUExecutionProvider"])


def pad(rows):
    width = max(len(r) for r in rows)
    return np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64)


def embed_texts(texts):
    encs = tok.encode_batch(texts)
    feed = {{"input_ids": pad([e.ids for e in encs]),
            "attention_mask": pad([e.attention_mask for e in encs])}}{types_feed}
    return text_session.run(["embeddings"], feed)[0]


{preprocess_py}

def embed_images(paths):
    batch = np.stack([preprocess(p) for p in paths])
    return image_session.run(["embeddings"], {{"{input}": batch}})[0]


images = ["first.png", "second.jpg"]
scores = embed_texts(["a red fruit"]) @ embed_images(images).T  # cosine similarities
for i in np.argsort(-scores[0]):
    print(images[i], float(scores[0, i]))
```
"#,
        recipe_note = recipe_note(size),
        preprocess_py = PREPROCESS_PY,
    )
}
