"""The NumPy 2.5 shim for numba-cuda (gpubp.backends.numba_compat).

NumPy 2.5 removed ``np.row_stack``; numba-cuda <= 0.30.4 registers an overload for it when
its array support is first imported, so every kernel compile raised AttributeError. On an
older NumPy these tests take ``row_stack`` away first, which is what NumPy 2.5 looks like to
numba-cuda; on NumPy 2.5 (the image-twin leg of .ci/run) it is already gone. Each test runs
in its own process: the shim acts at import time, and the simulator must be off to compile.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpubp.backends import numba_compat

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    if hasattr(np, "row_stack"):  # NumPy 2.5, as numba-cuda (and scipy's array-API layer) see it
        del np.row_stack
        np.__all__ = [name for name in np.__all__ if name != "row_stack"]
    import gpubp  # installs the shim
    from gpubp.backends import numba_compat
    if SHIM_OFF:
        sys.meta_path.remove(numba_compat._FINDER)
    from numba import cuda, types

    def double(x):
        i = cuda.grid(1)
        if i < x.size:
            x[i] = 2 * x[i]

    try:
        ptx, _ = cuda.compile_ptx(double, (types.float32[::1],), cc=(9, 0))
    except AttributeError as e:
        print("ATTRIBUTE-ERROR", e)
        sys.exit(3)
    assert ".entry" in ptx
    print("COMPILED", len(ptx), "row_stack after:", hasattr(np, "row_stack"))
    """
)


def _run(shim_off: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    code = f"SHIM_OFF = {shim_off}\n" + SCRIPT
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_kernels_compile_where_numpy_has_no_row_stack():
    """With the shim (``import gpubp``), a kernel compiles, and ``np.row_stack`` stays absent after."""
    r = _run(shim_off=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "COMPILED" in r.stdout and "row_stack after: False" in r.stdout, r.stdout


def test_without_the_shim_numba_cuda_fails_on_numpy_2_5():
    """The defect the shim covers (NVIDIA/numba-cuda#907): without it the same compile raises
    AttributeError naming row_stack. Should a numba-cuda that guards the overload be installed,
    this fails on purpose: then raise the floor in pyproject.toml and drop numba_compat."""
    r = _run(shim_off=True)
    assert r.returncode == 3, (
        "the compile worked without the shim: this numba-cuda no longer needs gpubp.backends.numba_compat\n"
        + r.stdout[-2000:] + r.stderr[-2000:]
    )
    assert "row_stack" in r.stdout, r.stdout


def test_the_shim_only_acts_where_numpy_lacks_row_stack():
    assert numba_compat.needed() == (not hasattr(np, "row_stack"))
    # idempotent: installing again adds no second hook
    numba_compat.install()
    numba_compat.install()
    assert sys.meta_path.count(numba_compat._FINDER) <= 1
    # the hook leaves every other module alone
    assert numba_compat._FINDER.find_spec("numba.cuda.np.npyimpl") is None
    assert numba_compat._FINDER.find_spec("json") is None


# --- the numba-cuda floor ----------------------------------------------------------------------


def _installed(monkeypatch, version):
    def fake(name):
        assert name == "numba-cuda"
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(importlib.metadata, "version", fake)


@pytest.mark.parametrize("version", ["0.24.0", "0.30.4", "0.30.4.post1", "1.0rc1"])
def test_numba_cuda_at_or_above_the_floor_is_accepted(monkeypatch, version):
    _installed(monkeypatch, version)
    assert numba_compat.check_numba_cuda() == version


@pytest.mark.parametrize("version", ["0.23.9", "0.11.0", "0.9"])
def test_an_older_numba_cuda_is_refused_naming_the_fix(monkeypatch, version):
    _installed(monkeypatch, version)
    with pytest.raises(ImportError, match=rf"numba-cuda {re.escape(version)} is older than 0\.24.*pip install -U "):
        numba_compat.check_numba_cuda()


def test_a_missing_numba_cuda_is_refused_naming_the_fix(monkeypatch):
    _installed(monkeypatch, None)
    with pytest.raises(ImportError, match="numba-cuda package >= 0.24.*pip install"):
        numba_compat.check_numba_cuda()


def test_the_floor_matches_pyproject():
    text = (REPO / "pyproject.toml").read_text()
    floor = ".".join(map(str, numba_compat.NUMBA_CUDA_FLOOR))
    pins = re.findall(r'"numba-cuda(?:\[cu1\d\])?>=([\d.]+)"', text)
    assert pins and set(pins) == {floor}, pins
