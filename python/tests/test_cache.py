"""sherl.Cache against the CLI: the values equal `sherl-cache export`'s
arrays bit for bit, batches are sherl-fit's, and a damaged cache raises
with the message the CLI prints."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import sherl
from conftest import run


def export(cache: Path, out: Path) -> dict:
    if not out.exists():
        run("sherl-cache", "export", cache, "--out", out, "--quiet")
    meta = json.loads((out / "meta.json").read_text())
    arrays = {p.stem: np.load(p) for p in out.glob("*.npy")}
    return meta, arrays


@pytest.mark.parametrize("fixture", ["f16_cache", "int8_cache"])
def test_values_equal_export_bit_for_bit(fixture, request, root):
    path = request.getfixturevalue(fixture)
    meta, a = export(path, root / f"{fixture}-export")
    c = sherl.Cache(path)
    assert len(c) == meta["examples"] == len(meta["ids"])
    assert c.layers == meta["layers"] and c.labels == meta["labels"] and c.split_names == meta["split_names"]
    assert c.value_dtype == np.dtype(meta["dtype"])
    off = a["offsets"]
    for k, ex in enumerate(c):
        rows = slice(off[k], off[k + 1])
        assert ex.id == meta["ids"][k]
        assert ex.split == meta["split_names"][a["splits"][k]]
        assert ex.label_id == (None if a["labels"][k] < 0 else a["labels"][k])
        assert ex.label == c.labels[a["labels"][k]]
        np.testing.assert_array_equal(ex.input_ids, a["input_ids"][rows])
        np.testing.assert_array_equal(ex.token_type_ids, a["token_type_ids"][rows])
        assert sorted(ex.hidden_states) == c.layers
        for layer, values in ex.hidden_states.items():
            want = a[f"hidden_states.{layer}"][rows]
            assert values.dtype == want.dtype and values.shape == want.shape == (len(ex.input_ids), c.hidden)
            assert values.tobytes() == want.tobytes(), f"example {k}, hidden_states.{layer}"
            assert values.flags.writeable


def test_manifest_splits_and_layer_subset(f16_cache):
    c = sherl.Cache(f16_cache)
    assert c.dtype == "f16" and c.value_dtype == np.float16
    assert sum(c.splits.values()) == len(c) == 60
    assert set(c.splits) == {"train", "valid", "test"}
    assert c.labels == ["neg", "neu", "pos"]
    assert c.layers == list(range(c.backbone["num_layers"] + 1))
    assert c.backbone["onnx"]["sha256"] and c.hidden == 384
    seen = 0
    for name in c.split_names:
        s = c.split(name)
        assert len(s) == c.splits[name]
        for k in range(len(s)):
            ex = s[k]
            assert ex.split == name and ex.position == seen
            seen += 1
        assert s[-1].id == s[len(s) - 1].id
        with pytest.raises(IndexError):
            s[len(s)]
    assert seen == len(c)
    ex = c.example(3, layers=[6, 0])
    assert list(ex.hidden_states) == [6, 0]
    assert ex.hidden_states[6].tobytes() == c[3].hidden_states[6].tobytes()
    with pytest.raises(KeyError, match="hidden_states.99"):
        c.example(0, layers=[99])
    with pytest.raises(KeyError, match="no split 'nope'"):
        c.split("nope")
    with pytest.raises(IndexError):
        c.example(len(c))


def test_torch_is_imported_only_by_sherl_torch():
    import subprocess
    import sys

    code = "import sys, sherl; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_batches_are_an_epoch_of_the_split(f16_cache):
    c = sherl.Cache(f16_cache)
    by_id = {ex.id: ex for ex in c.split("train")}

    def epoch(**kw):
        return list(c.batches("train", batch_size=5, **kw))

    first = epoch(seed=3, epoch=0)
    order = [i for b in first for i in b.ids]
    assert sorted(order) == sorted(by_id), "each training example exactly once"
    assert [i for b in epoch(seed=3, epoch=0) for i in b.ids] == order, "seeded: the same order again"
    assert [i for b in epoch(seed=3, epoch=1) for i in b.ids] != order, "another epoch, another order"
    in_order = [i for b in epoch(shuffle=False) for i in b.ids]
    assert in_order == list(by_id), "without shuffle: cache order"
    for b in first:
        assert len(b) <= 5
        for r, ident in enumerate(b.ids):
            ex = by_id[ident]
            n = len(ex.input_ids)
            assert b.attention_mask[r].tolist() == [1] * n + [0] * (b.attention_mask.shape[1] - n)
            assert b.labels[r] == ex.label_id
            np.testing.assert_array_equal(b.input_ids[r, :n], ex.input_ids)
            for layer, values in b.hidden_states.items():
                assert values.dtype == np.float32
                np.testing.assert_array_equal(values[r, :n], ex.hidden_states[layer].astype(np.float32))
                assert not values[r, n:].any()


def damaged_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    shard = dst / "shards" / "shard-00000.shrd"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x55  # inside a compressed frame
    shard.write_bytes(bytes(raw))
    return dst


def test_corrupted_shard_raises_the_cli_message(f16_cache, root):
    bad = damaged_copy(f16_cache, root / "damaged")
    with pytest.raises(sherl.SherlError) as err:
        c = sherl.Cache(bad)
        c.verify()
    msg = str(err.value)
    assert "shard-00000.shrd" in msg
    cli = run("sherl-cache", "verify", bad, "--quiet", check=False)
    assert cli.returncode == 2
    assert f"error: {msg}" in cli.stderr
    with pytest.raises(sherl.SherlError):
        for ex in sherl.Cache(bad):
            pass


def test_edited_manifest_and_missing_cache_raise(f16_cache, root):
    edited = root / "edited"
    shutil.copytree(f16_cache, edited)
    m = edited / "manifest.json"
    m.write_text(m.read_text().replace('"neg"', '"NEG"'))
    with pytest.raises(sherl.SherlError, match="manifest"):
        sherl.Cache(edited)
    with pytest.raises(sherl.SherlError, match="not found"):
        sherl.Cache(root / "no-such-cache")
