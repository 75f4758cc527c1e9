"""The fast tier's list (tests/conftest.py: SLOW_MODULES, SLOW_TESTS) names tests that exist, so that a
renamed module or test does not slip into `pytest -m "not slow"` unnoticed."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from pathlib import Path

import conftest
import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("module", sorted(conftest.SLOW_MODULES))
def test_every_slow_module_exists(module):
    assert (TESTS / f"{module}.py").is_file(), f"SLOW_MODULES names {module!r}, which is not in tests/"


@pytest.mark.parametrize("pattern", sorted(p for p in conftest.SLOW_TESTS if p.startswith("tests/")))
def test_every_slow_test_named_by_its_file_exists(pattern):
    path, _, name = pattern.partition("::")
    tests = re.findall(r"^def (test_\w+)", (TESTS.parent / path).read_text(), re.M)
    assert any(fnmatchcase(t, name) or fnmatchcase(f"{t}[id]", name) for t in tests), f"no test {name!r} in {path}"


def test_the_slow_marker_is_registered(pytestconfig):
    assert any(m.startswith("slow:") for m in pytestconfig.getini("markers"))
