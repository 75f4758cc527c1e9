"""The gpubp command: info, demo and gradcheck, run in-process and as a console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import gpubp as gp
from gpubp import cli


def test_info_lists_versions_and_gpu_status(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("gpubp", "python", "numpy", "numba", "safetensors", "GPU"):
        assert word in out


def test_demo_trains_and_says_which_device(capsys, tmp_path):
    ckpt = tmp_path / "demo.safetensors"
    code = cli.main(["demo", "--device", "auto", "--epochs", "3", "--samples", "600", "--quiet", "--save", str(ckpt)])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("device: cpu (auto: ")
    assert "validation accuracy" in out and "done in" in out
    assert gp.load(ckpt).model.epoch == 3


def test_demo_prints_loss_and_accuracy_per_epoch(capsys):
    assert cli.main(["demo", "--device", "cpu", "--epochs", "2", "--samples", "400"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device: cpu\n")
    assert "epoch   1  loss" in out and "epoch   2  loss" in out and "val_accuracy" in out


def test_demo_on_missing_gpu_fails_clearly(capsys):
    assert cli.main(["demo", "--device", "cuda"]) == 2
    assert "cuda" in capsys.readouterr().err


def test_gradcheck_prints_a_table_and_passes(capsys):
    code = cli.main(["gradcheck", "--activations", "relu,sigmoid", "--losses", "all", "--depths", "1,2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "max abs err" in out and "max rel err" in out
    assert out.count("  pass\n") == 2 * 3 * 2 * 2
    assert out.rstrip().endswith("24 passed, 0 failed")


def test_gradcheck_exits_1_on_a_wrong_gradient(capsys, monkeypatch):
    from gpubp import activations

    spec = activations.TABLE["tanh"]
    wrong = lambda da, z, a, p: spec.backward(da, z, a, p) * 1.01  # noqa: E731
    monkeypatch.setitem(activations.TABLE, "tanh", spec.__class__(**{**spec.__dict__, "backward": wrong}))
    code = cli.main(["gradcheck", "--activations", "tanh", "--losses", "mse", "--depths", "1", "--dtypes", "float64"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out and "0 passed, 1 failed" in out and "worst at" in out


def test_gradcheck_rejects_unknown_names(capsys):
    assert cli.main(["gradcheck", "--activations", "nope"]) == 2
    assert "unknown name 'nope'" in capsys.readouterr().err


def test_console_script_and_module_entry_point():
    # The script sits beside the interpreter in a virtual environment, or on PATH.
    exe = shutil.which("gpubp", path=str(Path(sys.executable).parent)) or shutil.which("gpubp")
    assert exe is not None, "the gpubp console script is not installed"
    r = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "numpy" in r.stdout
    r = subprocess.run([sys.executable, "-m", "gpubp", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "gradcheck" in r.stdout
