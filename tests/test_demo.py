"""gpubp demo's --dense-impl: the reference (the NumPy spec) trains the same recipe with its own rounding."""

from __future__ import annotations

import re

from gpubp import cli


def final_loss(capsys, *extra: str) -> str:
    assert cli.main(["demo", "--device", "cpu", "--epochs", "2", "--samples", "400", "--quiet", *extra]) == 0
    out = capsys.readouterr().out
    m = re.search(r"^done in .*: loss [0-9.]+ -> ([0-9.]+), validation accuracy", out, re.M)
    assert m, out
    return m.group(1)


def test_dense_impl_reference_runs_the_spec(capsys, monkeypatch):
    import gpubp as gp

    made = []
    real = gp.Sequential.__init__

    def spy(self, *layers, **kw):
        made.append(kw.get("dense_impl"))
        real(self, *layers, **kw)

    monkeypatch.setattr(gp.Sequential, "__init__", spy)
    final_loss(capsys, "--dense-impl", "reference")
    assert made == ["reference"]
    final_loss(capsys)
    assert made == ["reference", "auto"]


def test_dense_impl_is_checked(capsys):
    assert cli.main(["demo", "--dense-impl", "nope"]) == 2
    assert "--dense-impl" in capsys.readouterr().err
