"""The NumPy reference backend: the spec every other backend is checked against.

Clear before fast. Every function computes in the dtype of its inputs (float32 or
float64), except loss values, which are accumulated in float64. Shapes:
x (N, in), W (in, out), b (out,), z = x @ W + b (N, out), a = f(z).

The maths are the module's functions (dense_forward / dense_backward, dropout; the
reductions live beside them in ``numpy_optim``, each optimizer's update is its rule's
NumPy spec in ``gpubp/optim/``, each loss its row's NumPy spec in ``gpubp/losses/``);
:class:`NumpyBackend` implements the backend interface (gpubp.backends.base.Backend) by
calling them.

Mixed precision (``precision``, a :class:`gpubp.precision.Precision`, or None): the rounding
points of :mod:`gpubp.precision` are defined here. R_g rounds GEMM inputs to ``precision.gemm``,
R_s stored values to ``precision.store`` (:func:`gpubp.precision.round_to`, the identity where the
kind is None); everything else is float32. None or ``fp32``: the code path without rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from gpubp._random import dropout_keep
from gpubp.activations import Activation
from gpubp.backends import numpy_optim
from gpubp.backends.base import Backend
from gpubp.precision import Precision, active, round_to

if TYPE_CHECKING:
    from gpubp.backends.rows import Hyper, LossRule, Rule

Array = np.ndarray


# --- dense layer: forward and backward as a pair -----------------------------------------


def dense_forward(x: Array, w: Array, b: Array, act: Activation, training: bool,
                  precision: Precision | None = None) -> tuple[Array, tuple]:
    """a = f(x @ W + b).

    x (N, in), w (in, out), b (out,) -> a (N, out).
    Returns ``(a, saved)``; ``saved`` is what :func:`dense_backward` needs and
    nothing more: ``(x, z)`` or ``(x, a)`` as ``act.saves`` says, or ``()`` when
    not training.

    Under a precision P (float32): z = R_g(x) @ R_g(W) (a float32 GEMM of the rounded inputs),
    a = f(z + b) in float32, returned as R_s(a); saved (R_g(x), R_s(z) or R_s(a)).
    """
    p = active(precision)
    if p is not None:
        return _dense_forward_mixed(x, w, b, act, training, p)
    z = x @ w
    z += b
    a = act.forward(z)
    if not training:
        return a, ()
    kept = {"z": z, "a": a, "": None}[act.saves]
    return a, (x, kept)


def dense_backward(
    da: Array, saved: tuple, w: Array, act: Activation, dw: Array, db: Array, need_dx: bool,
    precision: Precision | None = None,
) -> Array | None:
    """Backward of :func:`dense_forward`, given da = dL/da (N, out).

        dz = da * f'(z)      (N, out)
        dW = x^T @ dz        (in, out)   written into ``dw`` (=, not +=)
        db = sum_rows dz     (out,)      written into ``db``
        dx = dz @ W^T        (N, in)     returned when ``need_dx``, else None

    Under a precision P: dz and db as above in float32 (x, z or a the saved, rounded ones);
    dW = R_g(x)^T @ R_g(dz) (float32 accumulation, into the float32 ``dw``);
    dx = R_s(R_g(dz) @ R_g(W)^T).
    """
    p = active(precision)
    if p is not None:
        return _dense_backward_mixed(da, saved, w, act, dw, db, need_dx, p)
    x, kept = saved
    z = kept if act.saves == "z" else None
    a = kept if act.saves == "a" else None
    dz = act.backward(da, z, a)
    np.matmul(x.T, dz, out=dw)
    np.sum(dz, axis=0, out=db)
    return dz @ w.T if need_dx else None


def _dense_forward_mixed(x: Array, w: Array, b: Array, act: Activation, training: bool,
                         p: Precision) -> tuple[Array, tuple]:
    xg = round_to(np, x, p.gemm)
    z = xg @ round_to(np, w, p.gemm)  # float32 accumulation
    z += b
    a = round_to(np, act.forward(z), p.store)
    if not training:
        return a, ()
    kept = {"z": round_to(np, z, p.store), "a": a, "": None}[act.saves]
    return a, (xg, kept)


def _dense_backward_mixed(da: Array, saved: tuple, w: Array, act: Activation, dw: Array, db: Array,
                          need_dx: bool, p: Precision) -> Array | None:
    xg, kept = saved  # R_g(x), and R_s(z) or R_s(a)
    dz = act.backward(da, kept if act.saves == "z" else None, kept if act.saves == "a" else None)
    np.sum(dz, axis=0, out=db)
    dzg = round_to(np, dz, p.gemm)
    np.matmul(xg.T, dzg, out=dw)
    return round_to(np, dzg @ round_to(np, w, p.gemm).T, p.store) if need_dx else None


# --- dropout: the mask from gpubp._random's counter-based generator ------------------------------


def dropout_forward(x: Array, key: int, p: float, precision: Precision | None = None) -> tuple[Array, Array]:
    """y = x * keep / (1 - p); returns (y, keep). Under a precision: y = R_s(x * keep / (1 - p))."""
    keep = dropout_keep(np, key, x.shape, p)
    y = x * keep * x.dtype.type(1.0 / (1.0 - p))
    prec = active(precision)
    return (y if prec is None else round_to(np, y, prec.store, out=y)), keep


def dropout_backward(dy: Array, keep: Array, p: float, precision: Precision | None = None) -> Array:
    """dx = dy * keep / (1 - p). Under a precision: dx = R_s(dy * keep / (1 - p))."""
    dx = dy * keep * dy.dtype.type(1.0 / (1.0 - p))
    prec = active(precision)
    return dx if prec is None else round_to(np, dx, prec.store, out=dx)


# --- the interface ---------------------------------------------------------------------------


class NumpyBackend(Backend):
    """The backend interface over this module's functions and ``numpy_optim`` (looked up at call time)."""

    name = "numpy"
    xp = np

    def __repr__(self) -> str:
        return "NumpyBackend()"

    # array helpers
    def is_device_array(self, x: Any) -> bool:
        return False  # host arrays are validated on the host

    def asarray(self, x: Any, dtype: Any) -> Array:
        return np.ascontiguousarray(x, dtype=dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.array(x, copy=True)

    def full(self, shape: Any, value: float, dtype: Any) -> Array:
        return numpy_optim.full(shape, value, dtype)

    def assign_(self, dst: Array, src: np.ndarray) -> None:
        numpy_optim.assign_(dst, src)

    def take_rows(self, data: Array, index: slice | np.ndarray) -> Array:
        return np.ascontiguousarray(data[index])

    # dense layer
    def dense_forward(self, x: Array, w: Array, b: Array, act: Activation, training: bool,
                      precision: Precision | None = None) -> tuple[Array, tuple]:
        return dense_forward(x, w, b, act, training, precision)

    def dense_backward(
        self, da: Array, saved: tuple, w: Array, act: Activation, dw: Array, db: Array, need_dx: bool,
        precision: Precision | None = None,
    ) -> Array | None:
        return dense_backward(da, saved, w, act, dw, db, need_dx, precision)

    # dropout
    def dropout_forward(self, x: Array, key: int, p: float, precision: Precision | None = None) -> tuple[Array, Array]:
        return dropout_forward(x, key, p, precision)

    def dropout_backward(self, dy: Array, keep: Array, p: float, precision: Precision | None = None) -> Array:
        return dropout_backward(dy, keep, p, precision)

    # losses: the row's NumPy spec
    def loss(self, rule: LossRule, pred: Array, target: Array, scale: float,
             weight: Array | None = None) -> tuple[float, Array]:
        return rule.spec(pred, target, scale) if weight is None else rule.spec(pred, target, scale, weight)

    # optimizer updates: the rule's NumPy spec (the guard is read on the host: it is here already)
    def update(self, rule: Rule, p: Array, g: Array, state: tuple, hp: Hyper, guard: Array | None = None) -> None:
        rule.live(state, hp)
        if guard is None or not guard[0]:
            rule.spec(p, g, state, hp)

    def flag_nonfinite_(self, value: float, g: Array, flag: Array, tag: int) -> None:
        if not flag[0] and not (np.isfinite(value) and np.isfinite(g).all()):
            flag[0] = tag

    # reductions
    def reduce_into(self, g: Array, out: Array, op: str, *, accumulate: bool = False) -> None:
        if op == "sumsq":
            total = numpy_optim.sum_of_squares(g)
            out[0] = (float(out[0]) + total) if accumulate else total
        elif op == "maxabs":
            m = numpy_optim.max_abs(g)
            out[0] = np.maximum(out[0], m) if accumulate else m  # np.maximum: NaN wins
        else:
            raise ValueError(f"op: expected 'sumsq' or 'maxabs', got {op!r}")

    def scale_(self, g: Array, c: float) -> None:
        numpy_optim.scale_(g, c)

    def clip_scale_(self, g: Array, total_sq: Array, max_norm: float) -> None:
        coef = max_norm / (float(np.sqrt(total_sq[0])) + 1e-6)
        if coef < 1.0:
            numpy_optim.scale_(g, coef)


#: The one instance (the backend holds no state).
BACKEND = NumpyBackend()
