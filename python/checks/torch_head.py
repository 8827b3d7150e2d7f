"""A check, not a test (torch is not in CI's venv): a linear head trained
in a plain PyTorch loop from sherl.torch.CacheDataset on a cache made by
`sherl-extract` (MiniLM) learns: the training loss of the last epoch is
under half that of the first. Run by pipelines/check-python-torch.sh.
"""

import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import sherl
from sherl.torch import CacheDataset

BIN = Path(os.environ["SHERL_BIN_DIR"])
ASSETS = Path(os.environ.get("SHERL_ASSETS") or Path.home() / ".cache" / "sherl")
POS = "good great wonderful superb lovely".split()
NEG = "bad awful terrible boring dreadful".split()
FILL = "the a movie film plot actor scene story".split()


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="sherl-torch-"))
    try:
        return train(work)
    finally:
        shutil.rmtree(work)


def train(work: Path) -> int:
    rng = random.Random(1)
    rows = ["text,label"]
    for _ in range(200):
        label = rng.choice(["neg", "pos"])
        words = [rng.choice(FILL) for _ in range(rng.randint(2, 8))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POS if label == "pos" else NEG))
        rows.append(" ".join(words) + "," + label)
    (work / "data.csv").write_text("\n".join(rows) + "\n")
    subprocess.run(
        [BIN / "sherl-extract", "run", "--backbone", ASSETS / "backbones" / "all-MiniLM-L6-v2",
         "--data", work / "data.csv", "--split", "train=0.8,valid=0.2", "--max-len", "16",
         "--layers", "all", "--device", "cpu", "--quiet", "--out", work / "cache"],
        check=True,
    )
    cache = sherl.Cache(work / "cache")
    layer = cache.layers[-1]
    ds = CacheDataset(cache, "train", layers=[layer], batch_size=16, seed=0)
    torch.manual_seed(0)
    head = torch.nn.Linear(cache.hidden, len(cache.labels))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for epoch in range(8):
        ds.set_epoch(epoch)
        total, n = 0.0, 0
        for b in DataLoader(ds, batch_size=None):
            x, mask = b["hidden_states"][layer], b["attention_mask"].unsqueeze(-1).float()
            pooled = (x * mask).sum(1) / mask.sum(1)
            loss = torch.nn.functional.cross_entropy(head(pooled), b["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(b["ids"]), n + len(b["ids"])
        assert n == len(ds), f"epoch {epoch}: {n} examples, the split has {len(ds)}"
        losses.append(total / n)
        print(f"epoch {epoch}: mean training loss {losses[-1]:.4f}")
    ok = losses[-1] < 0.5 * losses[0]
    print(("ok" if ok else "FAILED") + f": loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
