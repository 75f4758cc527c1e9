"""The README's marked examples run as they stand."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def example(name: str) -> str:
    text = README.read_text()
    m = re.search(rf"<!-- example: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README.md has no example {name!r}"
    return m.group(1)


def test_training_health_example_runs(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 'auto' may say it runs on the CPU
        exec(compile(example("training-health"), "README.md:training-health", "exec"), {})
    out = capsys.readouterr().out
    assert "epoch" in out and "step" in out  # the NonFiniteError's message
    assert re.search(r"^(completed|early_stopping)$", out, re.M)
    assert "'grad_norm'" in out


def test_examples_are_found():
    with pytest.raises(AssertionError, match="no example"):
        example("no-such-example")
