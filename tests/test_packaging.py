"""Packaging: the wheel carries kernels/, importing gpubp stays light, README and CI agree."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_does_not_load_cupy_or_numba_cuda():
    code = "import sys, gpubp; print(sorted(m for m in sys.modules if m.split('.')[0] in ('cupy', 'cupyx') or m.startswith('numba.cuda')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert r.stdout.strip() == "[]"


def test_kernel_dir_is_found():
    import gpubp

    assert (gpubp.kernel_dir() / "README.md").is_file()


def test_wheel_carries_every_kernel_source(tmp_path):
    pytest.importorskip("hatchling")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = tmp_path.glob("gpubp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = [p.relative_to(ROOT / "kernels").as_posix() for p in (ROOT / "kernels").rglob("*") if p.is_file()]
    assert sources, "kernels/ is empty"
    for rel in sources:
        assert f"gpubp/_kernels/{rel}" in names
    assert "gpubp/__init__.py" in names and "gpubp/backends/numpy_ref.py" in names
    modules = [p.relative_to(ROOT).as_posix() for p in (ROOT / "gpubp").rglob("*.py") if "__pycache__" not in p.parts]
    missing = sorted(m for m in modules if m not in names)  # subpackages too (backends/numba_cuda/, ...)
    assert not missing, f"the wheel lacks {missing}"
    assert not any("__pycache__" in n for n in names)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    for extra in ("cuda13", "cuda12", "dev", "bench"):
        assert f"Provides-Extra: {extra}" in text
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "gpubp = gpubp.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    assert len(blocks) >= 2
    setup, tests = blocks[0].strip(), blocks[1].strip()
    assert "pip install" in setup and "gpubp demo" in setup
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = tests.splitlines()[-1]
    assert test_command in ci, f"{test_command!r} is not what .ci/run runs"
