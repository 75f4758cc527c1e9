"""Gradient health: per-layer statistics of one training step, and the warnings they raise.

With ``fit(..., gradient_stats=True)`` the last step of every epoch records, for each
parameter (names as in ``model.parameters()``):

    grad_norm      ||g||_2 of the step's gradient
    weight_norm    ||p||_2 after the step
    update_ratio   ||p_after - p_before||_2 / ||p_before||_2   (healthy: ~1e-3)
    dead           (weights of relu / leaky_relu layers) fraction of units whose
                   pre-activation was <= 0 on every sample of the batch
    saturated      (weights of sigmoid / tanh layers) fraction of the batch's outputs
                   in the flat tails: sigmoid a < 0.01 or a > 0.99, tanh |a| > 0.99

Norms are fixed-order float64 reductions by the backend (on a GPU: on the device,
one per parameter); everything is read once per epoch.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from gpubp.layers import Dense

VANISH_RATIO = 1e-6  # first layer's gradient norm below this fraction of the last layer's
VANISH_ABS = 1e-8  # ... or below this, absolutely
EXPLODE = 1e3  # a gradient norm above this, and growing from the last epoch


class NonFiniteError(ValueError):
    """A NaN or Inf appeared in a layer's output or gradient, or in the loss (``check_finite=True``,
    or fit's non-finite guard)."""


class GradientWarning(UserWarning):
    """Gradients vanish or explode (issued once per fit, with ``gradient_stats=True``)."""


class StepStats:
    """Collects the statistics of one step, on the device, and reads them once."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.backend = model.arena.backend
        self.params = model.parameters()
        n = len(self.params)
        self.sums = self.backend.asarray(np.zeros(3 * n), np.float64)  # grad, weight, update sums of squares
        self.before: Any = None
        self.before_sq = self.backend.asarray(np.zeros(n), np.float64)
        self.extra: dict[str, tuple[str, Any]] = {}

    def after_backward(self, outputs: list[Any]) -> None:
        """Gradient norms; the dead / saturated fractions from each Dense layer's output."""
        b = self.backend
        for i, p in enumerate(self.params):
            b.sum_of_squares_into(p.grad.reshape(-1), self.sums[i : i + 1])
            b.sum_of_squares_into(p.data.reshape(-1), self.before_sq[i : i + 1])
        self.before = self.model.arena.data.copy()
        for layer, a in zip(self.model.layers, outputs, strict=True):
            if not isinstance(layer, Dense):
                continue
            name = layer.activation.name
            key = layer.weight.name
            if name in ("relu", "leaky_relu"):
                self.extra[key] = ("dead", (a <= 0).all(axis=0).mean())
            elif name == "sigmoid":
                self.extra[key] = ("saturated", ((a < 0.01) | (a > 0.99)).mean())
            elif name == "tanh":
                self.extra[key] = ("saturated", (abs(a) > 0.99).mean())

    def after_step(self) -> None:
        b = self.backend
        n = len(self.params)
        diff = self.model.arena.data - self.before
        for i, p in enumerate(self.params):
            b.sum_of_squares_into(p.data.reshape(-1), self.sums[n + i : n + i + 1])
            lo = p.offset
            b.sum_of_squares_into(diff[lo : lo + p.size], self.sums[2 * n + i : 2 * n + i + 1])

    def read(self) -> list[dict[str, Any]]:
        """One dict per parameter (the one host read of the epoch)."""
        b = self.backend
        sums, before = b.to_numpy(self.sums), b.to_numpy(self.before_sq)
        n = len(self.params)
        records = []
        for i, p in enumerate(self.params):
            w0 = math.sqrt(before[i])
            rec: dict[str, Any] = {
                "name": p.name,
                "grad_norm": math.sqrt(sums[i]),
                "weight_norm": math.sqrt(sums[n + i]),
                "update_ratio": math.sqrt(sums[2 * n + i]) / w0 if w0 > 0 else math.inf,
            }
            if p.name in self.extra:
                kind, value = self.extra[p.name]
                rec[kind] = float(value)
            records.append(rec)
        return records


def check_health(epochs: list[list[dict[str, Any]]]) -> str | None:
    """A warning text when the last epoch's gradients vanish or explode, else None."""
    last = [r for r in epochs[-1] if r["name"].endswith(".weight")]
    if not last:
        return None
    first, top = last[0], last[-1]
    fixes = ("remedies: He initialisation with ReLU-family activations (relu, leaky_relu, gelu, silu) "
             "instead of sigmoid/tanh in deep stacks, fewer layers, gradient clipping (clip_grad_norm), "
             "a lower learning rate (gp.lr_find)")
    if len(last) > 1 and (first["grad_norm"] < VANISH_RATIO * top["grad_norm"] or first["grad_norm"] < VANISH_ABS):
        return (f"vanishing gradients: layer {first['name']} gradient norm {first['grad_norm']:.3g}, "
                f"layer {top['name']} {top['grad_norm']:.3g} (ratio {first['grad_norm'] / max(top['grad_norm'], 1e-300):.3g}); "
                + fixes)
    if len(epochs) > 1:
        prev = {r["name"]: r["grad_norm"] for r in epochs[-2]}
        big = [r for r in epochs[-1] if r["grad_norm"] > EXPLODE and r["grad_norm"] > prev.get(r["name"], math.inf)]
        if big:
            shown = ", ".join(f"{r['name']} {prev[r['name']]:.3g} -> {r['grad_norm']:.3g}" for r in big)
            return f"exploding gradients: {shown}; " + fixes
    return None


def warn_once(epochs: list[list[dict[str, Any]]], warned: list[bool]) -> None:
    if warned[0]:
        return
    text = check_health(epochs)
    if text is not None:
        warned[0] = True
        warnings.warn(text, GradientWarning, stacklevel=4)
