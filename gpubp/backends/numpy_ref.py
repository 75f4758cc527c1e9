"""The NumPy reference backend: the spec every other backend is checked against.

Clear before fast. Every function computes in the dtype of its inputs (float32 or
float64), except loss values, which are accumulated in float64. Shapes:
x (N, in), W (in, out), b (out,), z = x @ W + b (N, out), a = f(z).

The maths are the module's functions (dense_forward / dense_backward, dropout; the
reductions live beside them in ``numpy_optim``, each optimizer's update is its rule's
NumPy spec in ``gpubp/optim/``, each loss its row's NumPy spec in ``gpubp/losses/``);
:class:`NumpyBackend` implements the backend interface (gpubp.backends.base.Backend) by
calling them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from gpubp._random import dropout_keep
from gpubp.activations import Activation
from gpubp.backends import numpy_optim
from gpubp.backends.base import Backend

if TYPE_CHECKING:
    from gpubp.backends.rows import Hyper, LossRule, Rule

Array = np.ndarray


# --- dense layer: forward and backward as a pair -----------------------------------------


def dense_forward(x: Array, w: Array, b: Array, act: Activation, training: bool) -> tuple[Array, tuple]:
    """a = f(x @ W + b).

    x (N, in), w (in, out), b (out,) -> a (N, out).
    Returns ``(a, saved)``; ``saved`` is what :func:`dense_backward` needs and
    nothing more: ``(x, z)`` or ``(x, a)`` as ``act.saves`` says, or ``()`` when
    not training.
    """
    z = x @ w
    z += b
    a = act.forward(z)
    if not training:
        return a, ()
    kept = {"z": z, "a": a, "": None}[act.saves]
    return a, (x, kept)


def dense_backward(
    da: Array, saved: tuple, w: Array, act: Activation, dw: Array, db: Array, need_dx: bool
) -> Array | None:
    """Backward of :func:`dense_forward`, given da = dL/da (N, out).

        dz = da * f'(z)      (N, out)
        dW = x^T @ dz        (in, out)   written into ``dw`` (=, not +=)
        db = sum_rows dz     (out,)      written into ``db``
        dx = dz @ W^T        (N, in)     returned when ``need_dx``, else None
    """
    x, kept = saved
    z = kept if act.saves == "z" else None
    a = kept if act.saves == "a" else None
    dz = act.backward(da, z, a)
    np.matmul(x.T, dz, out=dw)
    np.sum(dz, axis=0, out=db)
    return dz @ w.T if need_dx else None


# --- dropout: the mask from gpubp._random's counter-based generator ------------------------------


def dropout_forward(x: Array, key: int, p: float) -> tuple[Array, Array]:
    """y = x * keep / (1 - p); returns (y, keep)."""
    keep = dropout_keep(np, key, x.shape, p)
    return x * keep * x.dtype.type(1.0 / (1.0 - p)), keep


def dropout_backward(dy: Array, keep: Array, p: float) -> Array:
    """dx = dy * keep / (1 - p)."""
    return dy * keep * dy.dtype.type(1.0 / (1.0 - p))


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
    def dense_forward(self, x: Array, w: Array, b: Array, act: Activation, training: bool) -> tuple[Array, tuple]:
        return dense_forward(x, w, b, act, training)

    def dense_backward(
        self, da: Array, saved: tuple, w: Array, act: Activation, dw: Array, db: Array, need_dx: bool
    ) -> Array | None:
        return dense_backward(da, saved, w, act, dw, db, need_dx)

    # dropout
    def dropout_forward(self, x: Array, key: int, p: float) -> tuple[Array, Array]:
        return dropout_forward(x, key, p)

    def dropout_backward(self, dy: Array, keep: Array, p: float) -> Array:
        return dropout_backward(dy, keep, p)

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
