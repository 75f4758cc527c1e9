"""The package talks to a model through its public surface: no module but gpubp/model.py reads
or writes a private member of a Sequential.

Two checks over the sources of gpubp/: (1) text: ``model._x`` anywhere; (2) syntax: any
private name Sequential defines (its ``_methods`` and ``self._attributes``) taken from an
object other than ``self``/``cls`` (a model held under another name: ``target._backend``,
``self.model._forward``). Layers and optimizers keep their own private members of those names on
``self``, which is theirs to use.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np

import gpubp as gp

PACKAGE = Path(gp.__file__).resolve().parent
MODEL = PACKAGE / "model.py"

# Allowed (path relative to gpubp/, private name): none today. Each entry needs a reason.
ALLOWED: dict[tuple[str, str], str] = {}


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != MODEL)


def _sequential_private_names() -> set[str]:
    """The private (single underscore) names Sequential defines: methods and self attributes."""
    tree = ast.parse(MODEL.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Sequential")
    names = set()
    for node in ast.walk(cls):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_sequential_has_private_members_to_guard():
    names = _sequential_private_names()
    assert {"_backend", "_checked", "_out_shape"} <= names  # the syntax check sees them


def test_no_module_reads_model_private_members_by_name():
    pattern = re.compile(r"\bmodel\.(_[A-Za-z]\w*)")
    found = []
    for path in _sources():
        rel = path.relative_to(PACKAGE).as_posix()
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if any((rel, m.group(1)) not in ALLOWED for m in pattern.finditer(line)):
                found.append(f"gpubp/{rel}:{lineno}: {line.strip()}")
    assert not found, "use the model's public surface (see Sequential.forward_batch ...):\n" + "\n".join(found)


def test_no_module_uses_sequential_private_members():
    private = _sequential_private_names()
    found = []
    for path in _sources():
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not (isinstance(node, ast.Attribute) and node.attr in private):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue  # an object's own member (layers and optimizers have their own _backend)
            if (rel, node.attr) in ALLOWED:
                continue
            found.append(f"gpubp/{rel}:{node.lineno}: .{node.attr} on {ast.unparse(node.value)}")
    assert not found, "private members of Sequential used outside gpubp/model.py:\n" + "\n".join(found)


def test_allow_list_entries_are_still_needed():
    for (rel, name), reason in ALLOWED.items():
        assert reason, f"{rel}: {name} is allowed without a reason"
        assert f".{name}" in (PACKAGE / rel).read_text(encoding="utf-8"), f"{rel} no longer uses {name}: drop it"


def test_public_surface_runs_a_step_as_fit_does():
    """prepare_data / rows / forward_batch / backward_batch / dropout_step give the same gradients as
    the validating forward / backward pair."""
    model = gp.Sequential(gp.Dense(3, 5, "tanh"), gp.Dropout(0.5), gp.Dense(5, 2), dtype="float64", seed=1)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    loss = gp.losses.get("mse")
    xd, yd = model.prepare_data(x, y, loss)
    model.dropout_step = 3
    outputs: list = []
    seen: list[int] = []
    out = model.forward_batch(model.rows(xd, slice(0, 4)), training=True, dropout=True, outputs=outputs)
    assert out.shape == (4, 2) and len(outputs) == len(model.layers)
    _, dout = loss.compute(out, model.rows(yd, slice(0, 4)), model.arena.backend)
    model.backward_batch(dout, after_layer=seen.append)
    assert seen == [2, 1, 0]
    grad = np.array(model.arena.backend.to_numpy(model.arena.grad), copy=True)

    model.arena.grad[...] = 0
    out2 = model.forward(x[:4])  # train() mode: dropout on, the masks of the same dropout_step
    np.testing.assert_array_equal(out2, out)
    model.backward(dout)
    np.testing.assert_array_equal(model.arena.grad, grad)
    assert model.epoch_progress is None and model.progress() is None
    np.testing.assert_array_equal(model.prepare_input(x), x)
