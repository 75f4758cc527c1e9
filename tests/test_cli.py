"""The gpubp command: info, demo and gradcheck, run in-process, as ``python -m gpubp`` and as a
console script.

Correct on machines with and without a GPU: where the answer depends on it (``auto``,
``--device cuda``, ``gradcheck``'s default of every device), the test asks CuPy, as the
command does (gpubp.device.cuda_status), and expects what the command should do there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gpubp as gp
from gpubp import cli
from gpubp.device import cuda_status

GPUS, NO_GPU_REASON = cuda_status()
REPO = Path(__file__).resolve().parents[1]


def _run_from_tree(*args: str) -> subprocess.CompletedProcess:
    """``python -m gpubp ARGS`` in a child that finds gpubp whether it is installed or run from the
    tree (PYTHONPATH=<repo>, as on a machine without the build tools)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "gpubp", *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=REPO)


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
    if GPUS:
        assert out.startswith(f"device: cuda:0 (auto: {GPUS} GPU(s) seen, using cuda:0)\n"), out
    else:
        assert out.startswith(f"device: cpu (auto: no GPU: {NO_GPU_REASON})\n"), out
    assert "validation accuracy" in out and "done in" in out
    assert gp.load(ckpt).model.epoch == 3


def test_demo_prints_loss_and_accuracy_per_epoch(capsys):
    assert cli.main(["demo", "--device", "cpu", "--epochs", "2", "--samples", "400"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device: cpu\n")
    assert "epoch   1  loss" in out and "epoch   2  loss" in out and "val_accuracy" in out


@pytest.mark.skipif(GPUS > 0, reason="a GPU is present: test_demo_on_a_gpu covers --device cuda")
def test_demo_on_missing_gpu_fails_clearly(capsys):
    assert cli.main(["demo", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda' asked for, but no GPU can be used" in err and NO_GPU_REASON in err


def test_demo_on_a_gpu_index_past_the_last_fails_clearly(capsys):
    assert cli.main(["demo", "--device", f"cuda:{max(GPUS, 1)}"]) == 2
    err = capsys.readouterr().err
    assert (f"only {GPUS} GPU(s) visible" if GPUS else "no GPU can be used") in err, err


@pytest.mark.skipif(GPUS == 0, reason=f"no GPU: {NO_GPU_REASON}")
def test_demo_on_a_gpu(capsys):
    code = cli.main(["demo", "--device", "cuda", "--epochs", "2", "--samples", "400", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("device: cuda:0\n") and "done in" in out and "on cuda:0" in out


def test_gradcheck_prints_a_table_and_passes(capsys):
    # The default --device all: the CPU and every GPU, 2 activations x 3 losses x 2 depths x 2 dtypes each.
    code = cli.main(["gradcheck", "--activations", "relu,sigmoid", "--losses", "all", "--depths", "1,2"])
    out = capsys.readouterr().out
    assert code == 0, out
    devices = ["cpu"] + [f"cuda:{i}" for i in range(GPUS)]
    assert out.startswith(f"devices: {', '.join(devices)}"), out
    assert "max abs err" in out and "max rel err" in out
    n = 2 * 3 * 2 * 2 * len(devices)
    assert out.count("  pass\n") == n
    for d in devices:
        assert sum(line.startswith(f"{d:<7} ") for line in out.splitlines()) == 24, d
    assert out.rstrip().endswith(f"{n} passed, 0 failed")


def test_gradcheck_exits_1_on_a_wrong_gradient(capsys, monkeypatch):
    from gpubp import activations

    spec = activations.TABLE["tanh"]
    wrong = lambda da, z, a, p: spec.backward(da, z, a, p) * 1.01  # noqa: E731
    monkeypatch.setitem(activations.TABLE, "tanh", spec.__class__(**{**spec.__dict__, "backward": wrong}))
    from gpubp.backends.cpu import CpuBackend

    fast = CpuBackend.dense_backward

    def wrong_fast(self, da, saved, w, act, dw, db, need_dx):
        dx = fast(self, da, saved, w, act, dw, db, need_dx)
        if act.name == "tanh":
            dw *= 1.01
        return dx

    monkeypatch.setattr(CpuBackend, "dense_backward", wrong_fast)
    # The patches break the CPU's tanh backward (the reference's and the fast backend's) alone; a GPU runs
    # its own kernels.
    code = cli.main(["gradcheck", "--device", "cpu", "--activations", "tanh", "--losses", "mse", "--depths", "1",
                     "--dtypes", "float64"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out and "0 passed, 1 failed" in out and "worst at" in out


def test_gradcheck_rejects_unknown_names(capsys):
    assert cli.main(["gradcheck", "--activations", "nope"]) == 2
    assert "unknown name 'nope'" in capsys.readouterr().err


def test_module_entry_point():
    r = _run_from_tree("--help")
    assert r.returncode == 0 and "gradcheck" in r.stdout, r.stderr
    r = _run_from_tree("info")
    assert r.returncode == 0 and "numpy" in r.stdout and "GPU" in r.stdout, r.stderr


def _console_script() -> str | None:
    # The script sits beside the interpreter in a virtual environment, or on PATH.
    return shutil.which("gpubp", path=str(Path(sys.executable).parent)) or shutil.which("gpubp")


@pytest.mark.skipif(_console_script() is None,
                    reason="the gpubp console script is not installed (gpubp runs from the tree: PYTHONPATH)")
def test_console_script():
    r = subprocess.run([_console_script(), "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "numpy" in r.stdout, r.stderr
