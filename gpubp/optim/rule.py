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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Rule", "Hyper", "MAX_STATE", "l2", "lerp_", "lerp_factors", "wd_mode"]

#: The most state buffers one rule keeps (the generic kernels take this many).
MAX_STATE = 3


class Hyper(NamedTuple):
    """Packed hyper-parameters of one step: ``flags`` (ints, compile-time constants of a compiled
    update) and ``scalars`` (numbers in the data dtype)."""

    flags: tuple[int, ...]
    scalars: tuple[Any, ...]


@dataclass(frozen=True)
class Rule:
    """One optimizer's update maths (see the module docstring)."""

    name: str
    state: tuple[str, ...]
    pack: Callable[[Mapping[str, Any], int, Any], Hyper]
    uses: Callable[[tuple[int, ...]], tuple[bool, ...]]
    spec: Callable[..., None]
    scalar: Callable[[Any], Callable]
    #: hyper-parameter sets that cover every branch (tests, PTX checks); keys as ``pack`` reads them
    examples: tuple[dict[str, Any], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if len(self.state) > MAX_STATE:
            raise ValueError(f"state: at most {MAX_STATE} buffers, got {self.state}")

    def __repr__(self) -> str:
        return f"Rule({self.name!r})"

    def live(self, state: tuple, hp: Hyper) -> tuple[bool, ...]:
        """Which state buffers the update writes (``uses``), after checking ``state``: one entry per
        buffer of the rule, an array wherever one is used. ValueError naming a missing buffer."""
        if len(state) != len(self.state):
            raise ValueError(f"state: expected {len(self.state)} buffers {self.state}, got {len(state)}")
        used = tuple(bool(u) for u in self.uses(hp.flags))
        for name, a, u in zip(self.state, state, used, strict=True):
            if u and a is None:
                raise ValueError(f"{name}: required by this {self.name} update")
        return used

    def slots(self, state: tuple, hp: Hyper, filler: Any) -> tuple[tuple, tuple[bool, ...]]:
        """The :data:`MAX_STATE` arrays a generic kernel takes (``filler``, never written, for the
        absent ones) and which of them it writes back."""
        live = self.live(state, hp)
        arrays = tuple(a if u else filler for a, u in zip(state, live, strict=True))
        pad = MAX_STATE - len(arrays)
        return arrays + (filler,) * pad, live + (False,) * pad


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
