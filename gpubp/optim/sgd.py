"""SGD: the optimizer, its NumPy spec, its scalar body and its hyper-parameter packing (one row)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from gpubp._validate import real
from gpubp.optim.base import Optimizer, flag_arg
from gpubp.optim.rule import Hyper, Rule, l2
from gpubp.parameter import Parameter

__all__ = ["SGD"]


def pack(hp: dict[str, Any], step: int, dtype: Any) -> Hyper:
    t = np.dtype(dtype).type
    momentum, dampening, wd = hp["momentum"], hp["dampening"], hp["weight_decay"]
    flags = (int(wd != 0), int(momentum != 0), int(step == 1), int(dampening != 0), int(bool(hp["nesterov"])))
    return Hyper(flags, (t(hp["lr"]), t(momentum), t(1.0 - dampening), t(wd)))


def uses(flags: tuple[int, ...]) -> tuple[bool, ...]:
    return (bool(flags[1]),)  # the momentum buffer, when momentum != 0


def spec(p: np.ndarray, g: np.ndarray, state: tuple, hp: Hyper) -> None:
    """d = g + wd p; buf = d (first step) or momentum buf + (1 - dampening) d; d = d + momentum buf
    (Nesterov) or buf; p -= lr d."""
    (buf,) = state
    has_wd, use_momentum, first, damped, nesterov = hp.flags
    lr, momentum, one_minus_dampening, wd = hp.scalars
    d = l2(p, g, wd) if has_wd else g
    if use_momentum:
        if first:
            np.copyto(buf, d)
        else:
            buf *= momentum
            if damped:
                buf += np.multiply(d, one_minus_dampening)
            else:
                buf += d
        if nesterov:
            nd = np.multiply(buf, momentum)
            nd += d
            d = nd
        else:
            d = buf
    p -= np.multiply(d, lr)


def scalar(ops: Any) -> Any:
    mul, l2s = ops.mul, ops.l2

    def sgd_step(p, g, b, s1, s2, hp, flags):
        """(p, momentum buffer, s1, s2) after one SGD step; b is read only with momentum after the first step."""
        has_wd, use_momentum, first, damped, nesterov = flags
        lr, momentum, one_minus_dampening, wd = hp
        d = g
        if has_wd:
            d = l2s(d, p, wd)
        if use_momentum:
            if first:
                b = d
            else:
                b = mul(b, momentum)
                if damped:
                    b = b + mul(d, one_minus_dampening)
                else:
                    b = b + d
            if nesterov:
                d = mul(b, momentum) + d
            else:
                d = b
        return p - mul(d, lr), b, s1, s2

    return sgd_step


RULE = Rule("sgd", ("momentum_buffer",), pack, uses, spec, scalar, examples=(
    dict(lr=0.05, momentum=0.9, dampening=0.1, nesterov=False, weight_decay=1e-3),
    dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0),
    dict(lr=0.05, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
))


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and L2 weight decay.

    For each parameter p with gradient g, at step t (counting from 1)::

        d = g + weight_decay * p
        b = d                                          if t == 1
        b = momentum * b + (1 - dampening) * d         otherwise   (when momentum != 0)
        d = d + momentum * b   if nesterov   else   d = b          (when momentum != 0)
        p = p - lr * d

    ``nesterov`` needs ``momentum > 0`` and ``dampening == 0``.
    State: ``momentum_buffer`` (when momentum != 0).
    """

    _hparam_names = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
    rule = RULE
    key = "sgd"
    torch_name = "SGD"

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        super().__init__(
            params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov
        )

    def _check(self, hp: dict[str, Any]) -> dict[str, Any]:
        out = super()._check(hp)
        for k in ("momentum", "dampening", "weight_decay"):
            out[k] = real(hp[k], k, min=0.0)
        out["nesterov"] = flag_arg(hp["nesterov"], "nesterov")
        if out["nesterov"] and (out["momentum"] <= 0 or out["dampening"] != 0):
            raise ValueError(
                f"nesterov: needs momentum > 0 and dampening == 0, got momentum={hp['momentum']!r}, "
                f"dampening={hp['dampening']!r}"
            )
        return out

    def _buffers(self, hp: dict[str, Any]) -> dict[str, float]:
        return {"momentum_buffer": 0.0} if hp["momentum"] != 0 else {}
