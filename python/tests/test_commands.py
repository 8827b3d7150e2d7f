"""sherl.extract, sherl.fit, sherl.predict and sherl.export: the commands
run in this process give what the release binaries give on the same
settings (the same cache, bit-identical weights, the same predictions and
exported model), and refuse what the binaries refuse, with their message."""

import hashlib
import json
import signal
from pathlib import Path

import numpy as np
import pytest

import sherl
from conftest import minilm, run


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cli_error(name: str, *args) -> str:
    """The binary's error message (its stderr without `error: `)."""
    r = run(name, *args, check=False)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: "), r.stderr
    return r.stderr[len("error: "):].rstrip()


FIT = dict(method="sherl", epochs=1, seed=3, threads=1, device="cpu", batch_size=8, quiet=True)


def cli_flags(flags: dict) -> list:
    out = []
    for k, v in flags.items():
        out.append("--" + k.replace("_", "-"))
        if v is not True:
            out.append(str(v))
    return out


@pytest.fixture(scope="session")
def runs(root, f16_cache):
    """The same run trained by the binary and by sherl.fit."""
    r = run(
        "sherl-fit", "run", "--cache", f16_cache, "--backbone", minilm(), "--out", root / "runs-cli",
        *cli_flags(FIT),
    )
    cli = json.loads(r.stdout.strip().splitlines()[-1])
    py = sherl.fit(cache=f16_cache, backbone=minilm(), out=root / "runs-py", **FIT)
    return cli, py


def test_extract_writes_the_cache_the_cli_writes(root, f16_cache):
    out = root / "py-cache-f16"
    s = sherl.extract(
        backbone=minilm(), data=root / "data.csv", split={"train": 0.6, "valid": 0.2, "test": 0.2},
        max_len=16, chunk_size=8, dtype="f16", layers="all", device="cpu", threads=1, quiet=True, out=out,
    )
    assert Path(s["cache"]) == out
    py, cli = sherl.Cache(out), sherl.Cache(f16_cache)
    assert s["examples"] == len(py) == len(cli) == 60
    assert py.splits == cli.splits == {"train": 36, "valid": 12, "test": 12}
    assert py.verify() > 0
    for a, b in zip(py, cli):
        assert (a.id, a.split, a.label) == (b.id, b.split, b.label)
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        assert a.hidden_states.keys() == b.hidden_states.keys()
        for layer in a.hidden_states:
            np.testing.assert_array_equal(a.hidden_states[layer], b.hidden_states[layer])


def test_fit_returns_the_cli_summary_with_identical_weights(runs):
    cli, py = runs
    assert Path(py["run_dir"]).is_dir()
    assert py["run_dir"] != cli["run_dir"]
    assert py["method"] == "sherl" and py["epochs"] == 1
    assert py["weights_sha256"] == cli["weights_sha256"]
    assert sha256(Path(py["run_dir"]) / "weights.safetensors") == py["weights_sha256"]
    for key in ("run_id", "valid_accuracy", "test_accuracy", "best_epoch", "trainable_params", "config_sha256"):
        assert py[key] == cli[key], key
    assert py["train_memory"] is not None and cli["train_memory"] is not None
    on_disk = json.loads((Path(py["run_dir"]) / "summary.json").read_text())
    assert on_disk["weights_sha256"] == py["weights_sha256"]


def test_predict_returns_the_cli_predictions_or_writes_them(root, runs):
    cli_run, py_run = runs[0]["run_dir"], runs[1]["run_dir"]
    data = root / "data.csv"
    r = run("sherl-fit", "predict", "--run", cli_run, "--data", data, "--device", "cpu", "--quiet")
    want = [json.loads(line) for line in r.stdout.splitlines()]
    got = sherl.predict(run=py_run, data=data, device="cpu", quiet=True)
    assert len(got) == len(want) == 60
    assert got == want
    out = root / "predictions.jsonl"
    s = sherl.predict(run=py_run, data=data, device="cpu", quiet=True, out=out, text_chars=0)
    assert s["examples"] == 60 and Path(s["out"]) == out
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["label"] for x in lines] == [x["label"] for x in want]
    assert "text" not in lines[0] and "text" in want[0]
    labelled = [x for x in want if "true_label" in x]
    accuracy = sum(x["label"] == x["true_label"] for x in labelled) / len(labelled)
    assert s["accuracy"] == pytest.approx(accuracy)


def test_export_writes_the_model_the_cli_writes(root, f16_cache):
    s = sherl.fit(cache=f16_cache, backbone=minilm(), out=root / "runs-export", method="linear-probe", epochs=1,
                  threads=1, device="cpu", quiet=True)
    run("sherl-fit", "export", "--run", s["run_dir"], "--backbone", minilm(), "--out", root / "export-cli", "--quiet")
    e = sherl.export(run=s["run_dir"], out=root / "export-py", quiet=True)
    assert e["method"] == "linear-probe" and e["classes"] == 3
    assert Path(e["model"]) == root / "export-py" / "model.onnx"
    for name in ("model.onnx", "tokenizer.json", "labels.json"):
        assert sha256(root / "export-py" / name) == sha256(root / "export-cli" / name), name


def test_bad_arguments_raise_the_cli_message(root, f16_cache):
    cases = [
        dict(cache=f16_cache, backbone=minilm(), out=root / "bad", method="no-such-method"),
        dict(cache=root / "no-such-cache", backbone=minilm(), out=root / "bad"),
        dict(cache=f16_cache, backbone=minilm(), out=root / "bad", epoch=1),
        dict(backbone=minilm(), out=root / "bad"),
    ]
    for flags in cases:
        flags = dict(flags, quiet=True)
        out = flags.pop("out")
        want = cli_error("sherl-fit", "run", "--out", out, *cli_flags(flags))
        with pytest.raises(sherl.SherlError) as e:
            sherl.fit(out=out, **flags)
        assert str(e.value) == want
    assert "invalid value 'no-such-method' for '--method <METHOD>'" in cli_error(
        "sherl-fit", "run", "--out", root / "bad", "--method", "no-such-method"
    )
    want = cli_error("sherl-extract", "run", "--backbone", minilm(), "--out", root / "bad-cache", "--quiet")
    with pytest.raises(sherl.SherlError) as e:
        sherl.extract(backbone=minilm(), out=root / "bad-cache", quiet=True)
    assert str(e.value) == want


def test_predict_and_export_refuse_a_missing_run_as_the_cli_does(tmp_path):
    gone = tmp_path / "no-run"
    want = cli_error("sherl-fit", "export", "--run", gone, "--out", tmp_path / "x")
    with pytest.raises(sherl.SherlError) as e:
        sherl.export(run=gone, out=tmp_path / "x")
    assert str(e.value) == want
    want = cli_error("sherl-fit", "predict", "--run", gone, "--data", tmp_path / "d.csv", "--out", tmp_path / "p")
    with pytest.raises(sherl.SherlError) as e:
        sherl.predict(run=gone, data=tmp_path / "d.csv", out=tmp_path / "p")
    assert str(e.value) == want


def test_keywords_become_flags_and_ctrl_c_stops_the_call(monkeypatch):
    """What the native side receives for each kind of keyword argument,
    and SIGINT's default action during the call (Ctrl-C stops the process,
    as it stops the CLI), the Python handler back afterwards."""
    seen = []

    def command(program, sub, flags):
        seen.append((program, sub, flags, signal.getsignal(signal.SIGINT)))
        return '{"ok": 1}'

    monkeypatch.setattr(sherl._sherl, "command", command)
    before = signal.getsignal(signal.SIGINT)
    assert before is signal.default_int_handler
    got = sherl.extract(
        backbone=Path("b"), out="c", split={"train": 0.8, "valid": 0.2}, labels=["neg", "pos"],
        no_shuffle=True, resume=False, threads=None, max_len=16, verbose=2,
    )
    assert got == {"ok": 1}
    assert seen == [(
        "sherl-extract", "run",
        [
            ("backbone", None, ["b"]), ("out", None, ["c"]), ("split", None, ["train=0.8,valid=0.2"]),
            ("labels", None, ["neg", "pos"]), ("no_shuffle", True, []), ("resume", False, []),
            ("max_len", None, ["16"]), ("verbose", None, ["2"]),
        ],
        signal.SIG_DFL,
    )]
    assert signal.getsignal(signal.SIGINT) is before
