"""The NumPy reference backend: the spec every other backend is checked against.

Clear before fast. Every function computes in the dtype of its inputs (float32 or
float64), except loss values, which are accumulated in float64. Shapes:
x (N, in), W (in, out), b (out,), z = x @ W + b (N, out), a = f(z).

The backend interface (what a layer, a loss or an optimizer may call):
    asarray, to_numpy, zeros                       array helpers
    dense_forward / dense_backward                 a dense layer, as a pair
    mse / cross_entropy / bce_with_logits          loss value and gradient in one call
    all_finite                                     finite check
The optimizer update maths live beside this module in ``numpy_optim`` (``optim``).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from gpubp.activations import Activation, sigmoid
from gpubp.backends import numpy_optim

name = "numpy"
xp = np
optim = numpy_optim  # the optimizer update maths for this backend's arrays
Array = np.ndarray


# --- array helpers ---------------------------------------------------------------------


def asarray(x: Any, dtype: Any) -> Array:
    """C-contiguous array of ``dtype`` (copies only when layout or dtype differ)."""
    return np.ascontiguousarray(x, dtype=dtype)


def to_numpy(x: Any) -> np.ndarray:
    return np.asarray(x)


def dense_ops(impl: str, dtype: Any) -> Any:
    """What runs dense layers: this module (the reference) for ``impl="auto"``."""
    if impl != "auto":
        raise ValueError(f"dense_impl: {impl!r} runs on a CUDA device only; on the CPU use 'auto' (the reference)")
    return sys.modules[__name__]


def is_device_array(x: Any) -> bool:
    """Whether x already lives where this backend computes (never, for the host reference)."""
    return False


def zeros(shape: Any, dtype: Any) -> Array:
    return np.zeros(shape, dtype=dtype)


def all_finite(x: Array) -> bool:
    return bool(np.isfinite(x).all())


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


# --- losses: value and gradient in one call ------------------------------------------------
# ``scale`` is 1/count for reduction="mean" and 1 for "sum". Values are float64 scalars.


def mse(pred: Array, target: Array, scale: float) -> tuple[float, Array]:
    """L = scale * sum (p - t)^2;  dL/dp = 2 scale (p - t)."""
    diff = pred - target
    value = float(np.sum(np.square(diff, dtype=np.float64)) * scale)
    return value, diff * pred.dtype.type(2.0 * scale)


def _log_softmax(z: Array) -> Array:
    """log softmax(z) row-wise via log-sum-exp: z - max - log sum e^(z - max); finite for any finite z."""
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


def cross_entropy(logits: Array, target: Array, scale: float) -> tuple[float, Array]:
    """Softmax + negative log-likelihood over rows of logits (N, C).

    Integer labels y (N,):       L = scale * sum_n (logsumexp(z_n) - z_n[y_n])
                                 dL/dz = scale * (softmax(z) - onehot(y))
    Probability targets t (N, C): L = -scale * sum_n sum_c t_nc log softmax(z)_nc
                                 dL/dz = scale * (softmax(z) * sum_c t_nc - t)
    """
    logp = _log_softmax(logits)
    p = np.exp(logp)
    if target.ndim == 1:
        rows = np.arange(logits.shape[0])
        value = -float(np.sum(logp[rows, target], dtype=np.float64) * scale)
        grad = p
        grad[rows, target] -= 1
    else:
        value = -float(np.sum(target * logp, dtype=np.float64) * scale)
        grad = p * target.sum(axis=1, keepdims=True) - target
    grad *= logits.dtype.type(scale)
    return value, grad


def bce_with_logits(logits: Array, target: Array, scale: float) -> tuple[float, Array]:
    """Binary cross-entropy on logits x with targets t in [0, 1], elementwise:

        l = max(x, 0) - x t + log(1 + e^-|x|)      (stable for any finite x)
        dl/dx = sigmoid(x) - t
    """
    zero = logits.dtype.type(0.0)
    elem = np.maximum(logits, zero) - logits * target + np.log1p(np.exp(-np.abs(logits)))
    value = float(np.sum(elem, dtype=np.float64) * scale)
    return value, (sigmoid(logits) - target) * logits.dtype.type(scale)
