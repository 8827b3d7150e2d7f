#!/usr/bin/env python3
"""PyTorch peer of `sherl-fit run`: the same model, formulas and training
recipe in plain PyTorch (torch.nn.functional), on the examples of a cache
exported with `sherl-cache export CACHE --out DIR`.

    benches/fit_torch.py --export DIR --backbone BACKBONE [--method sherl] [--threads 2] ...

What is the same as sherl-fit (docs/method.md sections 4, 6, 7; src/fit/):
  - the modules and their formulas: SHERL's early route (per-layer
    projectors Linear + LayerNorm(1e-5), redundancy from relu'd cosine
    similarities, guided weights relu(score)/r L1-normalised, g = sum
    alpha E + e, zero at padding), restore LayerNorm(1e-12) with dropout,
    the gate tanh(gamma / 0.1), the backbone's last K BERT layers (post-norm,
    additive -1e9 bias at padded keys, the config's activation and dropout,
    frozen unless trained), masked mean (or CLS) pooling, Linear head,
    mean cross-entropy; late-layer, unipt and full-ft as in docs/method.md 6;
  - initialisation: nn.Linear's uniform(+-1/sqrt(fan_in)) for weight and
    bias, LayerNorm 1 and 0, gamma 0; pre-trained layers from the backbone's
    model.safetensors;
  - two AdamW groups (betas 0.9/0.999, eps 1e-8, decoupled weight decay on
    every trained tensor), new modules at --lr, pre-trained weights at
    --lr-pretrained, one multiplier: linear warm-up over
    max(1, round(warmup * total)) steps then linear decay,
    total = ceil(n_train / batch) * epochs, step capped at total - 1;
  - global gradient-norm clipping (scale by clip / (norm + 1e-6) above clip);
  - batches: per epoch a random chunk order, a shuffle buffer of
    --shuffle-chunks chunks, examples drawn at random from it, sorted by
    length and cut into batches of at most --batch-size examples and
    --max-tokens-per-batch padded tokens, served in random order; evaluation
    in cache order in batches of max(batch, 64) examples, dropout off;
  - best epoch by valid accuracy (strictly higher), restored for the final
    valid and test evaluation.
What differs: the random numbers (torch's generator, not sherl's SplitMix64),
and the data path: the exported arrays are held in memory as float32, while
sherl-fit decodes cache chunks (zstd, f16) on background threads every epoch.

Per epoch it prints train loss, valid accuracy, seconds and real training
tokens/s to stderr; at the end one JSON line on stdout. With
`--eval-weights RUN/weights.safetensors` it trains nothing: it loads a
sherl-fit run's trained tensors and prints the valid/test loss and accuracy
they give here (the check that both compute the same function).
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

GATE_TEMPERATURE = 0.1
EPS = 1e-8


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", required=True, help="directory written by sherl-cache export")
    p.add_argument("--backbone", required=True, help="backbone directory (config.json, model.safetensors)")
    p.add_argument("--method", default="sherl", choices=["sherl", "late-layer", "unipt", "full-ft"])
    p.add_argument("--late-layers", type=int, default=1)
    p.add_argument("--late-trainable", action="store_true")
    p.add_argument("--reduction", type=int, default=4)
    p.add_argument("--side-dim", type=int, default=None)
    p.add_argument("--pool", default="mean", choices=["mean", "cls"])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-pretrained", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.06)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-tokens-per-batch", type=int, default=8192)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--shuffle-chunks", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--attention", default="eager", choices=["eager", "sdpa"],
                   help="eager: softmax(QK^T/sqrt(d) + bias) as sherl; sdpa: F.scaled_dot_product_attention")
    p.add_argument("--eval-weights", default=None,
                   help="evaluate a sherl-fit run's weights.safetensors instead of training")
    return p.parse_args()


# --- data -------------------------------------------------------------------

def load_npy(dir_, name):
    return np.load(os.path.join(dir_, name), mmap_mode="r")


class Data:
    """The exported examples in memory: each needed layer as one float32
    [tokens + 1, D] tensor whose last row is zeros (the padding row)."""

    def __init__(self, export_dir, layers, need_ids):
        with open(os.path.join(export_dir, "meta.json")) as f:
            self.meta = json.load(f)
        self.offsets = np.asarray(load_npy(export_dir, "offsets.npy"), dtype=np.int64)
        self.labels = np.asarray(load_npy(export_dir, "labels.npy"), dtype=np.int64)
        self.splits = np.asarray(load_npy(export_dir, "splits.npy"), dtype=np.int64)
        self.lengths = np.diff(self.offsets)
        self.tokens = int(self.offsets[-1])
        self.layers = []
        for i in layers:
            path = os.path.join(export_dir, f"hidden_states.{i}.npy")
            if not os.path.exists(path):
                sys.exit(f"fit_torch: {path} missing: export the cache with hidden_states.{i}")
            a = load_npy(export_dir, f"hidden_states.{i}.npy")
            t = torch.zeros(self.tokens + 1, a.shape[1], dtype=torch.float32)
            t[: self.tokens] = torch.from_numpy(np.asarray(a, dtype=np.float32))
            self.layers.append(t)
        self.ids = self.types = None
        if need_ids:
            pad = np.zeros(1, dtype=np.int64)
            self.ids = torch.from_numpy(np.concatenate([np.asarray(load_npy(export_dir, "input_ids.npy")), pad]))
            self.types = torch.from_numpy(np.concatenate([np.asarray(load_npy(export_dir, "token_type_ids.npy")), pad]))
        starts = list(self.meta["chunk_starts"]) + [len(self.labels)]
        self.chunks = [(starts[c], starts[c + 1]) for c in range(len(starts) - 1)]

    def split_id(self, names):
        for n in names:
            if n in self.meta["split_names"]:
                k = self.meta["split_names"].index(n)
                if (self.splits == k).any():
                    return k
        return None

    def split_examples(self, split):
        return np.nonzero(self.splits == split)[0]

    def split_chunks(self, split):
        return [c for c in self.chunks if (self.splits[c[0]:c[1]] == split).any()]

    def batch(self, examples):
        """Padded inputs of `examples` (cache positions): layers [B, S, D],
        mask [B, S], labels [B], ids/types [B, S] when loaded, real tokens."""
        ex = np.asarray(examples, dtype=np.int64)
        lens = self.lengths[ex]
        s = int(lens.max())
        ar = np.arange(s)
        real = ar[None, :] < lens[:, None]
        idx = np.where(real, self.offsets[ex][:, None] + ar[None, :], self.tokens)
        idx_t = torch.from_numpy(idx)
        out = {
            "layers": [l[idx_t] for l in self.layers],
            "mask": torch.from_numpy(real.astype(np.float32)),
            "labels": torch.from_numpy(self.labels[ex]),
            "tokens": int(lens.sum()),
        }
        if self.ids is not None:
            out["ids"] = self.ids[idx_t]
            out["types"] = self.types[idx_t]
        return out


def batch_ranges(lengths, max_tokens, max_batch):
    """src/batching.rs batch_ranges: greedy cut of length-ordered examples."""
    out, start, n = [], 0, len(lengths)
    while start < n:
        end, longest = start, 0
        while end < n and end - start < max(max_batch, 1):
            l = max(longest, lengths[end])
            if end > start and l * (end - start + 1) > max_tokens:
                break
            longest = l
            end += 1
        out.append((start, end))
        start = end
    return out


def train_batches(data, split, chunks, args, rng):
    """One epoch of training batches, the rule of src/fit/batcher.rs with
    numpy's generator: random chunk order, shuffle buffer, length-sorted
    batches served in random order."""
    chunks = list(chunks)
    rng.shuffle(chunks)
    chunk_size = int(data.meta["chunk_size"])
    target = max(args.shuffle_chunks, 1) * chunk_size
    stream = iter(chunks)
    buffer, done = [], False
    while True:
        while not done and len(buffer) < target + chunk_size:
            c = next(stream, None)
            if c is None:
                done = True
            else:
                buffer.extend(k for k in range(c[0], c[1]) if data.splits[k] == split)
        if not buffer:
            return
        n = min(len(buffer), target)
        pick = []
        for _ in range(n):
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            pick.append(buffer.pop())
        pick.sort(key=lambda k: data.lengths[k])
        lengths = [int(data.lengths[k]) for k in pick]
        batches = [pick[a:b] for a, b in batch_ranges(lengths, args.max_tokens_per_batch, args.batch_size)]
        rng.shuffle(batches)
        while batches:
            yield batches.pop()


def eval_batches(data, split, args):
    ex = data.split_examples(split)
    lengths = [int(data.lengths[k]) for k in ex]
    for a, b in batch_ranges(lengths, args.max_tokens_per_batch, max(args.batch_size, 64)):
        yield ex[a:b]


# --- the model ----------------------------------------------------------------

class Params:
    """Named tensors: fresh ones (group new), pre-trained ones (trained in
    group pretrained, or frozen)."""

    def __init__(self, ckpt, prefix, gen):
        self.t, self.group = {}, {}
        self.ckpt, self.prefix, self.gen = ckpt, prefix, gen

    def fresh_linear(self, name, d_in, d_out):
        bound = 1.0 / math.sqrt(d_in)
        for suffix, shape in (("weight", (d_out, d_in)), ("bias", (d_out,))):
            self.add(f"{name}.{suffix}", (torch.rand(shape, generator=self.gen) * 2 - 1) * bound, "new")

    def fresh_layer_norm(self, name, d):
        self.add(f"{name}.weight", torch.ones(d), "new")
        self.add(f"{name}.bias", torch.zeros(d), "new")

    def pretrained(self, name, group):
        key = self.prefix + name
        if key not in self.ckpt:
            sys.exit(f"fit_torch: {key} not in model.safetensors")
        self.add(name, self.ckpt[key].to(torch.float32).clone(), group)

    def pretrained_layer(self, i, group):
        for n in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                  "output.dense", "output.LayerNorm"):
            for s in ("weight", "bias"):
                self.pretrained(f"encoder.layer.{i}.{n}.{s}", group)

    def add(self, name, t, group):
        if group is not None:
            t.requires_grad_(True)
        self.t[name], self.group[name] = t, group

    def trained(self, group):
        return [t for n, t in self.t.items() if self.group[n] == group]

    def __getitem__(self, name):
        return self.t[name]


def linear(p, name, x):
    return F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"])


def layer_norm(p, name, x, eps):
    return F.layer_norm(x, (x.shape[-1],), p[f"{name}.weight"], p[f"{name}.bias"], eps)


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class Model:
    def __init__(self, args, cfg, ckpt, prefix, cached):
        self.args, self.cfg = args, cfg
        n, D = cfg["num_hidden_layers"], cfg["hidden_size"]
        k = args.late_layers
        self.n, self.D, self.k = n, D, k
        self.d = args.side_dim or D // args.reduction
        self.eps = cfg.get("layer_norm_eps", 1e-12)
        self.heads = cfg["num_attention_heads"]
        self.act = ACTIVATIONS[cfg.get("hidden_act", "gelu")]
        self.p_attn = cfg.get("attention_probs_dropout_prob", 0.1)
        self.p_hidden = cfg.get("hidden_dropout_prob", 0.1)
        gen = torch.Generator().manual_seed(args.seed)
        p = self.p = Params(ckpt, prefix, gen)
        m, classes = args.method, args.classes
        head_dim = D
        if m == "sherl":
            self.inputs = list(range(0, n - k + 1))
            for j in range(len(self.inputs)):
                p.fresh_linear(f"early.proj.{j}", D, self.d)
                p.fresh_layer_norm(f"early.proj_ln.{j}", self.d)
            p.fresh_linear("early.score", self.d, 1)
            p.fresh_linear("late.up", self.d, D)
            p.fresh_layer_norm("late.up_ln", D)
            p.add("late.gate", torch.zeros(1), "new")
            for i in range(n - k, n):
                p.pretrained_layer(i, "pretrained" if args.late_trainable else None)
        elif m == "late-layer":
            self.inputs = [n - k]
            for i in range(n - k, n):
                p.pretrained_layer(i, "pretrained")
        elif m == "unipt":
            self.inputs = list(range(0, n + 1))
            for j in range(n + 1):
                p.fresh_linear(f"unipt.proj.{j}", D, self.d)
                p.fresh_layer_norm(f"unipt.proj_ln.{j}", self.d)
            p.fresh_linear("unipt.confidence", self.d, 1)
            p.fresh_linear("unipt.out", self.d, self.d)
            p.fresh_layer_norm("unipt.out_ln", self.d)
            head_dim = self.d
        elif m == "full-ft":
            self.inputs = []
            for name in ("word_embeddings.weight", "position_embeddings.weight",
                         "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias"):
                p.pretrained(f"embeddings.{name}", "pretrained")
            for i in range(n):
                p.pretrained_layer(i, "pretrained")
        missing = [i for i in self.inputs if i not in cached]
        if missing:
            sys.exit(f"fit_torch: method {m} needs hidden_states {missing}, not in the export")
        p.fresh_linear("head", head_dim, classes)

    def bert_layer(self, i, x, bias, train):
        p, pre = self.p, f"encoder.layer.{i}"
        b, s, D = x.shape
        h = self.heads
        hd = D // h

        def heads(t):
            return t.view(b, s, h, hd).transpose(1, 2)

        q = heads(linear(p, f"{pre}.attention.self.query", x))
        k = heads(linear(p, f"{pre}.attention.self.key", x))
        v = heads(linear(p, f"{pre}.attention.self.value", x))
        if self.args.attention == "sdpa":
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.p_attn if train else 0.0)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + bias
            probs = F.dropout(scores.softmax(-1), self.p_attn, train)
            ctx = probs @ v
        ctx = ctx.transpose(1, 2).reshape(b, s, D)
        a = F.dropout(linear(p, f"{pre}.attention.output.dense", ctx), self.p_hidden, train)
        h1 = layer_norm(p, f"{pre}.attention.output.LayerNorm", a + x, self.eps)
        i_ = self.act(linear(p, f"{pre}.intermediate.dense", h1))
        o = F.dropout(linear(p, f"{pre}.output.dense", i_), self.p_hidden, train)
        return layer_norm(p, f"{pre}.output.LayerNorm", o + h1, self.eps)

    def consolidation(self, layers, mask):
        p = self.p
        m = len(layers)
        f = [layer_norm(p, f"early.proj_ln.{j}", linear(p, f"early.proj.{j}", x), 1e-5)
             for j, x in enumerate(layers)]
        b, s, d = f[0].shape
        e_set = torch.stack(f[:-1], 2).reshape(b * s, m - 1, d)
        guide = f[-1].reshape(b * s, 1, d)
        norm = (e_set.square().sum(-1, keepdim=True) + 1e-16).sqrt()
        unit = e_set / (norm + EPS)
        r = (unit @ unit.transpose(1, 2)).relu().sum(-1, keepdim=True).clamp_min(EPS)
        a = linear(p, "early.score", e_set * guide)
        u = a.relu() / r
        alpha = u / (u.abs().sum(1, keepdim=True) + EPS)
        g = (alpha * e_set).sum(1) + guide.squeeze(1)
        return g.reshape(b, s, d) * mask.unsqueeze(2)

    def unipt(self, layers, mask):
        p = self.p
        a = [layer_norm(p, f"unipt.proj_ln.{j}", linear(p, f"unipt.proj.{j}", x), 1e-5)
             for j, x in enumerate(layers)]
        anchor = a[-1]
        key_mask = mask.unsqueeze(1)
        anchor_mean = masked_mean(anchor, mask)
        ms, cs = [], []
        for aj in a[:-1]:
            sim = (anchor @ aj.transpose(1, 2)).relu() * key_mask
            w = sim / (sim.sum(2, keepdim=True) + 1e-8)
            ms.append(w @ aj + aj)
            cs.append(linear(p, "unipt.confidence", anchor_mean * masked_mean(aj, mask)))
        w = torch.cat(cs, 1).softmax(-1)
        agg = sum(mj * w[:, j, None, None] for j, mj in enumerate(ms))
        return anchor + layer_norm(p, "unipt.out_ln", linear(p, "unipt.out", agg), 1e-5)

    def forward(self, batch, train):
        mask = batch["mask"]
        b, s = mask.shape
        bias = ((1.0 - mask) * -1e9).view(b, 1, 1, s)
        m = self.args.method
        if m == "sherl":
            layers = batch["layers"]
            g = self.consolidation(layers, mask)
            z = layer_norm(self.p, "late.up_ln", linear(self.p, "late.up", g.relu()), 1e-12)
            z = F.dropout(z, self.args.dropout, train)
            h = z + torch.tanh(self.p["late.gate"] / GATE_TEMPERATURE) * layers[-1]
            for i in range(self.n - self.k, self.n):
                h = self.bert_layer(i, h, bias, train)
        elif m == "late-layer":
            h = batch["layers"][0]
            for i in range(self.n - self.k, self.n):
                h = self.bert_layer(i, h, bias, train)
        elif m == "unipt":
            h = self.unipt(batch["layers"], mask)
        else:
            p = self.p
            x = (p["embeddings.word_embeddings.weight"][batch["ids"]]
                 + p["embeddings.token_type_embeddings.weight"][batch["types"]]
                 + p["embeddings.position_embeddings.weight"][:s])
            h = F.dropout(layer_norm(p, "embeddings.LayerNorm", x, self.eps), self.p_hidden, train)
            for i in range(self.n):
                h = self.bert_layer(i, h, bias, train)
        pooled = masked_mean(h, mask) if self.args.pool == "mean" else h[:, 0]
        return linear(self.p, "head", pooled)


def masked_mean(x, mask):
    m = mask.unsqueeze(2)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


# --- training -----------------------------------------------------------------

def schedule(step, total, warmup):
    warm = max(1, int(round_half_away(warmup * total)))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, 1.0 - (step - warm) / max(1, total - warm))


def round_half_away(x):
    # Rust's f64::round rounds half away from zero (Python's round: to even).
    return math.floor(x + 0.5) if x >= 0 else -math.floor(-x + 0.5)


@torch.no_grad()
def evaluate(model, data, split, args):
    n = correct = 0
    loss_sum = 0.0
    for ex in eval_batches(data, split, args):
        b = data.batch(ex)
        logits = model.forward(b, False)
        loss_sum += F.cross_entropy(logits, b["labels"]).item() * len(ex)
        correct += (logits.argmax(1) == b["labels"]).sum().item()
        n += len(ex)
    return loss_sum / max(n, 1), correct / max(n, 1)


def main():
    args = parse_args()
    t_process = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with open(os.path.join(args.backbone, "config.json")) as f:
        cfg = json.load(f)
    ckpt = load_file(os.path.join(args.backbone, "model.safetensors"))
    probe = "encoder.layer.0.attention.self.query.weight"
    prefix = next((pre for pre in ("", "bert.") if pre + probe in ckpt), None)
    if prefix is None:
        sys.exit("fit_torch: model.safetensors has no encoder.layer.0 (with or without 'bert.')")
    with open(os.path.join(args.export, "meta.json")) as f:
        meta = json.load(f)
    args.classes = len(meta["labels"])
    model = Model(args, cfg, ckpt, prefix, meta["layers"])
    del ckpt
    data = Data(args.export, model.inputs, args.method == "full-ft")
    train = data.split_id(["train"])
    valid = data.split_id(["valid", "validation", "dev"])
    test = data.split_id(["test"])
    if train is None or valid is None:
        sys.exit(f"fit_torch: the export needs train and valid splits (has {meta['split_names']})")

    if args.eval_weights:
        w = load_file(args.eval_weights)
        for name, t in w.items():
            if name not in model.p.t:
                sys.exit(f"fit_torch: {name} in {args.eval_weights} is not a parameter of {args.method}")
            with torch.no_grad():
                model.p[name].copy_(t.reshape(model.p[name].shape))
        vl, va = evaluate(model, data, valid, args)
        tl, ta = evaluate(model, data, test, args) if test is not None else (None, None)
        print(json.dumps({"weights": args.eval_weights, "tensors": len(w), "valid_loss": vl,
                          "valid_accuracy": va, "test_loss": tl, "test_accuracy": ta}))
        return

    new, pre = model.p.trained("new"), model.p.trained("pretrained")
    betas, adam_eps = (0.9, 0.999), 1e-8
    opt_new = torch.optim.AdamW(new, lr=args.lr, betas=betas, eps=adam_eps, weight_decay=args.weight_decay)
    opt_pre = (torch.optim.AdamW(pre, lr=args.lr_pretrained, betas=betas, eps=adam_eps,
                                 weight_decay=args.weight_decay) if pre else None)
    trained = new + pre
    n_train = len(data.split_examples(train))
    total = math.ceil(n_train / args.batch_size) * args.epochs
    rng = np.random.default_rng(args.seed)
    chunks = data.split_chunks(train)
    step = 0
    best = None
    epochs = []
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        tokens = n = 0
        loss_sum = 0.0
        correct = 0
        for ex in train_batches(data, train, chunks, args, rng):
            b = data.batch(ex)
            logits = model.forward(b, True)
            loss = F.cross_entropy(logits, b["labels"])
            loss_v = loss.item()
            if not math.isfinite(loss_v):
                sys.exit(f"fit_torch: loss {loss_v} at epoch {epoch}, step {step}")
            for t in trained:
                t.grad = None
            loss.backward()
            if args.grad_clip > 0:
                norm = torch.sqrt(sum((t.grad.double().square().sum() for t in trained if t.grad is not None),
                                      torch.zeros((), dtype=torch.float64))).item()
                if norm > args.grad_clip:
                    s = args.grad_clip / (norm + 1e-6)
                    for t in trained:
                        if t.grad is not None:
                            t.grad.mul_(s)
            mult = schedule(min(step, max(total - 1, 0)), max(total, 1), args.warmup)
            for g in opt_new.param_groups:
                g["lr"] = args.lr * mult
            opt_new.step()
            if opt_pre is not None:
                for g in opt_pre.param_groups:
                    g["lr"] = args.lr_pretrained * mult
                opt_pre.step()
            step += 1
            tokens += b["tokens"]
            n += len(ex)
            loss_sum += loss_v * len(ex)
            correct += (logits.argmax(1) == b["labels"]).sum().item()
        secs = time.perf_counter() - t0
        vl, va = evaluate(model, data, valid, args)
        em = {"epoch": epoch, "train_loss": loss_sum / max(n, 1), "train_accuracy": correct / max(n, 1),
              "valid_loss": vl, "valid_accuracy": va, "seconds": secs, "tokens": tokens,
              "tokens_per_second": tokens / max(secs, 1e-9)}
        if args.method == "sherl":
            em["gate"] = math.tanh(model.p["late.gate"].item() / GATE_TEMPERATURE)
        epochs.append(em)
        print(f"epoch {epoch}: train loss {em['train_loss']:.4f} acc {em['train_accuracy']:.4f} | "
              f"valid loss {vl:.4f} acc {va:.4f} | {secs:.2f}s, {em['tokens_per_second']:.0f} tokens/s",
              file=sys.stderr, flush=True)
        if best is None or va > best[0]:
            best = (va, epoch, {k: t.detach().clone() for k, t in model.p.t.items() if model.p.group[k]})
    _, best_epoch, snap = best
    with torch.no_grad():
        for k, t in snap.items():
            model.p[k].copy_(t)
    vl, va = evaluate(model, data, valid, args)
    tl, ta = evaluate(model, data, test, args) if test is not None else (None, None)
    train_seconds = sum(e["seconds"] for e in epochs)
    train_tokens = sum(e["tokens"] for e in epochs)
    print(json.dumps({
        "peer": "pytorch", "torch": torch.__version__, "method": args.method,
        "threads": torch.get_num_threads(), "attention": args.attention, "epochs": args.epochs,
        "seconds_per_epoch": train_seconds / args.epochs,
        "epoch_seconds": [e["seconds"] for e in epochs],
        "train_tokens_per_second": train_tokens / max(train_seconds, 1e-9),
        "train_losses": [e["train_loss"] for e in epochs],
        "valid_accuracy": va, "test_accuracy": ta, "valid_loss": vl, "test_loss": tl,
        "best_epoch": best_epoch,
        "trainable_params": sum(t.numel() for t in trained),
        "process_seconds": time.time() - t_process,
    }))


if __name__ == "__main__":
    main()
