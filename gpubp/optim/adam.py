"""Adam and AdamW: the optimizers, their NumPy spec, scalar body and hyper-parameter packing (one row)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from gpubp._validate import real
from gpubp.optim.base import Optimizer, beta_arg, flag_arg
from gpubp.optim.rule import Hyper, Rule, l2, lerp_, lerp_factors, wd_mode
from gpubp.parameter import Parameter

__all__ = ["Adam", "AdamW"]


def pack(hp: dict[str, Any], step: int, dtype: Any) -> Hyper:
    t = np.dtype(dtype).type
    lr, (beta1, beta2), wd = hp["lr"], hp["betas"], hp["weight_decay"]
    w1, one_minus_w1, high = lerp_factors(dtype, 1.0 - beta1)
    flags = (wd_mode(wd, hp.get("decoupled", False)), high, int(bool(hp["amsgrad"])))
    scalars = (t(1.0 - lr * wd), t(wd), w1, one_minus_w1, t(beta2), t(1.0 - beta2),
               t(lr / (1.0 - beta1**step)), t(math.sqrt(1.0 - beta2**step)), t(hp["eps"]))
    return Hyper(flags, scalars)


def uses(flags: tuple[int, ...]) -> tuple[bool, ...]:
    return (True, True, bool(flags[2]))  # exp_avg, exp_avg_sq, max_exp_avg_sq (AMSGrad)


def spec(p: np.ndarray, g: np.ndarray, state: tuple, hp: Hyper) -> None:
    """AdamW: p *= 1 - lr wd; Adam: g = g + wd p. m = lerp(m, g, 1 - beta1); v = beta2 v + (1 - beta2) g g;
    vmax = max(vmax, v) (AMSGrad, then in v's place); p -= (step_size m) / (sqrt(v) / sqrt(bc2) + eps)."""
    exp_avg, exp_avg_sq, max_exp_avg_sq = state
    mode, high, amsgrad = hp.flags
    decay, wd, w1, one_minus_w1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps = hp.scalars
    d = g
    if mode == 2:
        p *= decay
    elif mode == 1:
        d = l2(p, g, wd)
    lerp_(exp_avg, d, w1, one_minus_w1, high)
    exp_avg_sq *= beta2
    t = np.multiply(d, one_minus_beta2)
    t *= d
    exp_avg_sq += t
    if amsgrad:
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        denom = np.sqrt(max_exp_avg_sq)
    else:
        denom = np.sqrt(exp_avg_sq)
    denom /= bc2_sqrt
    denom += eps
    np.multiply(exp_avg, step_size, out=t)
    t /= denom
    p -= t


def scalar(ops: Any) -> Any:
    mul, l2s, lerp = ops.mul, ops.l2, ops.lerp

    def adam_step(p, g, m, v, vmax, hp, flags):
        """(p, exp_avg, exp_avg_sq, max_exp_avg_sq) after one Adam (mode 1) or AdamW (mode 2) step."""
        mode, high, amsgrad = flags
        decay, wd, w1, one_minus_w1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps = hp
        d = g
        if mode == 2:  # AdamW: p *= 1 - lr * wd
            p = mul(p, decay)
        elif mode == 1:  # Adam: d = g + wd * p
            d = l2s(d, p, wd)
        m = lerp(m, d, w1, one_minus_w1, high)
        v = mul(v, beta2) + mul(mul(d, one_minus_beta2), d)
        if amsgrad:
            if v > vmax or v != v:  # NaN-propagating maximum, as np.maximum
                vmax = v
            denom = math.sqrt(vmax)
        else:
            denom = math.sqrt(v)
        denom = denom / bc2_sqrt + eps
        return p - mul(m, step_size) / denom, m, v, vmax

    return adam_step


RULE = Rule("adam", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), pack, uses, spec, scalar, examples=(
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False),
    dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=1e-2, amsgrad=True, decoupled=True),
    dict(lr=1e-2, betas=(0.3, 0.9), eps=1e-8, weight_decay=0.0, amsgrad=False),
))


class Adam(Optimizer):
    """Adam, with L2 weight decay added to the gradient and optional AMSGrad.

    For each parameter p with gradient g, at step t (counting from 1)::

        g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        v_max = max(v_max, v);  v = v_max                        (amsgrad)
        denom = sqrt(v) / sqrt(1 - beta2**t) + eps
        p = p - (lr / (1 - beta1**t)) * m / denom

    State: ``exp_avg`` (m), ``exp_avg_sq`` (v), ``max_exp_avg_sq`` (amsgrad).
    """

    _hparam_names = ("lr", "betas", "eps", "weight_decay", "amsgrad")
    _decoupled = False
    rule = RULE
    key = "adam"
    torch_name = "Adam"

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)

    def _check(self, hp: dict[str, Any]) -> dict[str, Any]:
        out = super()._check(hp)
        betas = hp["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        out["betas"] = (beta_arg(betas[0], "betas[0]"), beta_arg(betas[1], "betas[1]"))
        out["eps"] = real(hp["eps"], "eps", min=0.0)
        out["weight_decay"] = real(hp["weight_decay"], "weight_decay", min=0.0)
        out["amsgrad"] = flag_arg(hp["amsgrad"], "amsgrad")
        return out

    def _buffers(self, hp: dict[str, Any]) -> dict[str, float]:
        names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if hp["amsgrad"] else [])
        return dict.fromkeys(names, 0.0)

    def _rule_hparams(self) -> dict[str, Any]:
        return {**super()._rule_hparams(), "decoupled": self._decoupled}


class AdamW(Adam):
    """Adam with decoupled weight decay (the decay does not pass through m and v).

    For each parameter p with gradient g, at step t (counting from 1)::

        p = p * (1 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        v_max = max(v_max, v);  v = v_max                        (amsgrad)
        denom = sqrt(v) / sqrt(1 - beta2**t) + eps
        p = p - (lr / (1 - beta1**t)) * m / denom

    State: ``exp_avg`` (m), ``exp_avg_sq`` (v), ``max_exp_avg_sq`` (amsgrad).
    """

    _decoupled = True
    key = "adamw"
    torch_name = "AdamW"

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
