"""Edges of the gpubp command a new user runs into: a reader that stops reading (``| head``), bad
option values named as options, --save checked before training, --lr-find and --plot.

Commands run in a child as ``python -m gpubp`` from the tree, with ``--device cpu`` where the
device is not what is tested, so the tests hold with and without a GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpubp import cli

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _read_then_close(argv: list[str], lines: int, **env: str) -> tuple[list[str], int, str]:
    """Start ``argv``, read ``lines`` lines of its stdout, close the pipe (as ``head`` does), and
    return (lines read, exit status, stderr)."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(**env), cwd=REPO)
    try:
        got = [p.stdout.readline().decode() for _ in range(lines)]
        p.stdout.close()
        err = p.stderr.read().decode()
        return got, p.wait(timeout=300), err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_demo_into_a_reader_that_stops_after_one_line():
    # The per-epoch lines are flushed as they come: the pipe is closed while training goes on.
    got, code, err = _read_then_close(
        [sys.executable, "-m", "gpubp", "demo", "--device", "cpu", "--epochs", "6", "--samples", "600"], 1)
    assert got == ["device: cpu\n"]
    assert code == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err


def test_gradcheck_into_a_reader_that_stops_after_two_lines():
    got, code, err = _read_then_close([sys.executable, "-m", "gpubp", "gradcheck", "--device", "cpu"], 2,
                                      PYTHONUNBUFFERED="1")
    assert got[0] == "device: cpu\n" and got[1].startswith("case")
    assert code == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err


WRONG_TANH = textwrap.dedent("""
    import sys
    from gpubp import activations, cli
    spec = activations.TABLE["tanh"]
    wrong = lambda da, z, a, p: spec.backward(da, z, a, p) * 1.01
    activations.TABLE["tanh"] = spec.__class__(**{**spec.__dict__, "backward": wrong})
    from gpubp.backends.cpu import CpuBackend
    fast = CpuBackend.dense_backward
    def wrong_fast(self, da, saved, w, act, dw, db, need_dx):
        dx = fast(self, da, saved, w, act, dw, db, need_dx)
        if act.name == "tanh":
            dw *= 1.01
        return dx
    CpuBackend.dense_backward = wrong_fast
    sys.exit(cli.main(["gradcheck", "--device", "cpu", "--activations", "relu,sigmoid,tanh",
                       "--losses", "all", "--depths", "1,2,3"]))
""")


def test_gradcheck_failure_after_the_reader_left_still_exits_1():
    # tanh's cases come after the reader has gone: they still run, and their failure decides the status
    got, code, err = _read_then_close([sys.executable, "-c", WRONG_TANH], 2, PYTHONUNBUFFERED="1")
    assert got[1].startswith("case")
    assert code == 1, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


@pytest.mark.parametrize(
    "argv, option",
    [
        (["demo", "--epochs", "0"], "--epochs"),
        (["demo", "--epochs", "ten"], "--epochs"),
        (["demo", "--batch-size", "0"], "--batch-size"),
        (["demo", "--lr", "0"], "--lr"),
        (["demo", "--lr", "nan"], "--lr"),
        (["demo", "--width", "0"], "--width"),
        (["demo", "--samples", "1"], "--samples"),
        (["demo", "--classes", "1"], "--classes"),
        (["demo", "--seed", "-1"], "--seed"),
        (["demo", "--device", "gpu"], "--device"),
        (["demo", "--device", "cuda:x"], "--device"),
        (["gradcheck", "--depths", "0"], "--depths"),
        (["gradcheck", "--depths", "1,two"], "--depths"),
        (["gradcheck", "--dtypes", "float16"], "--dtypes"),
        (["gradcheck", "--activations", "relu,nope"], "--activations"),
        (["gradcheck", "--losses", "hinge"], "--losses"),
        (["gradcheck", "--device", "tpu"], "--device"),
        (["gradcheck", "--seed", "-3"], "--seed"),
    ],
)
def test_bad_values_are_rejected_naming_the_option(capsys, argv, option):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith(f"gpubp {argv[0]}: error: argument {option}: "), captured.err
    for internal in ("T_max", "layers", "n_classes", "n_samples", "positive integer"):
        assert internal not in last


def test_classes_message_says_at_least_two(capsys):
    assert cli.main(["demo", "--classes", "1"]) == 2
    assert "expected an integer >= 2, got 1" in capsys.readouterr().err


def test_help_returns_0(capsys):
    assert cli.main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--lr-find" in out and "--plot" in out


def test_save_into_a_missing_folder_fails_before_training(capsys, tmp_path):
    target = tmp_path / "missing" / "run.safetensors"
    assert cli.main(["demo", "--device", "cpu", "--epochs", "50", "--save", str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing trained
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpubp demo: error: --save: the folder ")
    assert "does not exist" in lines[0] and str(tmp_path / "missing") in lines[0]
    assert not (tmp_path / "missing").exists()
    assert cli.main(["demo", "--device", "cpu", "--save", str(tmp_path)]) == 2
    assert "--save: " in capsys.readouterr().err


def test_lr_find_suggestion_used_unless_lr_given(capsys):
    base = ["demo", "--device", "cpu", "--epochs", "2", "--samples", "400", "--quiet", "--lr-find"]
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    assert "lr_find: " in out and "suggestion" in out
    line = next(s for s in out.splitlines() if s.startswith("lr: "))
    assert line.endswith("the suggestion (--lr overrides it)")
    assert cli.main([*base, "--lr", "0.005"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.005 (--lr), not the suggestion" in out


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_plot_writes_pngs(capsys, tmp_path):
    folder = tmp_path / "figs" / "run1"  # created when missing
    assert cli.main(["demo", "--device", "cpu", "--epochs", "2", "--samples", "400", "--quiet", "--lr-find",
                     "--plot", str(folder)]) == 0
    out = capsys.readouterr().out
    written = sorted(p.name for p in folder.iterdir())
    if "no gradient statistics" in out:  # a fit without gradient_stats: said in one line
        assert written == ["history.png", "lr_find.png"]
    else:
        assert written == ["gradient_flow.png", "history.png", "lr_find.png"]
    for name in written:
        assert (folder / name).read_bytes().startswith(PNG)
        assert f"wrote {folder / name}" in out


def test_plot_without_matplotlib_fails_before_training(capsys, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert cli.main(["demo", "--device", "cpu", "--plot", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "pip install 'gpubp[plot]'" in captured.err
