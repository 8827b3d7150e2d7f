#!/usr/bin/env python3
"""PyTorch peer of `sherl-extract run`, for throughput comparisons.

Runs a BERT-family backbone (config.json + model.safetensors, as sherl reads
it) with Hugging Face transformers over a CSV column, in length-sorted
batches under the same rules as sherl (at most --max-batch examples and
--max-tokens-per-batch padded tokens per batch, truncation to --max-len),
asks for every hidden state, and copies them to host memory as float16, the
work an extraction has to do before compressing. Prints one JSON line:
examples, real tokens, forward-loop seconds and real tokens per second, and
the whole process's seconds (imports and model load included).

Needs torch, transformers and tokenizers (the GPU check machine has them;
nothing in sherl's tests or CI runs this).

    python3 benches/extract_torch.py --backbone DIR --data reviews.csv \
        --text-column review --device cuda
"""
import argparse
import csv
import json
import time

START = time.perf_counter()

import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoModel  # noqa: E402


def batches(lengths, max_batch, max_tokens):
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out, cur, longest = [], [], 0
    for i in order:
        longer = max(longest, lengths[i])
        if cur and (len(cur) + 1 > max_batch or longer * (len(cur) + 1) > max_tokens):
            out.append(cur)
            cur, longer = [], lengths[i]
        cur.append(i)
        longest = longer
    if cur:
        out.append(cur)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--text-column", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--max-tokens-per-batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with open(a.data, newline="") as f:
        texts = [r[a.text_column] for r in csv.DictReader(f)]
    tok = Tokenizer.from_file(f"{a.backbone}/tokenizer.json")
    tok.no_padding()
    tok.enable_truncation(a.max_len)
    dev = torch.device(a.device)
    model = AutoModel.from_pretrained(a.backbone, torch_dtype=torch.float32).to(dev).eval()
    loaded = time.perf_counter()

    t0 = time.perf_counter()
    encs = tok.encode_batch(texts)
    lengths = [len(e.ids) for e in encs]
    plan = batches(lengths, a.max_batch, a.max_tokens_per_batch)
    kept = 0
    with torch.inference_mode():
        for b in plan:
            n = max(lengths[i] for i in b)
            ids = torch.zeros((len(b), n), dtype=torch.long)
            mask = torch.zeros((len(b), n), dtype=torch.long)
            types = torch.zeros((len(b), n), dtype=torch.long)
            for r, i in enumerate(b):
                e = encs[i]
                ids[r, : lengths[i]] = torch.tensor(e.ids)
                mask[r, : lengths[i]] = 1
                types[r, : lengths[i]] = torch.tensor(e.type_ids)
            out = model(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                token_type_ids=types.to(dev),
                output_hidden_states=True,
            )
            hs = torch.stack(out.hidden_states).half().cpu()
            kept += hs.numel()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    loop = time.perf_counter() - t0
    tokens = sum(lengths)
    print(
        json.dumps(
            {
                "peer": "pytorch",
                "torch": torch.__version__,
                "device": str(dev),
                "examples": len(texts),
                "tokens": tokens,
                "batches": len(plan),
                "loop_seconds": loop,
                "tokens_per_second": tokens / loop,
                "load_seconds": loaded - START,
                "process_seconds": time.perf_counter() - START,
                "f16_values_copied": kept,
            }
        )
    )


if __name__ == "__main__":
    main()
