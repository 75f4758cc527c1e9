"""What every optimizer row shares: the :class:`Rule` bundle, the packed hyper-parameters, and the
helpers written once for all of them (L2 weight decay, the lerp and its factors, the weight-decay mode).

An optimizer's update maths is one :class:`Rule`, defined in the optimizer's own file
(``sgd.py``, ``adam.py``, ...) beside the :class:`~gpubp.optim.base.Optimizer` subclass that uses it:

* ``pack(hp, step, dtype) -> Hyper``: the host side, once per step: the hyper-parameters
  rounded to the data dtype (``scalars``, a tuple, as NumPy rounds a Python float operand;
  scalar factors such as bias corrections computed first as Python floats) and the
  specialisation ``flags`` (small integers: has weight decay, momentum, Nesterov, AMSGrad,
  lerp_high, ...), which compiled backends fold in as compile-time constants.
* ``uses(flags) -> tuple[bool, ...]``: which of the rule's state buffers the update reads and
  writes under those flags (the others may be None).
* ``spec(p, g, state, hp)``: the NumPy reference (the spec), in place, in the arrays' dtype.
* ``scalar(ops) -> step``: the per-element body every compiled backend runs:
  ``step(p, g, s0, s1, s2, hp, flags) -> (p, s0, s1, s2)``, plain Python that ``numba.njit`` and
  ``numba.cuda.jit(device=True)`` compile too. ``ops`` is a build of
  :mod:`gpubp.backends.scalar_math` (``ops.mul`` the FMA-free product, ``ops.l2``, ``ops.lerp``,
  ``ops.cst``); every product of the optimizer maths is ``ops.mul``. States past the rule's
  own (up to :data:`MAX_STATE`) and absent ones are returned as they came.

A backend runs a rule with its one primitive ``Backend.update(rule, p, g, state, hp, guard)``.
The order of the arithmetic follows torch.optim's CPU code where it changes the rounding
(``(lr * m) / denom``, exponential averages as a linear interpolation).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpubp.backends.rows import MAX_STATE, Hyper, Rule

__all__ = ["Rule", "Hyper", "MAX_STATE", "l2", "lerp_", "lerp_factors", "wd_mode"]

# --- host side, written once -------------------------------------------------------------------


def lerp_factors(dtype: Any, weight: float) -> tuple[Any, Any, int]:
    """(w, 1 - w, high) of :func:`lerp_`: w rounded to ``dtype``, 1 - w computed in ``dtype``,
    high = |w| >= 0.5 (the branch taken)."""
    t = np.dtype(dtype).type
    w = t(weight)
    return w, t(1) - w, int(not abs(w) < 0.5)


def wd_mode(weight_decay: float, decoupled: bool = False) -> int:
    """0: no weight decay; 1: L2 (``g + wd * p``); 2: decoupled (``p * (1 - lr * wd)``)."""
    return 0 if weight_decay == 0 else (2 if decoupled else 1)


# --- NumPy spec helpers ------------------------------------------------------------------------


def l2(p: np.ndarray, g: np.ndarray, weight_decay: Any) -> np.ndarray:
    """``g + weight_decay * p`` as a new array."""
    d = np.multiply(p, weight_decay)
    d += g
    return d


def lerp_(a: np.ndarray, b: np.ndarray, w: Any, one_minus_w: Any, high: int) -> None:
    """``a <- a + w * (b - a)`` in place; for |w| >= 0.5 (``high``) the same value is formed as
    ``b - (b - a) * (1 - w)``, which is more accurate there (torch's lerp)."""
    d = np.subtract(b, a)
    if high:
        d *= one_minus_w
        np.subtract(b, d, out=a)
    else:
        d *= w
        a += d
