"""PyTorch over a sherl cache: ``CacheDataset`` yields the padded batches
sherl-fit trains on, as tensors. ``import sherl`` never imports torch; this
module does, when it is imported.

    from torch.utils.data import DataLoader
    from sherl.torch import CacheDataset
    ds = CacheDataset("cache/", "train", layers=[6], seed=0)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for b in DataLoader(ds, batch_size=None):   # batches come made
            x = b["hidden_states"][6]                  # [B, S, hidden] float32
            mask, y = b["attention_mask"], b["labels"]
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import Cache

__all__ = ["CacheDataset"]


class CacheDataset(torch.utils.data.IterableDataset):
    """The batches of one split of a sherl cache as dicts of tensors:
    ``hidden_states`` (hidden_states index -> float32 ``[B, S, hidden]``,
    zeros at padding), ``attention_mask``, ``input_ids``,
    ``token_type_ids`` (int64 ``[B, S]``), ``labels`` (int64 ``[B]``) and
    ``ids`` (list of str). With ``shuffle`` the order of epoch
    ``set_epoch(e)`` is sherl-fit's for ``seed`` and that epoch; the other
    arguments are :meth:`sherl.Cache.batches`'s. Use it with
    ``DataLoader(ds, batch_size=None)`` (the batches are already made) and
    one worker: the decoding runs on sherl's own threads."""

    def __init__(
        self,
        cache,
        split: str = "train",
        *,
        layers: Optional[Sequence[int]] = None,
        batch_size: int = 32,
        max_tokens: int = 8192,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_chunks: int = 8,
        train_examples: Optional[int] = None,
        threads: int = 2,
    ):
        super().__init__()
        self.cache = cache if isinstance(cache, Cache) else Cache(cache)
        self.split = split
        self.layers = self.cache.layers if layers is None else list(layers)
        self.kw = dict(
            batch_size=batch_size,
            max_tokens=max_tokens,
            seed=seed,
            shuffle=shuffle,
            shuffle_chunks=shuffle_chunks,
            train_examples=train_examples,
            threads=threads,
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose seeded order the next iteration follows."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Examples in the split (not batches: their number depends on the
        token budget)."""
        return self.cache.splits[self.split]

    def __iter__(self):
        for b in self.cache.batches(self.split, epoch=self.epoch, layers=self.layers, **self.kw):
            yield {
                "hidden_states": {l: torch.from_numpy(v) for l, v in b.hidden_states.items()},
                "attention_mask": torch.from_numpy(b.attention_mask),
                "input_ids": torch.from_numpy(b.input_ids),
                "token_type_ids": torch.from_numpy(b.token_type_ids),
                "labels": torch.from_numpy(b.labels),
                "ids": b.ids,
            }
