"""Adamax: the optimizer, its NumPy spec, its scalar body and its hyper-parameter packing (one row)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from gpubp._validate import real
from gpubp.optim.base import Optimizer, beta_arg
from gpubp.optim.rule import Hyper, Rule, l2, lerp_, lerp_factors
from gpubp.parameter import Parameter

__all__ = ["Adamax"]


def pack(hp: dict[str, Any], step: int, dtype: Any) -> Hyper:
    t = np.dtype(dtype).type
    lr, (beta1, beta2), wd = hp["lr"], hp["betas"], hp["weight_decay"]
    w1, one_minus_w1, high = lerp_factors(dtype, 1.0 - beta1)
    clr = lr / (1.0 - beta1**step)
    return Hyper((int(wd != 0), high), (t(wd), w1, one_minus_w1, t(beta2), t(hp["eps"]), t(clr)))


def uses(flags: tuple[int, ...]) -> tuple[bool, ...]:
    return (True, True)  # exp_avg, exp_inf


def spec(p: np.ndarray, g: np.ndarray, state: tuple, hp: Hyper) -> None:
    """g = g + wd p; m = lerp(m, g, 1 - beta1); u = max(beta2 u, |g| + eps); p -= (clr m) / u,
    clr = lr / (1 - beta1**step) (torch.optim.Adamax, operation by operation)."""
    exp_avg, exp_inf = state
    has_wd, high = hp.flags
    wd, w1, one_minus_w1, beta2, eps, clr = hp.scalars
    d = l2(p, g, wd) if has_wd else g
    lerp_(exp_avg, d, w1, one_minus_w1, high)
    exp_inf *= beta2
    t = np.abs(d)
    t += eps
    np.maximum(exp_inf, t, out=exp_inf)
    np.multiply(exp_avg, clr, out=t)
    t /= exp_inf
    p -= t


def scalar(ops: Any) -> Any:
    mul, l2s, lerp = ops.mul, ops.l2, ops.lerp

    def adamax_step(p, g, m, u, s2, hp, flags):
        """(p, exp_avg, exp_inf, s2) after one Adamax step."""
        has_wd, high = flags
        wd, w1, one_minus_w1, beta2, eps, clr = hp
        d = g
        if has_wd:
            d = l2s(d, p, wd)
        m = lerp(m, d, w1, one_minus_w1, high)
        u = mul(u, beta2)
        a = abs(d) + eps
        if a > u or a != a:  # NaN-propagating maximum, as np.maximum
            u = a
        return p - mul(m, clr) / u, m, u, s2

    return adamax_step


RULE = Rule("adamax", ("exp_avg", "exp_inf"), pack, uses, spec, scalar, examples=(
    dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
    dict(lr=2e-3, betas=(0.3, 0.9), eps=1e-8, weight_decay=0.0),
))


class Adamax(Optimizer):
    """Adamax: Adam with the infinity norm in place of the second moment.

    For each parameter p with gradient g, at step t (counting from 1)::

        g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        u = max(beta2 * u, |g| + eps)
        p = p - (lr / (1 - beta1**t)) * m / u

    State: ``exp_avg`` (m), ``exp_inf`` (u).
    """

    _hparam_names = ("lr", "betas", "eps", "weight_decay")
    rule = RULE
    key = "adamax"
    torch_name = "Adamax"

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _check(self, hp: dict[str, Any]) -> dict[str, Any]:
        out = super()._check(hp)
        betas = hp["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        out["betas"] = (beta_arg(betas[0], "betas[0]"), beta_arg(betas[1], "betas[1]"))
        out["eps"] = real(hp["eps"], "eps", min=0.0)
        out["weight_decay"] = real(hp["weight_decay"], "weight_decay", min=0.0)
        return out

    def _buffers(self, hp: dict[str, Any]) -> dict[str, float]:
        return {"exp_avg": 0.0, "exp_inf": 0.0}
