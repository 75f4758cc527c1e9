"""NumPy reference maths of the optimizers: one in-place update over flat arrays.

Every update takes 1-D arrays of one dtype (float32 or float64): the parameters
``p``, their gradients ``g`` and the optimizer's state buffers, all the same
length, usually a whole contiguous run of a model's arena. ``p`` and the state
buffers are updated in place; ``g`` is only read. Hyper-parameters are Python
floats; the maths runs in the arrays' dtype (NumPy casts a Python float operand
to the array's dtype). Scalar factors such as bias corrections are Python floats.

The order of the arithmetic follows torch.optim's CPU code where it changes
the rounding, e.g. ``(lr * m) / denom`` rather than ``lr * (m / denom)``, and
exponential averages written as a linear interpolation ``m + w * (g - m)``.

A CUDA backend provides the same functions with the same signatures.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Array = np.ndarray


# --- helpers ---------------------------------------------------------------------------


def to_numpy(a: Array) -> np.ndarray:
    """A host copy of ``a``."""
    return np.array(a, copy=True)


def assign_(dst: Array, src: np.ndarray) -> None:
    """Copy the host array ``src`` (any shape, ``dst.size`` elements) into ``dst``."""
    np.copyto(dst, np.asarray(src).reshape(dst.shape), casting="no")


def full(n: int, value: float, dtype: Any) -> Array:
    """A new 1-D array of ``n`` elements, all ``value``."""
    return np.full(n, value, dtype=dtype)


def sum_of_squares(g: Array) -> float:
    """Sum of ``g**2``, accumulated in float64 in a fixed order (NumPy's pairwise sum)."""
    return float(np.add.reduce(np.square(g, dtype=np.float64)))


def max_abs(g: Array) -> float:
    """Largest ``|g|`` (0.0 for an empty array), as a Python float."""
    return float(np.max(np.abs(g))) if g.size else 0.0


def scale_(g: Array, c: float) -> None:
    """``g *= c`` in place."""
    np.multiply(g, c, out=g)


def _with_weight_decay(p: Array, g: Array, weight_decay: float) -> Array:
    """``g + weight_decay * p`` as a new array (``g`` itself when weight_decay is 0)."""
    if weight_decay == 0:
        return g
    d = np.multiply(p, weight_decay)
    d += g
    return d


def _lerp_(a: Array, b: Array, weight: float) -> None:
    """``a <- a + weight * (b - a)`` in place.

    For weights of 0.5 and above the same value is formed as
    ``b - (b - a) * (1 - weight)``, which is more accurate there; ``weight`` and
    ``1 - weight`` are rounded to the arrays' dtype first.
    """
    w = a.dtype.type(weight)
    d = np.subtract(b, a)
    if abs(w) < 0.5:
        d *= w
        a += d
    else:
        d *= a.dtype.type(1) - w
        np.subtract(b, d, out=a)


# --- updates ---------------------------------------------------------------------------


def sgd_update(
    p: Array,
    g: Array,
    momentum_buf: Array | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    first_step: bool,
) -> None:
    """SGD with optional momentum, dampening, Nesterov momentum and L2 weight decay.

    d = g + wd * p
    buf = d                                   on the first step
    buf = momentum * buf + (1 - dampening) * d  afterwards
    d = d + momentum * buf (Nesterov)  or  d = buf
    p -= lr * d

    ``momentum_buf`` is used (and may be None) only when ``momentum != 0``.
    """
    d = _with_weight_decay(p, g, weight_decay)
    if momentum != 0:
        if momentum_buf is None:
            raise ValueError("momentum_buf: required when momentum != 0")
        buf = momentum_buf
        if first_step:
            np.copyto(buf, d)
        else:
            buf *= momentum
            if dampening == 0:
                buf += d
            else:
                buf += np.multiply(d, 1.0 - dampening)
        if nesterov:
            nd = np.multiply(buf, momentum)
            nd += d
            d = nd
        else:
            d = buf
    p -= np.multiply(d, lr)


def adam_update(
    p: Array,
    g: Array,
    exp_avg: Array,
    exp_avg_sq: Array,
    max_exp_avg_sq: Array | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    step: int,
    amsgrad: bool,
) -> None:
    """Adam (``decoupled=False``, L2 weight decay) or AdamW (``decoupled=True``).

    AdamW:  p *= 1 - lr * wd          Adam:  g = g + wd * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    vmax = max(vmax, v)   (amsgrad; then vmax replaces v below)
    denom = sqrt(v) / sqrt(1 - beta2**step) + eps
    p -= (lr / (1 - beta1**step)) * m / denom

    ``step`` counts from 1 (this update included).
    """
    if weight_decay != 0 and decoupled:
        p *= 1.0 - lr * weight_decay
        d = g
    else:
        d = _with_weight_decay(p, g, weight_decay)
    _lerp_(exp_avg, d, 1.0 - beta1)
    exp_avg_sq *= beta2
    t = np.multiply(d, 1.0 - beta2)
    t *= d
    exp_avg_sq += t

    step_size = lr / (1.0 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("max_exp_avg_sq: required when amsgrad is True")
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        denom = np.sqrt(max_exp_avg_sq)
    else:
        denom = np.sqrt(exp_avg_sq)
    denom /= bias_correction2_sqrt
    denom += eps
    np.multiply(exp_avg, step_size, out=t)
    t /= denom
    p -= t


def rmsprop_update(
    p: Array,
    g: Array,
    square_avg: Array,
    grad_avg: Array | None,
    momentum_buf: Array | None,
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
) -> None:
    """RMSprop, optionally centred and with momentum.

    g = g + wd * p
    v = alpha * v + (1 - alpha) * g * g
    centred:  gavg = alpha * gavg + (1 - alpha) * g;  avg = sqrt(v - gavg**2) + eps
    else:     avg = sqrt(v) + eps
    momentum > 0:  buf = momentum * buf + g / avg;  p -= lr * buf
    else:          p -= lr * g / avg

    ``grad_avg`` is used only when centred, ``momentum_buf`` only when momentum > 0.
    """
    d = _with_weight_decay(p, g, weight_decay)
    square_avg *= alpha
    t = np.multiply(d, 1.0 - alpha)
    t *= d
    square_avg += t
    if centered:
        if grad_avg is None:
            raise ValueError("grad_avg: required when centered is True")
        _lerp_(grad_avg, d, 1.0 - alpha)
        avg = np.multiply(grad_avg, grad_avg)
        np.subtract(square_avg, avg, out=avg)
        np.sqrt(avg, out=avg)
    else:
        avg = np.sqrt(square_avg)
    avg += eps
    if momentum > 0:
        if momentum_buf is None:
            raise ValueError("momentum_buf: required when momentum > 0")
        momentum_buf *= momentum
        np.divide(d, avg, out=t)
        momentum_buf += t
        np.multiply(momentum_buf, lr, out=t)
    else:
        np.multiply(d, lr, out=t)
        t /= avg
    p -= t


def adagrad_update(
    p: Array,
    g: Array,
    state_sum: Array,
    *,
    lr: float,
    lr_decay: float,
    eps: float,
    weight_decay: float,
    step: int,
) -> None:
    """Adagrad with learning-rate decay.

    g = g + wd * p
    clr = lr / (1 + (step - 1) * lr_decay)
    s += g * g
    p -= clr * g / (sqrt(s) + eps)

    ``step`` counts from 1 (this update included).
    """
    d = _with_weight_decay(p, g, weight_decay)
    clr = lr / (1.0 + (step - 1) * lr_decay)
    t = np.multiply(d, d)
    state_sum += t
    std = np.sqrt(state_sum)
    std += eps
    np.multiply(d, clr, out=t)
    t /= std
    p -= t
