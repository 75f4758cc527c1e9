"""The NumPy reference backend: the spec every other backend is checked against.

Clear before fast. Every function computes in the dtype of its inputs (float32 or
float64), except loss values, which are accumulated in float64. Shapes:
x (N, in), W (in, out), b (out,), z = x @ W + b (N, out), a = f(z).

The maths are the module's functions (dense_forward / dense_backward, the losses;
the reductions live beside them in ``numpy_optim``, each optimizer's update is its
rule's NumPy spec in ``gpubp/optim/``); :class:`NumpyBackend` implements the backend
interface (gpubp.backends.base.Backend) by calling them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from gpubp._random import dropout_keep
from gpubp.activations import Activation, sigmoid
from gpubp.backends import numpy_optim
from gpubp.backends.base import Backend

if TYPE_CHECKING:
    from gpubp.optim.rule import Hyper, Rule

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


# --- losses: value and gradient in one call ------------------------------------------------
# ``scale`` is 1/count for reduction="mean" and 1 for "sum". Values are float64 scalars.
# ``weight``: None (every row counts once: the unweighted maths), or float64 row weights w (N,).
# With weights each row's terms are multiplied by w_i: the value term in float64 (w_i l_i),
# the gradient by the per-row factor dtype(g w_i) (g = 2 scale for MSE, scale otherwise), so
# that w_i = 1 gives the unweighted value and gradient bit for bit. The caller picks ``scale``
# (gpubp.losses: 1 / (per-row count x sum_i w_i) for the weighted mean).


def _row_factor(g: float, weight: Array, dtype: np.dtype) -> Array:
    """dtype(g w_i) as a column (N, 1): the gradient factor of each row."""
    return (g * weight).astype(dtype)[:, None]


def mse(pred: Array, target: Array, scale: float, weight: Array | None = None) -> tuple[float, Array]:
    """L = scale * sum_i w_i sum_j (p_ij - t_ij)^2;  dL/dp_ij = dtype(2 scale w_i) (p_ij - t_ij)  (w = 1 unweighted)."""
    diff = pred - target
    sq = np.square(diff, dtype=np.float64)
    if weight is None:
        value = float(np.sum(sq) * scale)
        return value, diff * pred.dtype.type(2.0 * scale)
    value = float(np.sum(sq * weight[:, None]) * scale)
    return value, diff * _row_factor(2.0 * scale, weight, pred.dtype)


def _log_softmax(z: Array) -> Array:
    """log softmax(z) row-wise via log-sum-exp: z - max - log sum e^(z - max); finite for any finite z."""
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


def cross_entropy(logits: Array, target: Array, scale: float, weight: Array | None = None) -> tuple[float, Array]:
    """Softmax + negative log-likelihood over rows of logits (N, C), rows weighted by w (w = 1 unweighted).

    Integer labels y (N,):       L = scale * sum_n w_n (logsumexp(z_n) - z_n[y_n])
                                 dL/dz_n = dtype(scale w_n) (softmax(z_n) - onehot(y_n))
    Probability targets t (N, C): L = -scale * sum_n w_n sum_c t_nc log softmax(z)_nc
                                 dL/dz_n = dtype(scale w_n) (softmax(z_n) sum_c t_nc - t_n)
    """
    logp = _log_softmax(logits)
    p = np.exp(logp)
    if target.ndim == 1:
        rows = np.arange(logits.shape[0])
        picked = logp[rows, target]
        if weight is None:
            value = -float(np.sum(picked, dtype=np.float64) * scale)
        else:
            value = -float(np.sum(picked * weight) * scale)
        grad = p
        grad[rows, target] -= 1
    else:
        terms = target * logp
        if weight is None:
            value = -float(np.sum(terms, dtype=np.float64) * scale)
        else:
            value = -float(np.sum(terms * weight[:, None]) * scale)
        grad = p * target.sum(axis=1, keepdims=True) - target
    if weight is None:
        grad *= logits.dtype.type(scale)
    else:
        grad *= _row_factor(scale, weight, logits.dtype)
    return value, grad


def bce_with_logits(logits: Array, target: Array, scale: float, weight: Array | None = None) -> tuple[float, Array]:
    """Binary cross-entropy on logits x with targets t in [0, 1], elementwise, rows weighted by w:

        l = max(x, 0) - x t + log(1 + e^-|x|)      (stable for any finite x)
        L = scale * sum_i w_i sum_j l_ij;  dL/dx_ij = dtype(scale w_i) (sigmoid(x_ij) - t_ij)
    """
    zero = logits.dtype.type(0.0)
    elem = np.maximum(logits, zero) - logits * target + np.log1p(np.exp(-np.abs(logits)))
    if weight is None:
        value = float(np.sum(elem, dtype=np.float64) * scale)
        return value, (sigmoid(logits) - target) * logits.dtype.type(scale)
    value = float(np.sum(elem * weight[:, None]) * scale)
    return value, (sigmoid(logits) - target) * _row_factor(scale, weight, logits.dtype)


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

    # losses
    def mse(self, pred: Array, target: Array, scale: float, weight: Array | None = None) -> tuple[float, Array]:
        return mse(pred, target, scale) if weight is None else mse(pred, target, scale, weight)

    def cross_entropy(self, logits: Array, target: Array, scale: float,
                      weight: Array | None = None) -> tuple[float, Array]:
        if weight is None:
            return cross_entropy(logits, target, scale)
        return cross_entropy(logits, target, scale, weight)

    def bce_with_logits(self, logits: Array, target: Array, scale: float,
                        weight: Array | None = None) -> tuple[float, Array]:
        if weight is None:
            return bce_with_logits(logits, target, scale)
        return bce_with_logits(logits, target, scale, weight)

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
