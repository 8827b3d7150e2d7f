"""sherl's MPNet against Hugging Face transformers (a check, not a test).

Reads a sherl cache exported to .npy (`sherl-cache export`, an f32 cache of
every layer of all-mpnet-base-v2) and the texts it was made from (a CSV
with a `text` column; example id `NAME:LINE` is the CSV line, header = 1),
runs transformers' own MPNetModel and tokenizer on each text alone, and
compares: the token ids exactly, every hidden state within a tolerance.
This checks sherl's tokenisation, its ONNX export of MPNet (relative
position buckets, positions from pad_token_id + 1) and ONNX Runtime against
the reference implementation, layer by layer.

    python benches/mpnet_transformers.py BACKBONE_DIR EXPORT_DIR TEXTS.csv [MAX_LEN]

Prints one JSON line per layer (largest absolute and relative difference
over every real token of every text) and exits 1 if an id differs or a
difference exceeds the tolerance (absolute 1e-4 + 1e-4 x |reference|).
"""

import csv
import json
import sys

import numpy as np
import torch
from transformers import MPNetModel, MPNetTokenizerFast


def main():
    backbone, export, texts_csv = sys.argv[1:4]
    max_len = int(sys.argv[4]) if len(sys.argv) > 4 else 128
    meta = json.load(open(f"{export}/meta.json"))
    offsets = np.load(f"{export}/offsets.npy")
    ids = np.load(f"{export}/input_ids.npy")
    layers = meta["layers"]
    states = {l: np.load(f"{export}/hidden_states.{l}.npy") for l in layers}
    name = texts_csv.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    with open(texts_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    by_id = {f"{name}:{i + 2}": r["text"] for i, r in enumerate(rows)}

    tok = MPNetTokenizerFast(tokenizer_file=f"{backbone}/tokenizer.json")
    model = MPNetModel.from_pretrained(backbone, add_pooling_layer=False).eval()
    torch.set_num_threads(2)
    worst = {l: [0.0, 0.0] for l in layers}
    failed = False
    for e, ex_id in enumerate(meta["ids"]):
        text = by_id[ex_id]
        enc = tok(text, truncation=True, max_length=max_len, return_tensors="pt")
        a, b = int(offsets[e]), int(offsets[e + 1])
        got_ids = ids[a:b].tolist()
        want_ids = enc["input_ids"][0].tolist()
        if got_ids != want_ids:
            print(f"{ex_id}: token ids differ: sherl {got_ids[:12]}... transformers {want_ids[:12]}...")
            failed = True
            continue
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True)
        for l in layers:
            want = out.hidden_states[l][0].numpy()
            got = states[l][a:b].astype(np.float32)
            diff = np.abs(got - want)
            worst[l][0] = max(worst[l][0], float(diff.max()))
            worst[l][1] = max(worst[l][1], float((diff / (np.abs(want) + 1e-6)).max()))
            if np.any(diff > 1e-4 + 1e-4 * np.abs(want)):
                failed = True
    for l in layers:
        print(json.dumps({"layer": l, "max_abs_diff": worst[l][0], "max_rel_diff": worst[l][1]}))
    print(json.dumps({"texts": len(meta["ids"]), "tokens": int(offsets[-1]), "ok": not failed}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
