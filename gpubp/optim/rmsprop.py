"""RMSprop: the optimizer, its NumPy spec, its scalar body and its hyper-parameter packing (one row)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from gpubp._validate import real
from gpubp.optim.base import Optimizer, flag_arg
from gpubp.optim.rule import Hyper, Rule, l2, lerp_, lerp_factors
from gpubp.parameter import Parameter

__all__ = ["RMSprop"]


def pack(hp: dict[str, Any], step: int, dtype: Any) -> Hyper:
    t = np.dtype(dtype).type
    w, one_minus_w, high = lerp_factors(dtype, 1.0 - hp["alpha"])
    wd, momentum = hp["weight_decay"], hp["momentum"]
    flags = (int(wd != 0), int(bool(hp["centered"])), high, int(momentum > 0))
    return Hyper(flags, (t(hp["lr"]), t(hp["alpha"]), w, one_minus_w, t(hp["eps"]), t(wd), t(momentum)))


def uses(flags: tuple[int, ...]) -> tuple[bool, ...]:
    return (True, bool(flags[1]), bool(flags[3]))  # square_avg, grad_avg (centred), momentum_buffer


def spec(p: np.ndarray, g: np.ndarray, state: tuple, hp: Hyper) -> None:
    """g = g + wd p; v = alpha v + (1 - alpha) g g; centred: a = lerp(a, g, 1 - alpha), avg = sqrt(v - a a) + eps,
    else avg = sqrt(v) + eps; momentum: b = momentum b + g / avg, p -= lr b; else p -= (lr g) / avg."""
    square_avg, grad_avg, momentum_buf = state
    has_wd, centered, high, use_momentum = hp.flags
    lr, alpha, w, one_minus_w, eps, wd, momentum = hp.scalars
    d = l2(p, g, wd) if has_wd else g
    square_avg *= alpha
    t = np.multiply(d, w)
    t *= d
    square_avg += t
    if centered:
        lerp_(grad_avg, d, w, one_minus_w, high)
        avg = np.multiply(grad_avg, grad_avg)
        np.subtract(square_avg, avg, out=avg)
        np.sqrt(avg, out=avg)
    else:
        avg = np.sqrt(square_avg)
    avg += eps
    if use_momentum:
        momentum_buf *= momentum
        np.divide(d, avg, out=t)
        momentum_buf += t
        np.multiply(momentum_buf, lr, out=t)
    else:
        np.multiply(d, lr, out=t)
        t /= avg
    p -= t


def scalar(ops: Any) -> Any:
    mul, l2s, lerp = ops.mul, ops.l2, ops.lerp

    def rmsprop_step(p, g, v, a, b, hp, flags):
        """(p, square_avg, grad_avg, momentum_buffer) after one RMSprop step."""
        has_wd, centered, high, use_momentum = flags
        lr, alpha, w, one_minus_w, eps, wd, momentum = hp
        d = g
        if has_wd:
            d = l2s(d, p, wd)
        v = mul(v, alpha) + mul(mul(d, w), d)
        if centered:
            a = lerp(a, d, w, one_minus_w, high)
            avg = math.sqrt(v - mul(a, a))
        else:
            avg = math.sqrt(v)
        avg = avg + eps
        if use_momentum:
            b = mul(b, momentum) + d / avg
            t = mul(b, lr)
        else:
            t = mul(d, lr) / avg
        return p - t, v, a, b

    return rmsprop_step


RULE = Rule("rmsprop", ("square_avg", "grad_avg", "momentum_buffer"), pack, uses, spec, scalar, examples=(
    dict(lr=1e-3, alpha=0.99, eps=1e-8, weight_decay=1e-3, momentum=0.5, centered=True),
    dict(lr=1e-3, alpha=0.9, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False),
    dict(lr=1e-3, alpha=0.3, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=True),
))


class RMSprop(Optimizer):
    """RMSprop, optionally centred and with momentum.

    For each parameter p with gradient g::

        g = g + weight_decay * p
        v = alpha * v + (1 - alpha) * g * g
        centred:   a = alpha * a + (1 - alpha) * g;   avg = sqrt(v - a * a) + eps
        otherwise: avg = sqrt(v) + eps
        momentum > 0:  b = momentum * b + g / avg;   p = p - lr * b
        otherwise:     p = p - lr * g / avg

    State: ``square_avg`` (v), ``grad_avg`` (a, centred), ``momentum_buffer`` (b, momentum > 0).
    """

    _hparam_names = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")
    rule = RULE
    key = "rmsprop"
    torch_name = "RMSprop"

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
    ) -> None:
        super().__init__(
            params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered
        )

    def _check(self, hp: dict[str, Any]) -> dict[str, Any]:
        out = super()._check(hp)
        for k in ("alpha", "eps", "weight_decay", "momentum"):
            out[k] = real(hp[k], k, min=0.0)
        out["centered"] = flag_arg(hp["centered"], "centered")
        return out

    def _buffers(self, hp: dict[str, Any]) -> dict[str, float]:
        names = ["square_avg"] + (["grad_avg"] if hp["centered"] else [])
        names += ["momentum_buffer"] if hp["momentum"] > 0 else []
        return dict.fromkeys(names, 0.0)
