"""sherl from Python: feature caches read by sherl's own reader.

    import sherl
    cache = sherl.Cache("cache/")           # every check sherl-fit makes
    cache.splits                            # {"train": 900, "validation": 100}
    ex = cache.split("train")[0]            # one example, NumPy arrays
    ex.hidden_states[6].shape               # (tokens, hidden), stored dtype
    for batch in cache.batches("train", seed=0, epoch=0):
        batch.hidden_states[6]              # (B, S, hidden) float32, zero padding

    summary = sherl.fit(cache="cache/", backbone="backbone/", out="runs/",
                        method="sherl", epochs=3)      # sherl-fit run
    summary["run_dir"], summary["valid_accuracy"]
    sherl.predict(run=summary["run_dir"], data="new.csv")  # [{"id", "label", ...}]

``extract``, ``fit``, ``predict`` and ``export`` are the commands
``sherl-extract run``, ``sherl-fit run``, ``sherl-fit predict`` and
``sherl-fit export`` run in this process (the library, not a subprocess):
keyword arguments are the flags (``max_len=16`` is ``--max-len 16``), read
by the commands' own parser, so the defaults, checks and messages are the
CLI's.

Nothing here downloads anything; errors of the library (and usage errors)
are raised as ``sherl.SherlError`` with the message the CLI prints.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from . import _sherl
from ._sherl import SherlError

__all__ = ["Cache", "Split", "Example", "Batch", "SherlError", "extract", "fit", "predict", "export"]
__version__ = _sherl.__version__


@dataclass(frozen=True)
class Example:
    """One cached example: its real tokens only (no padding)."""

    id: str
    position: int
    split: str
    label: Optional[str]
    label_id: Optional[int]
    input_ids: np.ndarray  # int64 [tokens] (empty for image caches)
    token_type_ids: np.ndarray  # int64 [tokens]
    hidden_states: dict  # hidden_states index -> [tokens, hidden] (stored dtype)

    def __len__(self) -> int:
        return len(next(iter(self.hidden_states.values()))) if self.hidden_states else len(self.input_ids)


@dataclass(frozen=True)
class Batch:
    """One padded batch, as sherl-fit trains on it."""

    ids: list
    labels: np.ndarray  # int64 [B]
    input_ids: np.ndarray  # int64 [B, S], 0 at padding
    token_type_ids: np.ndarray  # int64 [B, S]
    attention_mask: np.ndarray  # int64 [B, S], 1 at real tokens
    hidden_states: dict  # hidden_states index -> float32 [B, S, hidden], zeros at padding

    def __len__(self) -> int:
        return len(self.ids)


def _i64(raw: bytes, shape) -> np.ndarray:
    return np.frombuffer(raw, dtype="<i8").reshape(shape)


class Cache:
    """A sherl feature cache (``sherl-extract``'s output), opened and checked
    by sherl's reader: the manifest's checksum, every shard against the
    manifest, every frame's checksums when it is read."""

    def __init__(self, path):
        self._c = _sherl.Cache(str(path))
        self.path = str(path)
        self.manifest = json.loads(self._c.manifest_json())
        m = self.manifest
        self.split_names = list(m["split_names"])
        self.splits = {n: int(m["splits"].get(n, 0)) for n in self.split_names}
        self.labels = list(m["labels"])
        self.layers = list(m["settings"]["layers"])
        self.hidden = int(m["backbone"]["hidden"])
        self.backbone = m["backbone"]
        self.dtype = m["settings"]["dtype"]
        self.value_dtype = np.dtype(self._c.value_dtype()).newbyteorder("<")

    def __len__(self) -> int:
        return len(self._c)

    def __repr__(self) -> str:
        return f"sherl.Cache({self.path!r}, examples={len(self)}, splits={self.splits}, layers={self.layers})"

    def _split_id(self, split: str) -> int:
        try:
            return self.split_names.index(split)
        except ValueError:
            raise KeyError(f"no split {split!r} in the cache (it has {self.split_names})") from None

    def example(self, position: int, layers: Optional[Sequence[int]] = None) -> Example:
        """The example at cache ``position`` (cache order), with the stored
        ``layers`` (``hidden_states`` indices; all when None)."""
        if position < 0:
            position += len(self)
        if position < 0:
            raise IndexError("example index out of range")
        asked = self.layers if layers is None else list(layers)
        ident, split, label, ids, types, tokens, values = self._c.example(
            position, None if layers is None else asked
        )
        hs = {
            l: np.frombuffer(v, dtype=self.value_dtype).reshape(tokens, self.hidden)
            for l, v in zip(asked, values)
        }
        return Example(
            id=ident,
            position=position,
            split=self.split_names[split],
            label=None if label is None else self.labels[label],
            label_id=label,
            input_ids=np.frombuffer(ids, dtype="<i8"),
            token_type_ids=np.frombuffer(types, dtype="<i8"),
            hidden_states=hs,
        )

    def __getitem__(self, position: int) -> Example:
        return self.example(position)

    def __iter__(self) -> Iterator[Example]:
        for i in range(len(self)):
            yield self.example(i)

    def split(self, name: str) -> "Split":
        """The examples of split ``name``, in cache order."""
        return Split(self, name)

    def verify(self) -> int:
        """Decode and check every frame (``sherl-cache verify``); the number
        of frames checked."""
        return self._c.verify()

    def batches(
        self,
        split: str = "train",
        *,
        batch_size: int = 32,
        max_tokens: int = 8192,
        seed: Optional[int] = 0,
        epoch: int = 0,
        shuffle: bool = True,
        shuffle_chunks: int = 8,
        train_examples: Optional[int] = None,
        layers: Optional[Sequence[int]] = None,
        threads: int = 2,
    ) -> Iterator[Batch]:
        """Padded batches of ``split`` from sherl-fit's own batcher: with
        ``shuffle`` in the seeded order of training epoch ``epoch`` for
        ``seed`` (sherl-fit's defaults: batch 32, 8192 tokens, 8 shuffle
        chunks), else in cache order. ``train_examples`` takes sherl-fit's
        seeded subset of whole chunks (``--train-examples``)."""
        sid = self._split_id(split)
        asked = self.layers if layers is None else list(layers)
        positions = []
        for l in asked:
            if l not in self.layers:
                raise KeyError(f"the cache does not store hidden_states.{l} (it stores {self.layers})")
            positions.append(self.layers.index(l))
        it = self._c.batches(
            sid,
            positions,
            batch_size,
            max_tokens,
            (seed or 0, epoch) if shuffle else None,
            shuffle_chunks,
            None if train_examples is None else (seed or 0, train_examples),
            threads,
        )
        for ids, labels, tok, typ, mask, b, s, values in it:
            yield Batch(
                ids=list(ids),
                labels=_i64(labels, (b,)),
                input_ids=_i64(tok, (b, s)),
                token_type_ids=_i64(typ, (b, s)),
                attention_mask=_i64(mask, (b, s)),
                hidden_states={
                    l: np.frombuffer(v, dtype="<f4").reshape(b, s, self.hidden) for l, v in zip(asked, values)
                },
            )


class Split:
    """The examples of one split, indexable and iterable in cache order."""

    def __init__(self, cache: Cache, name: str):
        self.cache = cache
        self.name = name
        self._start, self._len = cache._c.split_range(cache._split_id(name))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, k: int) -> Example:
        if k < 0:
            k += self._len
        if not 0 <= k < self._len:
            raise IndexError(f"example {k} of split {self.name!r} of {self._len} examples")
        return self.cache.example(self._start + k)

    def __iter__(self) -> Iterator[Example]:
        for k in range(self._len):
            yield self[k]

    def __repr__(self) -> str:
        return f"sherl.Split({self.name!r}, examples={self._len})"


# ------------------------------------------------------------------ commands


def _text(value: Any) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _flags(flags: dict) -> list:
    """Keyword arguments as (name, switch, values) for the native side,
    which builds the command line from them with the command's own flag
    kinds: ``True`` a bare switch (``"true"`` for a flag taking a value),
    ``False`` and ``None`` left out, a list or tuple several values (joined
    with the flag's delimiter, or the flag repeated, as the CLI takes
    them), a dict ``{"train": 0.8, "valid": 0.2}`` as ``train=0.8,valid=0.2``."""
    out = []
    for name, value in flags.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out.append((name, value, []))
        elif isinstance(value, dict):
            out.append((name, None, [",".join(f"{k}={_text(v)}" for k, v in value.items())]))
        elif isinstance(value, (list, tuple)):
            out.append((name, None, [_text(v) for v in value]))
        else:
            out.append((name, None, [_text(value)]))
    return out


def _command(program: str, sub: str, flags: dict) -> str:
    """Run ``program sub`` with ``flags`` in this process; its JSON line.

    Ctrl-C: the work runs in native code without the GIL, where Python's
    KeyboardInterrupt cannot reach it; during the call (from the main
    thread) SIGINT is given back its default action, so Ctrl-C stops the
    process as it stops the CLI (whose outputs are written to be resumed or
    replaced: ``--resume`` for an extraction, a new run directory for a
    run). The Python handler is put back when the call returns."""
    args = _flags(flags)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    if main and previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        return _sherl.command(program, sub, args)
    finally:
        if main and previous is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous)


def extract(*, backbone: Union[str, os.PathLike], out: Union[str, os.PathLike], **flags) -> dict:
    """``sherl-extract run``: run the backbone over a dataset (``data=``,
    or ``train=``/``valid=``/``test=``) and write the feature cache in
    ``out``. Every other flag of the command is a keyword argument
    (``split="train=0.8,valid=0.2"``, ``max_len=128``, ``layers="all"``,
    ``device="cpu"``, ``quiet=True``, ...). Returns the summary the command
    prints (``cache``, ``examples``, ``tokens``, ``bytes_on_disk``, ...);
    open the cache with ``sherl.Cache(out)``."""
    return json.loads(_command("sherl-extract", "run", {"backbone": backbone, "out": out, **flags}))


def fit(*, out: Union[str, os.PathLike], **flags) -> dict:
    """``sherl-fit run``: train one model (``cache=`` and ``backbone=``,
    or ``task="retrieval"`` with its caches) into a new run directory under
    ``out``. Every other flag of the command is a keyword argument
    (``method="sherl"``, ``epochs=3``, ``lr=1e-3``, ``seed=0``,
    ``config="settings.json"``, ``threads=4``, ...). Returns the summary
    the command prints, also the run's ``summary.json`` (``run_dir``,
    ``run_id``, ``method``, ``valid_accuracy``, ``test_accuracy``, ...)."""
    return json.loads(_command("sherl-fit", "run", {"out": out, **flags}))


def predict(
    *, run: Union[str, os.PathLike], data: Union[str, os.PathLike], out: Optional[Union[str, os.PathLike]] = None, **flags
) -> Union[list, dict]:
    """``sherl-fit predict``: label ``data`` with the run in ``run``
    (``backbone=`` defaults to the one the run recorded). Without ``out``,
    returns the predictions, one dict per input as the command's JSON lines
    (``id``, ``label``, ``probabilities``, ``true_label`` when the input has
    one, ...); with ``out``, writes them there (JSON Lines) and returns the
    command's summary (``examples``, ``accuracy``, ``out``, ...)."""
    if out is not None:
        return json.loads(_command("sherl-fit", "predict", {"run": run, "data": data, "out": out, **flags}))
    with tempfile.TemporaryDirectory(prefix="sherl-predict-") as tmp:
        path = Path(tmp) / "predictions.jsonl"
        _command("sherl-fit", "predict", {"run": run, "data": data, "out": path, **flags})
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def export(
    *, run: Union[str, os.PathLike], out: Union[str, os.PathLike], backbone: Optional[Union[str, os.PathLike]] = None, **flags
) -> dict:
    """``sherl-fit export``: write the run in ``run`` as one standalone ONNX
    model (with its tokenizer, ``labels.json`` and a README) in ``out``.
    ``backbone`` defaults to the one the run recorded, when it is still
    there unchanged. Returns the command's summary (``run_id``, ``method``,
    ``classes``, ``model``, ``bytes``, ...)."""
    return json.loads(_command("sherl-fit", "export", {"run": run, "out": out, "backbone": backbone, **flags}))
