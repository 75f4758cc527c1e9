"""Adagrad: the optimizer, its NumPy spec, its scalar body and its hyper-parameter packing (one row)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from gpubp._validate import real
from gpubp.optim.base import Optimizer
from gpubp.optim.rule import Hyper, Rule, l2
from gpubp.parameter import Parameter

__all__ = ["Adagrad"]


def pack(hp: dict[str, Any], step: int, dtype: Any) -> Hyper:
    t = np.dtype(dtype).type
    clr = hp["lr"] / (1.0 + (step - 1) * hp["lr_decay"])
    return Hyper((int(hp["weight_decay"] != 0),), (t(clr), t(hp["eps"]), t(hp["weight_decay"])))


def uses(flags: tuple[int, ...]) -> tuple[bool, ...]:
    return (True,)  # sum


def spec(p: np.ndarray, g: np.ndarray, state: tuple, hp: Hyper) -> None:
    """g = g + wd p; s += g g; p -= (clr g) / (sqrt(s) + eps), clr = lr / (1 + (step - 1) lr_decay)."""
    (state_sum,) = state
    (has_wd,) = hp.flags
    clr, eps, wd = hp.scalars
    d = l2(p, g, wd) if has_wd else g
    t = np.multiply(d, d)
    state_sum += t
    std = np.sqrt(state_sum)
    std += eps
    np.multiply(d, clr, out=t)
    t /= std
    p -= t


def scalar(ops: Any) -> Any:
    mul, l2s = ops.mul, ops.l2

    def adagrad_step(p, g, s, s1, s2, hp, flags):
        """(p, sum, s1, s2) after one Adagrad step with the decayed rate clr."""
        (has_wd,) = flags
        clr, eps, wd = hp
        d = g
        if has_wd:
            d = l2s(d, p, wd)
        s = s + mul(d, d)
        std = math.sqrt(s) + eps
        return p - mul(d, clr) / std, s, s1, s2

    return adagrad_step


RULE = Rule("adagrad", ("sum",), pack, uses, spec, scalar, examples=(
    dict(lr=1e-2, lr_decay=1e-2, weight_decay=1e-3, eps=1e-10, initial_accumulator_value=0.0),
    dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10, initial_accumulator_value=0.1),
))


class Adagrad(Optimizer):
    """Adagrad with learning-rate decay.

    For each parameter p with gradient g, at step t (counting from 1)::

        g = g + weight_decay * p
        clr = lr / (1 + (t - 1) * lr_decay)
        s = s + g * g                      (s starts at initial_accumulator_value)
        p = p - clr * g / (sqrt(s) + eps)

    State: ``sum`` (s).
    """

    _hparam_names = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")
    rule = RULE
    key = "adagrad"
    torch_name = "Adagrad"

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
        )

    def _check(self, hp: dict[str, Any]) -> dict[str, Any]:
        out = super()._check(hp)
        for k in ("lr_decay", "weight_decay", "initial_accumulator_value", "eps"):
            out[k] = real(hp[k], k, min=0.0)
        return out

    def _buffers(self, hp: dict[str, Any]) -> dict[str, float]:
        return {"sum": hp["initial_accumulator_value"]}
