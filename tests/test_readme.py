"""Every ```python block of README.md runs as written, and the figures the README states hold.

Each block runs in a fresh namespace, in a temporary folder (the examples write checkpoints),
on the CPU (the blocks use ``Sequential``'s default device, the CPU). The data-parallel
script (``# train.py``) runs as the README launches the demo, under ``mpiexec -n 2``, or
under plain ``python`` (a world of one process, which the README says runs it unchanged)
where there is no ``mpiexec``. The digits example needs scikit-learn, which is not a
dependency of gpubp: it is skipped where scikit-learn is not installed. A block the tests do
not know how to run fails ``test_every_python_block_is_run``.

Figures: the README writes what a block prints in a comment after the print (``# 0.939``).
The printed values are checked against the claims the README makes of them (accuracy at
least 0.9, the resumed run no worse, lr never below min_lr), and against the figure written,
within a tolerance: BLAS GEMMs round differently with other thread counts and CPUs, so the
last digits may differ elsewhere; on the 2-core CI machine they are the figures written.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# How each block is recognised: a line only it holds.
KINDS = {
    "api": 'ck = gp.load("run.safetensors")',
    "training-health": "model.summary()",
    "train.py": "# train.py",
    "gradcheck": "from gpubp import gradcheck",
    "digits": "load_digits()",
    "onnx-export": "gp.export.to_onnx(",
    "torch": "gp.from_torch(net)",
    "memmap": "open_memmap(",
}


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block, in order (those indented in a list too)."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 2, textwrap.dedent(m.group(2)))
            for m in re.finditer(r"^( *)```python\n(.*?)^\1```", text, re.S | re.M)]


def block(kind: str) -> str:
    found = [code for _, code in python_blocks() if KINDS[kind] in code]
    assert len(found) == 1, f"README.md: expected one python block holding {KINDS[kind]!r}, found {len(found)}"
    return found[0]


def stated(code: str, printed: str) -> str:
    """The figure the README writes in the comment after the print of ``printed``."""
    m = re.search(rf"^ *print\(.*{re.escape(printed)}.*#\s*(.+?)\s*$", code, re.M)
    assert m, f"README.md: no print of {printed!r} with its figure in a comment"
    return m.group(1)


def run(code: str, name: str, capsys) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. a GradientWarning
        exec(compile(code, f"README.md:{name}", "exec"), {})
    return capsys.readouterr().out


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text, re.M)
    assert m, f"{pattern!r} not in the output:\n{text}"
    return float(m.group(1))


def test_every_python_block_is_run():
    blocks = python_blocks()
    assert len(blocks) >= len(KINDS)
    for line, code in blocks:
        kinds = [k for k, marker in KINDS.items() if marker in code]
        assert len(kinds) == 1, f"README.md line {line}: a python block the tests do not run (or run twice): {kinds}"


def test_api_example_learns_and_the_resumed_run_improves(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = block("api")
    out = run(code, "api", capsys)
    first = number(r"^validation accuracy ([0-9.]+)$", out)
    resumed = number(r"^resumed: validation accuracy ([0-9.]+)$", out)
    assert first >= 0.9 and resumed >= 0.9, out
    assert resumed >= first, "the README says the resumed epochs do not lose accuracy"
    want_first, want_resumed = float(stated(code, "validation accuracy")), float(stated(code, "resumed:"))
    assert abs(first - want_first) <= 0.02 and abs(resumed - want_resumed) <= 0.02, (first, resumed)
    prose = README.read_text().split("validation accuracy {more", 1)[1][:1200]  # the paragraph after the block
    assert f"{want_first:.3f}" in prose and f"{want_resumed:.3f}" in prose
    assert (tmp_path / "run.safetensors").exists()


def test_training_health_example(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = block("training-health")
    out = run(code, "training-health", capsys)
    assert re.search(r"^training diverged at epoch 1, step \d+: .*layer", out, re.M), out  # the NonFiniteError
    suggestion = number(r"^lr_find: .*suggestion ([0-9.e+-]+)$", out)
    want = float(stated(code, "found)").rsplit(" ", 1)[1])
    assert want / 2 <= suggestion <= want * 2, (suggestion, want)
    m = re.search(r"^(completed|early_stopping) (\d+)$", out, re.M)
    assert m, out
    want_stop, want_epochs = stated(code, 'history["stopped"]').split(":")[0].split()
    assert m.group(1) == want_stop and abs(int(m.group(2)) - int(want_epochs)) <= 15, m.group(0)
    # ReduceLROnPlateau(min_lr=1e-4): halved on plateaus, never below the floor
    floor = float(re.search(r"ReduceLROnPlateau\(.*min_lr=([0-9.e+-]+)\)", code).group(1))
    lrs = re.search(r"^lr ([0-9.e+-]+) -> ([0-9.e+-]+)$", out, re.M)
    first, last = float(lrs.group(1)), float(lrs.group(2))
    assert first == pytest.approx(suggestion, rel=1e-2) and floor <= last < first
    assert "'grad_norm'" in out and "'dead'" in out
    accuracy = number(r"^validation accuracy ([0-9.]+)$", out)
    assert accuracy >= 0.9 and abs(accuracy - float(stated(code, "validation accuracy"))) <= 0.03, accuracy


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"  # the mpich wheel installs it next to python
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def test_data_parallel_script(tmp_path):
    (tmp_path / "train.py").write_text(block("train.py"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUBP_CPU", "NUMBA_ENABLE_CUDASIM"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    launcher = _mpiexec()
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        launcher = None
    cmd = ([launcher, "-n", "2"] if launcher else []) + [sys.executable, "train.py"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"{' '.join(cmd)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    import gpubp as gp

    ck = gp.load(tmp_path / "run.safetensors")  # written by rank 0
    assert ck.model.in_features == 2 and ck.model.out_features == 4 and ck.optimizer.step_count == 120


def test_gradcheck_example(capsys):
    out = run(block("gradcheck"), "gradcheck", capsys)
    assert out.count(": pass") >= 3 and "FAIL" not in out, out


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                    reason="scikit-learn is not installed (the digits example's data; not a dependency of gpubp)")
def test_digits_example(capsys):
    code = block("digits")
    out = run(code, "digits", capsys)
    suggestion = number(r"^lr_find: .*suggestion ([0-9.e+-]+)$", out)
    assert suggestion == pytest.approx(float(stated(code, "found)").rsplit(" ", 1)[1]), rel=0.5)
    losses = [float(v) for v in re.findall(r"^lr [0-9.e+-]+: test loss ([0-9.]+)$", out, re.M)]
    assert len(losses) == 2, out
    want = [float(v) for v in re.findall(r": ([0-9.]+)", stated(code, "test loss"))]
    assert all(abs(a - b) <= 0.03 for a, b in zip(losses, want, strict=True)), (losses, want)
    assert losses[0] <= 1.25 * losses[1], "the suggestion's test loss should not be much worse than lr 1e-3's"


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
                    reason="onnx and onnxruntime are not installed (pip install 'gpubp[onnx]')")
def test_onnx_export_example(capsys):
    run(block("onnx-export"), "onnx-export", capsys)  # asserts its own agreement with predict


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed (CI's PyTorch leg has it)")
def test_torch_interop_example(capsys):
    out = run(block("torch"), "torch", capsys)
    assert out.split() == ["True", "True"], out


def test_memmap_example(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = block("memmap")
    out = run(code, "memmap", capsys)
    accuracy = number(r"^accuracy ([0-9.]+)$", out)
    assert abs(accuracy - float(stated(code, "accuracy"))) <= 0.02, accuracy
